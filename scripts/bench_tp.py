#!/usr/bin/env python
"""Benchmark the tensor-product engines.

    python scripts/bench_tp.py --json docs/benchmarks/tp.json --markdown docs/benchmarks/tp_tables.md
    python scripts/bench_tp.py --lmax 1..8 --dtypes float32 --no-layer

1. Bare product, inputs/outputs ``0e+1o+…+L`` (single multiplicity, L1 = L2 = Lout = L), ``rows`` = batch × channels
   rows (default 256 × 32 = 8192): e3nn CG ``TensorProduct`` with every parity-allowed path ('uuu', no weights,
   same input/output irreps) vs the ``gaunt_fft`` and ``gaunt_grid`` kernels; forward (no grad) and
   forward+backward (gradients of both inputs).
2. Inside a MACE layer (interaction + product block, correlation 3) with each engine: the whole layer, the edge
   product alone and the product basis alone (CG: symmetric contraction).

Prints machine info, the command, ratio tables (CG time / engine time) and the scaling exponent p of
t ∝ L^p fitted over L = 4…8; JSON records ``{"engine", "L", "dtype", "fwd_ms", "fwd_bwd_ms", "where", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn import o3  # noqa: E402

from potentials.nn.tp import get_engine  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GAUNT = ("gaunt_fft", "gaunt_grid")


def parse_lmax(values: list[str]) -> list[int]:
    out = []
    for v in values:
        if ".." in v:
            a, b = v.split("..")
            out += list(range(int(a), int(b) + 1))
        else:
            out += [int(x) for x in v.split(",") if x]
    return sorted(set(out))


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import e3nn

    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Minimum wall time (ms) over ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def natural(lmax: int, mul: int = 1) -> o3.Irreps:
    return o3.Irreps([(mul, (l, (-1) ** l)) for l in range(lmax + 1)])


def cg_product(lmax: int) -> torch.nn.Module:
    """e3nn full CG product with the same input/output irreps as the Gaunt product (all parity-allowed paths)."""
    ir = natural(lmax)
    ins = [
        (i, j, k, "uuu", False)
        for i, (_, a) in enumerate(ir)
        for j, (_, b) in enumerate(ir)
        for k, (_, c) in enumerate(ir)
        if c in a * b
    ]
    return o3.TensorProduct(ir, ir, ir, ins)


def bench_bare(lmax: int, dtype: torch.dtype, rows: int, repeats: int, device, engines) -> list[dict]:
    d = (lmax + 1) ** 2
    gen = torch.Generator().manual_seed(lmax)
    x = torch.randn(rows, d, generator=gen, dtype=dtype).to(device)
    y = torch.randn(rows, d, generator=gen, dtype=dtype).to(device)
    out = []
    for name in engines:
        if name == "cg":
            mod, detail = cg_product(lmax), "e3nn TensorProduct uuu"
        else:
            mod = get_engine(name).product_kernel(lmax, lmax, lmax)
            detail = describe_kernel(mod)
        mod = mod.to(device=device, dtype=dtype)
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                mod(x, y)

        def fwd_bwd():
            mod(xg, yg).sum().backward()

        out.append(dict(engine=name, L=lmax, dtype=str(dtype).replace("torch.", ""), where="bare", rows=rows,
                        fwd_ms=timeit(fwd, repeats, device), fwd_bwd_ms=timeit(fwd_bwd, repeats, device), detail=detail))
        print(f"  bare L={lmax} {out[-1]['dtype']:<8} {name:<11} fwd {out[-1]['fwd_ms']:9.2f} ms  fwd+bwd "
              f"{out[-1]['fwd_bwd_ms']:9.2f} ms  ({detail})", flush=True)
    return out


def describe_kernel(k) -> str:
    parts = [type(k).__name__]
    if getattr(k, "mode", None):
        parts.append(f"mode={k.mode}")
    if getattr(k, "grid_shape", None):
        parts.append(f"grid={k.grid_shape[0]}x{k.grid_shape[1]}")
    if getattr(k, "n_theta", None):
        parts.append(f"torus={k.n_theta}x{k.n_alpha}")
    strategies = {m.strategy for m in k.modules() if hasattr(m, "strategy") and isinstance(m, torch.nn.Module)}
    if strategies:
        parts.append("/".join(sorted(strategies)))
    return " ".join(parts)


def bench_layer(engine: str, max_ell: int, max_L: int, channels: int, nodes: int, neighbors: int, dtype, repeats,
                device) -> list[dict]:
    """Second MACE layer (node irreps = hidden): interaction + product block; also the edge TP and product basis alone."""
    from potentials.models.mace import natural_irreps
    from potentials.nn.blocks import InteractionBlock, ProductBlock
    from potentials.nn.radial import RadialEmbedding
    from potentials.nn.radials import make_radial_factory

    torch.manual_seed(0)
    eng = get_engine(engine)
    n_el, num_bessel = 2, 8
    irreps_sh = o3.Irreps.spherical_harmonics(max_ell)
    target = o3.Irreps([(channels, ir) for _, ir in irreps_sh])
    hidden = natural_irreps(channels, max_L)
    make_radial = make_radial_factory("mlp", num_bessel, [64, 64, 64])
    inter = InteractionBlock(eng, hidden, irreps_sh, target, hidden, n_el, make_radial, float(neighbors))
    prod = ProductBlock(eng, target, hidden, 3, n_el)
    inter, prod = inter.to(device=device, dtype=dtype), prod.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    e = nodes * neighbors
    node_feats = torch.randn(nodes, hidden.dim, generator=gen, dtype=dtype).to(device)
    species = torch.randint(0, n_el, (nodes,), generator=gen).to(device)
    one_hot = torch.nn.functional.one_hot(species, n_el).to(dtype)
    vec = torch.randn(e, 3, generator=gen, dtype=dtype).to(device)
    lengths = 1.0 + 3.0 * torch.rand(e, 1, generator=gen, dtype=dtype).to(device)
    sh = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
    edge_attrs = sh(vec)
    edge_feats = RadialEmbedding(5.0, num_bessel).to(dtype=dtype, device=device)(lengths)
    centre = torch.arange(nodes, device=device).repeat_interleave(neighbors)
    neighbour = torch.randint(0, nodes, (e,), generator=gen).to(device)
    edge_index = torch.stack([centre, neighbour])
    a_in = torch.randn(nodes, target.dim, generator=gen, dtype=dtype).to(device)
    weights = inter.radial(edge_feats).detach()
    h_nb = node_feats[neighbour]

    def layer(grad: bool):
        nf = node_feats.clone().requires_grad_(grad)
        a, sc = inter(nf, one_hot, edge_attrs, edge_feats, edge_index)
        out = prod(a, species, sc)
        if grad:
            out.sum().backward()

    def edge(grad: bool):
        h = h_nb.clone().requires_grad_(grad)
        out = inter.tp(h, edge_attrs, weights)
        if grad:
            out.sum().backward()

    def basis(grad: bool):
        a = a_in.clone().requires_grad_(grad)
        out = prod.product(a, species)
        if grad:
            out.sum().backward()

    records = []
    for where, fn in (("layer", layer), ("edge_tp", edge), ("product_basis", basis)):
        def f0():
            with torch.no_grad():
                fn(False)

        rec = dict(engine=engine, L=max_ell, dtype=str(dtype).replace("torch.", ""), where=where, max_L=max_L,
                   channels=channels, nodes=nodes, edges=e, correlation=3,
                   fwd_ms=timeit(f0, repeats, device), fwd_bwd_ms=timeit(lambda: fn(True), repeats, device))
        records.append(rec)
        print(f"  {where:<13} ell={max_ell} L={max_L} C={channels} {rec['dtype']:<8} {engine:<11} fwd "
              f"{rec['fwd_ms']:9.2f} ms  fwd+bwd {rec['fwd_bwd_ms']:9.2f} ms", flush=True)
    return records


def fit_exponent(ls: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ls), np.log(ts), 1)[0])


def tables(records: list[dict], lmaxs: list[int]) -> str:
    lines = []
    bare = [r for r in records if r["where"] == "bare"]
    for dt in sorted({r["dtype"] for r in bare}):
        for key, label in (("fwd_bwd_ms", "forward+backward"), ("fwd_ms", "forward")):
            lines += [f"\n### Bare product, {dt}, {label} (ms; × = CG time / engine time)\n",
                      "| L | cg | gaunt_fft | gaunt_grid | fft × | grid × |", "|---|---|---|---|---|---|"]
            by = {(r["engine"], r["L"]): r[key] for r in bare if r["dtype"] == dt}
            for l in lmaxs:
                cg, ff, gr = by.get(("cg", l)), by.get(("gaunt_fft", l)), by.get(("gaunt_grid", l))
                fmt = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
                rat = lambda v: f"{cg / v:.1f}" if cg and v else "–"  # noqa: E731
                lines.append(f"| {l} | {fmt(cg)} | {fmt(ff)} | {fmt(gr)} | {rat(ff)} | {rat(gr)} |")
            fit_ls = [l for l in lmaxs if 4 <= l <= 8]
            if len(fit_ls) >= 2:
                exps = []
                for eng in ("cg", *GAUNT):
                    ts = [by.get((eng, l)) for l in fit_ls]
                    if all(ts):
                        exps.append(f"{eng} {fit_exponent(fit_ls, ts):.2f}")
                lines.append(f"\nFitted exponent p (t ∝ L^p, L = {fit_ls[0]}…{fit_ls[-1]}): " + ", ".join(exps))
    layer = [r for r in records if r["where"] != "bare"]
    if layer:
        lines += ["\n### MACE layer (interaction + product, correlation 3)\n",
                  "| where | dtype | ell | L | C | nodes | edges | engine | fwd ms | fwd+bwd ms | CG / engine (fwd+bwd) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in layer:
            cg = next((q["fwd_bwd_ms"] for q in layer if q["engine"] == "cg" and q["where"] == r["where"]
                       and q["dtype"] == r["dtype"] and q["L"] == r["L"] and q["max_L"] == r["max_L"]), None)
            lines.append(f"| {r['where']} | {r['dtype']} | {r['L']} | {r['max_L']} | {r['channels']} | {r['nodes']} | "
                         f"{r['edges']} | {r['engine']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{cg / r['fwd_bwd_ms']:.1f} |" if cg else "")
    return "\n".join(lines)


def target_report(records: list[dict]) -> str:
    """The issue's targets (float32, fwd+bwd) against the measurements."""
    by = {(r["engine"], r["L"]): r["fwd_bwd_ms"] for r in records if r["where"] == "bare" and r["dtype"] == "float32"}
    out = []

    def ratio(eng, l):
        return by[("cg", l)] / by[(eng, l)] if ("cg", l) in by and (eng, l) in by else None

    for eng, l, want in (("gaunt_grid", 6, 3.0), ("gaunt_grid", 8, 6.0), ("gaunt_fft", 6, 1.0), ("gaunt_fft", 7, 1.0), ("gaunt_fft", 8, 1.0)):
        r = ratio(eng, l)
        if r is not None:
            verdict = "met" if r >= want else f"MISSED by {want / r:.2f}x"
            out.append(f"- {eng} vs CG at L={l}: {r:.1f}x faster (target >= {want:g}x): {verdict}")
    fit_ls = sorted(l for (e, l) in by if e == "gaunt_grid" and 4 <= l <= 8)
    if len(fit_ls) >= 2:
        for eng in ("cg", *GAUNT):
            ts = [by.get((eng, l)) for l in fit_ls]
            if all(ts):
                p = fit_exponent(fit_ls, ts)
                tail = "" if eng == "cg" else (": met" if p <= 2.5 else f": MISSED by {p - 2.5:.2f}")
                out.append(f"- fitted exponent {eng} (L={fit_ls[0]}..{fit_ls[-1]}): {p:.2f}" + ("" if eng == "cg" else " (target <= 2.5)") + tail)
    pb = {(r["engine"], r["dtype"], r["max_L"]): r["fwd_bwd_ms"] for r in records if r["where"] == "product_basis"}
    for (eng, dt, ml), t in sorted(pb.items()):
        if eng != "cg" and ("cg", dt, ml) in pb:
            r = pb[("cg", dt, ml)] / t
            verdict = "met" if r >= 2 else f"MISSED by {2 / r:.2f}x"
            out.append(f"- product basis {eng} vs CG symmetric contraction ({dt}, L={ml}): {r:.1f}x (target >= 2x): {verdict}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the records and machine info to this file")
    p.add_argument("--markdown", help="write the tables to this file")
    p.add_argument("--lmax", nargs="+", default=["1..8"], help="degrees, e.g. 1..8 or 2 4 6 8")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=sorted(DTYPES))
    p.add_argument("--engines", nargs="+", default=["cg", *GAUNT])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--channels", type=int, default=32, help="bare product rows = batch × channels")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-layer", action="store_true", help="skip the MACE-layer benchmark")
    p.add_argument("--layer", nargs="+", default=["3:1", "3:2"], help="MACE layers as max_ell:max_L")
    p.add_argument("--layer-channels", type=int, default=32)
    p.add_argument("--layer-nodes", type=int, default=500)
    p.add_argument("--layer-neighbors", type=int, default=16)
    p.add_argument("--cg-max-l", type=int, default=8, help="skip the CG product above this degree (slow)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lmaxs = parse_lmax(args.lmax)
    rows = args.batch * args.channels
    info = machine_info()
    command = "python " + " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "scripts/bench_tp.py", *sys.argv[1:]])
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    records = []
    t_start = time.time()
    for dt in args.dtypes:
        for lmax in lmaxs:
            engines = [e for e in args.engines if e != "cg" or lmax <= args.cg_max_l]
            records += bench_bare(lmax, DTYPES[dt], rows, args.repeats, device, engines)
    if not args.no_layer:
        for dt in args.dtypes:
            for spec in args.layer:
                ell, lmax_hidden = (int(v) for v in spec.split(":"))
                for eng in args.engines:
                    records += bench_layer(eng, ell, lmax_hidden, args.layer_channels, args.layer_nodes,
                                           args.layer_neighbors, DTYPES[dt], args.repeats, device)
    text = tables(records, lmaxs)
    targets = target_report(records)
    print(text)
    print("\nTargets (float32, forward+backward):\n" + targets)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    info["wall_s"] = round(time.time() - t_start, 1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"command": command, "machine": info, "rows": rows, "records": records}, fh, indent=1)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write(f"Command: `{command}`\n\nMachine: {json.dumps(info)}\n{text}\n\nTargets:\n{targets}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
