"""Models: graph → total energy. ``build_model(cfg, stats)`` builds one from its config by name."""

from __future__ import annotations

from typing import Any, Callable

import torch

from potentials.errors import PotentialsError
from potentials.models.derivatives import energy_forces_stress  # noqa: F401
from potentials.models.facet import Facet
from potentials.models.mace import MACE
from potentials.nn.tp.auto import timing_dtype

MODELS: dict[str, Callable[..., torch.nn.Module]] = {"mace": MACE, "facet": Facet}

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build_model(cfg: dict[str, Any], stats: dict[str, Any]) -> torch.nn.Module:
    """Build a model from its config (``name``, ``dtype`` and the model's keyword arguments) and the
    dataset statistics (``atomic_numbers``, ``e0s``, ``avg_num_neighbors``, ``scale``, ``shift``; multi-head:
    ``heads`` = ``{name: {e0s, scale, shift}}``)."""
    cfg = dict(cfg)
    name = cfg.pop("name", "mace")
    dtype = cfg.pop("dtype", "float64")
    cfg.pop("compile", None)  # how the model is executed (potentials.models.compiled), not what it is
    if name not in MODELS:
        raise PotentialsError(f"unknown model name {name!r}; available: {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise PotentialsError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    e0s = {int(k): float(v) for k, v in stats.get("e0s", {}).items()}
    kwargs = {k: stats[k] for k in ("avg_num_neighbors", "scale", "shift", "heads") if stats.get(k) is not None}
    try:
        with timing_dtype(DTYPES[dtype]):  # tp=auto times its candidates in the model's dtype
            model = MODELS[name](list(stats["atomic_numbers"]), e0s, **kwargs, **cfg)
    except TypeError as exc:
        raise PotentialsError(f"bad option for model {name!r}: {exc}") from exc
    return model.to(DTYPES[dtype])
