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


def outside_autocast(fn, *args: torch.Tensor) -> torch.Tensor:
    """Call ``fn(*args)`` with autocast off and floating inputs in float32 when autocast is on.

    e3nn's code-generated tensor products mix their own float32 constants with the inputs in ops that
    autocast does not cover (``tensordot``), so under bf16/fp16 autocast they must run in float32.
    """
    device_type = args[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return fn(*args)
    with torch.autocast(device_type, enabled=False):
        return fn(*(a.float() if a.is_floating_point() else a for a in args))
