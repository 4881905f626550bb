"""Reading structures (any ASE format) into :class:`AtomicGraph` datasets, and train/val splitting."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from potentials.data.graph import AtomicGraph
from potentials.data.neighbors import atoms_to_graph
from potentials.errors import PotentialsError


def read_atoms(path: str | os.PathLike, index: str | int | slice = ":") -> list:
    """All frames (``index``) of ``path`` as a list of ``ase.Atoms``; any format ``ase.io.read`` understands.

    Raises :class:`PotentialsError` naming the file if it is missing, unreadable or holds no structures.
    """
    import ase.io
    from ase.io.formats import UnknownFileTypeError

    path = Path(path)
    if not path.exists():
        raise PotentialsError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise PotentialsError(f"data file {str(path)!r} is a directory, not a file")
    if path.stat().st_size == 0:
        raise PotentialsError(f"data file {str(path)!r} is empty")
    try:
        frames = ase.io.read(str(path), index=index)
    except StopIteration:
        raise PotentialsError(f"data file {str(path)!r} contains no structures") from None
    except UnknownFileTypeError as exc:
        raise PotentialsError(
            f"cannot read data file {str(path)!r}: ASE does not recognise its format ({exc}); use a known "
            "extension such as .extxyz, .traj or .db"
        ) from None
    except Exception as exc:  # ASE raises many different exception types for bad files
        msg = str(exc) or type(exc).__name__
        raise PotentialsError(f"cannot read data file {str(path)!r}: {type(exc).__name__}: {msg}") from exc
    if not isinstance(frames, list):
        frames = [frames]
    if len(frames) == 0:
        raise PotentialsError(f"data file {str(path)!r} contains no structures")
    return frames


def _available_keys(atoms) -> list[str]:
    keys = set(atoms.info.keys()) | (set(atoms.arrays.keys()) - {"positions", "numbers"})
    calc = getattr(atoms, "calc", None)
    if calc is not None:
        keys |= set(getattr(calc, "results", {}).keys())
    return sorted(keys)


def _lookup(atoms, key: str, per_atom: bool):
    """Value of ``key`` from ``atoms.arrays`` (per-atom) / ``atoms.info`` (per-structure), else the raw
    calculator results (no constraints applied); ``None`` if absent."""
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    other = atoms.info if per_atom else atoms.arrays
    if key in other and key not in ("positions", "numbers"):
        return other[key]
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) if calc is not None else None
    if results and key in results and results[key] is not None:
        return results[key]
    return None


def _to_array(value, key: str, kind: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PotentialsError(f"{where}: {kind} key {key!r} is not numeric ({exc})") from None
    if not np.all(np.isfinite(arr)):
        raise PotentialsError(f"{where}: {kind} key {key!r} contains NaN or inf")
    return arr


def extract_targets(
    atoms,
    energy_key: str | None = "energy",
    forces_key: str | None = "forces",
    stress_key: str | None = "stress",
    where: str = "structure",
    *,
    require_stress: bool = False,
) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    """Reference targets of one frame: energy (eV), forces [n, 3] (eV/Å), stress (6,)/(3, 3)/(9,) (eV/Å³).

    A key is looked up in ``atoms.info`` / ``atoms.arrays`` first, then in the raw ``atoms.calc.results``
    (where ASE's extxyz/traj/db readers put ``energy``/``forces``/``stress``). A key of ``None`` means
    "don't read". A missing energy or forces key raises :class:`PotentialsError` naming ``where`` and the
    key; a missing stress gives ``None`` unless ``require_stress``.
    """
    energy = forces = stress = None
    if energy_key is not None:
        value = _lookup(atoms, energy_key, per_atom=False)
        if value is None:
            raise PotentialsError(
                f"{where}: no energy key {energy_key!r} (available: {', '.join(_available_keys(atoms)) or 'none'})"
            )
        arr = _to_array(value, energy_key, "energy", where)
        if arr.size != 1:
            raise PotentialsError(f"{where}: energy key {energy_key!r} has shape {arr.shape}, expected a scalar")
        energy = float(arr.reshape(()))
    if forces_key is not None:
        value = _lookup(atoms, forces_key, per_atom=True)
        if value is None:
            raise PotentialsError(
                f"{where}: no forces key {forces_key!r} (available: {', '.join(_available_keys(atoms)) or 'none'})"
            )
        forces = _to_array(value, forces_key, "forces", where)
        if forces.shape != (len(atoms), 3):
            raise PotentialsError(
                f"{where}: forces key {forces_key!r} has shape {forces.shape}, expected ({len(atoms)}, 3)"
            )
    if stress_key is not None:
        value = _lookup(atoms, stress_key, per_atom=False)
        if value is None:
            if require_stress:
                raise PotentialsError(
                    f"{where}: no stress key {stress_key!r} (available: "
                    f"{', '.join(_available_keys(atoms)) or 'none'})"
                )
        else:
            stress = _to_array(value, stress_key, "stress", where)
            if stress.shape not in ((6,), (9,), (3, 3)):
                raise PotentialsError(
                    f"{where}: stress key {stress_key!r} has shape {stress.shape}, expected (6,), (9,) or (3, 3)"
                )
    return energy, forces, stress


class GraphDataset(torch.utils.data.Dataset):
    """A list of single-structure :class:`AtomicGraph` (float64).

    ``atomic_numbers[k]`` is the [n_k] int array of graph ``k``'s atomic numbers (for statistics);
    ``sources[k]`` names its file and frame.
    """

    def __init__(self, graphs: Sequence[AtomicGraph], sources: Sequence[str] | None = None):
        self.graphs = list(graphs)
        self.sources = list(sources) if sources is not None else [f"structure {i}" for i in range(len(self.graphs))]
        if len(self.sources) != len(self.graphs):
            raise ValueError("sources and graphs differ in length")
        self.atomic_numbers = [g["numbers"].numpy() for g in self.graphs]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, idx: int) -> AtomicGraph:
        return self.graphs[idx]

    def __iter__(self):
        return iter(self.graphs)

    def frame_info(self, idx: int) -> dict:
        """Provenance and per-atom extras of graph ``idx``: ``source_file``, ``source_index`` (frame in that
        file, -1 if unknown), ``label``, ``system``, ``fixed`` ([n] bool or None), ``tags`` ([n] int or None)."""
        src = self.sources[idx]
        file, sep, rest = src.rpartition(", frame ")
        index = int(rest) if sep and rest.isdigit() else -1
        return {"source_file": file if sep else src, "source_index": index, "label": "", "system": file if sep else src,
                "fixed": None, "tags": None}

    def statistics(self, e0s_cfg="fit", atomic_numbers: Sequence[int] | None = None) -> dict:
        """Training statistics (:class:`~potentials.data.stats.StatsAccumulator`, the same code as cached
        datasets): ``atomic_numbers``, ``e0s``, ``avg_num_neighbors``, ``scale``, ``shift``."""
        from potentials.data.stats import graph_statistics

        return graph_statistics(self, e0s_cfg, atomic_numbers)

    def subset(self, indices: Sequence[int]) -> "GraphDataset":
        idx = [int(i) for i in indices]
        return GraphDataset([self.graphs[i] for i in idx], [self.sources[i] for i in idx])

    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        cutoff: float,
        energy_key: str | None = "energy",
        forces_key: str | None = "forces",
        stress_key: str | None = "stress",
        require_edges: bool = True,
        require_stress: bool = False,
    ) -> "GraphDataset":
        """Read every frame of every file in ``paths`` and build graphs with radial ``cutoff`` (Å)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        graphs, sources = [], []
        for path in paths:
            for i, atoms in enumerate(read_atoms(path)):
                where = f"{path}, frame {i}"
                energy, forces, stress = extract_targets(
                    atoms, energy_key, forces_key, stress_key, where, require_stress=require_stress
                )
                graphs.append(
                    atoms_to_graph(
                        atoms, cutoff, energy=energy, forces=forces, stress=stress,
                        where=where, require_edges=require_edges,
                    )
                )
                sources.append(where)
        if not graphs:
            raise PotentialsError(f"no structures read from {[str(p) for p in paths]}")
        return cls(graphs, sources)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices of a deterministic random frame split (``torch.Generator`` seeded with
    ``seed``): ``val`` gets ``round(val_fraction * n)`` items (at least 1 if ``val_fraction > 0`` and n ≥ 2).
    A split leaving either part empty raises :class:`PotentialsError`."""
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
        raise PotentialsError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_train = n - n_val
    if n_train <= 0 or n_val <= 0:
        raise PotentialsError(
            f"train/val split of {n} structures with val_fraction={val_fraction} gives "
            f"{n_train} train and {n_val} validation structures; both must be non-empty"
        )
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def split_dataset(dataset: GraphDataset, val_fraction: float, seed: int) -> tuple[GraphDataset, GraphDataset]:
    """Deterministic random frame split into (train, val); see :func:`split_indices`."""
    n = len(dataset)
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    if not isinstance(dataset, GraphDataset):
        dataset = GraphDataset([dataset[i] for i in range(n)])
    return dataset.subset(train_idx), dataset.subset(val_idx)


def split_by_system(dataset: GraphDataset, systems: Sequence[int] | np.ndarray, val_fraction: float,
                    seed: int) -> tuple[GraphDataset, GraphDataset, dict]:
    """Deterministic split (seeded like :func:`split_dataset`) that keeps every system on one side.

    ``systems[k]`` is graph ``k``'s system id (one relaxation trajectory, one mp-id, ...). Whole systems, in a
    seeded random order, go to validation until it holds at least ``round(val_fraction * n)`` frames (at
    least one system). Returns (train, val, report) with ``report`` = ``{"train_systems", "val_systems",
    "train_frames", "val_frames"}``. Fewer than two systems, or a split leaving a side empty, raises.
    """
    n = len(dataset)
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise PotentialsError(f"val_fraction must be in (0, 1) for a split by system, got {val_fraction!r}")
    systems = np.asarray(systems).reshape(-1)
    if systems.shape[0] != n:
        raise ValueError("systems and dataset differ in length")
    unique = np.unique(systems)
    if unique.size < 2:
        raise PotentialsError(
            f"cannot split {n} frames by system: they all belong to {unique.size} system(s); use "
            "val_split=frame (frames of one system then land on both sides) or give a separate validation set"
        )
    gen = torch.Generator().manual_seed(int(seed))
    order = unique[torch.randperm(unique.size, generator=gen).numpy()]
    counts = dict(zip(*np.unique(systems, return_counts=True)))
    target = max(int(round(val_fraction * n)), 1)
    chosen, n_val = [], 0
    for s in order:
        if n_val >= target:
            break
        chosen.append(s)
        n_val += int(counts[s])
    if len(chosen) == unique.size:
        chosen.pop()  # keep at least one system for training
        n_val = sum(int(counts[s]) for s in chosen)
    is_val = np.isin(systems, np.asarray(chosen))
    train, val = dataset.subset(np.flatnonzero(~is_val)), dataset.subset(np.flatnonzero(is_val))
    report = {"train_systems": int(unique.size - len(chosen)), "val_systems": len(chosen),
              "train_frames": len(train), "val_frames": len(val)}
    return train, val, report
