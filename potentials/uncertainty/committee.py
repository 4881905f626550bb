"""Committee (deep ensemble) of separately trained models: mean prediction and member spread.

Members are evaluated in one autograd pass: each gets its own leaf copy of the positions (and strain), the
member energies are stacked [M, B] and one backward of Σ_m E_m gives every member's forces and stress. The
neighbour list and graph are built once for all members. (``torch.func.vmap`` over stacked weights is not
usable here: the models branch on data, e.g. the unknown-element check.)

Spreads use the sample standard deviation (ddof = 1): ``energy_std`` [B], ``forces_std`` [n] = √Σ_α Var F_iα,
``stress_std`` [B, 3, 3]; all zero for a single member.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.nn.ops import fused_inference


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
        """Per-member ``energy`` [M, B], ``forces`` [M, n, 3], ``stress`` [M, B, 3, 3], in one backward pass."""
        with fused_inference():
            return members_one_pass(list(self.members), graph, stress)

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


def members_sequential(members, graph: AtomicGraph, stress: bool = False) -> dict[str, torch.Tensor]:
    """Reference path: one ``energy_forces_stress`` call per member (for timing against the one-pass path)."""
    from potentials.models import energy_forces_stress

    outs = []
    with fused_inference():
        for model in members:
            outs.append(energy_forces_stress(model, graph, forces=True, stress=stress))
    return {k: torch.stack([o[k].detach() for o in outs]) for k in outs[0]}
