"""Registry of radial networks (edge basis → per-edge tensor-product weights), chosen by ``model.radial``.

A factory takes ``weight_numel`` and returns a module mapping the radial embedding [E, num_basis] to
[E, weight_numel]. ``mlp`` is MACE's radial MLP; other kinds register with :func:`register_radial`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from potentials.errors import PotentialsError
from potentials.nn.radial import RadialMLP

_RADIALS: dict[str, Callable[..., torch.nn.Module]] = {}
# Options every model passes to every radial kind (a kind may ignore them).
SHARED_OPTIONS = {"r_max", "cutoff_p"}


def register_radial(name: str):
    def deco(fn):
        _RADIALS[name] = fn
        return fn

    return deco


@register_radial("mlp")
def _mlp(num_basis: int, hidden: list[int], weight_numel: int, **_) -> torch.nn.Module:
    return RadialMLP(num_basis, hidden, weight_numel)


def make_radial_factory(kind: str, num_basis: int, hidden: list[int], **options) -> Callable[[int], torch.nn.Module]:
    """Return ``weight_numel ↦ radial module`` for ``model.radial=<kind>``."""
    if kind not in _RADIALS:
        raise PotentialsError(f"unknown model.radial={kind!r}; available: {sorted(_RADIALS)}")
    builder = _RADIALS[kind]
    params = inspect.signature(builder).parameters
    accepted = {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = set(options) - accepted - SHARED_OPTIONS
    if unknown:  # a typo must not be silently ignored
        raise PotentialsError(
            f"unknown option(s) {sorted(unknown)} for model.radial={kind!r}; it accepts "
            f"{sorted((accepted | SHARED_OPTIONS) - {'num_basis', 'hidden', 'weight_numel'})}"
        )
    return lambda weight_numel: builder(num_basis=num_basis, hidden=hidden, weight_numel=weight_numel, **options)

from potentials.nn import spline  # noqa: E402,F401  (registers "spline")
