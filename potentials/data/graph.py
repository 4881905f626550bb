"""The atomic graph container and batching.

An :class:`AtomicGraph` is a plain mapping of named tensors (like NequIP's ``AtomicDataDict``) so every
field is explicit. One structure or a batch of structures concatenated along the atom/edge axes.

Fields (n = atoms, E = edges, B = structures in the batch; units are ASE's: Å, eV):

================  ==============  =========  ================================================
key               shape           dtype      meaning
================  ==============  =========  ================================================
positions         [n, 3]          float      Cartesian positions (Å)
numbers           [n]             long       atomic numbers Z
cell              [B, 3, 3]       float      lattice vectors as rows (Å); zeros if non-periodic
pbc               [B, 3]          bool       periodic directions
edge_index        [2, E]          long       (centre i, neighbour j), global atom indices
shifts            [E, 3]          float      integer cell shifts S: r_ij = x_j - x_i + S @ cell
batch             [n]             long       structure index of each atom
num_atoms         [B]             long       atoms per structure
energy            [B]             float      total energy (eV), optional
forces            [n, 3]          float      forces (eV/Å), optional
stress            [B, 3, 3]       float      stress (eV/Å³, ASE sign), optional
energy_weight     [B]             float      per-structure loss weights (default 1)
forces_weight     [B]             float
stress_weight     [B]             float      (0 where no stress is known)
forces_mask       [n]             float      optional per-atom factor on the forces weight (0 = fixed atom
                                             whose force is not trained on, e.g. OC20); absent = all 1
tags              [n]             long       optional per-atom tags (OC20: 0 sub-surface, 1 surface,
                                             2 adsorbate); not used by the models
head              [B]             long       optional head index of each structure (multi-head training,
                                             potentials.train.multihead); absent = the model's default head
================  ==============  =========  ================================================
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

PER_ATOM = ("positions", "numbers", "forces", "batch", "forces_mask", "tags")
PER_EDGE = ("shifts",)
PER_GRAPH = (
    "cell", "pbc", "num_atoms", "energy", "stress", "energy_weight", "forces_weight", "stress_weight", "head",
)
TARGETS = ("energy", "forces", "stress")


class AtomicGraph(dict):
    """A dict of tensors with the documented keys; attribute access for convenience."""

    def __getattr__(self, key: str) -> torch.Tensor:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc

    @property
    def num_graphs(self) -> int:
        return int(self["num_atoms"].shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "AtomicGraph":
        """Move to ``device``; cast floating tensors to ``dtype`` if given."""
        out = AtomicGraph()
        for key, value in self.items():
            if dtype is not None and value.is_floating_point():
                value = value.to(device=device, dtype=dtype)
            else:
                value = value.to(device=device)
            out[key] = value
        return out

    def replace(self, **fields: torch.Tensor) -> "AtomicGraph":
        out = AtomicGraph(self)
        out.update(fields)
        return out


def collate(graphs: Iterable[Mapping[str, torch.Tensor]]) -> AtomicGraph:
    """Concatenate single-structure graphs into one batch, offsetting ``edge_index`` and adding ``batch``.

    Optional targets must be present in all or none of the graphs.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("cannot collate an empty list of graphs")
    out = AtomicGraph()
    keys = set(graphs[0].keys())
    for g in graphs[1:]:
        if set(g.keys()) != keys:
            raise ValueError(f"graphs in a batch have different fields: {sorted(keys ^ set(g.keys()))}")
    offsets = torch.cumsum(torch.tensor([0] + [int(g["positions"].shape[0]) for g in graphs[:-1]]), 0)
    for key in keys:
        if key == "edge_index":
            out[key] = torch.cat([g[key] + off for g, off in zip(graphs, offsets)], dim=1)
        elif key == "batch":
            continue
        else:
            out[key] = torch.cat([g[key] for g in graphs], dim=0)
    out["batch"] = torch.cat(
        [torch.full((int(g["positions"].shape[0]),), b, dtype=torch.long) for b, g in enumerate(graphs)]
    )
    return out
