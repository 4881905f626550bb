"""Radial basis of edge lengths: Bessel functions times a smooth polynomial cutoff, and the radial MLP
that turns them into per-edge tensor-product weights."""

from __future__ import annotations

import math

import torch
from e3nn import nn as enn


class BesselBasis(torch.nn.Module):
    """e_k(r) = sqrt(2/r_max) · sin(k π r / r_max) / r,  k = 1..num_basis.

    ``r`` [E, 1] (Å) → [E, num_basis]. Frequencies are learnable (initialised to kπ/r_max), as in MACE.
    """

    def __init__(self, r_max: float, num_basis: int = 8, trainable: bool = False):
        super().__init__()
        freqs = math.pi / r_max * torch.arange(1, num_basis + 1, dtype=torch.float64)
        if trainable:
            self.freqs = torch.nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)
        self.register_buffer("prefactor", torch.tensor(math.sqrt(2.0 / r_max), dtype=torch.float64))
        self.r_max, self.num_basis = r_max, num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.prefactor * torch.sin(self.freqs * r) / r


class PolynomialCutoff(torch.nn.Module):
    """Smooth envelope u(r) = 1 − (p+1)(p+2)/2 x^p + p(p+2) x^{p+1} − p(p+1)/2 x^{p+2}, x = r/r_max,
    and 0 beyond r_max; u and its first two derivatives vanish at r_max (DimeNet / MACE)."""

    def __init__(self, r_max: float, p: int = 5):
        super().__init__()
        self.r_max, self.p = float(r_max), int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p, x = self.p, r / self.r_max
        env = (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p)
            + p * (p + 2.0) * x.pow(p + 1)
            - p * (p + 1.0) / 2.0 * x.pow(p + 2)
        )
        return env * (x < 1.0)


class RadialEmbedding(torch.nn.Module):
    """Edge lengths [E, 1] → Bessel basis × cutoff [E, num_basis]."""

    def __init__(self, r_max: float, num_basis: int = 8, cutoff_p: int = 5):
        super().__init__()
        self.basis = BesselBasis(r_max, num_basis)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.out_dim = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.basis(r) * self.cutoff(r)


class RadialMLP(torch.nn.Module):
    """MACE's radial network: radial embedding [E, num_basis] → per-edge TP weights [E, weight_numel]."""

    def __init__(self, num_basis: int, hidden: list[int], weight_numel: int):
        super().__init__()
        self.net = enn.FullyConnectedNet([num_basis, *hidden, weight_numel], torch.nn.functional.silu)

    def forward(self, edge_feats: torch.Tensor) -> torch.Tensor:
        return self.net(edge_feats)


class LinearBesselRadial(torch.nn.Module):
    """Facet's radial weights (``model.radial=bessel``): a bias-free linear map of a Bessel basis with trainable
    frequencies, times the smooth cutoff — no hidden layer:

        R_w(r) = u(r) · Σ_k W[k, w] · sqrt(2/r_max) · sin(f_k r) / r,   f_k initialised to kπ/r_max (1/Å).

    ``r`` [E, 1] (Å) → [E, weight_numel]. ``u`` is :class:`PolynomialCutoff` (p ≥ 3): R, R' and R'' vanish at
    r_max whatever the frequencies become, and R = 0 beyond. ``W`` [num_basis, weight_numel] is initialised
    N(0, 1) and scaled by 1/√num_basis at call time (e3nn-style). Reads lengths (``uses_lengths``), not the
    model's shared (fixed-frequency) radial embedding.
    """

    uses_lengths = True

    def __init__(self, r_max: float, weight_numel: int, num_basis: int = 8, cutoff_p: int = 5):
        super().__init__()
        self.basis = BesselBasis(r_max, num_basis, trainable=True)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.weight = torch.nn.Parameter(torch.randn(num_basis, weight_numel))
        self.num_basis, self.weight_numel = int(num_basis), int(weight_numel)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.reshape(-1, 1)
        basis = self.basis(r).to(self.weight.dtype) * self.cutoff(r)  # [E, num_basis]
        return basis @ (self.weight / math.sqrt(self.num_basis))

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, weight_numel={self.weight_numel}, trainable frequencies"
