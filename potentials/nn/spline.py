"""Spline radial functions (``model.radial=spline``): per-edge tensor-product weights as cubic B-splines of
the edge length, times the smooth polynomial cutoff.

``R_w(r) = u(r) · Σ_k c[k, w] · B_k(r)``,  w = 0 … weight_numel−1 (one function per path and channel),

* ``B_k`` — uniform cubic B-splines on ``[0, r_max]`` with ``num_knots`` = K knots ``0, h, …, r_max``
  (h = r_max/(K−1)), extended by three knots on each side so that the K+2 basis functions form a
  partition of unity on the whole interval (scipy equivalent: ``BSpline(h·arange(−3, K+3), c, 3)``);
* ``c`` [K+2, weight_numel] — learnable control points;
* ``u`` — :class:`~potentials.nn.radial.PolynomialCutoff` (p ≥ 3): ``u``, ``u'``, ``u''`` vanish at r_max, so
  R is C² on [0, ∞), zero with zero first and second derivative at r_max, and zero beyond.

Evaluation computes only the four non-zero basis functions of each edge (closed-form cubic pieces in the
local coordinate of the edge's knot interval) and gathers their four control-point rows in one fused
``embedding_bag``: forward cost O(E · 4 · weight_numel) whatever K is, no dense [E, K+2] basis matrix
(see :class:`GatherContract` for the backward).

A spline radial takes the **edge length** r [E, 1] (Å), not the Bessel embedding: it sets
``uses_lengths = True``, which :class:`~potentials.nn.blocks.InteractionBlock` reads to feed it lengths.
"""

from __future__ import annotations

import torch

from potentials.errors import PotentialsError
from potentials.nn.radial import PolynomialCutoff
from potentials.nn.radials import register_radial


def cubic_bspline_pieces(u: torch.Tensor) -> torch.Tensor:
    """The four non-zero uniform cubic B-splines at local coordinate ``u`` ∈ [0, 1) of a knot interval,
    ``[..., 4]`` (ordered from the spline that started three intervals earlier to the one that starts here)."""
    u2 = u * u
    u3 = u2 * u
    v = 1.0 - u
    return torch.stack(
        [v * v * v, 3.0 * u3 - 6.0 * u2 + 4.0, -3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0, u3], dim=-1
    ) / 6.0


class GatherContract(torch.autograd.Function):
    """``out[e] = Σ_k b[e, k] · c[idx[e, k]]`` — b [E, 4], idx [E, 4] long, c [N, W] → [E, W].

    Forward: one fused gather-and-sum (``embedding_bag`` with per-sample weights), O(E·4·W).
    Backward, written with differentiable ops so that double backward (force training) works:
    ``∂/∂b[e, k] = (g @ cᵀ)[e, idx[e, k]]`` and ``∂/∂c = Bᵀ g`` with B the [E, N] scatter of ``b``; with N =
    K+2 ≈ 10 control points these small GEMMs are faster on CPU than per-edge gathers of four rows
    (``embedding_bag``'s own per-sample-weight backward has no double backward in torch).
    """

    @staticmethod
    def forward(ctx, b: torch.Tensor, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, idx, c)
        return torch.nn.functional.embedding_bag(idx, c, per_sample_weights=b, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        b, idx, c = ctx.saved_tensors
        grad_b = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_b = (grad @ c.transpose(0, 1)).gather(1, idx)
        if ctx.needs_input_grad[2]:
            grad_c = b.new_zeros((b.shape[0], c.shape[0])).scatter_add(1, idx, b).transpose(0, 1) @ grad
        return grad_b, None, grad_c


class SplineRadial(torch.nn.Module):
    """Edge lengths [E, 1] (Å) → per-edge weights [E, weight_numel] (see module docstring).

    Args:
        r_max: cutoff (Å); the spline lives on [0, r_max].
        weight_numel: number of independent radial functions (tensor-product paths × channels).
        num_knots: K ≥ 2 uniformly spaced knots on [0, r_max] (both ends included) → K+2 control points
            per function.
        cutoff_p: exponent of the polynomial cutoff envelope (≥ 3 for C² at r_max; MACE uses 5).
        init_std: standard deviation of the initial control points (i.i.d. normal).
    """

    uses_lengths = True

    def __init__(self, r_max: float, weight_numel: int, num_knots: int = 8, cutoff_p: int = 5, init_std: float = 1.0):
        super().__init__()
        if int(num_knots) < 2:
            raise PotentialsError(f"model.num_knots must be ≥ 2 for the spline radial, got {num_knots}")
        if int(cutoff_p) < 3:
            raise PotentialsError(f"model.cutoff_p must be ≥ 3 for a C² spline radial, got {cutoff_p}")
        self.r_max, self.num_knots, self.weight_numel = float(r_max), int(num_knots), int(weight_numel)
        self.num_intervals = self.num_knots - 1
        self.spacing = self.r_max / self.num_intervals
        self.control_points = torch.nn.Parameter(init_std * torch.randn(self.num_knots + 2, self.weight_numel))
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.register_buffer("_offsets", torch.arange(4), persistent=False)

    def knots(self) -> torch.Tensor:
        """The full (extended) knot vector, K+6 values: h·(−3, −2, …, K+2)."""
        return self.spacing * torch.arange(-3, self.num_knots + 3, dtype=torch.float64)

    def _locate(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r [E] → (first control-point index of each edge [E] long, the 4 basis values [E, 4])."""
        x = r / self.spacing
        interval = torch.floor(x.detach()).clamp_(0, self.num_intervals - 1)
        basis = cubic_bspline_pieces(x - interval)  # beyond r_max: the last piece, extrapolated (cut off later)
        return interval.long(), basis

    def basis(self, r: torch.Tensor) -> torch.Tensor:
        """Dense basis matrix [E, K+2] (for tests and inspection; the forward pass never builds it)."""
        r = r.reshape(-1)
        first, b = self._locate(r)
        out = r.new_zeros((r.shape[0], self.num_knots + 2))
        return out.scatter_(1, first[:, None] + self._offsets, b)

    def spline(self, r: torch.Tensor) -> torch.Tensor:
        """The spline without the envelope: ``Σ_k c[k, :] B_k(r)`` [E, weight_numel]."""
        first, b = self._locate(r.reshape(-1))
        return GatherContract.apply(b, first[:, None] + self._offsets, self.control_points)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.reshape(-1, 1)
        first, b = self._locate(r.reshape(-1))
        # fold the envelope into the 4 basis values: one [E, W] pass instead of two
        return GatherContract.apply(b * self.cutoff(r), first[:, None] + self._offsets, self.control_points)

    def smoothness_penalty(self) -> torch.Tensor:
        """Mean squared second difference of the control points, Σ_k (c_{k+1} − 2c_k + c_{k−1})² / weight_numel.

        Proportional to ∫ (R'')² dr of the spline part for a uniform cubic B-spline (up to a bounded
        factor); add ``λ · model_radial.smoothness_penalty()`` to a loss to discourage wiggly radials.
        """
        c = self.control_points
        d2 = c[2:] - 2.0 * c[1:-1] + c[:-2]
        return d2.pow(2).sum() / self.weight_numel

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, num_knots={self.num_knots}, weight_numel={self.weight_numel}"


@register_radial("spline")
def _spline(
    weight_numel: int,
    r_max: float | None = None,
    num_knots: int = 8,
    cutoff_p: int = 5,
    spline_init_std: float = 1.0,
    **_,
) -> torch.nn.Module:
    if r_max is None:
        raise PotentialsError("model.radial=spline needs r_max (the model passes it to the radial factory)")
    return SplineRadial(r_max, weight_numel, num_knots=num_knots, cutoff_p=cutoff_p, init_std=spline_init_std)
