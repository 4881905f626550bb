"""Compiled execution: energy → forces/stress traced into one graph of aten ops, then compiled.

The pattern (NequIP's, see shared design note ``compiled-execution.md``): ``make_fx`` runs the eager code of
:func:`~potentials.models.derivatives.energy_forces_stress` on symbolic-shape proxies, so the autograd calls that
give forces and stress are recorded as ordinary graph ops. In that graph forces are plain outputs; the parameter
gradients of a force loss then need only a *first-order* backward of the compiled graph, which AOTAutograd
supports (a compiled double backward is not). Python objects (e3nn ``Irreps``) never reach dynamo.

Inputs of the graph, all with symbolic sizes n (atoms), E (edges), B (structures):

==========  ==========  ======  =========================================
positions   [n, 3]      float   Å
cell        [B, 3, 3]   float   Å, rows = lattice vectors
pbc         [B, 3]      bool
species     [n]         long    element indices (validated *before* the graph, eagerly)
edge_index  [2, E]      long    (centre, neighbour)
shifts      [E, 3]      float   integer cell shifts
batch       [n]         long    structure of each atom
num_atoms   [B]         long
==========  ==========  ======  =========================================

followed by the model's parameters and buffers (``params_as_inputs=True``: training, gradients reach the live
leaves, so optimisers, EMA and DDP need no change) or with them baked in as constants (inference, export).
Outputs: ``energy`` [B] (eV), then ``forces`` [n, 3] (eV/Å) and ``stress`` [B, 3, 3] (eV/Å³) as asked.

Sizes 0 and 1 are specialised by PyTorch, so graphs with fewer than 2 atoms or 2 edges run eagerly, and B = 1
(the calculator) and B ≥ 2 (batches) are two graphs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.models.derivatives import energy_forces_stress
from potentials.nn.ops import tracing

log = logging.getLogger(__name__)

INPUT_KEYS = ("positions", "cell", "pbc", "species", "edge_index", "shifts", "batch", "num_atoms")
MIN_SIZE = 2  # atoms / edges below this run eagerly (sizes 0 and 1 are always specialised)
# Inductor options of inference graphs (weights baked in): the C++ wrapper calls the generated kernels without a
# Python call per kernel (what dominates small structures: 3BPA reference model 25 -> 10 ms per call; freezing the
# weights into the kernels gained nothing more there).
INFERENCE_OPTIONS = {"cpp_wrapper": True}


def graph_inputs(model: torch.nn.Module, graph: AtomicGraph) -> list[torch.Tensor]:
    """The graph's input tensors in :data:`INPUT_KEYS` order; the species are computed (and unknown elements
    rejected with a :class:`PotentialsError`) here, eagerly, outside any traced code."""
    species = graph["species"] if "species" in graph else model.species(graph["numbers"])
    return [species if k == "species" else graph[k] for k in INPUT_KEYS]


def _decompositions() -> dict:
    """Decompositions applied while tracing: SiLU's backward through the sigmoid, so that the traced force graph
    stays differentiable (aten has no derivative of ``silu_backward``), and outer-product matmuls as products."""
    table = {}

    def silu_backward(grad_output, x):
        s = torch.sigmoid(x)
        return grad_output * s * (1 + x * (1 - s))

    table[torch.ops.aten.silu_backward.default] = silu_backward

    def mm(a, b):
        # [n, 1] @ [1, k] (e.g. the backward of a Linear to one output) as a broadcast product: inductor would
        # otherwise decompose it only while n + k <= 32, a size guard that recompiles for small structures
        if isinstance(a.shape[-1], int) and a.shape[-1] == 1:
            return a * b
        return NotImplemented

    table[torch.ops.aten.mm.default] = mm
    return table


@contextlib.contextmanager
def _no_duck_shapes():
    """Give every input dimension its own symbol (n, E, B that happen to be equal are not merged)."""
    from torch.fx.experimental import _config

    old = _config.use_duck_shape
    _config.use_duck_shape = False
    try:
        yield
    finally:
        _config.use_duck_shape = old


def trace(
    model: torch.nn.Module, graph: AtomicGraph, *, forces: bool = True, stress: bool = False,
    params_as_inputs: bool = True,
) -> torch.fx.GraphModule:
    """Trace ``energy_forces_stress(model, ·)`` into one ``fx.GraphModule`` with symbolic n, E and B.

    Call it as ``gm(*graph_inputs(model, graph), *params)`` with ``params`` the tensors of
    :func:`parameters_and_buffers` (only if ``params_as_inputs``). Returns a tuple (energy[, forces][, stress]).
    Raises :class:`PotentialsError` if tracing fixed the number of atoms, edges or structures (a Python branch
    on a size somewhere in the model), since the graph would then be wrong for other sizes.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    names, tensors = parameters_and_buffers(model)
    inputs = _trace_inputs(graph_inputs(model, graph), model)

    def run(*flat):
        g = AtomicGraph(zip(INPUT_KEYS, flat[: len(INPUT_KEYS)]))
        if params_as_inputs:
            state = dict(zip(names, flat[len(INPUT_KEYS):]))
            fn = lambda gr: torch.func.functional_call(model, state, (gr,))  # noqa: E731
        else:
            fn = model
        out = energy_forces_stress(fn, g, forces=forces, stress=stress, training=True)
        return tuple(out[k] for k in ("energy", "forces", "stress") if k in out)

    args = inputs + (tensors if params_as_inputs else [])
    with tracing(), torch.enable_grad():  # under the caller's autocast: the backbone casts are recorded
        gm = make_fx(
            run, decomposition_table=_decompositions(), tracing_mode="symbolic",
            _allow_non_fake_inputs=True, _error_on_data_dependent_ops=True,
        )(*args)
    _check_symbolic(gm, graph)
    return gm


# Sizes of the synthetic inputs the graphs are traced on: primes that no weight dimension or fixed axis (2, 3)
# equals, so that PyTorch's duck sizing gives exactly one symbol each to n, E and B (8 independent symbols — one
# per input axis — made the symbolic-shape reasoning of the trace several times slower).
TRACE_ATOMS, TRACE_EDGES, TRACE_STRUCTURES = 1009, 4001, 101


def _trace_inputs(inputs: list[torch.Tensor], model: torch.nn.Module) -> list[torch.Tensor]:
    """Inputs of the same dtypes, devices and structure (B = 1 stays 1) as ``inputs`` but of the sizes above.
    Only their sizes matter to the trace (no value reaches Python); the values are still valid indices."""
    g = dict(zip(INPUT_KEYS, inputs))
    n, e = TRACE_ATOMS, TRACE_EDGES
    b = 1 if g["num_atoms"].shape[0] == 1 else TRACE_STRUCTURES
    pos, cell = g["positions"], g["cell"]
    out = {
        "positions": torch.zeros((n, 3), dtype=pos.dtype, device=pos.device),
        "cell": torch.zeros((b, 3, 3), dtype=cell.dtype, device=cell.device),
        "pbc": torch.zeros((b, 3), dtype=g["pbc"].dtype, device=pos.device),
        "species": torch.arange(n, device=pos.device) % max(int(model.num_elements), 1),
        "edge_index": torch.stack([torch.arange(e, device=pos.device) % n, (torch.arange(e, device=pos.device) + 1) % n]),
        "shifts": torch.zeros((e, 3), dtype=g["shifts"].dtype, device=pos.device),
        "batch": torch.arange(n, device=pos.device) % b,
        "num_atoms": torch.zeros((b,), dtype=g["num_atoms"].dtype, device=pos.device),
    }
    return [out[k] for k in INPUT_KEYS]


def _check_symbolic(gm: torch.fx.GraphModule, graph: AtomicGraph) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shape = {k: placeholders[i].meta["val"].shape for i, k in enumerate(INPUT_KEYS)}
    checks = [("atoms", shape["positions"][0]), ("edges", shape["edge_index"][1])]
    if graph["num_atoms"].shape[0] >= MIN_SIZE:
        checks.append(("structures", shape["num_atoms"][0]))
    fixed = [name for name, size in checks if not isinstance(size, torch.SymInt)]
    if fixed:
        raise PotentialsError(
            f"tracing fixed the number of {', '.join(fixed)} in the graph (a Python branch or loop on a size in the "
            "model's forward); this model cannot be compiled"
        )


def parameters_and_buffers(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and live tensors of all parameters and buffers (the graph's trailing inputs)."""
    items = list(model.named_parameters()) + list(model.named_buffers())
    return [k for k, _ in items], [v for _, v in items]


class CompiledPotential:
    """``energy_forces_stress`` through traced and compiled graphs, cached per signature.

    Args:
        model: any potentials model (graph → energy [B]).
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` compiles nothing to C++, for tests) or
            ``None`` to run the traced graph without compiling it.
        params_as_inputs: parameters are graph inputs (training, fine-tuning) or constants (inference).
        check: compare the first evaluation of each new graph with eager execution (tolerance 1e-8 relative
            in float64, 1e-4 in float32) and raise :class:`PotentialsError` if they differ.
        fallback: if a graph cannot be traced or compiled, log the reason once and run that signature eagerly
            (training) instead of raising.
        lean_edges: inference only (``params_as_inputs=False``): structures with more edges than this run the
            memory-lean path instead of the one graph — the eager chunk loops of
            :func:`~potentials.nn.ops.fused_inference` with compiled static-shape chunk kernels
            (:mod:`potentials.models.compiled_chunks`); nothing per edge is stored. ``None``: always one graph.

    ``__call__(graph, forces, stress)`` returns the dict of :func:`energy_forces_stress`. Graphs with fewer than
    2 atoms or edges run eagerly. The first call of each signature (forces/stress asked, B = 1 or not, dtype,
    device, autocast) traces and compiles; the time it took is logged and kept in :attr:`compile_seconds`.
    """

    def __init__(self, model: torch.nn.Module, *, backend: str | None = "inductor", params_as_inputs: bool = True,
                 check: bool = True, fallback: bool = False, lean_edges: int | None = None):
        self.model = model
        self.lean_edges = lean_edges
        self._chunk_kernels = None  # ChunkKernels of the memory-lean path, built on first use
        self.fallback = fallback
        self.backend = backend
        self.params_as_inputs = params_as_inputs
        self.check = check
        self._cache: dict[tuple, Callable] = {}
        self.compile_seconds: dict[tuple, float] = {}
        self._pending = None  # (key, start, traced) of a graph whose first (compiling) call is still to come

    # the cache holds compiled code: never copied or pickled (EMA copies of the module start without it)
    def __deepcopy__(self, memo):
        import copy

        return CompiledPotential(copy.deepcopy(self.model, memo), backend=self.backend,
                                 params_as_inputs=self.params_as_inputs, check=self.check, fallback=self.fallback,
                                 lean_edges=self.lean_edges)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["compile_seconds"], state["_chunk_kernels"] = {}, {}, None
        return state

    def _key(self, graph: AtomicGraph, forces: bool, stress: bool) -> tuple:
        pos = graph["positions"]
        amp = (torch.is_autocast_enabled(pos.device.type), torch.get_autocast_dtype(pos.device.type))
        return (forces, stress, graph["num_atoms"].shape[0] == 1, pos.dtype, pos.device, amp)

    def __call__(self, graph: AtomicGraph, *, forces: bool = True, stress: bool = False,
                 training: bool = False) -> dict[str, torch.Tensor]:
        n, e = graph["positions"].shape[0], graph["edge_index"].shape[1]
        if n < MIN_SIZE or e < MIN_SIZE:
            with torch.enable_grad():
                return energy_forces_stress(self.model, graph, forces=forces, stress=stress, training=training)
        if self.lean_edges is not None and e > self.lean_edges and not training and not self.params_as_inputs:
            return self._lean(graph, forces, stress)
        key = self._key(graph, forces, stress)
        fn = self._cache.get(key)
        first = fn is None
        try:
            if first:
                fn = self._build(graph, forces, stress, key)
            if fn is _EAGER:
                return energy_forces_stress(self.model, graph, forces=forces, stress=stress, training=training)
            out = self._run(fn, graph, forces, stress)
            if first and self.check:
                self._compare(out, graph, forces, stress)
        except Exception as exc:
            if not (first and self.fallback):
                raise
            log.warning("model.compile: this configuration cannot be compiled (%s: %s); running it eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._cache[key], self._pending = _EAGER, None
            return energy_forces_stress(self.model, graph, forces=forces, stress=stress, training=training)
        return out

    def _build(self, graph: AtomicGraph, forces: bool, stress: bool, key: tuple) -> Callable:
        t0 = time.perf_counter()
        gm = trace(self.model, graph, forces=forces, stress=stress, params_as_inputs=self.params_as_inputs)
        options = None
        if self.backend == "inductor" and not self.params_as_inputs:  # inference: weights are constants
            options = dict(INFERENCE_OPTIONS)
        fn = gm if self.backend is None else torch.compile(gm, backend=self.backend, dynamic=True, options=options)
        if self.backend is not None:
            # compile on the synthetic prime-sized inputs of the trace, so that no size coincidence of the first
            # real batch (e.g. B = 2 = edge_index.shape[0]) becomes a guard that a later batch fails (a recompile)
            args = _trace_inputs(graph_inputs(self.model, graph), self.model)
            if self.params_as_inputs:
                args = args + parameters_and_buffers(self.model)[1]
            with torch.autocast(graph["positions"].device.type, enabled=False), _no_duck_shapes():  # same grad mode
                fn(*args)
        self._cache[key] = fn
        t1 = time.perf_counter()
        self._pending = (key, t0, t1)
        return fn

    def _run(self, fn: Callable, graph: AtomicGraph, forces: bool, stress: bool) -> dict[str, torch.Tensor]:
        args = graph_inputs(self.model, graph)
        if self.params_as_inputs:
            args = args + parameters_and_buffers(self.model)[1]
        # autocast is already baked into the traced graph (backbone only): never apply it twice
        with torch.autocast(graph["positions"].device.type, enabled=False), _no_duck_shapes():
            outs = fn(*args)
        pending = self._pending
        if pending is not None:  # the first call of a compiled function compiles it: log trace + compile time
            key, t0, t1 = pending
            self.compile_seconds[key] = time.perf_counter() - t0
            log.info("compiled energy/forces/stress graph (%s): trace %.1f s, compile + first call %.1f s",
                     self.backend, t1 - t0, time.perf_counter() - t1)
            self._pending = None
        keys = ["energy"] + (["forces"] if forces else []) + (["stress"] if stress else [])
        return dict(zip(keys, outs))

    def _lean(self, graph: AtomicGraph, forces: bool, stress: bool) -> dict[str, torch.Tensor]:
        """The memory-lean path: eager chunk loops, compiled chunk bodies (first use compared with eager)."""
        from potentials.models.compiled_chunks import ChunkKernels
        from potentials.nn.ops import compiled_chunks, fused_inference

        first = self._chunk_kernels is None
        if first:
            self._chunk_kernels = ChunkKernels(backend="inductor" if self.backend == "inductor" else None)
        with fused_inference(), compiled_chunks(self._chunk_kernels), torch.enable_grad():
            out = energy_forces_stress(self.model, graph, forces=forces, stress=stress)
        if first:
            log.info("compiled memory-lean chunk kernels: %.1f s", self._chunk_kernels.compile_seconds)
            if self.check:
                self._compare(out, graph, forces, stress, lean=True)
        return {k: v.detach() for k, v in out.items()}

    def _compare(self, out: dict, graph: AtomicGraph, forces: bool, stress: bool, lean: bool = False) -> None:
        if lean:  # the same chunk loops run eagerly (the one-graph reference would store every per-edge tensor)
            from potentials.nn.ops import fused_inference

            with fused_inference(), torch.enable_grad():
                ref = energy_forces_stress(self.model, graph, forces=forces, stress=stress)
        else:
            with torch.enable_grad():
                ref = energy_forces_stress(self.model, graph, forces=forces, stress=stress, training=True)  # as traced
        tol = 1e-8 if graph["positions"].dtype == torch.float64 and _model_dtype(self.model) == torch.float64 else 1e-4
        for k, v in ref.items():
            got, want = out[k].detach(), v.detach()
            err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
            if not err <= tol:
                raise PotentialsError(
                    f"compiled {k} differs from eager execution by {err:.2e} (relative, tolerance {tol:g}); "
                    "run without compile and report this model configuration"
                )


_EAGER = object()  # cache entry of a signature that could not be compiled (fallback)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)


class EagerPotential:
    """Same call signature as :class:`CompiledPotential`, running :func:`energy_forces_stress` eagerly."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, graph: AtomicGraph, **kw) -> dict[str, torch.Tensor]:
        return energy_forces_stress(self.model, graph, **kw)


BACKENDS = ("inductor", "aot_eager", "trace")


def compiled_or_eager(model: torch.nn.Module, option: bool | str, **options: Any):
    """The executor for the config value ``model.compile``: ``false`` → :class:`EagerPotential`; ``true`` or
    ``inductor`` → :class:`CompiledPotential` (inductor, eager fallback with a logged reason); ``aot_eager`` →
    compiled without generating C++; ``trace`` → the traced graph run as is (no compiler)."""
    if option in (False, None, "false", "eager"):
        return EagerPotential(model)
    backend = "inductor" if option in (True, "true") else option
    if backend not in BACKENDS:
        raise PotentialsError(f"model.compile must be true, false or one of {list(BACKENDS)}, got {option!r}")
    return CompiledPotential(model, fallback=True, backend=None if backend == "trace" else backend, **options)
