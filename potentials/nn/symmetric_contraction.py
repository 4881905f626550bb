"""MACE's symmetric contraction: the element-dependent many-body product basis.

For every channel ``c`` and output irrep ``L`` (with components ``M``)::

    B[c, LM] = Σ_{ν=1..correlation} Σ_η W^{(ν)}[z, η, c] Σ_{k1..kν} U^{(ν)}_{L,η}[M, k1..kν] Π_i A[c, k_i]

where ``k`` runs over the ``d = Σ(2l+1)`` components of one channel of ``A`` and the ``U^{(ν)}_{L,η}`` form a
basis of the O(3)-equivariant tensors ``Sym^ν(V) → L`` (``V`` = the irreps of one channel), symmetric under
any permutation of ``k1..kν``. Channels are never mixed.

The ``U`` tensors are built here in float64 (no e3nn ``ReducedTensorProducts``, which works in the default
dtype): the degree-ν basis is spanned by the (ν-1) basis coupled with one more input irrep through
``o3.wigner_3j`` and symmetrised over the ν slots; a deterministic Gram–Schmidt (fixed candidate order, no
SVD) turns the candidates into an orthogonal basis, so the same ``U`` is obtained on every machine (the
compressed ``U`` are also persistent buffers, so a checkpoint carries the basis its weights were trained with).
The basis of an output irrep does not depend on which other output irreps are requested.

Evaluation uses the symmetry of ``U``: ``Σ_{k1..kν} U[k] Π A_{k_i} = Σ_{k1≤…≤kν} mult(k) U[k] Π A_{k_i}``, so
the degree-ν monomials of ``A`` (``C(d+ν-1, ν)`` per channel, built recursively from the degree ν-1 ones) are
contracted with the compressed ``U`` in one matmul per ν. The largest intermediate is
``[n, C, C(d+ν-1, ν)]`` (816 numbers per channel for d=16, ν=3).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator

import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.nn.ops import is_tracing

# A candidate (unit norm before symmetrisation) whose component orthogonal to the current basis has a norm
# below this is taken as linearly dependent (or as killed by the symmetrisation). Dependent candidates leave
# ~1e-15 residuals, independent ones O(1e-2..1): the gap is wide.
_RANK_TOL = 1e-8


def _symmetrise(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Mean of ``x`` [2L+1, d, …, d] over all permutations of its ν trailing axes."""
    if nu == 1:
        return x
    perms = list(itertools.permutations(range(1, nu + 1)))
    out = torch.zeros_like(x)
    for p in perms:
        out = out + x.permute(0, *p)
    return out / len(perms)


def _gram_schmidt(cands: list[torch.Tensor]) -> list[torch.Tensor]:
    """Orthonormal basis (deterministic, in candidate order) of the span of flattened ``cands``.

    The candidates must have a norm of at most ~1 on a meaningful scale (here: unit norm before the
    symmetrisation), so that the absolute tolerance tells "killed by symmetrisation / dependent" from real.
    """
    flat = torch.stack([c.reshape(-1) for c in cands])
    basis = torch.empty(0, flat.shape[1], dtype=flat.dtype)
    for v in flat:
        if v.norm() <= _RANK_TOL:
            continue
        for _ in range(2):  # re-orthogonalise once: "twice is enough"
            v = v - basis.T @ (basis @ v)
        nv = v.norm()
        if nv > _RANK_TOL:
            basis = torch.cat([basis, (v / nv)[None]])
    return list(basis)


def _parse(irreps: str) -> list[o3.Irrep]:
    return [ir for mul, ir in o3.Irreps(irreps) for _ in range(mul)]


@contextlib.contextmanager
def _one_thread():
    """Run torch single-threaded inside the block (restored after).

    The construction is thousands of tiny ops; with intra-op threads on a loaded machine each one can stall
    on the thread pool (measured: 0.2 s single-threaded vs 8 s with 2 threads under load).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def symmetric_basis(
    irreps: str, correlation: int, targets: str | None = None
) -> dict[int, dict[o3.Irrep, torch.Tensor]]:
    """Equivariant symmetric tensors for one channel.

    ``irreps``: the irreps of one channel (multiplicity 1 each, e.g. ``"0e+1o+2e+3o"``; d = its dim);
    ``targets``: the output irreps wanted (``None``: all reachable). Returns ``{ν: {L: U}}`` for
    ``ν = 1..correlation`` with ``U`` [n_paths, 2L+1, d, …, d] (ν trailing axes), float64, symmetric in the
    ν trailing axes, equivariant (``U(D_V(R)^{⊗ν} x) = D_L(R) U x``), orthogonal in its paths and normalised
    to ``Σ U_η² = 2L+1`` (component normalisation: the ν=1 basis is the plain selection of a slot).
    Irreps with no path at some ν are absent from that ν's dict. Cached: treat the tensors as read-only.
    """
    if correlation < 1:
        raise PotentialsError(f"symmetric contraction: correlation must be >= 1, got {correlation}")
    with _one_thread():
        return _build_basis(irreps, correlation, targets)


def _build_basis(irreps: str, correlation: int, targets: str | None) -> dict[int, dict[o3.Irrep, torch.Tensor]]:
    slots = _parse(irreps)
    if not slots:
        raise PotentialsError("symmetric contraction: empty input irreps")
    d = sum(ir.dim for ir in slots)
    offsets = [sum(ir.dim for ir in slots[:i]) for i in range(len(slots))]
    lmax = max(ir.l for ir in slots)
    wanted = None if targets is None else {ir for _, ir in o3.Irreps(targets)}

    def keep(ir: o3.Irrep, nu: int) -> bool:
        """Can ``ir`` at degree ν still lead to a wanted irrep (needed for output or as an intermediate)?"""
        if wanted is None:
            return True
        reach = (correlation - nu) * lmax
        return any(abs(ir.l - t.l) <= reach for t in wanted)

    # ν = 1: one path per input slot (the selection of that slot's components).
    level: dict[o3.Irrep, list[torch.Tensor]] = {}
    for ir, off in zip(slots, offsets):
        if keep(ir, 1):
            u = torch.zeros(ir.dim, d, dtype=torch.float64)
            u[:, off:off + ir.dim] = torch.eye(ir.dim, dtype=torch.float64)
            level.setdefault(ir, []).append(u)
    result = {1: {ir: torch.stack(us) for ir, us in level.items()}}

    for nu in range(2, correlation + 1):
        cands: dict[o3.Irrep, list[torch.Tensor]] = {}
        for lam, us in result[nu - 1].items():
            for ir, off in zip(slots, offsets):
                for out in lam * ir:
                    if not keep(out, nu):
                        continue
                    w3j = o3.wigner_3j(lam.l, ir.l, out.l, dtype=torch.float64)  # [2λ+1, 2l+1, 2L+1]
                    for u in us:  # u: [2λ+1, d, …, d] (ν-1 axes)
                        c = torch.einsum("mnM,m...->M...n", w3j, u)
                        full = torch.zeros(*c.shape[:-1], d, dtype=torch.float64)
                        full[..., off:off + ir.dim] = c
                        # unit norm *before* symmetrising: a candidate the symmetrisation kills is then ~1e-16
                        cands.setdefault(out, []).append(_symmetrise(full / full.norm(), nu))
        level_out = {}
        for out, cs in sorted(cands.items(), key=lambda kv: (kv[0].l, kv[0].p)):
            basis = _gram_schmidt(cs)
            if basis:
                shape = (out.dim,) + (d,) * nu
                level_out[out] = torch.stack(basis).reshape(len(basis), *shape) * math.sqrt(out.dim)
        result[nu] = level_out
    if wanted is not None:
        result = {nu: {ir: u for ir, u in lev.items() if ir in wanted} for nu, lev in result.items()}
    return result


@functools.lru_cache(maxsize=None)
def _monomials(d: int, nu: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted index tuples ``k1≤…≤kν`` over ``range(d)`` (lexicographic).

    Returns ``(idx [m, ν], mult [m], parent [m], last [m])``: ``mult`` = number of distinct permutations of the
    tuple, ``parent`` = position of ``idx[:, :-1]`` in the degree ν-1 list, ``last`` = ``idx[:, -1]``.
    """
    tuples = list(itertools.combinations_with_replacement(range(d), nu))
    idx = torch.tensor(tuples, dtype=torch.long).reshape(len(tuples), nu)
    mult = torch.tensor(
        [math.factorial(nu) / math.prod(math.factorial(t.count(k)) for k in set(t)) for t in tuples],
        dtype=torch.float64,
    )
    if nu == 1:
        parent = torch.zeros(len(tuples), dtype=torch.long)
    else:
        pos = {t: i for i, t in enumerate(itertools.combinations_with_replacement(range(d), nu - 1))}
        parent = torch.tensor([pos[t[:-1]] for t in tuples], dtype=torch.long)
    return idx, mult, parent, idx[:, -1].clone()


ROWS_PER_CHUNK = 2048  # (node, channel) rows per chunk of the contraction


class SymmetricContraction(torch.nn.Module):
    """Element-dependent symmetric contraction of ``A`` with itself, ν = 1..``correlation`` factors.

    ``irreps_in``: ``C x ir_1 + C x ir_2 + …`` (one common multiplicity C); ``irreps_out``: ``C x L_1 + …``
    (same C, every ``L`` reachable from the input at some ν ≤ correlation).
    Shapes: ``a`` [n, irreps_in.dim], ``species`` [n] long in ``[0, num_elements)`` → [n, irreps_out.dim].

    Parameters: ``weights[i]`` [num_elements, n_paths(L_i), C] for output irrep ``L_i``, the paths of all ν
    concatenated in ν order (``path_slices[i][ν]`` locates them); initialised ``randn / n_paths(ν, L_i)``.
    Buffers ``U_{ν}``: the compressed bases [C(d+ν-1, ν), Σ_L n_paths(ν, L)(2L+1)], float64 when built.
    """

    def __init__(self, irreps_in, irreps_out, correlation: int, num_elements: int):
        super().__init__()
        irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        try:
            corr = operator.index(correlation)
        except TypeError:
            corr = 0
        if corr < 1:
            raise PotentialsError(f"symmetric contraction: correlation must be an integer >= 1, got {correlation!r}")
        correlation = corr
        if num_elements < 1:
            raise PotentialsError(f"symmetric contraction: num_elements must be >= 1, got {num_elements}")
        if len(irreps_in) == 0 or len(irreps_out) == 0:
            raise PotentialsError(
                f"symmetric contraction: empty irreps (irreps_in={irreps_in}, irreps_out={irreps_out})"
            )
        c_in = channels_of(irreps_in)
        c_out = channels_of(irreps_out)
        if c_in != c_out:
            raise PotentialsError(
                f"symmetric contraction is channel-wise: irreps_out {irreps_out} must have the multiplicity "
                f"{c_in} of irreps_in {irreps_in}, got {c_out}"
            )
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        self.correlation, self.num_elements, self.channels = correlation, num_elements, c_in

        channel_irreps = "+".join(str(ir) for _, ir in irreps_in)
        targets = "+".join(str(ir) for ir in sorted({ir for _, ir in irreps_out}))
        basis = symmetric_basis(channel_irreps, correlation, targets)
        self.dim_channel = d = sum(ir.dim for _, ir in irreps_in)

        out_irs = [ir for _, ir in irreps_out]
        unreachable = [str(ir) for ir in out_irs if not any(ir in basis[nu] for nu in basis)]
        if unreachable:
            raise PotentialsError(
                f"symmetric contraction: output irreps {', '.join(unreachable)} of irreps_out {irreps_out} "
                f"cannot be reached from {channel_irreps} with correlation {correlation}"
            )

        # Per ν: one matrix [n_monomials, Σ_L n_paths(2L+1)] with columns (L over distinct output irreps, path, M).
        self.distinct = sorted(set(out_irs))
        self.n_paths: dict[int, dict[o3.Irrep, int]] = {}
        for nu in range(1, correlation + 1):
            idx, mult, parent, last = _monomials(d, nu)
            cols, counts = [], {}
            for ir in self.distinct:
                if ir in basis[nu]:
                    u = basis[nu][ir]  # [P, 2L+1, d, …, d]
                    flat = u.reshape(u.shape[0] * u.shape[1], -1)
                    lin = torch.zeros(idx.shape[0], dtype=torch.long)
                    for i in range(nu):
                        lin = lin * d + idx[:, i]
                    cols.append(flat[:, lin].T * mult[:, None])  # [m, P(2L+1)]
                    counts[ir] = u.shape[0]
            self.n_paths[nu] = counts
            mat = torch.cat(cols, dim=1) if cols else torch.zeros(idx.shape[0], 0, dtype=torch.float64)
            self.register_buffer(f"U_{nu}", mat.contiguous())
            if nu > 1:
                self.register_buffer(f"parent_{nu}", parent, persistent=False)
                self.register_buffer(f"last_{nu}", last, persistent=False)

        # Weights per output irrep (entry of irreps_out, duplicates get their own weights).
        self.weights = torch.nn.ParameterList()
        self.path_slices: list[dict[int, slice]] = []
        for ir in out_irs:
            slices, start, parts = {}, 0, []
            for nu in range(1, correlation + 1):
                p = self.n_paths[nu].get(ir, 0)
                if p:
                    slices[nu] = slice(start, start + p)
                    start += p
                    parts.append(torch.randn(num_elements, p, c_in) / p)
            self.path_slices.append(slices)
            self.weights.append(torch.nn.Parameter(torch.cat(parts, dim=1)))

    def paths(self, ir) -> dict[int, int]:
        """Number of paths ``{ν: n_paths(ν, ir)}`` for an output irrep ``ir``."""
        ir = o3.Irrep(ir)
        return {nu: c[ir] for nu, c in self.n_paths.items() if ir in c}

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        if is_tracing():  # one pass: a loop over row chunks would fix n in the traced graph
            return from_channels_last(self._contract(to_channels_last(a, self.irreps_in), species), self.irreps_out)
        if n == 0:  # from_channels_last cannot reshape an empty batch
            return a.new_zeros(0, self.irreps_out.dim)
        x = to_channels_last(a, self.irreps_in)  # [n, C, d]
        # Rows of ~ROWS_PER_CHUNK (node, channel) pairs at a time: the monomial tensors ([rows, C(d+ν-1, ν)], 816
        # columns at d=16, ν=3) then stay cache-sized, which is 2-4x faster on CPU than one pass over all nodes.
        step = max(1, ROWS_PER_CHUNK // self.channels)
        parts = [self._contract(x[i:i + step], species[i:i + step]) for i in range(0, n, step)]
        return from_channels_last(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0), self.irreps_out)

    def _contract(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """x [n, C, d] (channels-last) → [n, C, Σ_out (2L+1)] (channels-last).

        Works component-major ([d, n·C]): the monomial gathers then copy whole rows (and their backward adds whole
        rows) instead of picking single elements out of every length-d row."""
        n, c, d = x.shape
        xt = x.permute(2, 0, 1).reshape(d, n * c)
        feats: dict[o3.Irrep, list[torch.Tensor]] = {ir: [] for ir in self.distinct}
        mono = xt
        for nu in range(1, self.correlation + 1):
            if nu > 1:
                parent, last = getattr(self, f"parent_{nu}"), getattr(self, f"last_{nu}")
                mono = mono.index_select(0, parent) * xt.index_select(0, last)  # [C(d+ν-1, ν), n·C]
            u = getattr(self, f"U_{nu}")
            if u.shape[1] == 0:
                continue
            y = u.t().to(mono.dtype) @ mono  # [Σ_L P(2L+1), n·C]
            start = 0
            for ir in self.distinct:
                p = self.n_paths[nu].get(ir, 0)
                if p:
                    feats[ir].append(y[start:start + p * ir.dim].view(p, ir.dim, n, c))
                    start += p * ir.dim
        cat = {ir: torch.cat(f, dim=0) for ir, f in feats.items()}  # [P_total(L), 2L+1, n, C]
        outs = []
        for (_, ir), w in zip(self.irreps_out, self.weights):
            outs.append(torch.einsum("pmnc,npc->ncm", cat[ir], w.index_select(0, species)))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} -> {self.irreps_out}, correlation={self.correlation}, "
            f"num_elements={self.num_elements}"
        )


# Imported last on purpose: ``potentials.nn.tp`` (package ``__init__``) imports ``cg``, which imports this module's
# ``SymmetricContraction``; importing the helpers after the class is defined keeps either import order working.
from potentials.nn.tp.base import channels_of, from_channels_last, to_channels_last  # noqa: E402
