"""``gaunt_grid``: exact Gaunt products on a Gauss–Legendre S² grid (aliases ``grid``).

A product of degrees (L1, L2) projected to ≤ Lout is a polynomial of degree ≤ D = L1+L2+Lout in cosβ and a
trigonometric polynomial of degree ≤ D in α, so ``n_β = ⌈(D+1)/2⌉`` Gauss–Legendre nodes in cosβ and
``n_α = D+1`` equispaced α are exact (about half the points of e3nn's SOFT grid). Powers ``f^ν`` use
``D = ν_max·L_A + L_out`` with one synthesis, pointwise powers and one analysis.

Transforms (see :class:`~potentials.nn.tp.gaunt.RingTransform`): the Legendre step is block-sparse in m (one
GEMM per m-block, O(L³) instead of e3nn's dense O(L⁴)), the α step is a real DFT by GEMM (exact; at these sizes
faster on CPU than ``torch.fft``); small degrees use the fused dense table (one GEMM), whichever is cheaper.
Tables come from e3nn's own SH in float64 and are non-persistent buffers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from potentials.errors import PotentialsError
from potentials.nn.tp.base import register_engine
from potentials.nn.tp.gaunt import GauntEngine, RingPowerKernel, RingProductKernel
from potentials.nn.tp.rings import RingGrid, legendre_table


def minimal_resolution(degree: int) -> tuple[int, int]:
    """Smallest exact Gauss–Legendre grid ``(n_beta, n_alpha)`` for total degree ``D``."""
    return math.ceil((degree + 1) / 2), degree + 1


def check_resolution(resolution, degree: int, what: str) -> tuple[int, int]:
    """Return ``resolution`` (or the minimum when None); raise if it is below the exact minimum for ``D``."""
    nb_min, na_min = minimal_resolution(degree)
    if resolution is None:
        return nb_min, na_min
    nb, na = (int(r) for r in resolution)
    if nb < nb_min or na < na_min:
        raise PotentialsError(
            f"gaunt_grid: resolution (n_beta={nb}, n_alpha={na}) is too small for {what}: D = {degree} needs at least "
            f"n_beta = ceil((D+1)/2) = {nb_min} Gauss-Legendre nodes and n_alpha = D+1 = {na_min} (minimum resolution "
            f"({nb_min}, {na_min}))"
        )
    return nb, na


@functools.lru_cache(maxsize=None)
def _gl_nodes(n_beta: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, w = np.polynomial.legendre.leggauss(n_beta)
    return torch.from_numpy(np.arccos(t)), torch.from_numpy(w)


class GaussLegendreGrid(RingGrid):
    """β_b = arccos(t_b) with Gauss–Legendre nodes/weights (t_b, w_b); α_a = 2πa/n_alpha.
    ``analysis = w_b Λ_{lk}(β_b)`` (∫ dΩ = ∫ d(cosβ) dα)."""

    def __init__(self, n_beta: int, n_alpha: int):
        self.n_theta, self.n_alpha = int(n_beta), int(n_alpha)
        self.betas, self.weights = _gl_nodes(self.n_theta)

    def synthesis(self, lmax: int) -> torch.Tensor:
        return legendre_table(lmax, self.betas)

    def analysis(self, lmax: int) -> torch.Tensor:
        return legendre_table(lmax, self.betas) * self.weights[:, None, None]


class GridProductKernel(RingProductKernel):
    """Exact Gaunt product on the smallest exact Gauss–Legendre grid (or ``resolution`` = (n_beta, n_alpha))."""

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int, resolution=None, strategy: str = "auto"):
        degree = lmax1 + lmax2 + lmax_out
        nb, na = check_resolution(resolution, degree, f"the product (L1, L2, Lout) = ({lmax1}, {lmax2}, {lmax_out})")
        super().__init__(lmax1, lmax2, lmax_out, GaussLegendreGrid(nb, na), strategy)


class GridPowerKernel(RingPowerKernel):
    """Exact powers ``P_{≤Lout}[f^ν]`` on one Gauss–Legendre grid with D = ν_max·L_A + L_out."""

    def __init__(self, lmax_in: int, nu_max: int, lmax_out: int, resolution=None, strategy: str = "auto"):
        degree = nu_max * lmax_in + lmax_out
        nb, na = check_resolution(resolution, degree, f"powers up to nu={nu_max} of degree {lmax_in} projected to {lmax_out}")
        super().__init__(lmax_in, nu_max, lmax_out, GaussLegendreGrid(nb, na), strategy)


@register_engine("gaunt_grid")
class GauntGridEngine(GauntEngine):
    """Gaunt products on the S² Gauss–Legendre grid. ``resolution=(n_beta, n_alpha)`` forces a grid (checked)."""

    def __init__(self, resolution=None, strategy: str = "auto"):
        super().__init__(resolution)
        self.strategy = strategy

    def product_kernel(self, lmax1, lmax2, lmax_out):
        return GridProductKernel(lmax1, lmax2, lmax_out, self.resolution, self.strategy)

    def power_kernel(self, lmax_in, nu_max, lmax_out):
        return GridPowerKernel(lmax_in, nu_max, lmax_out, self.resolution, self.strategy)
