"""Small tensor operations shared by blocks and models (no project imports, so no import cycles)."""

from __future__ import annotations

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` [E, ...] into ``dim_size`` bins given by ``index`` [E]."""
    out = torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)
