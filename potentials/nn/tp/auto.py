"""``auto``: at model build, time every exact engine for the Gaunt parameterisation on each actual product shape,
in the model's dtype on the current device, and use the fastest (logging the table it chose from). Choices are
cached per (shape, dtype, device) for the process.

Candidates (:data:`CANDIDATES`): ``gaunt_grid`` and ``gaunt_fft`` (their S² / torus grids), and ``cg`` — the same
products contracted with the dense coupling-coefficient tensor (Gaunt coefficients = Wigner-3j / Clebsch–Gordan
× constants, :func:`~potentials.nn.tp.gaunt.gaunt_tensor`). All compute the same function with the same
parameters (the shared Gaunt modules), so the choice never changes the weights: a checkpoint trained with
``auto`` loads into ``gaunt_grid`` or ``gaunt_fft``. (The ``cg`` *engine* itself has another parameterisation,
one free weight per path, so it cannot be an ``auto`` candidate; its coupling tensors can.) The timing dtype is
the one :func:`potentials.models.build_model` announces with :func:`timing_dtype` (the model's), else torch's
default. Use :func:`auto_choices` to see what was picked.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Callable

import torch

from potentials.nn.tp.base import get_engine, register_engine
from potentials.nn.tp.gaunt import GauntEngine, SphericalPowerKernel, SphericalProductKernel, gaunt_tensor

log = logging.getLogger("potentials.nn.tp")

CANDIDATES = ("gaunt_grid", "gaunt_fft", "cg")
_CACHE: dict[tuple, dict] = {}
_TIMING_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("tp_auto_dtype", default=None)


@contextlib.contextmanager
def timing_dtype(dtype: torch.dtype):
    """Inside this context ``auto`` times candidates in ``dtype`` (the dtype the model being built will have)."""
    token = _TIMING_DTYPE.set(dtype)
    try:
        yield
    finally:
        _TIMING_DTYPE.reset(token)


class DenseProductKernel(SphericalProductKernel):
    """``z = Σ_ab G[a, b, c] x_a y_b`` with the dense Gaunt tensor G [(L1+1)², (L2+1)², (Lout+1)²] (exact)."""

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int):
        super().__init__(lmax1, lmax2, lmax_out)
        self.register_buffer("g", gaunt_tensor(self.lmax1, self.lmax2, self.lmax_out), persistent=False)

    def _product(self, x, y):
        g = self.g.to(x.dtype)
        xy = (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)  # [M, d1·d2]
        return xy @ g.reshape(-1, g.shape[-1])


class DensePowerKernel(SphericalPowerKernel):
    """f^ν for ν = 2..ν_max by repeated dense Gaunt products, keeping every intermediate degree (k·L) exactly."""

    def __init__(self, lmax_in: int, nu_max: int, lmax_out: int):
        super().__init__(lmax_in, nu_max, lmax_out)
        steps, degree = [], self.lmax_in
        for k in range(2, self.nu_max + 1):  # f^(k-1) (degree ≤ `degree`, exact zeros above (k-1)·L) times f
            out = max(k * self.lmax_in, self.lmax_out)
            steps.append(DenseProductKernel(degree, self.lmax_in, out))
            degree = out
        self.steps = torch.nn.ModuleList(steps)

    def _powers(self, x):
        p, powers, d = x, [], (self.lmax_out + 1) ** 2
        for step in self.steps:
            p = step._product(p, x)
            powers.append(p[:, :d])
        return torch.stack(powers, dim=1)


class _DenseEngine(GauntEngine):
    """The Gaunt modules with dense coupling-tensor kernels (``auto``'s ``cg`` candidate; not registered)."""

    def __init__(self):
        super().__init__(None)

    def product_kernel(self, lmax1, lmax2, lmax_out) -> SphericalProductKernel:
        return DenseProductKernel(lmax1, lmax2, lmax_out)

    def power_kernel(self, lmax_in, nu_max, lmax_out) -> SphericalPowerKernel:
        return DensePowerKernel(lmax_in, nu_max, lmax_out)


def _candidate(name: str) -> GauntEngine:
    return _DenseEngine() if name == "cg" else get_engine(name)


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
    minimum of ``repeats`` (``dtype``: given, else the model's from :func:`timing_dtype`, else torch's default;
    ``device``: CUDA when available). Within ``tie`` (10%) of the fastest, the first candidate (gaunt_grid: fewer
    grid points) is kept, so noise does not flip the choice."""

    def __init__(self, rows: int = 4096, repeats: int = 5, dtype=None, device=None, candidates=CANDIDATES, tie: float = 0.1):
        super().__init__(None)
        self.rows, self.repeats, self.candidates, self.tie = int(rows), int(repeats), tuple(candidates), float(tie)
        self._dtype = dtype
        self.device = torch.device(device) if device is not None else _default_device()

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or _TIMING_DTYPE.get() or torch.get_default_dtype()

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
        builders = {n: (lambda n=n: _candidate(n).product_kernel(lmax1, lmax2, lmax_out)) for n in self.candidates}
        dims = ((lmax1 + 1) ** 2, (lmax2 + 1) ** 2)
        return self._choose("product", (lmax1, lmax2, lmax_out), builders, dims, trivial=min(lmax1, lmax2) == 0)

    def power_kernel(self, lmax_in, nu_max, lmax_out) -> SphericalPowerKernel:
        builders = {n: (lambda n=n: _candidate(n).power_kernel(lmax_in, nu_max, lmax_out)) for n in self.candidates}
        return self._choose("power", (lmax_in, nu_max, lmax_out), builders, ((lmax_in + 1) ** 2,), trivial=lmax_in == 0 or nu_max == 1)
