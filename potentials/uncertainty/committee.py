"""Committee (deep ensemble) of separately trained models: mean prediction and member spread.

The neighbour list, graph and element indices are built (and validated) once for all members; then each member
is evaluated with :func:`~potentials.models.energy_forces_stress`, one after the other, each with its own backward
pass (so only one member's intermediates are alive at a time). On graphs of at most :data:`STORED_MAX_EDGES` edges
the members run with stored intermediates (plain autograd), not the memory-lean recomputing kernels of
:func:`~potentials.nn.ops.fused_inference` that the single-model calculator uses: at these sizes memory is no
concern (≲ 0.5 GB per member at the reference width) and not recomputing the edge messages in the backward pass saves ~15–25 % per member.

Why not one batched pass over stacked weights: members share no weight-dependent work (radial MLPs, edge products,
symmetric contractions, readouts all differ), and the shared part — edge vectors, spherical harmonics, radial basis,
neighbour list — is 1–10 % of one member's call (docs/benchmarks/uncertainty.md), so the floating-point work of an
N-member committee is ≈ N single calls however it is batched. ``torch.func.vmap`` of ``functional_call`` over
``stack_module_state`` was measured 2–3× *slower* than evaluating the members one by one (batched backward rules),
and it needs an out-of-place :func:`~potentials.nn.ops.scatter_sum` (the in-place ``index_add_`` is rejected by vmap).

Spreads use the sample standard deviation (ddof = 1): ``energy_std`` [B], ``forces_std`` [n] = √Σ_α Var F_iα,
``stress_std`` [B, 3, 3]; all zero for a single member.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Sequence

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.nn.ops import fused_inference

# Above this many edges the members use the memory-lean fused_inference kernels. Stored intermediates of one member
# at the reference MACE width (32 channels, radial MLP 64x3): 2.0 GB at 21,000 edges (fused: 0.23 GB), so ≈ 0.5 GB here.
STORED_MAX_EDGES = 5_000

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

    def __init__(self, members: Sequence[torch.nn.Module], names: Sequence[str] | None = None):
        super().__init__()
        if len(members) == 0:
            raise PotentialsError("committee: no members")
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

    @classmethod
    def from_checkpoints(cls, paths, device="cpu", **overrides) -> "Committee":
        """Load every checkpoint of ``paths`` (list or glob); ``overrides`` as for ``model_from_checkpoint``."""
        from potentials.calculator import model_from_checkpoint

        paths = expand_paths(paths)
        return cls([model_from_checkpoint(p, device=device, **overrides) for p in paths], names=paths).to(device)

    def __len__(self) -> int:
        return len(self.members)

    def member_predictions(self, graph: AtomicGraph, stress: bool = False) -> dict[str, torch.Tensor]:
        """Per-member ``energy`` [M, B], ``forces`` [M, n, 3], ``stress`` [M, B, 3, 3] (elements validated once;
        stored intermediates up to :data:`STORED_MAX_EDGES` edges, the fused kernels above)."""
        if "species" not in graph:  # validate the elements once (a PotentialsError names unknown ones), not per member
            graph = graph.replace(species=self.members[0].species(graph["numbers"]))
        fused = graph["edge_index"].shape[1] > STORED_MAX_EDGES
        return members_sequential(list(self.members), graph, stress=stress, fused=fused)

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


def members_sequential(members, graph: AtomicGraph, stress: bool = False, fused: bool = True) -> dict[str, torch.Tensor]:
    """One ``energy_forces_stress`` call (forward and backward) per member → ``energy`` [M, B], ``forces``
    [M, n, 3], ``stress`` [M, B, 3, 3]; ``fused`` runs them inside :func:`~potentials.nn.ops.fused_inference`."""
    from potentials.models import energy_forces_stress

    outs = []
    with fused_inference() if fused else contextlib.nullcontext():
        for model in members:
            outs.append(energy_forces_stress(model, graph, forces=True, stress=stress))
    return {k: torch.stack([o[k].detach() for o in outs]) for k in outs[0]}
