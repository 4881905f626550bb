"""Path audit: which couplings an engine represents, compared with the CG (``cg``) engine.

* Edge product ``(l1 p1) ⊗ (l2 p2) → (l3 p3)``: CG has every parity-allowed path into the target irreps, each
  with a free radial weight per channel. A Gaunt engine has only even l1+l2+l3 (G ≡ 0 for odd sums, e.g. the
  cross product 1o⊗1o→1e), natural parity only, and weights factorised per degree (a_{l1}·b_{l2}·d_{l3}).
* Product basis: CG (MACE's symmetric contraction) has one weight per symmetric coupling Sym^ν(V) → L (counted
  here by characters); a Gaunt engine has one per (ν, L): ``P_L[f^ν]``.

Use before training::

    from potentials.nn.tp.audit import path_audit, format_path_audit
    print(format_path_audit(path_audit("gaunt_grid", "8x0e+8x1o", "0e+1o+2e+3o", "8x0e+8x1o+8x2e+8x3o")))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from e3nn import o3

from potentials.errors import PotentialsError

log = logging.getLogger("potentials.nn.tp")

GAUNT_ENGINES = ("gaunt_grid", "gaunt_fft", "auto", "grid", "fft")


@dataclass(frozen=True)
class PathRow:
    """One (l1 p1) ⊗ (l2 p2) → (l3 p3) coupling: is it in the CG engine, in the audited engine?"""

    ir1: o3.Irrep
    ir2: o3.Irrep
    ir3: o3.Irrep
    cg: bool
    engine: bool
    note: str


def _is_gaunt(engine: str) -> bool:
    if engine == "cg":
        return False
    if engine in GAUNT_ENGINES:
        return True
    raise PotentialsError(f"path audit: unknown engine {engine!r} (cg, {', '.join(GAUNT_ENGINES)})")


def path_audit(engine: str, irreps_in1, irreps_in2, irreps_out) -> list[PathRow]:
    """All triangle-allowed (l1, l2 → l3) couplings of ``irreps_in1 ⊗ irreps_in2`` with l3 ≤ max target degree,
    with whether CG (into ``irreps_out``) and ``engine`` represent them."""
    gaunt = _is_gaunt(engine)
    in1, in2, out = o3.Irreps(irreps_in1), o3.Irreps(irreps_in2), o3.Irreps(irreps_out)
    targets = {ir for _, ir in out}
    lmax_out = max(ir.l for ir in targets)
    rows, seen = [], set()
    for _, ir1 in in1:
        for _, ir2 in in2:
            for l3 in range(abs(ir1.l - ir2.l), min(ir1.l + ir2.l, lmax_out) + 1):
                ir3 = o3.Irrep(l3, ir1.p * ir2.p)
                if (ir1, ir2, ir3) in seen:
                    continue
                seen.add((ir1, ir2, ir3))
                in_cg = ir3 in targets
                natural = all(ir.p == (-1) ** ir.l for ir in (ir1, ir2, ir3))
                even = (ir1.l + ir2.l + l3) % 2 == 0
                in_engine = in_cg and (not gaunt or (even and natural))
                if not even:
                    note = "odd l-sum: Gaunt coefficient ≡ 0" + (", CG only" if in_cg else f"; target has no {ir3}")
                elif not natural:
                    note = "pseudo parity: not representable by Gaunt" if gaunt else ""
                elif not in_cg:
                    note = f"target has no {ir3}"
                else:
                    note = "fixed coefficient c(l1,l2,l3), factorised weight" if gaunt else "free weight per channel"
                rows.append(PathRow(ir1, ir2, ir3, in_cg, in_engine, note))
    return rows


def format_path_audit(rows: list[PathRow], engine: str = "", channels: int | None = None) -> str:
    """A short text table of :func:`path_audit` rows, with a summary line."""
    lines = [f"{'path':<18}{'cg':<5}{engine or 'engine':<12}note"]
    for r in rows:
        lines.append(f"{f'{r.ir1}x{r.ir2}->{r.ir3}':<18}{'yes' if r.cg else '-':<5}{'yes' if r.engine else '-':<12}{r.note}")
    n_cg, n_eng = sum(r.cg for r in rows), sum(r.engine for r in rows)
    lost = [f"{r.ir1}x{r.ir2}->{r.ir3}" for r in rows if r.cg and not r.engine]
    summary = f"CG: {n_cg} paths, {engine or 'engine'}: {n_eng} paths; lost: {', '.join(lost) if lost else 'none'}"
    if engine and _is_gaunt(engine) and n_eng:
        summary += "; Gaunt weights are factorised per degree (one radial weight per (channel, degree), not per path)"
        if channels:
            n_deg = len({r.ir1 for r in rows}) + len({r.ir2 for r in rows}) + len({r.ir3 for r in rows if r.engine})
            summary += f"; radial weights per edge: CG {n_cg * channels}, Gaunt {n_deg * channels}"
    return "\n".join(lines + [summary])


# ----------------------------------------------------------------------------------------------------------
# Product basis: symmetric coupling counts by characters
# ----------------------------------------------------------------------------------------------------------


def _chi(ls_parities: list[tuple[int, int]], omega: torch.Tensor, inversion: int) -> torch.Tensor:
    """Character of ⊕ (l, p) at the O(3) element R(ω)·P^inversion."""
    out = torch.zeros_like(omega)
    for l, p in ls_parities:
        chi_l = 1 + 2 * sum(torch.cos(m * omega) for m in range(1, l + 1)) if l else torch.ones_like(omega)
        out = out + (p**inversion) * chi_l
    return out


def symmetric_coupling_count(irreps_channel, nu: int, ir_out) -> int:
    """Multiplicity of ``ir_out`` in Sym^ν(V), V = one channel's irreps (the number of CG product-basis couplings).

    Character formula: h_ν = (1/ν) Σ_{k=1..ν} p_k h_{ν−k} with p_k(g) = χ_V(g^k), averaged over O(3) with χ_out;
    the SO(3) average is exact on a uniform grid in the rotation angle (the integrand is a trig polynomial)."""
    v = [(ir.l, ir.p) for mul, ir in o3.Irreps(irreps_channel) for _ in range(mul)]
    ir_out = o3.Irrep(ir_out)
    lmax = max(l for l, _ in v)
    n = 4 * (nu * lmax + ir_out.l + 4)
    omega = 2 * math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    total = 0.0
    for inv in (0, 1):
        p = [None] + [_chi(v, k * omega, (k * inv) % 2) for k in range(1, nu + 1)]
        h = [torch.ones_like(omega)]
        for m in range(1, nu + 1):
            h.append(sum(p[k] * h[m - k] for k in range(1, m + 1)) / m)
        chi_out = _chi([(ir_out.l, ir_out.p)], omega, inv)
        total += float((h[nu] * chi_out * (1 - torch.cos(omega))).mean()) * 0.5
    count = round(total)
    if abs(total - count) > 1e-6:
        raise RuntimeError(f"character average {total} is not an integer")
    return count


def product_basis_audit(engine: str, irreps_in, irreps_out, correlation: int) -> list[tuple[int, o3.Irrep, int, int]]:
    """Rows (ν, L, CG couplings, engine couplings) per channel and element for the product basis."""
    gaunt = _is_gaunt(engine)
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    channel = o3.Irreps([(1, ir) for _, ir in irreps_in])
    rows = []
    for nu in range(1, correlation + 1):
        for _, ir in irreps_out:
            n_cg = symmetric_coupling_count(channel, nu, ir)
            # Gaunt: P_L[f^ν] is one symmetric coupling, present whenever CG has one of natural parity
            n_eng = (1 if n_cg and ir.p == (-1) ** ir.l else 0) if gaunt else n_cg
            rows.append((nu, ir, n_cg, n_eng))
    return rows


def format_product_audit(rows, engine: str = "") -> str:
    lines = [f"{'nu':<4}{'L':<5}{'cg':<6}{engine or 'engine'}"]
    lines += [f"{nu:<4}{str(ir):<5}{n_cg:<6}{n_eng}" for nu, ir, n_cg, n_eng in rows]
    lines.append(
        f"couplings per channel and element: CG {sum(r[2] for r in rows)}, {engine or 'engine'} {sum(r[3] for r in rows)}"
    )
    return "\n".join(lines)


_LOGGED: set = set()


def log_edge_audit(engine: str, irreps_in1, irreps_in2, irreps_out) -> None:
    """Log the edge-product path audit once per (engine, irreps) at INFO level."""
    key = ("edge", engine, str(irreps_in1), str(irreps_in2), str(irreps_out))
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    channels = o3.Irreps(irreps_in1)[0].mul
    rows = path_audit(engine, irreps_in1, irreps_in2, irreps_out)
    log.info("tp=%s edge product %s x %s -> %s:\n%s", engine, irreps_in1, irreps_in2, irreps_out,
             format_path_audit(rows, engine, channels))


def log_product_audit(engine: str, irreps_in, irreps_out, correlation: int) -> None:
    """Log the product-basis coupling counts once per (engine, irreps, correlation) at INFO level."""
    key = ("product", engine, str(irreps_in), str(irreps_out), int(correlation))
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    rows = product_basis_audit(engine, irreps_in, irreps_out, correlation)
    log.info("tp=%s product basis %s -> %s (correlation %d):\n%s", engine, irreps_in, irreps_out, correlation,
             format_product_audit(rows, engine))
