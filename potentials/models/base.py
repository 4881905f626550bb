"""What every model shares: the element table, isolated-atom energies and the edge geometry.

A model maps an :class:`~potentials.data.graph.AtomicGraph` to one total energy per structure
(eV, [B]).

Heads (multi-head training): one backbone, and per head its own readout column(s), E0s and scale/shift. Each
structure's head is ``graph["head"]`` [B] (index into ``heads``); a graph without it (the calculator, the traced
path) uses ``default_head`` (:meth:`PotentialModel.select_head`). A one-head model is exactly the single-head
layout (``e0s`` [n_el], ``scale``/``shift`` [n_el], one readout column). Forces and stress are never model outputs: :mod:`potentials.models.derivatives` takes them
from the energy by autograd, for every model alike.
"""

from __future__ import annotations

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.nn.ops import scatter_sum

try:  # ase is a hard dependency, but keep the import local to this helper
    from ase.data import chemical_symbols
except ImportError:  # pragma: no cover
    chemical_symbols = [str(i) for i in range(119)]


class PotentialModel(torch.nn.Module):
    """Base class: element table ``atomic_numbers`` and isolated-atom energies ``e0s`` (eV, float64).

    Energy constants stay float64 in every model dtype: buffers named in ``float64_buffers`` of this model or
    of any submodule (``e0s`` here, ``scale``/``shift`` of :class:`~potentials.nn.blocks.ScaleShift`) follow
    device moves but never dtype casts (``model.to(torch.float32)``, ``.float()``, precision plugins).
    """

    float64_buffers: tuple[str, ...] = ("e0s",)

    def __init__(self, atomic_numbers: list[int], e0s: dict[int, float] | None = None, heads: dict | None = None):
        """``heads``: ``{name: {"e0s": {Z: eV}, "scale": float, "shift": float}}`` in head order (multi-head; the
        E0s of every head replace ``e0s``), or None for one unnamed head ``"default"``."""
        super().__init__()
        self.atomic_numbers = [int(z) for z in atomic_numbers]
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.atomic_numbers)] = torch.arange(len(self.atomic_numbers))
        self.register_buffer("z_to_index", table, persistent=False)
        heads = dict(heads or {})
        self.heads = [str(h) for h in heads] or ["default"]
        self.default_head = 0  # the head of graphs without graph["head"] (Python int: a constant in traced graphs)
        per_head = [{int(k): float(v) for k, v in (h.get("e0s") or {}).items()} for h in heads.values()]
        rows = per_head or [{int(k): float(v) for k, v in (e0s or {}).items()}]
        e0 = torch.tensor([[row.get(z, 0.0) for z in self.atomic_numbers] for row in rows], dtype=torch.float64)
        self.register_buffer("e0s", e0[0] if len(rows) == 1 else e0)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def head_scale_shift(self, scale: float, shift: float, heads: dict | None) -> tuple:
        """(scale, shift) for :class:`~potentials.nn.blocks.ScaleShift`: floats, or one per head (multi-head)."""
        if not heads or len(heads) == 1:
            only = next(iter(heads.values())) if heads else {}
            return float(only.get("scale", scale)), float(only.get("shift", shift))
        return [float(h.get("scale", scale)) for h in heads.values()], [float(h.get("shift", shift)) for h in heads.values()]

    def select_head(self, name: str) -> "PotentialModel":
        """Use head ``name`` for graphs without ``graph["head"]``; an unknown name raises :class:`PotentialsError`."""
        if str(name) not in self.heads:
            raise PotentialsError(f"no head {name!r} in this model (heads: {self.heads})")
        self.default_head = self.heads.index(str(name))
        return self

    def node_heads(self, graph: AtomicGraph, species: torch.Tensor) -> torch.Tensor | None:
        """Head index of each atom [n] (long), or None for a one-head model (the single-head code path)."""
        if self.num_heads == 1:
            return None
        if "head" in graph:
            return graph["head"][graph["batch"]]
        return torch.full_like(species, self.default_head)

    @staticmethod
    def pick_head(node_energy: torch.Tensor, node_head: torch.Tensor | None) -> torch.Tensor:
        """Per-atom energies of every head [n, H] → of each atom's own head [n]."""
        if node_head is None:
            return node_energy.squeeze(-1)
        return node_energy.gather(1, node_head[:, None]).squeeze(-1)

    def _apply(self, fn, recurse=True):
        kept = [
            (module, name, module._buffers[name])
            for module in self.modules()
            for name in getattr(module, "float64_buffers", ())
            if module._buffers.get(name) is not None
        ]
        super()._apply(fn, recurse)
        for module, name, before in kept:
            after = module._buffers[name]
            if after.dtype != torch.float64:  # a dtype cast: keep the exact float64 values, on the new device
                module._buffers[name] = before.to(device=after.device)
        return self

    @property
    def num_elements(self) -> int:
        return len(self.atomic_numbers)

    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        """Atomic numbers [n] → element indices [n]; unknown elements raise :class:`PotentialsError`."""
        idx = self.z_to_index[numbers]
        if bool((idx < 0).any()):
            unknown = sorted({int(z) for z in numbers[idx < 0].tolist()})
            names = [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown]
            known = [chemical_symbols[z] for z in self.atomic_numbers]
            raise PotentialsError(f"element(s) {names} not in the model's element table {known}")
        return idx


    def node_and_edge_inputs(self, graph: AtomicGraph, dtype: torch.dtype):
        """Species [n], one-hot [n, num_elements], edge vectors [E, 3] and lengths [E, 1] (Å) in ``dtype``;
        the vectors are formed in the dtype of the positions (float64 from the data) before the cast.

        Species come from ``graph["species"]`` when the caller validated the elements already (the traced path:
        :mod:`potentials.models.compiled` checks them eagerly, outside the graph), else from :meth:`species`."""
        species = graph["species"] if "species" in graph else self.species(graph["numbers"])
        one_hot = torch.nn.functional.one_hot(species, self.num_elements).to(dtype)
        vectors = edge_vectors(graph).to(dtype)
        return species, one_hot, vectors, vectors.norm(dim=-1, keepdim=True)

    def total_energy(self, node_energy: torch.Tensor, species: torch.Tensor, graph: AtomicGraph,
                     node_head: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom model energies [n] → scale/shift + E0 (of each atom's head) in float64 → summed per structure
        [B] (eV)."""
        if node_head is None:
            atom_energy = self.scale_shift(node_energy, species).to(torch.float64) + self.e0s[species]
        else:
            atom_energy = self.scale_shift(node_energy, species, node_head).to(torch.float64) + self.e0s[node_head, species]
        num_graphs = graph["num_atoms"].shape[0]  # no int(): B stays symbolic in traced graphs
        if isinstance(num_graphs, int) and num_graphs == 1:  # one structure (the calculator): a plain sum, no
            return atom_energy.sum(0, keepdim=True)  # scatter (inductor's C++ codegen fails on a scatter into [1])
        return scatter_sum(atom_energy, graph["batch"], num_graphs)


def edge_vectors(graph: AtomicGraph) -> torch.Tensor:
    """r_ij = x_j − x_i + S_ij · cell [E, 3] (Å), in the dtype of ``positions``."""
    pos, cell = graph["positions"], graph["cell"]
    centre, neighbour = graph["edge_index"][0], graph["edge_index"][1]
    if isinstance(cell.shape[0], int) and cell.shape[0] == 1:  # one structure: no gather (and no scatter backward)
        shift = graph["shifts"].to(pos.dtype) @ cell[0].to(pos.dtype)
    else:
        graph_of_edge = graph["batch"][centre]
        shift = torch.einsum("ek,ekl->el", graph["shifts"].to(pos.dtype), cell[graph_of_edge].to(pos.dtype))
    return pos[neighbour] - pos[centre] + shift
