"""Forces and stress from the energy by autograd, in one place for all models.

* forces  F_i = −∂E/∂x_i  (eV/Å)
* stress  σ = (1/V) ∂E/∂ε  (eV/Å³, ASE's sign: positive = tensile), with ε a symmetric strain applied to
  positions and cell, x → x(1+ε), cell → cell(1+ε). Zero for non-periodic structures.
"""

from __future__ import annotations

import torch

from potentials.data.graph import AtomicGraph
from potentials.nn.precision import outer_autocast_captured


def energy_forces_stress(
    model: torch.nn.Module,
    graph: AtomicGraph,
    *,
    forces: bool = True,
    stress: bool = False,
    training: bool = False,
) -> dict[str, torch.Tensor]:
    """Evaluate ``model`` (graph → energy [B]) and its derivatives.

    Returns ``energy`` [B], and if asked ``forces`` [n, 3] and ``stress`` [B, 3, 3]. With
    ``training=True`` the graph of the derivatives is kept so a loss on forces/stress can be back-propagated.
    Under an outer ``torch.autocast`` only the model's backbone runs in reduced precision
    (:mod:`potentials.nn.precision`); geometry, energy sum and derivatives stay in full precision.
    """
    with outer_autocast_captured(graph["positions"].device.type):
        return _energy_forces_stress(model, graph, forces, stress, training)


def _energy_forces_stress(model, graph, forces, stress, training):
    positions = graph["positions"]
    cell = graph["cell"]
    inputs: list[torch.Tensor] = []
    if forces or stress:
        positions = positions.detach().requires_grad_(True)
        inputs.append(positions)
    strain = None
    if stress:
        num_graphs = cell.shape[0]
        strain = torch.zeros((num_graphs, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True)
        inputs.append(strain)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        if isinstance(num_graphs, int) and num_graphs == 1:  # one structure: no gather/scatter over structures
            positions_used = positions + positions @ sym[0]
        else:
            positions_used = positions + torch.einsum("ni,nij->nj", positions, sym[graph["batch"]])
        cell = cell + torch.bmm(cell.to(sym.dtype), sym)
    else:
        positions_used = positions
    energy = model(graph.replace(positions=positions_used, cell=cell))
    out = {"energy": energy}
    if not inputs:
        return out
    grads = torch.autograd.grad(
        energy.sum(), inputs, create_graph=training, retain_graph=training, allow_unused=True
    )
    if forces:
        g = grads[0]
        out["forces"] = -g if g is not None else torch.zeros_like(positions)
    if stress:
        g = grads[-1]
        if g is None:
            g = torch.zeros_like(strain)
        volume = cell_volume(graph["cell"].to(g.dtype))
        periodic = graph["pbc"].any(dim=1) & (volume > 0)
        safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
        out["stress"] = torch.where(periodic[:, None, None], g / safe_volume[:, None, None], torch.zeros_like(g))
    return out


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|a · (b × c)| of cells [B, 3, 3] (rows = lattice vectors) → [B] (Å³). A triple product, not
    ``torch.linalg.det``: no LAPACK call, so it traces and compiles to plain elementwise code."""
    return torch.linalg.cross(cell[:, 1], cell[:, 2]).mul(cell[:, 0]).sum(-1).abs()
