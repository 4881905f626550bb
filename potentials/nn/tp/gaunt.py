"""Shared maths and modules of the Gaunt tensor-product engines (``gaunt_grid``, ``gaunt_fft``, ``auto``).

Conventions (e3nn 0.6, see ``shared/design/tensor-product-backends.md``):

* real SH ``Y_lm``, flat index ``l² + l + m``; inside the kernels 'integral' normalisation (∫Y² dΩ = 1);
  a point is ``x = (sinβ sinα, cosβ, sinβ cosα)`` and ``Y_lm(β, α) = Λ_{l|m|}(β) · φ_m(α)`` with
  ``φ_0 = 1``, ``φ_m = cos(mα)`` (m > 0), ``sin(|m|α)`` (m < 0); the tables ``Λ`` are read off e3nn's own SH.
* Gaunt coefficients ``G[l1m1, l2m2, l3m3] = ∫ Y Y Y dΩ = c · W`` with ``W = o3.wigner_3j(l1, l2, l3)`` and
  ``c = sqrt((2l1+1)(2l2+1)(2l3+1)/4π) · W[l1, l2, l3]`` (closed form, float64). ``G = 0`` for odd l1+l2+l3.
* For ``f = Σ x_a Y_a`` and ``g = Σ y_b Y_b``: ``P_{≤Lout}(f·g) = Σ_ab G[a, b, :] x_a y_b``. A *bilinear spherical
  product kernel* (:class:`SphericalProductKernel`) computes exactly this; a *power kernel*
  (:class:`SphericalPowerKernel`) computes ``P_{≤Lout}[f^ν]`` for ν = 1..ν_max without truncating the
  intermediate degrees. The engines differ only in the kernel; parameters and weight layout live in the
  shared modules :class:`GauntEdgeTensorProduct` and :class:`GauntProductBasis`, and kernels hold only
  non-persistent buffers, so state dicts are identical across Gaunt engines.

Ring machinery (used by ``gaunt_grid`` on a Gauss–Legendre grid and by ``gaunt_fft`` on the uniform torus grid):
a spherical function on nodes ``θ_b`` × ``α_a`` is ``f(θ_b, α_a) = Σ_m φ_m(α_a) Σ_{l≥|m|} Λ_{l|m|}(θ_b) x_lm``,
i.e. an m-block-sparse "Legendre" step followed by a real DFT in α; the transpose with quadrature weights
projects back. :class:`RingTransform` evaluates it either fused (one GEMM with the dense table, O(L⁴)) or
separable (one batched GEMM over the 2L+1 m-slots + one α-DFT GEMM, O(L³)), whichever is cheaper for the degree.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.nn.tp.base import EdgeTensorProduct, Engine, ProductBasis, channels_of, to_channels_last
from potentials.nn.tp.rings import RingGrid, RingTransform

SQRT_4PI = math.sqrt(4.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------
# Closed-form Gaunt coefficients and dense references
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gaunt_block(l1: int, l2: int, l3: int) -> torch.Tensor:
    if (l1 + l2 + l3) % 2 or not abs(l1 - l2) <= l3 <= l1 + l2:
        return torch.zeros(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1, dtype=torch.float64)
    w = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
    c = math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1) / (4 * math.pi)) * float(w[l1, l2, l3])
    return c * w


def gaunt_coefficients(l1: int, l2: int, l3: int) -> torch.Tensor:
    """``G[m1, m2, m3] = ∫ Y_{l1m1} Y_{l2m2} Y_{l3m3} dΩ`` (e3nn real SH, integral norm), float64 [2l1+1, 2l2+1, 2l3+1]."""
    return _gaunt_block(l1, l2, l3).clone()


@functools.lru_cache(maxsize=None)
def _gaunt_tensor(lmax1: int, lmax2: int, lmax_out: int) -> torch.Tensor:
    g = torch.zeros((lmax1 + 1) ** 2, (lmax2 + 1) ** 2, (lmax_out + 1) ** 2, dtype=torch.float64)
    for l1 in range(lmax1 + 1):
        for l2 in range(lmax2 + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1):
                g[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2, l3 * l3:(l3 + 1) ** 2] = _gaunt_block(l1, l2, l3)
    return g


def gaunt_tensor(lmax1: int, lmax2: int, lmax_out: int) -> torch.Tensor:
    """Dense Gaunt tensor float64 [(L1+1)², (L2+1)², (Lout+1)²] over all degrees ≤ the given maxima."""
    return _gaunt_tensor(lmax1, lmax2, lmax_out).clone()


def _resize_sh(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """Truncate or zero-pad SH coefficients [..., (L+1)²] to degree ``lmax``."""
    d = (lmax + 1) ** 2
    if x.shape[-1] >= d:
        return x[..., :d]
    return torch.nn.functional.pad(x, (0, d - x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# Kernel interfaces
# ----------------------------------------------------------------------------------------------------------


def _flatten_lead(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


class SphericalProductKernel(torch.nn.Module):
    """Bilinear spherical product: ``z[..., c] = Σ_ab G[a, b, c] x[..., a] y[..., b]`` (integral normalisation).

    Shapes: x [..., (L1+1)²], y [..., (L2+1)²] with the same leading dims → z [..., (Lout+1)²]. Equals the
    SH coefficients (≤ Lout) of the product of the functions ``Σ x_a Y_a`` and ``Σ y_b Y_b``. Subclasses
    implement :meth:`_product` on flattened [M, d] inputs; buffers must be non-persistent.
    """

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int):
        super().__init__()
        self.lmax1, self.lmax2, self.lmax_out = int(lmax1), int(lmax2), int(lmax_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1] != y.shape[:-1]:
            lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
            x, y = x.expand(*lead, x.shape[-1]), y.expand(*lead, y.shape[-1])
        x2, lead = _flatten_lead(x)
        y2, _ = _flatten_lead(y)
        if self.lmax1 == 0 or self.lmax2 == 0:  # product with a constant: G[0, b, b] = 1/√4π
            s, f = (x2[:, :1], y2) if self.lmax1 == 0 else (y2[:, :1], x2)
            z = _resize_sh(s * f, self.lmax_out) / SQRT_4PI
        else:
            z = self._product(x2, y2)
        return z.reshape(*lead, z.shape[-1])

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class SphericalPowerKernel(torch.nn.Module):
    """Powers of one spherical function: x [..., (L+1)²] → ``P_{≤Lout}[f^ν]`` [..., ν_max, (Lout+1)²], ν = 1..ν_max,
    ``f = Σ x_a Y_a`` (integral normalisation), intermediate degrees never truncated (f^ν has degree ν·L).
    Subclasses implement :meth:`_powers` (ν = 2..ν_max) on flattened [M, d] inputs."""

    def __init__(self, lmax_in: int, nu_max: int, lmax_out: int):
        super().__init__()
        self.lmax_in, self.nu_max, self.lmax_out = int(lmax_in), int(nu_max), int(lmax_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten_lead(x)
        out = [_resize_sh(x2, self.lmax_out)]
        if self.nu_max > 1:
            if self.lmax_in == 0:  # f constant: f^ν = x0^ν Y_0^ν, Y_0 = 1/√4π
                out += [_resize_sh(x2[:, :1] ** nu / SQRT_4PI ** (nu - 1), self.lmax_out) for nu in range(2, self.nu_max + 1)]
            else:
                p = self._powers(x2)  # [M, ν_max−1, d_out]
                out += list(p.unbind(1))
        z = torch.stack(out, dim=1)
        return z.reshape(*lead, self.nu_max, z.shape[-1])

    def _powers(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class RingProductKernel(SphericalProductKernel):
    """Product on a ring grid: two syntheses, a pointwise product and one exact analysis."""

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int, grid: RingGrid, strategy: str = "auto"):
        super().__init__(lmax1, lmax2, lmax_out)
        self.grid_shape = (grid.n_theta, grid.n_alpha)
        if self.lmax1 and self.lmax2:
            self.t1 = RingTransform(self.lmax1, grid, True, strategy)
            self.t2 = self.t1 if self.lmax2 == self.lmax1 else RingTransform(self.lmax2, grid, True, strategy)
            self.t_out = RingTransform(self.lmax_out, grid, False, strategy)

    def _product(self, x, y):
        return self.t_out.from_grid(self.t1.to_grid(x) * self.t2.to_grid(y))


class RingPowerKernel(SphericalPowerKernel):
    """Powers on a ring grid: one synthesis, pointwise powers, one analysis of all stacked powers."""

    def __init__(self, lmax_in: int, nu_max: int, lmax_out: int, grid: RingGrid, strategy: str = "auto"):
        super().__init__(lmax_in, nu_max, lmax_out)
        self.grid_shape = (grid.n_theta, grid.n_alpha)
        if self.lmax_in and self.nu_max > 1:
            self.t_in = RingTransform(self.lmax_in, grid, True, strategy)
            self.t_out = RingTransform(self.lmax_out, grid, False, strategy)

    def _powers(self, x):
        f = self.t_in.to_grid(x)  # [G, M]
        p, powers = f, []
        for _ in range(2, self.nu_max + 1):
            p = p * f
            powers.append(p)
        stacked = torch.stack(powers, dim=-1).reshape(f.shape[0], -1)  # [G, M·(ν−1)]
        z = self.t_out.from_grid(stacked)  # [M·(ν−1), d]
        return z.reshape(x.shape[0], self.nu_max - 1, z.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Irreps handling
# ----------------------------------------------------------------------------------------------------------


class _Degrees:
    """Layout of ``C x (natural-parity irreps)`` with distinct degrees, embedded in the full SH layout 0..L."""

    def __init__(self, irreps: o3.Irreps, what: str, single: bool = False):
        irreps = o3.Irreps(irreps)
        if len(irreps) == 0:
            raise PotentialsError(f"Gaunt engines: {what} irreps are empty")
        for _, ir in irreps:
            if ir.p != (-1) ** ir.l:
                raise PotentialsError(
                    f"Gaunt engines support natural-parity irreps only (0e, 1o, 2e, 3o, …); {what} irreps "
                    f"{irreps} contain {ir} (pseudo parity). The Gaunt product has no odd l-sum couplings; use model.tp=cg."
                )
        ls = [ir.l for _, ir in irreps]
        if len(set(ls)) != len(ls):
            raise PotentialsError(f"Gaunt engines: {what} irreps {irreps} repeat a degree (one block per l expected)")
        self.channels = 1 if single and all(mul == 1 for mul, _ in irreps) else channels_of(irreps)
        if single and self.channels != 1:
            raise PotentialsError(f"Gaunt engines: {what} irreps {irreps} must have multiplicity 1")
        self.irreps, self.ls, self.lmax = irreps, ls, max(ls)
        self.dim = (self.lmax + 1) ** 2
        order = [i for _, ir in irreps for i in range(ir.l * ir.l, (ir.l + 1) ** 2)]
        self.identity = order == list(range(self.dim))
        self.order = order  # full-layout position of each channel-last component
        deg = sorted(set(ls))
        self.degrees = deg
        # degree slot (index into ``degrees``) of every full-layout component; absent degrees → −1
        self.slot_of_full = [deg.index(l) if l in deg else -1 for l in range(self.lmax + 1) for _ in range(2 * l + 1)]

    def embed(self, xc: torch.Tensor) -> torch.Tensor:
        """[..., Σ(2l+1)] in irreps order → full SH layout [..., (L+1)²] (zeros for absent degrees)."""
        if self.identity:
            return xc
        full = xc.new_zeros(*xc.shape[:-1], self.dim)
        return full.index_copy(-1, torch.tensor(self.order, device=xc.device), xc)

    def extract(self, z: torch.Tensor) -> torch.Tensor:
        """Full SH layout [..., (L+1)²] → [..., Σ(2l+1)] in irreps order."""
        if self.identity:
            return z
        return z.index_select(-1, torch.tensor(self.order, device=z.device))


def _e3nn_layout(z: torch.Tensor, irreps: o3.Irreps) -> torch.Tensor:
    """[n, C, Σ(2l+1)] (irreps order) → e3nn layout [n, C·Σ(2l+1)]."""
    if len(irreps) == 1:
        return z.reshape(z.shape[0], -1)
    parts = z.split([ir.dim for _, ir in irreps], dim=-1)
    return torch.cat([p.reshape(z.shape[0], -1) for p in parts], dim=-1)


def _expansion(slot_of_full: list[int], n: int) -> torch.Tensor:
    """0/1 matrix [n, d]: per-degree weights [..., n] @ it → per-component weights [..., d] (0 for absent degrees)."""
    e = torch.zeros(n, len(slot_of_full), dtype=torch.float64)
    for i, slot in enumerate(slot_of_full):
        if slot >= 0:
            e[slot, i] = 1.0
    return e


# ----------------------------------------------------------------------------------------------------------
# Shared modules (parameters and weight layout identical for every Gaunt engine)
# ----------------------------------------------------------------------------------------------------------


class GauntEdgeTensorProduct(EdgeTensorProduct):
    """Interaction edge product ``m = h ⊗ Y(r̂)`` as a Gaunt product with per-degree factorised radial weights.

    For channel c: ``f_c = Σ a_{c,l1}(r) h_{c,l1m1} Y_{l1m1}``, ``g_c = Σ (1 + b_{c,l2}(r)) Y_{l2m2}(r̂) Y_{l2m2}`` and
    ``m_{c,l3m3} = (1 + d_{c,l3}(r)) · √4π · P_{l3m3}[f_c · g_c] / n_{l3}``: every (l1, l2 → l3) path with even
    l1+l2+l3 gets the weight ``a_{c,l1} (1+b_{c,l2}) (1+d_{c,l3}) · G`` — rank one per channel instead of CG's free
    weight per path. (a, b, d) are the radial network's ``weight_numel = C·(n1 + n2 + n3)`` outputs per edge
    (layout [E, C, n1 | n2 | n3]); ``a`` carries the cutoff (the radial net maps 0 to 0), the ``1 +`` keeps the
    init scale of a single radial factor. Fixed factors, identical for every Gaunt engine: ``√4π`` (the model's
    edge SH are 'component'-normalised, so the product is taken between component-normalised expansions) and
    ``n_{l3} = sqrt(4π Σ_{ab} G[a, b, l3m3]²)`` over the present degrees (unit-variance inputs → unit-variance output).

    Shapes: x [E, C x (natural irreps)], y [E, 1 x (0e+1o+…)], weight [E, weight_numel] →
    [E, C x (target degrees reachable with even l-sum, natural parity)].
    """

    def __init__(self, make_kernel: Callable[[int, int, int], SphericalProductKernel], irreps_node, irreps_sh, irreps_target):
        super().__init__()
        node, sh = _Degrees(irreps_node, "node-feature"), _Degrees(irreps_sh, "edge-harmonic", single=True)
        target = _Degrees(irreps_target, "interaction-target")
        c = node.channels
        g = _gaunt_tensor(node.lmax, sh.lmax, target.lmax)
        mask1 = torch.tensor([s >= 0 for s in node.slot_of_full], dtype=torch.float64)
        mask2 = torch.tensor([s >= 0 for s in sh.slot_of_full], dtype=torch.float64)
        norm2 = 4 * math.pi * torch.einsum("abc,a,b->c", g * g, mask1, mask2)  # per output component
        out_ls = [l for l in target.degrees if norm2[l * l:(l + 1) ** 2].sum() > 1e-12]
        if not out_ls:
            raise PotentialsError(f"Gaunt engines: no target degree of {irreps_target} is reachable from {irreps_node} ⊗ {irreps_sh}")
        self.irreps_in1, self.irreps_in2 = node.irreps, sh.irreps
        self.irreps_out = o3.Irreps([(c, (l, (-1) ** l)) for l in out_ls])
        self.out = _Degrees(self.irreps_out, "edge-product output")
        self.node, self.sh, self.channels = node, sh, c
        n1, n2, n3 = len(node.degrees), len(sh.degrees), len(out_ls)
        self.splits = (n1, n2, n3)
        self.weight_numel = c * (n1 + n2 + n3)
        self.kernel = make_kernel(node.lmax, sh.lmax, self.out.lmax)
        norm = norm2[: self.out.dim].clamp(min=1e-30).sqrt()
        self.register_buffer("sh_present", (torch.tensor(sh.slot_of_full) >= 0).to(torch.float64), persistent=False)
        # one GEMM expands [a | b | d] per degree to per component: block-diagonal 0/1 matrix, offsets (0 | 1 | 1)·scale
        scale = SQRT_4PI / norm  # [(Lout+1)²]
        expand = torch.block_diag(
            _expansion(node.slot_of_full, n1), _expansion(sh.slot_of_full, n2), _expansion(self.out.slot_of_full, n3) * scale
        )
        offset = torch.cat([torch.zeros(node.dim, dtype=torch.float64), self.sh_present, scale])
        self.register_buffer("expand", expand, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.dims = (node.dim, sh.dim, self.out.dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        e, c = x.shape[0], self.channels
        w = torch.addmm(self.offset.to(x.dtype), weight.reshape(e * c, -1), self.expand.to(x.dtype))
        a, b, d = w.view(e, c, -1).split(self.dims, dim=-1)  # per-component a, 1+b, (1+d)·√4π/n
        xf = self.node.embed(to_channels_last(x, self.node.irreps)) * a
        yf = self.sh.embed(y)[:, None, :] * b
        z = self.kernel(xf, yf) * d
        return _e3nn_layout(self.out.extract(z), self.irreps_out)


class GauntProductBasis(ProductBasis):
    """Gaunt many-body product basis ``B_{c,LM} = Σ_{ν=1..ν_max} w_{z,ν,c,L} · s_ν · P_{LM}[f_c^ν]``.

    ``f_c = Σ A_{c,lm} Y_lm`` (per channel, no channel mixing); powers are exact (degree ν·L_A kept before the
    projection); ``s_ν = (4π/d)^{(ν−1)/2}`` with ``d = (L_A+1)²`` converts to 'component' coefficients and keeps
    unit-variance inputs O(1). Weights ``weight`` [num_elements, ν_max, C, n_L], init N(0, 1/ν_max): one
    coupling per (ν, L) (MACE's symmetric contraction has one per symmetric coupling; see the path audit).

    Shapes: a [n, C x (natural irreps)], species [n] → [n, C x (irreps_out degrees)].
    """

    def __init__(self, make_kernel: Callable[[int, int, int], SphericalPowerKernel], irreps_in, irreps_out, correlation: int, num_elements: int):
        super().__init__()
        self.a = _Degrees(irreps_in, "product-basis input")
        self.out = _Degrees(irreps_out, "product-basis output")
        if self.out.channels != self.a.channels:
            raise PotentialsError(f"Gaunt product basis is channel-wise: {irreps_in} and {irreps_out} need the same multiplicity")
        self.irreps_in, self.irreps_out = self.a.irreps, self.out.irreps
        self.correlation, c = int(correlation), self.a.channels
        self.weight = torch.nn.Parameter(
            torch.randn(num_elements, self.correlation, c, len(self.out.degrees)) / math.sqrt(self.correlation)
        )
        self.kernel = make_kernel(self.a.lmax, self.correlation, self.out.lmax)
        d = (self.a.lmax + 1) ** 2
        scale = torch.tensor([(4 * math.pi / d) ** ((nu - 1) / 2) for nu in range(1, self.correlation + 1)], dtype=torch.float64)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("expand", _expansion(self.out.slot_of_full, len(self.out.degrees)), persistent=False)

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        af = self.a.embed(to_channels_last(a, self.a.irreps))  # [n, C, dA]
        p = self.kernel(af)  # [n, C, ν, d_out]
        w = (self.weight * self.scale.to(a.dtype)[:, None, None]) @ self.expand.to(a.dtype)  # [Z, ν, C, d_out]
        b = torch.einsum("ncvd,nvcd->ncd", p, w[species])  # [n, C, d_out]
        return _e3nn_layout(self.out.extract(b), self.irreps_out)


class GauntEngine(Engine):
    """Base of the Gaunt engines: subclasses supply the kernels; the modules above hold the parameters.

    ``resolution``: optional grid size forced on every kernel (engine-specific meaning); a size below the
    exact minimum raises :class:`PotentialsError` stating the minimum.
    """

    def __init__(self, resolution: tuple[int, int] | None = None):
        self.resolution = None if resolution is None else tuple(int(r) for r in resolution)

    def product_kernel(self, lmax1: int, lmax2: int, lmax_out: int) -> SphericalProductKernel:  # pragma: no cover
        raise NotImplementedError

    def power_kernel(self, lmax_in: int, nu_max: int, lmax_out: int) -> SphericalPowerKernel:  # pragma: no cover
        raise NotImplementedError

    def edge_tp(self, irreps_node, irreps_sh, irreps_target) -> EdgeTensorProduct:
        tp = GauntEdgeTensorProduct(self.product_kernel, irreps_node, irreps_sh, irreps_target)
        from potentials.nn.tp.audit import log_edge_audit

        log_edge_audit(self.name, tp.irreps_in1, tp.irreps_in2, o3.Irreps(irreps_target))
        return tp

    def product_basis(self, irreps_in, irreps_out, correlation, num_elements) -> ProductBasis:
        pb = GauntProductBasis(self.power_kernel, irreps_in, irreps_out, correlation, num_elements)
        from potentials.nn.tp.audit import log_product_audit

        log_product_audit(self.name, pb.irreps_in, pb.irreps_out, correlation)
        return pb
