"""Registry of radial networks (edge basis → per-edge tensor-product weights), chosen by ``model.radial``.

A factory takes ``weight_numel`` and returns a module mapping the radial embedding [E, num_basis] to
[E, weight_numel]. ``mlp`` is MACE's radial MLP, ``bessel`` Facet's linear map of a trainable-frequency Bessel basis
(:class:`~potentials.nn.radial.LinearBesselRadial`), ``spline`` cubic B-splines; other kinds register with :func:`register_radial`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from potentials.errors import PotentialsError
from potentials.nn.radial import LinearBesselRadial, RadialMLP

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


@register_radial("bessel")
def _bessel(num_basis: int, weight_numel: int, r_max: float | None = None, cutoff_p: int = 5, **_) -> torch.nn.Module:
    if r_max is None:
        raise PotentialsError("model.radial=bessel needs r_max (the model passes it to the radial factory)")
    if int(cutoff_p) < 3:
        raise PotentialsError(f"model.cutoff_p must be ≥ 3 for a smooth (C²) cutoff of the bessel radial, got {cutoff_p}")
    return LinearBesselRadial(r_max, weight_numel, num_basis=num_basis, cutoff_p=cutoff_p)


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
