"""What every model shares: the element table, isolated-atom energies and the edge geometry.

A model maps an :class:`~potentials.data.graph.AtomicGraph` to one total energy per structure
(eV, [B]). Forces and stress are never model outputs: :mod:`potentials.models.derivatives` takes them
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

    def __init__(self, atomic_numbers: list[int], e0s: dict[int, float] | None = None):
        super().__init__()
        self.atomic_numbers = [int(z) for z in atomic_numbers]
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.atomic_numbers)] = torch.arange(len(self.atomic_numbers))
        self.register_buffer("z_to_index", table, persistent=False)
        e0 = torch.tensor([float((e0s or {}).get(z, 0.0)) for z in self.atomic_numbers], dtype=torch.float64)
        self.register_buffer("e0s", e0)

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

    def total_energy(self, node_energy: torch.Tensor, species: torch.Tensor, graph: AtomicGraph) -> torch.Tensor:
        """Per-atom model energies [n] → scale/shift + E0 in float64 → summed per structure [B] (eV)."""
        atom_energy = self.scale_shift(node_energy, species).to(torch.float64) + self.e0s[species]
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
