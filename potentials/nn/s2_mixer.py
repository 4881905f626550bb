"""Sphere-grid MLP mixing layer (Facet's ``S2SelfConnection``): an equivariant node-wise nonlinearity that
mixes channels with an ordinary MLP evaluated on a spherical grid.

    x ──Linear──▶ G × (0e + 1o + … + L)  ──ToS2Grid('integral')──▶ f_g(p), p on an N_β × N_α grid
      ──(the same MLP over channels, per head, at every grid point p)──▶ f'_g(p)
      ──FromS2Grid('integral')──▶ G' × (0e + 1o + … + L_out) ⊕ (scalars of x) ──Linear──▶ out

Each channel is a band-limited function on the sphere, f_g(p) = Σ_lm x_{g,lm} Y_lm(p); rotating the input
rotates the functions, and a pointwise map commutes with rotations. The projection back is exact only for
band-limited functions, and an MLP output is not band-limited, so the layer is **approximately**
SO(3)-equivariant; the error falls quickly with the grid resolution and grows with the feature amplitude
(measurements next to :data:`DEFAULT_RES`; asserted in ``tests/test_facet.py``).

**Parity / supported irreps.** Only natural-parity irreps (0e, 1o, 2e, 3o, …: parity (−1)^l) on the input
and the output. For those, inversion maps f(p) to f(−p), i.e. it permutes the grid points when the grid is
antipodally symmetric (β ↦ π−β is always on the e3nn grid; α ↦ α+π needs an **even** ``res_alpha``),
so the layer is *exactly* inversion-equivariant: the full O(3) error equals the SO(3) error. Pseudo
irreps (0o, 1e, 2o, …) would need an odd activation on the grid and are rejected with
:class:`~potentials.errors.PotentialsError`, as are odd ``res_alpha`` and grids too coarse for the
degrees used.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.o3 import _s2grid

from potentials.errors import PotentialsError
from potentials.nn.activations import silu
from potentials.nn.irreps import natural_irreps, to_channels_last
from potentials.nn.precision import outside_autocast

ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "softplus": torch.nn.functional.softplus,
}

# Default grid (res_beta, res_alpha) per grid degree L, chosen by measurement (float64, CPU, e3nn 0.6).
#
# 1. The mixer alone, 16 channels, random i.i.d. input components of RMS s, random rotation, relative error
#    max|mixer(Dx) − D·mixer(x)| / max|mixer(x)| (worst of 3 seeds):
#      L=1  s=0.1: (8,8) 6.5e-9                       s=0.3: (8,8) 3.8e-6
#      L=2  s=0.1: (16,16) 6.7e-9  (20,20) 3.8e-11    s=0.3: (16,16) 8.9e-6     s=1: (16,16) 1e-3, (32,32) 1e-7
#      L=3  s=0.1: (16,16) 1.5e-5  (20,20) 1.4e-7  (24,24) 6.2e-9               s=0.3: (16,16) 8e-4
#    The error grows steeply with the amplitude on the grid (silu is nearly quadratic for small inputs).
#    In trained demo Facet models (1–5 epochs) the mixer inputs have component RMS 0.1–0.15 (l=0), 0.005–0.04 (l>0).
# 2. A whole 2-layer Facet model (channels 16, max_L 1), relative force-equivariance error under a random
#    rotation/reflection (demo structures):
#      L=1 (max_ell 1), init:   (4,4) 1e-6   (6,6) 4e-11  (8,8) 1e-14
#      L=2 (max_ell 2), init:   (8,8) 8e-5   (10,10) 1.4e-6  (12,12) 4e-8  (16,16) 6e-12
#                       5 demo epochs: (12,12) 9.7e-8  (16,16) 2.8e-10  (20,20) 2.2e-10
#      L=3 (max_ell 3), init / 1 / 2 / 5 demo epochs:
#        (12,12) 1.2e-6 / 3.5e-7 / 5.3e-7 / 3.2e-5      (16,16) 1.3e-9 / 8.7e-10 / 2.9e-9 / 8.6e-8
#        (20,20) 6e-12 / 3.6e-12 / 1.2e-11 / 1.1e-9
#    float32: ~3e-6–1e-5 at every grid (rounding). The error grows during training as the features grow
#    (×1000 over 5 demo epochs at L=3), so the defaults keep ≥ 1e4 headroom below the 1e-5 requirement
#    after 5 epochs; re-measure for long runs or large features (tests/test_facet.py shows how).
#
# Defaults: the mixer alone stays ≤ MIXER_EQUIVARIANCE_BOUND for input RMS ≤ 0.1. res_alpha is even
# everywhere (antipodally symmetric grid → exact inversion). Beyond the table: 4(L+2) × 4(L+2) (not measured).
DEFAULT_RES = {0: (2, 2), 1: (8, 8), 2: (16, 16), 3: (20, 20)}
MIXER_EQUIVARIANCE_BOUND = 1e-6  # relative, default grid, float64, input component RMS ≤ 0.1, L ≤ 3


def default_resolution(lmax: int) -> tuple[int, int]:
    """The default (res_beta, res_alpha) for grid degree ``lmax``."""
    return DEFAULT_RES.get(int(lmax), (4 * (int(lmax) + 2), 4 * (int(lmax) + 2)))


def soft_quadrature_weights(b: int) -> torch.Tensor:
    """Kostelec–Rockmore (SOFT) quadrature weights for 2b β-nodes, in float64 (as e3nn's, without rounding)."""
    j = torch.arange(2 * b, dtype=torch.float64)[:, None]
    k = torch.arange(b, dtype=torch.float64)[None, :]
    inner = (torch.sin((2 * j + 1) * (2 * k + 1) * math.pi / (4.0 * b)) / (2 * k + 1)).sum(dim=1)
    w = (2.0 / b) * torch.sin(math.pi * (2.0 * j[:, 0] + 1.0) / (4.0 * b)) * inner
    return w / (2.0 * (2 * b) ** 2)


def s2_grid_pair(lmax_in: int, lmax_out: int, res: tuple[int, int]) -> tuple[o3.ToS2Grid, o3.FromS2Grid]:
    """``ToS2Grid(lmax_in)`` and ``FromS2Grid(lmax_out)`` ('integral') with float64 buffers.

    e3nn 0.6 computes the SOFT quadrature weights of ``FromS2Grid`` in the *default* dtype whatever ``dtype``
    says, so its float64 buffers are only float32-accurate (round trip error ~2e-7). The weights enter
    ``shb`` as one factor per β row, so we rescale those rows by (exact float64 weights / e3nn's weights);
    torch's default dtype is never touched. ``.to(float32)`` casts the buffers down.
    The grid buffers are non-persistent: they are not saved in checkpoints, so a checkpoint can be
    evaluated at another resolution.
    """
    to_grid = o3.ToS2Grid(lmax_in, res, normalization="integral", dtype=torch.float64)
    from_grid = o3.FromS2Grid(res, lmax_out, normalization="integral", dtype=torch.float64)
    b = from_grid.res_beta // 2
    e3nn_weights = _s2grid._quadrature_weights(b, dtype=torch.float64)
    from_grid.shb.mul_((soft_quadrature_weights(b) / e3nn_weights)[None, :, None])
    for module in (to_grid, from_grid):  # constants rebuilt from the config: keep them out of checkpoints
        for name, buf in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buf, persistent=False)
    return to_grid, from_grid


def grid_matrices(to_grid: o3.ToS2Grid, from_grid: o3.FromS2Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid transforms as dense float64 matrices: ``Y`` [Nb·Na, (L+1)²] with ``to_grid(x) = Y x`` (grid
    points flattened β-major) and ``W`` [(L_out+1)², Nb·Na] with ``from_grid(f) = W f``, obtained by applying the
    modules to unit vectors (exact: both are linear)."""
    dim_in = to_grid.lmax + 1
    y = to_grid(torch.eye(dim_in * dim_in, dtype=torch.float64))  # [(L+1)², Nb, Na]
    y = y.reshape(y.shape[0], -1).transpose(0, 1).contiguous()
    points = y.shape[0]
    w = from_grid(torch.eye(points, dtype=torch.float64).reshape(points, from_grid.res_beta, from_grid.res_alpha))
    return y, w.transpose(0, 1).contiguous()


def _component_major(x: torch.Tensor, mul: int, lmax: int) -> torch.Tensor:
    """e3nn layout of ``mul x (0e + 1o + … + lmax)`` [n, dim] → [n, (lmax+1)², mul] (channels last)."""
    n, blocks, start = x.shape[0], [], 0
    for l in range(lmax + 1):
        blocks.append(x[:, start:start + mul * (2 * l + 1)].reshape(n, mul, 2 * l + 1).transpose(1, 2))
        start += mul * (2 * l + 1)
    return torch.cat(blocks, dim=1)


def _from_component_major(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """Inverse of :func:`_component_major`: [n, (lmax+1)², mul] → [n, mul·(lmax+1)²] in e3nn layout."""
    n = x.shape[0]
    return torch.cat([x[:, l * l:(l + 1) * (l + 1)].transpose(1, 2).reshape(n, -1) for l in range(lmax + 1)], dim=-1)


def check_natural_parity(irreps: o3.Irreps, what: str) -> o3.Irreps:
    irreps = o3.Irreps(irreps)
    bad = [str(ir) for _, ir in irreps if ir.p != (-1) ** ir.l]
    if bad:
        raise PotentialsError(
            f"S2 grid mixer: {what} irreps {irreps} contain {sorted(set(bad))}; only natural-parity irreps "
            "(0e, 1o, 2e, 3o, ...) are supported (a pointwise MLP on the grid is inversion-equivariant only for them)"
        )
    return irreps


class GridMLP(torch.nn.Module):
    """The pointwise MLP: [..., heads, c_in] → [..., heads, c_out], weights shared over heads and points.

    Bias-free (Facet), e3nn-style initialisation (unit-variance weights scaled by 1/√fan_in at call time).
    """

    def __init__(self, c_in: int, hidden: list[int], c_out: int, act: str, final_act: bool):
        super().__init__()
        if act not in ACTIVATIONS:
            raise PotentialsError(f"S2 grid mixer: unknown activation {act!r}; available: {sorted(ACTIVATIONS)}")
        dims = [c_in, *hidden, c_out]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        # silu: closed-form first and second derivatives (force training differentiates the grid MLP twice)
        self.act, self.final_act = (silu if act == "silu" else ACTIVATIONS[act]), bool(final_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.weights)
        for i, w in enumerate(self.weights):
            x = x @ (w / math.sqrt(w.shape[0]))
            if i < n - 1 or self.final_act:
                x = self.act(x)
        return x


class S2MLPMixer(torch.nn.Module):
    """Sphere-grid MLP mixer ``irreps_in → irreps_out`` (natural parity only; see module docstring).

    Args:
        irreps_in, irreps_out: node feature irreps (any multiplicities, natural parity).
        grid_channels: G, channels lifted onto the grid (default: the largest multiplicity of ``irreps_in``).
        lmax: degree of the grid functions L (default: the largest l of ``irreps_in`` and ``irreps_out``);
            input degrees above L are dropped by the lift.
        res: (res_beta, res_alpha) of the grid; res_beta even, res_alpha even, res_beta ≥ 2(L+1)
            (default :func:`default_resolution`).
        heads: the G channels are split into ``heads`` groups of G/heads; the MLP is shared across heads.
        hidden: hidden widths of the MLP. act: its activation. final_act: activation after its last layer.
        scalar_skip: concatenate the input scalars to the grid output before the final Linear.

    Shapes: x [n, irreps_in.dim] → [n, irreps_out.dim].
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        grid_channels: int | None = None,
        lmax: int | None = None,
        res: tuple[int, int] | None = None,
        heads: int = 2,
        hidden: list[int] = (16,),
        act: str = "silu",
        final_act: bool = True,
        scalar_skip: bool = True,
    ):
        super().__init__()
        self.irreps_in = check_natural_parity(irreps_in, "input").simplify()
        self.irreps_out = check_natural_parity(irreps_out, "output").simplify()
        lmax = max(self.irreps_in.lmax, self.irreps_out.lmax) if lmax is None else int(lmax)
        lmax_out = min(self.irreps_out.lmax, lmax)
        g = int(grid_channels) if grid_channels else max(mul for mul, _ in self.irreps_in)
        if g < 1 or int(heads) < 1 or g % int(heads) != 0:
            raise PotentialsError(f"S2 grid mixer: grid channels {g} not divisible by heads={heads}")
        res_beta, res_alpha = (int(v) for v in (default_resolution(lmax) if res is None else res))
        if res_alpha % 2 != 0:
            raise PotentialsError(
                f"S2 grid mixer: res_alpha={res_alpha} must be even (antipodally symmetric grid → exact inversion)"
            )
        if res_beta % 2 != 0 or res_beta < 2 * (lmax + 1) or res_alpha < 2 * lmax + 1:
            raise PotentialsError(
                f"S2 grid mixer: grid ({res_beta}, {res_alpha}) too coarse or odd res_beta for lmax={lmax}; "
                f"need res_beta even ≥ {2 * (lmax + 1)} and res_alpha ≥ {2 * lmax + 1}"
            )
        self.lmax, self.lmax_out, self.res = lmax, lmax_out, (res_beta, res_alpha)
        self.heads, self.grid_channels = int(heads), g
        self.irreps_grid = natural_irreps(g, lmax)
        self.irreps_back = natural_irreps(g, lmax_out)
        self.lift = o3.Linear(self.irreps_in, self.irreps_grid)
        self.to_grid, self.from_grid = s2_grid_pair(lmax, lmax_out, self.res)
        # The same two linear maps as dense matrices over the flattened grid, applied channels-last (see forward)
        y_grid, w_grid = grid_matrices(self.to_grid, self.from_grid)
        self.register_buffer("y_grid", y_grid, persistent=False)  # [Nb·Na, (L+1)²]
        self.register_buffer("w_grid", w_grid, persistent=False)  # [(L_out+1)², Nb·Na]
        self.mlp = GridMLP(g // self.heads, list(hidden), g // self.heads, act, final_act)
        self.num_scalars = self.irreps_in.count("0e") if scalar_skip else 0
        # layout of the concatenation: (G + num_scalars) x 0e, then the grid's l > 0 blocks
        irreps_cat = o3.Irreps([(g + self.num_scalars, (0, 1))] + [(mul, ir) for mul, ir in self.irreps_back][1:])
        self.linear_out = o3.Linear(irreps_cat, self.irreps_out)
        self._scalar_slices = [s for s, (_, ir) in zip(self.irreps_in.slices(), self.irreps_in) if ir == o3.Irrep("0e")]

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """Lifted features on the grid [n, G, res_beta, res_alpha] (for inspection/tests)."""
        return self.to_grid(to_channels_last(outside_autocast(self.lift, x), self.irreps_grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last throughout: [n, (L+1)², G] → grid [n, Nb·Na, G] (one GEMM with y_grid) → MLP on the
        # last axis (heads split by a view, no copy) → [n, (L_out+1)², G] (one GEMM with w_grid). Same maps as
        # to_grid/from_grid, without e3nn's [n, G, Nb, Na] layout and the permute copies it needs for the MLP.
        n = x.shape[0]
        a = _component_major(outside_autocast(self.lift, x), self.grid_channels, self.lmax)  # [n, (L+1)², G]
        f = torch.matmul(self.y_grid.to(a.dtype), a)  # [n, P, G]
        f = self.mlp(f.view(n, f.shape[1], self.heads, self.grid_channels // self.heads)).view(n, f.shape[1], -1)
        y = _from_component_major(torch.matmul(self.w_grid.to(f.dtype), f), self.lmax_out)  # [n, irreps_back.dim]
        if self.num_scalars:
            scalars = [x[:, s] for s in self._scalar_slices]
            y = torch.cat([y[:, : self.grid_channels], *scalars, y[:, self.grid_channels:]], dim=-1)
        return outside_autocast(self.linear_out, y)

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} -> {self.irreps_out}, grid {self.grid_channels}x(L={self.lmax}) "
            f"on {self.res[0]}x{self.res[1]}, heads={self.heads}"
        )
