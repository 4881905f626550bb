"""Mixed precision confined to the backbone.

``energy_forces_stress`` records whether the caller runs under ``torch.autocast`` (e.g. Lightning's
``bf16-mixed``/``16-mixed``), switches autocast *off* for everything it does (edge geometry, energy head,
scatter-sum, autograd of forces/stress) and lets models re-enable it only around their backbone with
:func:`backbone_autocast`.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_AMP: contextvars.ContextVar[tuple[str, torch.dtype] | None] = contextvars.ContextVar("potentials_amp", default=None)


@contextlib.contextmanager
def outer_autocast_captured(device_type: str):
    """Capture the caller's autocast state for :func:`backbone_autocast`, then disable autocast."""
    state = (device_type, torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
    token = _AMP.set(state)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        _AMP.reset(token)


def backbone_autocast():
    """Autocast context for a model's backbone: the caller's autocast if there was one, else a no-op."""
    state = _AMP.get()
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])
