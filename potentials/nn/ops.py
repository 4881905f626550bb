"""Small tensor operations shared by blocks and models (no project imports, so no import cycles)."""

from __future__ import annotations

import contextlib
import contextvars

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` [E, ...] into ``dim_size`` bins given by ``index`` [E]."""
    out = torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add(0, index, src)  # out of place: torch.func.vmap (committees) rejects the in-place form


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


_TRACING: contextvars.ContextVar[bool] = contextvars.ContextVar("potentials_tracing", default=False)


@contextlib.contextmanager
def tracing():
    """Within this context the model is being traced into one graph (:mod:`potentials.models.compiled`): every
    block takes its single-pass path (no Python loops over atom or edge chunks, which would fix the numbers of
    atoms and edges in the graph) and no memory-lean custom autograd (the graph holds the derivatives itself)."""
    token = _TRACING.set(True)
    try:
        yield
    finally:
        _TRACING.reset(token)


def is_tracing() -> bool:
    """True inside :func:`tracing`."""
    return _TRACING.get()


def use_fused(module: torch.nn.Module) -> bool:
    """True inside :func:`fused_inference` for a module in eval mode (never while tracing)."""
    return _FUSED_INFERENCE.get() and not module.training and not _TRACING.get()


_CHUNK_RUNNER: contextvars.ContextVar = contextvars.ContextVar("potentials_chunk_runner", default=None)


@contextlib.contextmanager
def compiled_chunks(runner):
    """Within this context (and :func:`fused_inference`) the chunk bodies of :func:`chunked_aggregate` and
    :func:`node_checkpointed` run through ``runner`` — compiled kernels of static chunk shapes
    (:class:`potentials.models.compiled_chunks.ChunkKernels`) — instead of eagerly. ``runner`` provides
    ``edge_chunk`` / ``node_chunk`` (rows per chunk), ``forward(owner, fn, inputs, rows)`` → ``fn(*inputs)`` and
    ``vjp(owner, fn, inputs, need, grad, rows)`` → the gradients of ``fn`` with respect to the inputs flagged in ``need``
    (``None`` for the others), for row-wise ``fn`` and inputs of at most one chunk of rows."""
    token = _CHUNK_RUNNER.set(runner)
    try:
        yield
    finally:
        _CHUNK_RUNNER.reset(token)


def _eager_forward(owner, fn, inputs, rows):
    return fn(*inputs)


def input_vjp(fn, inputs, need, grad) -> list:
    """Recompute ``fn(*inputs)`` and return its gradients contracted with ``grad`` with respect to the inputs flagged
    in ``need`` (``None`` for the others and for inputs ``fn`` does not use). Used eagerly by the chunk loops and
    traced into the compiled backward kernels of :mod:`potentials.models.compiled_chunks`."""
    inputs = [t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
    with torch.enable_grad():
        out = fn(*inputs)
    wanted = [t for t, n in zip(inputs, need) if n]
    grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return [next(grads) if n else None for n in need]


def _eager_vjp(owner, fn, inputs, need, grad, rows):
    return input_vjp(fn, inputs, need, grad)


def _runner():
    """(edge rows, node rows, forward, vjp) of the active chunk runner, or the eager ones."""
    r = _CHUNK_RUNNER.get()
    if r is None:
        return CHUNK_EDGES, CHUNK_NODES, _eager_forward, _eager_vjp
    return r.edge_chunk, r.node_chunk, r.forward, r.vjp


CHUNK_NODES = 256  # nodes per checkpointed chunk of node_checkpointed


def node_checkpointed(owner: torch.nn.Module, fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` for a row-wise (per-node) ``fn`` of the module ``owner``. When :func:`use_fused` holds for
    ``owner`` (inference), it is evaluated in chunks of :data:`CHUNK_NODES` rows that are each checkpointed: only the
    inputs are kept for the backward pass, the intermediates are recomputed there. Otherwise one plain call."""
    n = tensors[0].shape[0]
    runner = _CHUNK_RUNNER.get()
    if use_fused(owner) and runner is not None and runner.node_chunk:
        return _RowChunked.apply(owner, fn, *tensors)
    if not use_fused(owner) or not torch.is_grad_enabled() or n <= CHUNK_NODES:
        return fn(*tensors)
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(fn, *(t[i:i + CHUNK_NODES] for t in tensors), use_reentrant=False) for i in range(0, n, CHUNK_NODES)]
    return torch.cat(parts, dim=0)


CHUNK_EDGES = 512  # edges per chunk of chunked_aggregate: cache-sized temporaries (~2.6 MB at 32 channels x 40 components, float32); 512 was fastest on CPU at 2,048 atoms (256-4096 tried)


def chunked_aggregate(message_fn, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, edge_index: torch.Tensor,
                      owner=None) -> torch.Tensor:
    """``out_i = Σ_{e: centre(e)=i} message_fn(x[neighbour(e)], y_e, r_e)`` walking the edges in chunks.

    x [n, ...] node tensor, y [E, ...], r [E, ...] edge tensors, edge_index [2, E] (centre, neighbour) → [n, ...].
    Nothing per edge is kept for the backward pass: each chunk's messages are recomputed there and differentiated
    with respect to x, y and r (first derivatives only; the parameters used inside ``message_fn`` get none).
    Peak memory is O(n + chunk) instead of O(E) — the inference path of :func:`fused_inference`. ``owner``
    identifies ``message_fn`` across calls (the compiled kernels of :func:`compiled_chunks` are cached by it:
    any hashable that is the same object for the same message function, e.g. a tuple of modules).
    """
    return _ChunkedAggregate.apply(message_fn, x, y, r, edge_index, owner)


def _chunks(num: int, size: int):
    for start in range(0, num, size):
        yield slice(start, min(start + size, num))


class _ChunkedAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, message_fn, x, y, r, edge_index, owner):
        edge_rows, _, run, _ = _runner()
        centre, neighbour = edge_index[0], edge_index[1]
        out = None
        for s in _chunks(y.shape[0], edge_rows):
            m = run(owner, message_fn, [x.index_select(0, neighbour[s]), y[s], r[s]], edge_rows)
            if out is None:
                out = m.new_zeros((x.shape[0], *m.shape[1:]))
            out.index_add_(0, centre[s], m)
        if out is None:  # no edges: the output shape is that of one (empty) message
            m = message_fn(x[:0], y[:0], r[:0])
            out = m.new_zeros((x.shape[0], *m.shape[1:]))
        ctx.message_fn, ctx.owner = message_fn, owner
        ctx.save_for_backward(x, y, r, edge_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        edge_rows, _, _, vjp = _runner()
        x, y, r, edge_index = ctx.saved_tensors
        centre, neighbour = edge_index[0], edge_index[1]
        need = list(ctx.needs_input_grad[1:4])  # x, y, r
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_y = torch.zeros_like(y) if need[1] else None
        grad_r = torch.zeros_like(r) if need[2] else None
        for s in _chunks(y.shape[0], edge_rows):
            inputs = [x.index_select(0, neighbour[s]), y[s], r[s]]
            gx, gy, gr = vjp(ctx.owner, ctx.message_fn, inputs, need, grad_out.index_select(0, centre[s]), edge_rows)
            if gx is not None:
                grad_x.index_add_(0, neighbour[s], gx)
            if gy is not None:
                grad_y[s] = gy
            if gr is not None:
                grad_r[s] = gr
        return None, grad_x, grad_y, grad_r, None, None


class _RowChunked(torch.autograd.Function):
    """``fn(*tensors)`` for a row-wise ``fn``, in chunks of the active runner's node rows, recomputed in the
    backward pass (first derivatives only)."""

    @staticmethod
    def forward(ctx, owner, fn, *tensors):
        _, node_rows, run, _ = _runner()
        parts = [run(owner, fn, [t[s] for t in tensors], node_rows) for s in _chunks(tensors[0].shape[0], node_rows)]
        ctx.owner, ctx.fn = owner, fn
        ctx.save_for_backward(*tensors)
        return torch.cat(parts, dim=0) if parts else fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):
        _no_double_backward()
        _, node_rows, _, vjp = _runner()
        tensors = ctx.saved_tensors
        need = list(ctx.needs_input_grad[2:])
        grads = [torch.zeros_like(t) if n else None for t, n in zip(tensors, need)]
        for s in _chunks(tensors[0].shape[0], node_rows):
            for g, part in zip(grads, vjp(ctx.owner, ctx.fn, [t[s] for t in tensors], need, grad_out[s], node_rows)):
                if g is not None:
                    g[s] = part
        return (None, None, *grads)


def _no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused_inference(): the chunked kernels give first derivatives only; evaluate the model outside "
            "potentials.nn.ops.fused_inference() (or in train mode) for higher derivatives"
        )
