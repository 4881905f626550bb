"""Small tensor operations shared by blocks and models (no project imports, so no import cycles)."""

from __future__ import annotations

import contextlib
import contextvars

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` [E, ...] into ``dim_size`` bins given by ``index`` [E]."""
    out = torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)


_FUSED_INFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("potentials_fused_inference", default=False)


@contextlib.contextmanager
def fused_inference():
    """Within this context, models in eval mode may use memory-lean kernels that recompute per-edge and per-node
    intermediates in the backward pass instead of storing them. Only derivatives with respect to the *inputs*
    (positions, strain) are then available — parameter gradients are not computed. The calculator and
    :func:`potentials.train.evaluation.predict` use it; training never does."""
    token = _FUSED_INFERENCE.set(True)
    try:
        yield
    finally:
        _FUSED_INFERENCE.reset(token)


def use_fused(module: torch.nn.Module) -> bool:
    """True inside :func:`fused_inference` for a module in eval mode."""
    return _FUSED_INFERENCE.get() and not module.training
