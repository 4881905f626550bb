"""Dense reference Gaunt products, used only to check the engines' kernels (tests, audits) — never by a model.

``gaunt_product_dense`` contracts the full Gaunt tensor of :func:`potentials.nn.tp.gaunt.gaunt_tensor`;
``gaunt_power_dense`` chains it without truncating intermediate degrees. Shapes: SH coefficients
[..., (L+1)²] in e3nn's real basis, 'integral' normalisation.
"""

from __future__ import annotations

import math

import torch

from potentials.nn.tp.gaunt import _gaunt_tensor, _resize_sh


def gaunt_product_dense(x: torch.Tensor, y: torch.Tensor, lmax_out: int) -> torch.Tensor:
    """Reference: ``Σ_ab G[a, b, :] x[..., a] y[..., b]``; x [..., (L1+1)²], y [..., (L2+1)²] → [..., (Lout+1)²]."""
    lmax1, lmax2 = math.isqrt(x.shape[-1]) - 1, math.isqrt(y.shape[-1]) - 1
    g = _gaunt_tensor(lmax1, lmax2, lmax_out).to(dtype=x.dtype, device=x.device)
    return torch.einsum("...a,...b,abc->...c", x, y, g)


def gaunt_power_dense(x: torch.Tensor, nu: int, lmax_out: int) -> torch.Tensor:
    """Reference: ``P_{≤Lout}[f^ν]`` by ν−1 exact products, keeping every intermediate degree (ν·L_A)."""
    lmax_in = math.isqrt(x.shape[-1]) - 1
    p = x
    for k in range(2, nu + 1):
        p = gaunt_product_dense(p, x, k * lmax_in if k < nu else lmax_out)
    if nu == 1:
        p = _resize_sh(x, lmax_out)
    return p
