"""Memory-lean compiled inference: the eager chunk loops of :func:`~potentials.nn.ops.fused_inference`, with each
chunk body (edge messages, per-node product basis) and its backward compiled for one static chunk shape.

Measured at 2,048 fcc Cu atoms (reference MACE, float32, 1 thread, idle machine; ±20 % between processes): eager
2.7 s per call; edge kernels only 2.0 s; edge (2,048) + product-basis (512 atoms) kernels 1.5–2.2 s — the default;
8,192-edge chunks 3.1 s, 512-edge chunks 2.0 s (edge kernels only). docs/benchmarks/md_lean.md has the benchmark.

The whole-graph compile of :mod:`potentials.models.compiled` keeps every per-edge tensor of the forward pass alive
for the force backward (7.7 GB at 2,048 fcc Cu atoms for the reference MACE in float32). The eager memory-lean
path walks the edges in chunks and recomputes each chunk's messages in the backward pass, so nothing per edge is
stored (0.6 GB), but runs every chunk op by op. Here the loop stays eager and the chunk bodies are compiled:

* ``forward(owner, fn, inputs, rows)``: ``fn(*inputs)`` for inputs of at most ``rows`` rows, padded to exactly
  ``rows`` (the last row repeated) so that one kernel serves every chunk of every structure, and cut back after.
* ``vjp(owner, fn, inputs, need, grad, rows)``: the gradients of ``fn`` with respect to the inputs flagged in
  ``need``, contracted with ``grad`` (the message recomputation and its backward in one kernel).

``fn`` must be row-wise (row k of the output depends on row k of each input only): padded rows then cannot
change the real ones. Kernels are traced with ``make_fx`` (weights baked in as constants) and compiled with
inductor's C++ wrapper; they are cached per ``owner`` (the modules that define ``fn``) and input signature.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from potentials.models.compiled import INFERENCE_OPTIONS, _decompositions
from potentials.nn.ops import input_vjp, tracing

log = logging.getLogger(__name__)

EDGE_CHUNK = 2048  # edges per compiled message kernel call
NODE_CHUNK = 512  # atoms per compiled product-basis kernel call (None: the eager per-node path)


class ChunkKernels:
    """Compiled static-shape chunk kernels; pass to :func:`potentials.nn.ops.compiled_chunks`.

    ``backend``: ``inductor`` (C++ kernels) or ``None`` (the traced graphs run as they are, for tests).
    ``compile_seconds`` accumulates the time spent tracing and compiling.
    """

    def __init__(self, backend: str | None = "inductor", edge_chunk: int = EDGE_CHUNK, node_chunk: int | None = NODE_CHUNK):
        self.backend = backend
        self.edge_chunk, self.node_chunk = int(edge_chunk), (int(node_chunk) if node_chunk else None)
        self._cache: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def forward(self, owner, fn, inputs: list[torch.Tensor], rows: int) -> torch.Tensor:
        key = (owner, "forward", _signature(inputs), rows)
        kernel = self._cache.get(key)
        padded, k = _pad(inputs, rows)
        if kernel is None:
            kernel = self._compile(lambda *a: (fn(*a),), padded, key)
        return kernel(*padded)[0][:k]

    def vjp(self, owner, fn, inputs: list[torch.Tensor], need: list[bool], grad: torch.Tensor, rows: int) -> list:
        need = tuple(bool(n) for n in need)
        key = (owner, "vjp", _signature(inputs), need, rows)
        kernel = self._cache.get(key)
        padded, k = _pad(inputs + [grad], rows)
        if kernel is None:

            def body(*args):  # unused inputs get zeros: a compiled graph returns tensors only
                grads = input_vjp(fn, args[:-1], need, args[-1])
                return tuple(g if g is not None else torch.zeros_like(t) for g, t, n in zip(grads, args, need) if n)

            kernel = self._compile(body, padded, key)
        grads = iter(kernel(*padded))
        return [next(grads)[:k] if n else None for n in need]

    def _compile(self, body: Callable, example: list[torch.Tensor], key: tuple) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        t0 = time.perf_counter()
        with tracing(), torch.enable_grad():
            gm = make_fx(body, decomposition_table=_decompositions(), tracing_mode="fake",
                         _allow_non_fake_inputs=True)(*example)
        if self.backend == "inductor":
            with torch.no_grad():
                kernel = torch._inductor.compile(gm, example, options=dict(INFERENCE_OPTIONS))
        elif self.backend is None:
            kernel = gm
        else:
            raise ValueError(f"ChunkKernels backend must be 'inductor' or None, got {self.backend!r}")
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        log.info("compiled %s chunk kernel (%d rows) in %.1f s", key[1], key[-1], dt)
        self._cache[key] = kernel
        return kernel


def _signature(inputs: list[torch.Tensor]) -> tuple:
    return tuple((t.dtype, t.device, tuple(t.shape[1:])) for t in inputs)


def _pad(inputs: list[torch.Tensor], rows: int) -> tuple[list[torch.Tensor], int]:
    """Inputs of k ≤ rows rows → exactly ``rows`` rows (the last row repeated), and k."""
    k = inputs[0].shape[0]
    if k == rows:
        return list(inputs), k
    if not 0 < k < rows:
        raise ValueError(f"chunk of {k} rows does not fit kernels of {rows} rows")
    idx = torch.arange(rows, device=inputs[0].device).clamp_(max=k - 1)
    return [t.index_select(0, idx) for t in inputs], k
