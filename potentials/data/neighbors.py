"""Neighbour lists (vesin) and the conversion ``ase.Atoms`` → :class:`AtomicGraph`."""

from __future__ import annotations

import numpy as np
import torch
import vesin

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError

MIN_DISTANCE = 1e-4  # Å: two atoms closer than this are "on top of each other" (rejected, never a NaN force)


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff`` (Å), self-images included, the atom itself excluded.

    Returns ``edge_index`` [2, E] (centre i, neighbour j) and integer ``shifts`` [E, 3] with
    ``r_ij = x_j - x_i + shifts @ cell``.
    """
    pbc = np.asarray(pbc, dtype=bool)
    box = np.asarray(cell, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s = nl.compute(
        points=np.asarray(positions, dtype=np.float64), box=box, periodic=pbc.tolist(), quantities="ijS"
    )
    return np.stack([i, j]).astype(np.int64), np.asarray(s, dtype=np.int64)


MAX_Z = 118


def _finite(value, name: str, where: str) -> np.ndarray:
    """``value`` as float64, or a clear error naming ``where`` if any entry is NaN/inf."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise PotentialsError(f"{where}: {name} contains NaN or inf")
    return arr


def check_cell(cell: np.ndarray, pbc: np.ndarray, where: str) -> None:
    """Raise a clear error for a singular cell along periodic directions."""
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return
    vol = abs(np.linalg.det(np.asarray(cell, dtype=np.float64)))
    if not np.isfinite(vol) or vol < 1e-6:
        raise PotentialsError(f"{where}: the cell is singular (volume {vol:.3g} Å³) but pbc={pbc.tolist()}")


def atoms_to_graph(
    atoms,
    cutoff: float,
    *,
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
    weights: dict | None = None,
    where: str = "structure",
    require_edges: bool = True,
) -> AtomicGraph:
    """Build a single-structure :class:`AtomicGraph` from ``ase.Atoms`` (float64 tensors).

    ``stress`` may be Voigt (6,) in ASE order (xx, yy, zz, yz, xz, xy) or a 3×3 matrix, eV/Å³.
    ``where`` names the file/frame in error messages.
    """
    n = len(atoms)
    if n == 0:
        raise PotentialsError(f"{where}: structure has no atoms")
    numbers = np.asarray(atoms.numbers)
    bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
    if bad.size:
        raise PotentialsError(f"{where}: unknown element (atomic number {int(bad[0])})")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = _finite(atoms.cell.array, "cell", where)
    check_cell(cell, pbc, where)
    pos = _finite(atoms.positions, "positions", where)
    edge_index, shifts = neighbor_list(pos, cell, pbc, cutoff)
    if edge_index.shape[1]:
        vec = pos[edge_index[1]] - pos[edge_index[0]] + np.asarray(shifts, dtype=np.float64) @ cell
        d2 = np.einsum("ij,ij->i", vec, vec)
        k = int(np.argmin(d2))
        if d2[k] < MIN_DISTANCE**2:
            raise PotentialsError(
                f"{where}: atoms {int(edge_index[0, k])} and {int(edge_index[1, k])} are {np.sqrt(d2[k]):.2g} Å apart "
                f"(on top of each other: below {MIN_DISTANCE} Å, the edge direction is undefined)"
            )
    if require_edges and edge_index.shape[1] == 0:
        raise PotentialsError(
            f"{where}: no atom has a neighbour within r_max={cutoff} Å; the model would predict "
            "only isolated-atom energies (increase r_max or check the structure)"
        )
    g = AtomicGraph(
        positions=torch.from_numpy(pos),
        numbers=torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long),
        cell=torch.from_numpy(cell if pbc.any() else np.zeros((3, 3))).unsqueeze(0),
        pbc=torch.from_numpy(pbc).unsqueeze(0),
        edge_index=torch.from_numpy(edge_index),
        shifts=torch.from_numpy(shifts).to(torch.float64),
        num_atoms=torch.tensor([n], dtype=torch.long),
    )
    w = {"energy": 1.0, "forces": 1.0, "stress": 1.0, **(weights or {})}
    if energy is not None:
        g["energy"] = torch.tensor([float(_finite(energy, "energy", where))], dtype=torch.float64)
    if forces is not None:
        f = np.asarray(forces, dtype=np.float64)
        if f.shape != (n, 3):
            raise PotentialsError(f"{where}: forces have shape {f.shape}, expected ({n}, 3)")
        g["forces"] = torch.from_numpy(_finite(f, "forces", where).copy())
    if stress is not None:
        g["stress"] = torch.from_numpy(_finite(voigt_to_matrix(stress, where), "stress", where)).unsqueeze(0)
    elif energy is not None:
        g["stress"] = torch.zeros(1, 3, 3, dtype=torch.float64)
        w["stress"] = 0.0
    if energy is not None:
        for key in ("energy", "forces", "stress"):
            g[f"{key}_weight"] = torch.tensor([float(w[key])], dtype=torch.float64)
    return g


def voigt_to_matrix(stress, where: str = "structure") -> np.ndarray:
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (3, 3):
        return s.copy()
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.shape == (9,):
        return s.reshape(3, 3).copy()
    raise PotentialsError(f"{where}: stress has shape {s.shape}, expected (6,), (9,) or (3, 3)")
