"""``auto``: at model build, time the exact Gaunt engines for each actual product shape on the current device
and use the fastest (logging the table). Choices are cached per (shape, dtype, device) for the process.

All candidates compute the same function with the same parameters (the shared Gaunt modules), so the choice
never changes the weights: a checkpoint trained with ``auto`` loads into ``gaunt_grid`` or ``gaunt_fft``.
Use :func:`auto_choices` to see what was picked.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from potentials.nn.tp.base import get_engine, register_engine
from potentials.nn.tp.gaunt import GauntEngine, SphericalPowerKernel, SphericalProductKernel

log = logging.getLogger("potentials.nn.tp")

CANDIDATES = ("gaunt_grid", "gaunt_fft")
_CACHE: dict[tuple, dict] = {}


def auto_choices() -> dict[tuple, dict]:
    """The cached decisions: ``{(kind, shape, dtype, device): {"choice": name, "ms": {name: fwd+bwd ms}}}``."""
    return {k: dict(v) for k, v in _CACHE.items()}


def clear_cache() -> None:
    """Forget the cached decisions (and let the path audit be logged again): the next build times afresh."""
    from potentials.nn.tp import audit

    _CACHE.clear()
    audit._LOGGED.clear()


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Minimum ms per step over ``repeats`` round-robin rounds (after one warm-up each), so that a busy period of a
    shared machine hits every candidate alike."""
    for fn in steps.values():
        fn()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


@register_engine("auto")
class AutoEngine(GauntEngine):
    """Per-shape fastest of :data:`CANDIDATES`, timed forward+backward on ``rows`` random rows, round-robin,
    minimum of ``repeats`` (``dtype``/``device``: default dtype and CUDA when available). Within ``tie`` (10%) of
    the fastest, the first candidate (gaunt_grid: fewer grid points) is kept, so noise does not flip the choice."""

    def __init__(self, rows: int = 4096, repeats: int = 5, dtype=None, device=None, candidates=CANDIDATES, tie: float = 0.1):
        super().__init__(None)
        self.rows, self.repeats, self.candidates, self.tie = int(rows), int(repeats), tuple(candidates), float(tie)
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else _default_device()

    def _choose(self, kind: str, shape: tuple, builders: dict, dims: tuple[int, ...], trivial: bool):
        key = (kind, shape, str(self.dtype).replace("torch.", ""), self.device.type)
        if key not in _CACHE:
            ms = {}
            if not trivial:  # shortcut shapes (constant factors) run the same code in every engine
                gen = torch.Generator().manual_seed(0)
                xs = [torch.randn(self.rows, d, generator=gen, dtype=self.dtype).to(self.device).requires_grad_() for d in dims]
                steps = {}
                for name, build in builders.items():
                    kernel = build().to(device=self.device, dtype=self.dtype)

                    def step(kernel=kernel):
                        kernel(*xs).sum().backward()

                    steps[name] = step
                ms = _time_interleaved(steps, self.repeats, self.device)
            choice = next(iter(builders))  # the preferred default (first candidate) unless clearly beaten
            if ms and ms[choice] > (1 + self.tie) * min(ms.values()):
                choice = min(ms, key=ms.get)
            _CACHE[key] = {"choice": choice, "ms": ms}
            table = ", ".join(f"{n} {t:.2f} ms" for n, t in ms.items()) or "trivial shape, not timed"
            log.info("tp=auto %s %s on %s/%s (%d rows, fwd+bwd): %s -> %s", kind, shape, self.device.type, key[2], self.rows, table, choice)
        choice = _CACHE[key]["choice"]
        kernel = builders[choice]()
        kernel.engine_choice = choice
        return kernel

    def product_kernel(self, lmax1, lmax2, lmax_out) -> SphericalProductKernel:
        builders = {n: (lambda n=n: get_engine(n).product_kernel(lmax1, lmax2, lmax_out)) for n in self.candidates}
        dims = ((lmax1 + 1) ** 2, (lmax2 + 1) ** 2)
        return self._choose("product", (lmax1, lmax2, lmax_out), builders, dims, trivial=min(lmax1, lmax2) == 0)

    def power_kernel(self, lmax_in, nu_max, lmax_out) -> SphericalPowerKernel:
        builders = {n: (lambda n=n: get_engine(n).power_kernel(lmax_in, nu_max, lmax_out)) for n in self.candidates}
        return self._choose("power", (lmax_in, nu_max, lmax_out), builders, ((lmax_in + 1) ** 2,), trivial=lmax_in == 0 or nu_max == 1)
