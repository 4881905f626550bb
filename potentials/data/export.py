"""Write a dataset's frames, exactly as training sees them, to an extxyz file.

Each graph becomes an :class:`ase.Atoms` with a ``SinglePointCalculator`` holding its training targets
(after unit/sign conversion, referencing and filters): ``energy`` (eV), ``forces`` [n, 3] (eV/Å), ``stress``
Voigt (6,) xx yy zz yz xz xy (eV/Å³, ASE sign: positive = tensile). A target with weight 0 (absent) is not
written. Fixed atoms become an ASE ``FixAtoms`` constraint (forces are written for every atom, unconstrained),
tags go to ``atoms.tags``, and ``info`` holds the provenance: ``source_file``, ``source_index`` (frame in that
file), ``label``/``system`` when known.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from potentials.errors import PotentialsError
from potentials.io import atomic_path


def graph_to_atoms(graph, info: dict):
    """One single-structure :class:`AtomicGraph` (+ :meth:`GraphDataset.frame_info`) → ``ase.Atoms``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms
    from ase.stress import full_3x3_to_voigt_6_stress

    pbc = graph["pbc"].reshape(3).numpy().astype(bool)
    cell = graph["cell"].reshape(3, 3).numpy() if pbc.any() else None
    atoms = Atoms(numbers=graph["numbers"].numpy(), positions=graph["positions"].numpy(), cell=cell, pbc=pbc)
    if info.get("tags") is not None:
        atoms.set_tags(np.asarray(info["tags"], dtype=int))
    fixed = info.get("fixed")
    if fixed is not None and np.any(fixed):
        atoms.set_constraint(FixAtoms(indices=np.flatnonzero(fixed)))
    results = {}
    if "energy" in graph and float(graph.get("energy_weight", [1.0])[0]) > 0:
        results["energy"] = float(graph["energy"][0])
    if "forces" in graph and float(graph.get("forces_weight", [1.0])[0]) > 0:
        results["forces"] = graph["forces"].numpy().copy()
    if "stress" in graph and float(graph.get("stress_weight", [1.0])[0]) > 0:
        results["stress"] = full_3x3_to_voigt_6_stress(graph["stress"].reshape(3, 3).numpy())
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["source_file"] = str(info["source_file"])
    atoms.info["source_index"] = int(info["source_index"])
    for key in ("label", "system"):
        if info.get(key):
            atoms.info[key] = str(info[key])
    return atoms


def dataset_atoms(dataset) -> Iterator:
    """``ase.Atoms`` of every frame of ``dataset`` (a :class:`GraphDataset` or a cached one), in order."""
    for i in range(len(dataset)):
        yield graph_to_atoms(dataset[i], dataset.frame_info(i))


def write_extxyz(parts: Mapping[str, object], path: str | os.PathLike) -> dict[str, int]:
    """Write the datasets in ``parts`` ({split name: dataset}, in order) to ``path`` (extxyz) atomically; each
    frame's ``info["split"]`` is its part's name. Returns the number of frames written per part."""
    import ase.io

    path = Path(path)
    if not any(len(ds) for ds in parts.values()):
        raise PotentialsError(f"{path}: nothing to export (no frames in {', '.join(parts) or 'no split'})")
    counts = {}
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            for name, ds in parts.items():
                counts[name] = 0
                for atoms in dataset_atoms(ds):
                    atoms.info["split"] = name
                    ase.io.write(fh, atoms, format="extxyz")
                    counts[name] += 1
    return counts


__all__ = ["dataset_atoms", "graph_to_atoms", "write_extxyz"]
