"""Run an exported model (:mod:`potentials.models.export`): the AOTInductor package alone, no model classes.

Imports only torch, the neighbour list (:mod:`potentials.data.neighbors`) and the errors module, so a host
program needs neither ``potentials.models`` nor e3nn's model code at run time.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from potentials.data.neighbors import atoms_to_graph
from potentials.errors import PotentialsError

FORMAT = "potentials-aoti-1"  # same string as potentials.models.export.FORMAT (not imported: no model code here)
INPUT_KEYS = ("positions", "cell", "pbc", "species", "edge_index", "shifts", "batch", "num_atoms")


class ExportedPotential:
    """An exported package: ``__call__(atoms)`` → (energy [1], forces [n, 3], stress [1, 3, 3]) tensors.

    Attributes from the package metadata: ``atomic_numbers`` (list of Z), ``r_max`` (Å), ``dtype`` (model dtype).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PotentialsError(f"exported model {path!r} does not exist")
        try:
            self.runner = torch._inductor.aoti_load_package(path, device_index=-1 if device == "cpu" else 0)
            meta = dict(self.runner.get_metadata())
        except Exception as exc:
            raise PotentialsError(f"exported model {path!r} cannot be loaded ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != FORMAT:
            raise PotentialsError(f"{path!r} is not a potentials export (format {meta.get('format')!r}, want {FORMAT!r})")
        self.path, self.device = path, torch.device(device)
        self.atomic_numbers = [int(z) for z in meta["atomic_numbers"].split(",")]
        self.r_max = float(meta["r_max"])
        self.dtype = meta["dtype"]
        table = np.full(119, -1, dtype=np.int64)
        table[self.atomic_numbers] = np.arange(len(self.atomic_numbers))
        self._table = table

    def species(self, numbers: np.ndarray) -> torch.Tensor:
        idx = self._table[np.asarray(numbers)]
        if (idx < 0).any():
            from ase.data import chemical_symbols

            unknown = sorted({chemical_symbols[z] for z in np.asarray(numbers)[idx < 0]})
            known = [chemical_symbols[z] for z in self.atomic_numbers]
            raise PotentialsError(f"element(s) {unknown} not in the exported model's element table {known} ({self.path})")
        return torch.from_numpy(idx)

    def __call__(self, atoms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        graph = atoms_to_graph(atoms, self.r_max, where="exported-model input", require_edges=False)
        if len(atoms) < 2 or graph["edge_index"].shape[1] < 2:
            raise PotentialsError(
                f"exported model {self.path!r}: needs at least 2 atoms and 2 neighbour pairs within r_max={self.r_max} Å "
                f"(got {len(atoms)} atoms, {graph['edge_index'].shape[1]} pairs)"
            )
        graph["species"] = self.species(atoms.numbers)
        graph["batch"] = torch.zeros(len(atoms), dtype=torch.long)
        inputs = [graph[k].to(self.device) for k in INPUT_KEYS]
        with torch.inference_mode():
            energy, forces, stress = self.runner(inputs)
        return energy, forces, stress
