"""Dataset statistics for model initialisation (float64): E0s, neighbour counts, force RMS.

All functions take a list (or indexable Dataset) of :class:`AtomicGraph`; a graph may hold one structure
or a batch (structures are separated with ``num_atoms``). Energies in eV, forces in eV/Å.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from potentials.errors import PotentialsError

log = logging.getLogger(__name__)


def _graphs(graphs) -> list:
    return [graphs[i] for i in range(len(graphs))]


def _structures(graphs):
    """Yield per structure: (numbers [n] int array, energy float|None, forces [n, 3]|None); targets with
    weight 0 are None."""
    for g in _graphs(graphs):
        num_atoms = g["num_atoms"].tolist()
        numbers = np.split(g["numbers"].numpy(), np.cumsum(num_atoms)[:-1])
        energy = g.get("energy")
        e_w = g.get("energy_weight")
        forces = g.get("forces")
        f_w = g.get("forces_weight")
        if forces is not None:
            forces = np.split(forces.detach().double().numpy(), np.cumsum(num_atoms)[:-1])
        for b, z in enumerate(numbers):
            e = None
            if energy is not None and (e_w is None or float(e_w[b]) > 0):
                e = float(energy[b])
            f = None
            if forces is not None and (f_w is None or float(f_w[b]) > 0):
                f = forces[b]
            yield z, e, f


def elements_in(graphs) -> list[int]:
    """Sorted unique atomic numbers present in ``graphs``."""
    zs = set()
    for g in _graphs(graphs):
        zs.update(int(z) for z in np.unique(g["numbers"].numpy()))
    return sorted(zs)


def _composition(graphs, atomic_numbers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Composition matrix [S, len(atomic_numbers)] and energies [S] of structures that have an energy."""
    col = {int(z): k for k, z in enumerate(atomic_numbers)}
    rows, energies = [], []
    for z, e, _ in _structures(graphs):
        if e is None:
            continue
        row = np.zeros(len(col))
        uz, counts = np.unique(z, return_counts=True)
        for zz, c in zip(uz.tolist(), counts.tolist()):
            if zz not in col:
                raise PotentialsError(
                    f"element Z={zz} is in the data but not in the model's atomic_numbers {list(atomic_numbers)}"
                )
            row[col[zz]] = c
        rows.append(row)
        energies.append(e)
    return np.array(rows).reshape(-1, len(col)), np.array(energies, dtype=np.float64)


def fit_e0s(graphs, atomic_numbers: Sequence[int]) -> dict[int, float]:
    """Least-squares isolated-atom energies E0_Z (eV) with total energy ≈ Σ_Z count_Z · E0_Z.

    Rank-deficient compositions (e.g. one stoichiometry only) give the minimum-norm solution and a warning.
    """
    atomic_numbers = [int(z) for z in atomic_numbers]
    a, e = _composition(graphs, atomic_numbers)
    if a.shape[0] == 0:
        raise PotentialsError("cannot fit E0s: no structure in the training data has an energy")
    coef, _, rank, _ = np.linalg.lstsq(a, e, rcond=None)
    if rank < len(atomic_numbers):
        missing = [z for k, z in enumerate(atomic_numbers) if not a[:, k].any()]
        log.warning(
            "E0 fit is underdetermined (composition matrix rank %d < %d elements%s); using the minimum-norm "
            "solution — consider giving E0s explicitly",
            rank, len(atomic_numbers), f"; elements absent from the data: {missing}" if missing else "",
        )
    return {z: float(c) for z, c in zip(atomic_numbers, coef)}


def _element_to_z(key) -> int:
    from ase.data import atomic_numbers as symbol_to_z

    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str):
        s = key.strip()
        if s.isdigit():
            return int(s)
        if s in symbol_to_z and s != "X":
            return int(symbol_to_z[s])
    raise PotentialsError(f"E0s: unknown element {key!r} (use an atomic number or a chemical symbol)")


def e0s_from_dict_or_fit(e0s_cfg, graphs, atomic_numbers: Sequence[int]) -> dict[int, float]:
    """E0s (eV) for every Z in ``atomic_numbers``: ``"fit"`` → :func:`fit_e0s`; or a mapping
    {Z or symbol: energy} that must cover all of ``atomic_numbers``."""
    from ase.data import chemical_symbols

    atomic_numbers = [int(z) for z in atomic_numbers]
    if isinstance(e0s_cfg, str):
        if e0s_cfg.strip().lower() == "fit":
            return fit_e0s(graphs, atomic_numbers)
        raise PotentialsError(f"E0s: expected 'fit' or a mapping {{element: energy}}, got {e0s_cfg!r}")
    if not isinstance(e0s_cfg, Mapping):
        raise PotentialsError(f"E0s: expected 'fit' or a mapping {{element: energy}}, got {type(e0s_cfg).__name__}")
    e0s: dict[int, float] = {}
    for key, value in e0s_cfg.items():
        z = _element_to_z(key)
        try:
            e0s[z] = float(value)
        except (TypeError, ValueError):
            raise PotentialsError(f"E0s: energy for element {key!r} is not a number: {value!r}") from None
    missing = [z for z in atomic_numbers if z not in e0s]
    if missing:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        raise PotentialsError(f"E0s: no energy given for element(s) {names}")
    return {z: e0s[z] for z in atomic_numbers}


def average_num_neighbors(graphs) -> float:
    """Mean number of edges per atom (total edges / total atoms)."""
    n_edges = n_atoms = 0
    for g in _graphs(graphs):
        n_edges += int(g["edge_index"].shape[1])
        n_atoms += int(g["numbers"].shape[0])
    if n_atoms == 0:
        raise PotentialsError("cannot compute the average number of neighbours: no atoms in the data")
    return n_edges / n_atoms


def force_rms(graphs) -> float:
    """RMS (eV/Å) of the force components of structures with forces (weight > 0)."""
    sq = 0.0
    count = 0
    for _, _, f in _structures(graphs):
        if f is None:
            continue
        sq += float(np.sum(f * f))
        count += f.size
    if count == 0:
        raise PotentialsError("cannot compute the force RMS: no structure in the data has forces")
    return float(np.sqrt(sq / count))


def mean_interaction_energy_per_atom(graphs, e0s: Mapping[int, float]) -> float:
    """Mean over structures with an energy of (E − Σ_atoms E0_Z) / n, eV/atom."""
    vals = []
    for z, e, _ in _structures(graphs):
        if e is None:
            continue
        try:
            ref = sum(float(e0s[int(k)]) for k in z.tolist())
        except KeyError as exc:
            raise PotentialsError(f"no E0 for element Z={exc.args[0]} found in the data") from None
        vals.append((e - ref) / len(z))
    if not vals:
        raise PotentialsError("cannot compute the mean interaction energy: no structure has an energy")
    return float(np.mean(vals))
