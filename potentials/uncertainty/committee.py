"""Committee (deep ensemble) of separately trained models: mean prediction and member spread.

The neighbour list, graph and element indices are built (and validated) once for all members; then the members
are evaluated by one of three exact strategies (per-member results agree to rounding, ~1e-15 in float64):

* ``"fused"``: one :func:`~potentials.models.energy_forces_stress` call per member inside
  :func:`~potentials.nn.ops.fused_inference` (the single-model calculator's memory-lean kernels);
* ``"stored"``: the same without the fused kernels (intermediates stored, not recomputed in the backward pass:
  faster for narrow models, ≲ 0.5 GB per member at the reference width up to :data:`STORED_MAX_EDGES` edges);
* ``"vmap"``: one batched pass, ``torch.func.vmap`` of ``functional_call`` over the members' stacked weights
  (``stack_module_state``), per-member position (and strain) leaves, one backward of Σ_m E_m; members must share
  the architecture. Faster where the call is dominated by per-operation overhead (small models, small graphs),
  slower for wide ones. It needs the model's scatter to be out of place: if vmap rejects an operation (the in-place
  ``index_add_`` of :func:`~potentials.nn.ops.scatter_sum`), the committee falls back to the others for good
  (a warning if ``"vmap"`` was asked for, else an info message).

``strategy="auto"`` (default) times the candidates on the first calls at each size (2 calls each, atoms and edges
bucketed by powers of two) and then keeps the fastest. Members share no weight-dependent work, and the shared
part (edge vectors, spherical harmonics, radial basis, neighbour list) is 1–10 % of a member's call, so the
floating-point work of N members is ≈ N single calls however they are batched (docs/benchmarks/uncertainty.cost.md).

Spreads use the sample standard deviation (ddof = 1): ``energy_std`` [B], ``forces_std`` [n] = √Σ_α Var F_iα,
``stress_std`` [B, 3, 3]; all zero for a single member.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
import warnings
from typing import Sequence

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.nn.ops import fused_inference

# Above this many edges the members use the memory-lean fused_inference kernels. Stored intermediates of one member
# at the reference MACE width (32 channels, radial MLP 64x3): 2.0 GB at 21,000 edges (fused: 0.23 GB), so ≈ 0.5 GB here.
STORED_MAX_EDGES = 5_000
STRATEGIES = ("auto", "fused", "stored", "vmap")
AUTO_TRIALS = 2  # timed calls per candidate strategy before "auto" decides (per size bucket)

log = logging.getLogger(__name__)

def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A list of checkpoint paths, or one glob pattern (``runs/x/*/checkpoints/last.ckpt``) → sorted list."""
    if isinstance(paths, (str, os.PathLike)):
        pattern = os.fspath(paths)
        found = sorted(glob.glob(pattern))
        if not found:
            raise PotentialsError(f"committee: no checkpoint matches {pattern!r}")
        return found
    out = [os.fspath(p) for p in paths]
    if not out:
        raise PotentialsError("committee: give at least one checkpoint")
    return out


class Committee(torch.nn.Module):
    """M models sharing cutoff and element table; ``evaluate`` returns mean and spread."""

    def __init__(self, members: Sequence[torch.nn.Module], names: Sequence[str] | None = None, strategy: str = "auto"):
        super().__init__()
        if len(members) == 0:
            raise PotentialsError("committee: no members")
        if strategy not in STRATEGIES:
            raise PotentialsError(f"committee: strategy must be one of {STRATEGIES}, got {strategy!r}")
        names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
        r0, z0 = float(members[0].r_max), list(members[0].atomic_numbers)
        for m, name in zip(members, names):
            if float(m.r_max) != r0:
                raise PotentialsError(f"committee: {name} has r_max {m.r_max} Å, {names[0]} has {r0} Å (must match)")
            if list(m.atomic_numbers) != z0:
                raise PotentialsError(
                    f"committee: {name} has elements {list(m.atomic_numbers)}, {names[0]} has {z0} (must match)"
                )
        self.members = torch.nn.ModuleList(members).eval()
        self.r_max = r0
        self.atomic_numbers = z0
        self.strategy = strategy
        self.same_architecture = same_architecture(members)
        self._vmap_ok = self.same_architecture  # False once vmap rejected the model
        self.last_strategy: str | None = None  # the strategy of the latest call
        self._trials: dict[tuple, dict[str, list[float]]] = {}
        self.choice: dict[tuple, str] = {}  # "auto": size bucket → fastest strategy

    @classmethod
    def from_checkpoints(cls, paths, device="cpu", strategy: str = "auto", **overrides) -> "Committee":
        """Load every checkpoint of ``paths`` (list or glob); ``overrides`` as for ``model_from_checkpoint``."""
        from potentials.calculator import model_from_checkpoint

        paths = expand_paths(paths)
        members = [model_from_checkpoint(p, device=device, **overrides) for p in paths]
        return cls(members, names=paths, strategy=strategy).to(device)

    def __len__(self) -> int:
        return len(self.members)

    def member_predictions(self, graph: AtomicGraph, stress: bool = False) -> dict[str, torch.Tensor]:
        """Per-member ``energy`` [M, B], ``forces`` [M, n, 3], ``stress`` [M, B, 3, 3] (elements validated once)."""
        if "species" not in graph:  # validate the elements once (a PotentialsError names unknown ones), not per member
            graph = graph.replace(species=self.members[0].species(graph["numbers"]))
        candidates = self.candidates(graph)
        if self.strategy != "auto":
            fallback = "stored" if "stored" in candidates else "fused"
            return self._run(self.strategy if self.strategy in candidates else fallback, graph, stress)
        key = (graph["positions"].shape[0].bit_length(), graph["edge_index"].shape[1].bit_length(), bool(stress))
        if key in self.choice and self.choice[key] in candidates:
            return self._run(self.choice[key], graph, stress)
        trials = self._trials.setdefault(key, {})
        name = min(candidates, key=lambda c: len(trials.get(c, [])))
        t0 = time.perf_counter()
        out = self._run(name, graph, stress)
        if name in self.candidates(graph):  # (vmap may have just been found unusable)
            trials.setdefault(name, []).append(time.perf_counter() - t0)
        candidates = self.candidates(graph)
        if all(len(trials.get(c, [])) >= AUTO_TRIALS for c in candidates):
            self.choice[key] = min(candidates, key=lambda c: min(trials[c]))
        return out

    def candidates(self, graph: AtomicGraph) -> list[str]:
        """Strategies usable on ``graph``: only the fused kernels above :data:`STORED_MAX_EDGES` edges."""
        if graph["edge_index"].shape[1] > STORED_MAX_EDGES:
            return ["fused"]
        return ["fused", "stored"] + (["vmap"] if self._vmap_ok else [])

    def _run(self, name: str, graph: AtomicGraph, stress: bool) -> dict[str, torch.Tensor]:
        members = list(self.members)
        self.last_strategy = name
        if name == "vmap":
            from torch.func import stack_module_state

            params, buffers = stack_module_state(members)  # stacked per call (a copy of the weights: cheap, never stale)
            try:
                return members_vmapped(members[0], ({k: v.detach() for k, v in params.items()}, buffers), graph, stress)
            except (RuntimeError, NotImplementedError) as exc:  # an operation vmap cannot batch: never try again
                self._vmap_ok = False
                self.last_strategy = "stored"
                (log.warning if self.strategy == "vmap" else log.info)(
                    "committee: one batched (vmap) pass not possible for this model (%s); members are evaluated one "
                    "by one", str(exc).splitlines()[0])
                name = "stored"
        return members_sequential(members, graph, stress=stress, fused=name == "fused")

    def evaluate(self, graph: AtomicGraph, stress: bool = False) -> dict[str, torch.Tensor]:
        """Mean ``energy`` [B], ``forces`` [n, 3], ``stress`` [B, 3, 3]; spreads ``energy_std`` [B],
        ``forces_std`` [n], ``stress_std`` [B, 3, 3]; members ``*_ensemble``."""
        return summarize(self.member_predictions(graph, stress))


def summarize(members: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Member predictions (leading axis M) → mean, sample std (ddof = 1; zero when M = 1) and the members."""
    out: dict[str, torch.Tensor] = {}
    for key, value in members.items():
        value = value.detach()
        out[key] = value.mean(0)
        var = value.var(0, correction=1) if value.shape[0] > 1 else torch.zeros_like(value[0])
        out[f"{key}_std"] = var.sum(-1).sqrt() if key == "forces" else var.sqrt()
        out[f"{key}_ensemble"] = value
    return out


def members_one_pass(members, graph: AtomicGraph, stress: bool, retain_graph: bool = False, leaves=None) -> dict[str, torch.Tensor]:
    """Per-member energy/forces/stress with one backward pass; ``leaves`` (optional) are the members' position
    leaves (the caller keeps them to differentiate more, with ``retain_graph``)."""
    positions, cell = graph["positions"], graph["cell"]
    leaves_x, leaves_s, energies = [], [], []
    for m, model in enumerate(members):
        x = leaves[m] if leaves is not None else positions.detach().requires_grad_(True)
        leaves_x.append(x)
        if stress:
            eps = torch.zeros((cell.shape[0], 3, 3), dtype=x.dtype, device=x.device, requires_grad=True)
            leaves_s.append(eps)
            sym = 0.5 * (eps + eps.transpose(1, 2))
            x_used = x + torch.einsum("ni,nij->nj", x, sym[graph["batch"]])
            cell_used = cell + torch.bmm(cell.to(sym.dtype), sym)
        else:
            x_used, cell_used = x, cell
        energies.append(model(graph.replace(positions=x_used, cell=cell_used)))
    energy = torch.stack(energies)  # [M, B]
    grads = torch.autograd.grad(energy.sum(), leaves_x + leaves_s, allow_unused=True, retain_graph=retain_graph)
    forces = torch.stack([-g if g is not None else torch.zeros_like(positions) for g in grads[: len(members)]])
    out = {"energy": energy.detach(), "forces": forces}
    if stress:
        g = torch.stack([s if s is not None else torch.zeros_like(e) for s, e in zip(grads[len(members):], leaves_s)])
        volume = torch.linalg.det(cell.to(g.dtype)).abs()
        periodic = graph["pbc"].any(dim=1) & (volume > 0)
        safe = torch.where(periodic, volume, torch.ones_like(volume))
        out["stress"] = torch.where(periodic[None, :, None, None], g / safe[None, :, None, None], torch.zeros_like(g))
    return out


def same_architecture(members) -> bool:
    """True when every member has the class and the parameter/buffer names and shapes of the first (vmappable)."""
    def shapes(m):
        return [(k, tuple(v.shape), v.dtype) for k, v in list(m.named_parameters()) + list(m.named_buffers())]

    first = shapes(members[0])
    return all(type(m) is type(members[0]) and shapes(m) == first for m in members)


def members_vmapped(base: torch.nn.Module, stacked, graph: AtomicGraph, stress: bool) -> dict[str, torch.Tensor]:
    """All members in one batched pass: ``vmap`` of ``functional_call(base, member weights)`` over ``stacked`` =
    (params, buffers) with a leading member axis M, each member its own position leaf [n, 3] (and strain
    [B, 3, 3]); one backward of Σ_m E_m. Runs in :func:`~potentials.nn.ops.tracing` mode (single-pass blocks, no
    chunked custom autograd). ``graph`` must hold ``species``. Returns as :func:`members_sequential`."""
    from torch.func import functional_call, vmap

    from potentials.models.derivatives import cell_volume
    from potentials.nn.ops import tracing

    params, buffers = stacked
    m = next(iter(params.values())).shape[0]
    positions, cell, batch = graph["positions"], graph["cell"], graph["batch"]
    x = positions.detach().unsqueeze(0).expand(m, -1, -1).clone().requires_grad_(True)  # [M, n, 3]
    eps = torch.zeros((m, cell.shape[0], 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=stress)

    def energy(p, b, x_m, eps_m):
        if stress:
            sym = 0.5 * (eps_m + eps_m.transpose(1, 2))
            g = graph.replace(positions=x_m + torch.einsum("ni,nij->nj", x_m, sym[batch]),
                              cell=cell + torch.bmm(cell.to(sym.dtype), sym))
        else:
            g = graph.replace(positions=x_m)
        return functional_call(base, (p, b), (g,))

    with tracing(), torch.enable_grad(), warnings.catch_warnings():
        # an op without a batching rule is looped over members: slower, which "auto" measures; no warning per call
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        e = vmap(energy)(params, buffers, x, eps)  # [M, B]
    grads = torch.autograd.grad(e.sum(), [x, eps] if stress else [x], allow_unused=True)
    forces = -grads[0] if grads[0] is not None else torch.zeros_like(x)
    out = {"energy": e.detach(), "forces": forces}
    if stress:
        g = grads[1] if grads[1] is not None else torch.zeros_like(eps)
        volume = cell_volume(cell.to(g.dtype))
        periodic = graph["pbc"].any(dim=1) & (volume > 0)
        safe = torch.where(periodic, volume, torch.ones_like(volume))
        out["stress"] = torch.where(periodic[None, :, None, None], g / safe[None, :, None, None], torch.zeros_like(g))
    return out


def members_sequential(members, graph: AtomicGraph, stress: bool = False, fused: bool = True) -> dict[str, torch.Tensor]:
    """One ``energy_forces_stress`` call (forward and backward) per member → ``energy`` [M, B], ``forces``
    [M, n, 3], ``stress`` [M, B, 3, 3]; ``fused`` runs them inside :func:`~potentials.nn.ops.fused_inference`."""
    from potentials.models import energy_forces_stress

    outs = []
    with fused_inference() if fused else contextlib.nullcontext():
        for model in members:
            outs.append(energy_forces_stress(model, graph, forces=True, stress=stress))
    return {k: torch.stack([o[k].detach() for o in outs]) for k in outs[0]}
