"""SiLU with closed-form first and second derivatives, for activations that force training differentiates twice.

Forces are −∂E/∂x with the graph kept, and the loss on them is differentiated again, so an activation's
derivative is itself differentiated. Autograd's generic double backward of ``silu`` builds the second
derivative from about a dozen elementwise passes over the activation tensor; on the Facet mixer's grid
([n, points, heads, width], the largest tensors of the step) those passes dominated the step (profile in
docs/benchmarks/facet_profile.md). Here:

    silu(x)   = x·s,                s = sigmoid(x)
    silu'(x)  = s·(1 + x·(1 − s))                  (torch's fused ``silu_backward``)
    silu''(x) = s·(1 − s)·(2 + x·(1 − 2s))

Shapes are unchanged (elementwise); any dtype. Higher derivatives stay correct (the backward of the
derivative is written with differentiable ops, in place only when no graph is being recorded).
"""

from __future__ import annotations

import torch


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.nn.functional.silu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _SiLUGrad.apply(grad, x)


class _SiLUGrad(torch.autograd.Function):
    """(g, x) ↦ g · silu'(x)."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad, x)
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def backward(ctx, gg: torch.Tensor):
        grad, x = ctx.saved_tensors
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = _SiLUGrad.apply(gg, x) if torch.is_grad_enabled() else torch.ops.aten.silu_backward(gg, x)
        if ctx.needs_input_grad[1]:
            s = torch.sigmoid(x)
            if torch.is_grad_enabled():  # a further derivative is being recorded: no in-place ops
                d_x = gg * grad * s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
            else:
                one_minus = 1.0 - s
                t = torch.sub(one_minus, s).mul_(x).add_(2.0)  # 2 + x(1 − 2s)
                d_x = t.mul_(s).mul_(one_minus).mul_(gg).mul_(grad)
        return d_grad, d_x


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU (x·sigmoid(x)) whose first and second derivatives are computed in closed form."""
    return _SiLU.apply(x)
