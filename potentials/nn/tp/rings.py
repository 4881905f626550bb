"""Ring machinery of the Gaunt engines: separable spherical transforms on θ × α grids.

A spherical function on nodes ``θ_b`` × ``α_a`` is ``f(θ_b, α_a) = Σ_m φ_m(α_a) Σ_{l≥|m|} Λ_{l|m|}(θ_b) x_lm``: an
m-block-sparse "Legendre" step (tables ``Λ`` read off e3nn's own SH, float64) followed by a real DFT in α; the
transpose with quadrature weights projects back. :class:`RingTransform` evaluates it fused (one GEMM with the dense
table, O(L⁴)) or separable (one batched GEMM over the 2L+1 m-slots + one α-DFT GEMM, O(L³)). Used by
``gaunt_grid`` (Gauss–Legendre grid) and ``gaunt_fft`` (uniform torus grid) through :mod:`potentials.nn.tp.gaunt`.
SH conventions: e3nn 0.6 real SH, flat index ``l² + l + m``, 'integral' normalisation.
"""

from __future__ import annotations

import functools
import math

import torch
from e3nn import o3

from potentials.errors import PotentialsError


# ----------------------------------------------------------------------------------------------------------
# Separable tables: Λ_{lk}(θ) from e3nn's SH, m-major ordering, ring grids
# ----------------------------------------------------------------------------------------------------------


def _sh_on_circle(lmax: int, thetas: torch.Tensor, n_alpha: int) -> torch.Tensor:
    """e3nn SH (integral norm, float64) at (θ_b, α_a = 2πa/n_alpha): [n_θ, n_alpha, (L+1)²]. θ may exceed π
    (the trigonometric-polynomial extension used on the torus)."""
    alphas = 2 * math.pi * torch.arange(n_alpha, dtype=torch.float64) / n_alpha
    t, a = torch.meshgrid(thetas.to(torch.float64), alphas, indexing="ij")
    pts = torch.stack([t.sin() * a.sin(), t.cos(), t.sin() * a.cos()], dim=-1)
    return o3.spherical_harmonics(list(range(lmax + 1)), pts, normalize=False, normalization="integral")


def alpha_basis(lmax: int, alphas: torch.Tensor) -> torch.Tensor:
    """``φ_m(α)`` for the 2L+1 ring slots in m-major slot order (0, +1, −1, +2, −2, …): [n_α, 2L+1]."""
    cols = [torch.ones_like(alphas)]
    for k in range(1, lmax + 1):
        cols += [torch.cos(k * alphas), torch.sin(k * alphas)]
    return torch.stack(cols, dim=-1)


@functools.lru_cache(maxsize=None)
def _legendre_table_cached(lmax: int, thetas: tuple[float, ...]) -> torch.Tensor:
    th = torch.tensor(thetas, dtype=torch.float64)
    n_alpha = 2 * lmax + 2  # exact discrete orthogonality of cos/sin(kα) for k ≤ L
    y = _sh_on_circle(lmax, th, n_alpha)  # [nθ, nα, d]
    phi = alpha_basis(lmax, 2 * math.pi * torch.arange(n_alpha, dtype=torch.float64) / n_alpha)  # [nα, 2L+1]
    lam = torch.zeros(len(thetas), 2, lmax + 1, lmax + 1, dtype=torch.float64)  # [θ, sign, k, l]
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            k, slot = abs(m), (0 if m == 0 else 2 * abs(m) - (m > 0))
            col, p = y[:, :, l * l + l + m], phi[:, slot]
            coef = (col * p).sum(-1) / (p * p).sum()
            resid = (col - coef[:, None] * p).abs().max()
            if resid > 1e-12:
                raise RuntimeError(f"e3nn SH Y_{l},{m} is not Λ(β)·φ_m(α) (residual {resid:.1e}); convention changed?")
            lam[:, int(m < 0), k, l] = coef
    if lmax > 0 and (lam[:, 0, 1:] - lam[:, 1, 1:]).abs().max() > 1e-12:
        raise RuntimeError("e3nn SH: Λ_{l,k} differs from Λ_{l,-k}; convention changed?")
    return lam[:, 0]


def legendre_table(lmax: int, thetas: torch.Tensor) -> torch.Tensor:
    """``Λ_{lk}(θ_b)`` such that ``Y_{l,±k}(θ, α) = Λ_{lk}(θ) φ_{±k}(α)``: float64 [n_θ, L+1 (k), L+1 (l)], zero for l < k."""
    return _legendre_table_cached(int(lmax), tuple(float(t) for t in thetas.tolist())).clone()


def m_major_order(lmax: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """SH indices reordered by ring slot: slot 0 = (k=0), then (k, +), (k, −) for k = 1..L; inside a slot l = k..L.

    Returns (perm, blocks): ``x[..., perm]`` is m-major; ``blocks[j] = (k, start, length)`` for slot j.
    """
    perm, blocks = [], []
    for k in range(lmax + 1):
        for sign in ((1,) if k == 0 else (1, -1)):
            start = len(perm)
            perm += [l * l + l + sign * k for l in range(k, lmax + 1)]
            blocks.append((k, start, lmax + 1 - k))
    return perm, blocks


class RingGrid:
    """Nodes ``θ_b`` (n_theta) × equispaced ``α_a = 2πa/n_alpha`` with the two half-transforms' tables.

    Subclasses give ``synthesis(L)`` → Λ [n_theta, L+1, L+1] (evaluate a degree-L expansion at the nodes) and
    ``analysis(L)`` → [n_theta, L+1, L+1] weights such that ``z_lm = Σ_b analysis[b,k,l] ∫ φ_m(α) h(θ_b, α) dα``
    is the exact projection of the sampled product ``h`` on ``Y_lm``. The α integral is the exact
    ``(2π/n_alpha) Σ_a`` for trigonometric degree < n_alpha.
    """

    n_theta: int
    n_alpha: int

    def synthesis(self, lmax: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def analysis(self, lmax: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _pick_separable(lmax: int, n_theta: int, n_alpha: int) -> bool:
    """Cost model (calibrated on this project's CPU, float32, fwd+bwd): the fused dense GEMM costs (L+1)²·G MACs;
    the separable path the padded m-slot GEMMs + one α GEMM plus memory passes over the ring array and the gathers.
    It switches at L ≈ 5 for D = 3L (dense wins below, by up to 2× at L ≤ 3; separable by ~1.5× at L = 8)."""
    d, g = (lmax + 1) ** 2, n_theta * n_alpha
    dense = d * g
    separable = (lmax + 1) * (lmax + 2) * n_theta + (2 * lmax + 1) * g + 24 * (2 * lmax + 1) * n_theta + 8 * d
    return separable < dense


class RingTransform(torch.nn.Module):
    """Degree-L SH coefficients ↔ samples on a :class:`RingGrid`, batch-last layout.

    ``to_grid``: x [M, (L+1)²] → [n_alpha·n_theta, M];  ``from_grid``: [n_alpha·n_theta, M] → [M, (L+1)²].
    Grid points are ordered (α-major, θ-minor). ``strategy``:

    * 'dense': one GEMM with the fused table [(n_α·n_θ), (L+1)²] — O(L⁴), best at small L;
    * 'separable': gather the coefficients into the 2L+1 ring slots (m), one batched GEMM with the
      per-m Legendre tables (block-sparse in m, zero-padded to L+1 rows: O(L³)), one α-DFT GEMM (O(L³));
      a constant number of ops, so autograd's bookkeeping does not grow with L;
    * 'auto': the cheaper by the cost model :func:`_pick_separable`.

    All tables are float64 non-persistent buffers (built once per grid; cast with the module).
    """

    def __init__(self, lmax: int, grid: RingGrid, synthesis: bool, strategy: str = "auto"):
        super().__init__()
        self.lmax, self.synthesis_dir = int(lmax), bool(synthesis)
        nt, na, lmax = grid.n_theta, grid.n_alpha, self.lmax
        if strategy == "auto":
            strategy = "separable" if _pick_separable(lmax, nt, na) else "dense"
        if strategy not in ("dense", "separable"):
            raise PotentialsError(f"unknown ring-transform strategy {strategy!r} (dense | separable | auto)")
        self.strategy, self.n_theta, self.n_alpha = strategy, nt, na
        lam = grid.synthesis(lmax) if synthesis else grid.analysis(lmax)  # [nθ, k, l]
        alphas = 2 * math.pi * torch.arange(na, dtype=torch.float64) / na
        phi = alpha_basis(lmax, alphas)  # [na, 2L+1] slot order
        if not synthesis:
            phi = phi * (2 * math.pi / na)
        slot_k = [0] + [k for k in range(1, lmax + 1) for _ in (0, 1)]
        slot_m = [0] + [m for k in range(1, lmax + 1) for m in (k, -k)]
        d, n_slots, lp = (lmax + 1) ** 2, 2 * lmax + 1, lmax + 1
        if strategy == "dense":
            table = torch.zeros(na, nt, d, dtype=torch.float64)
            for j, (k, m) in enumerate(zip(slot_k, slot_m)):
                for l in range(k, lmax + 1):
                    table[:, :, l * l + l + m] = phi[:, j, None] * lam[None, :, k, l]
            table = table.reshape(na * nt, d)
            self.register_buffer("table", table if synthesis else table.t().contiguous(), persistent=False)
            return
        # padded slot layout: row (j, l) ↔ SH index l²+l+m_j for l ≥ |m_j|, else the zero row d
        gather = torch.tensor([l * l + l + m if l >= k else d for k, m in zip(slot_k, slot_m) for l in range(lp)])
        lam_slots = torch.stack([lam[:, k, :] for k in slot_k])  # [2L+1, nθ, L+1]
        if synthesis:
            self.register_buffer("index", gather, persistent=False)
            self.register_buffer("lam", lam_slots.contiguous(), persistent=False)  # [2L+1, nθ, L+1]
            self.register_buffer("phi", phi.contiguous(), persistent=False)  # [na, 2L+1]
        else:
            valid = (gather < d).nonzero().squeeze(1)
            order = torch.empty(d, dtype=torch.long)
            order[gather[valid]] = valid  # SH index → padded row
            self.register_buffer("index", order, persistent=False)
            self.register_buffer("lam", lam_slots.transpose(1, 2).contiguous(), persistent=False)  # [2L+1, L+1, nθ]
            self.register_buffer("phi", phi.t().contiguous(), persistent=False)  # [2L+1, na]
        self.n_slots, self.lp = n_slots, lp

    def _buf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        t = getattr(self, name)
        return t if t.dtype == like.dtype and t.device == like.device else t.to(dtype=like.dtype, device=like.device)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, (L+1)²] → samples [n_alpha·n_theta, M]."""
        if self.strategy == "dense":
            return self._buf("table", x) @ x.t()
        m = x.shape[0]
        xt = torch.cat([x.t(), x.new_zeros(1, m)], dim=0)  # [(L+1)²+1, M], last row = 0
        xs = xt.index_select(0, self.index).view(self.n_slots, self.lp, m)  # [2L+1, L+1, M]
        ring = torch.bmm(self._buf("lam", x), xs)  # [2L+1, nθ, M]
        return (self._buf("phi", x) @ ring.view(self.n_slots, -1)).view(self.n_alpha * self.n_theta, m)

    def from_grid(self, g: torch.Tensor) -> torch.Tensor:
        """samples [n_alpha·n_theta, M] → projections [M, (L+1)²]."""
        if self.strategy == "dense":
            return g.t() @ self._buf("table", g).t()  # [M, d] contiguous
        m = g.shape[1]
        ring = (self._buf("phi", g) @ g.view(self.n_alpha, -1)).view(self.n_slots, self.n_theta, m)
        z = torch.bmm(self._buf("lam", g), ring).view(self.n_slots * self.lp, m)  # [(2L+1)(L+1), M]
        return z.index_select(0, self.index).t().contiguous()


