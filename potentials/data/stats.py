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


class StatsAccumulator:
    """Streaming training statistics, the one implementation for in-memory and cached datasets.

    Feed frames in any number of :meth:`add` calls (or whole graphs with :meth:`add_graph`); memory stays
    O(elements²). Accumulates:

    * the least-squares problem ``E ≈ Σ_Z count_Z · E0_Z`` over frames with an energy, as the R factor of a
      streamed QR of ``[composition | energy]`` (as accurate as ``lstsq`` on the full matrix, not the
      squared-condition normal equations);
    * Σ E/n and Σ count_Z/n over frames with an energy (for the mean interaction energy per atom);
    * Σ F² and the component count over atoms whose forces the loss uses: frames with forces, and not atoms
      masked out of the force loss (``fixed`` atoms with a force mask): one rule for every dataset kind;
    * edge and atom counts (average number of neighbours).
    """

    def __init__(self, flush_rows: int = 4096):
        self.columns: dict[int, int] = {}  # atomic number -> column (order of first appearance)
        self._r = np.zeros((0, 1))  # R of [composition | energy]; last column is the energy
        self._pending: list[np.ndarray] = []
        self._pending_rows, self.flush_rows = 0, int(flush_rows)
        self.sum_epa, self.sum_comp_pa, self.n_energy = 0.0, np.zeros(0), 0
        self.f_sq, self.f_count = 0.0, 0
        self.n_edges = self.n_atoms = self.n_frames = 0

    # -- input --
    def add(self, numbers, natoms, energy, forces=None, force_ok=None, n_edges: int = 0) -> None:
        """Frames packed atom after atom: ``numbers`` [A] int, ``natoms`` [F] int (Σ = A), ``energy`` [F] eV
        (NaN = no energy), ``forces`` [A, 3] eV/Å or None, ``force_ok`` [A] bool (atoms whose forces count;
        default all), ``n_edges`` the number of edges of these frames."""
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        natoms = np.asarray(natoms, dtype=np.int64).reshape(-1)
        energy = np.asarray(energy, dtype=np.float64).reshape(-1)
        nf = natoms.shape[0]
        uz, inv = np.unique(numbers, return_inverse=True)
        for z in uz.tolist():
            if z not in self.columns:
                self.columns[z] = len(self.columns)
        k = len(self.columns)
        if self.sum_comp_pa.shape[0] < k:
            self.sum_comp_pa = np.concatenate([self.sum_comp_pa, np.zeros(k - self.sum_comp_pa.shape[0])])
        col = np.array([self.columns[z] for z in uz.tolist()], dtype=np.int64)[inv] if numbers.size else numbers
        local = np.repeat(np.arange(nf), natoms)
        comp = np.bincount(local * k + col, minlength=nf * k).reshape(nf, k).astype(np.float64)
        ok = np.isfinite(energy)
        if ok.any():
            a, e, n = comp[ok], energy[ok], natoms[ok].astype(np.float64)
            self._pending.append(np.hstack([a, e[:, None]]))
            self._pending_rows += a.shape[0]
            self.sum_epa += float((e / n).sum())
            self.sum_comp_pa[:k] += (a / n[:, None]).sum(0)
            self.n_energy += int(ok.sum())
        if forces is not None:
            f = np.asarray(forces, dtype=np.float64).reshape(-1, 3)
            if force_ok is not None:
                f = f[np.asarray(force_ok, dtype=bool).reshape(-1)]
            self.f_sq += float((f * f).sum())
            self.f_count += int(f.size)
        self.n_atoms += int(numbers.shape[0])
        self.n_edges += int(n_edges)
        self.n_frames += nf
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def add_graph(self, g) -> None:
        """One :class:`AtomicGraph` (a structure or a batch): targets with weight 0 are absent; atoms with
        ``forces_mask`` 0 do not count in the force RMS."""
        num_atoms = g["num_atoms"].numpy().astype(np.int64)
        nf = num_atoms.shape[0]
        energy = np.full(nf, np.nan)
        if "energy" in g:
            e = g["energy"].detach().double().numpy().reshape(-1)
            w = g["energy_weight"].numpy().reshape(-1) if "energy_weight" in g else np.ones(nf)
            energy = np.where(w > 0, e, np.nan)
        forces = ok = None
        if "forces" in g:
            forces = g["forces"].detach().double().numpy()
            w = g["forces_weight"].numpy().reshape(-1) if "forces_weight" in g else np.ones(nf)
            ok = np.repeat(w > 0, num_atoms)
            if "forces_mask" in g:
                ok &= g["forces_mask"].numpy().reshape(-1) > 0
        self.add(g["numbers"].numpy(), num_atoms, energy, forces, ok, n_edges=int(g["edge_index"].shape[1]))

    def _flush(self) -> None:
        if not self._pending:
            return
        k = len(self.columns)

        def widen(m):  # zero columns for elements that appeared later, inserted before the energy column
            return np.hstack([m[:, :-1], np.zeros((m.shape[0], k + 1 - m.shape[1])), m[:, -1:]])

        stacked = np.vstack([widen(self._r)] + [widen(m) for m in self._pending])
        self._r = np.linalg.qr(stacked, mode="r")
        self._pending, self._pending_rows = [], 0

    # -- results --
    @property
    def elements(self) -> list[int]:
        """Sorted atomic numbers seen in any frame."""
        return sorted(self.columns)

    def _check_numbers(self, atomic_numbers: Sequence[int] | None) -> list[int]:
        numbers = [int(z) for z in atomic_numbers] if atomic_numbers else self.elements
        missing = sorted(set(self.columns) - set(numbers))
        if missing:
            raise PotentialsError(f"elements {missing} are in the data but not in the model's atomic_numbers {numbers}")
        return numbers

    def fit_e0s(self, atomic_numbers: Sequence[int] | None = None) -> dict[int, float]:
        """Least-squares E0_Z (eV), minimum-norm where the compositions do not determine them (warns)."""
        numbers = self._check_numbers(atomic_numbers)
        if self.n_energy == 0:
            raise PotentialsError("cannot fit E0s: no structure in the training data has an energy")
        self._flush()
        k = len(self.columns)
        coef, _, rank, _ = np.linalg.lstsq(self._r[:, :k], self._r[:, k], rcond=None)
        if rank < len(numbers):
            present = {z for z, c in self.columns.items() if np.any(self._r[:, c] != 0)}
            absent = [z for z in numbers if z not in present]
            log.warning(
                "E0 fit is underdetermined (composition matrix rank %d < %d elements%s); using the minimum-norm "
                "solution — consider giving E0s explicitly",
                rank, len(numbers), f"; elements absent from the data: {absent}" if absent else "",
            )
        return {z: float(coef[self.columns[z]]) if z in self.columns else 0.0 for z in numbers}

    def shift(self, e0s: Mapping[int, float]) -> float:
        """Mean over frames with an energy of (E − Σ_atoms E0_Z) / n (eV/atom)."""
        if self.n_energy == 0:
            raise PotentialsError("cannot compute the mean interaction energy: no structure has an energy")
        ref = np.zeros(len(self.columns))
        for z, c in self.columns.items():
            if z not in e0s and self.sum_comp_pa[c] != 0:
                raise PotentialsError(f"no E0 for element Z={z} found in the data")
            ref[c] = float(e0s.get(z, 0.0))
        return float((self.sum_epa - self.sum_comp_pa @ ref) / self.n_energy)

    def force_rms(self) -> float:
        """RMS (eV/Å) of the force components the loss uses."""
        if self.f_count == 0:
            raise PotentialsError("cannot compute the force RMS: no structure in the data has forces")
        return float(np.sqrt(self.f_sq / self.f_count))

    def avg_num_neighbors(self) -> float:
        """Edges per atom."""
        if self.n_atoms == 0:
            raise PotentialsError("cannot compute the average number of neighbours: no atoms in the data")
        return self.n_edges / self.n_atoms

    def statistics(self, e0s_cfg="fit", atomic_numbers: Sequence[int] | None = None,
                   given_e0s: Mapping | None = None, name: str = "data") -> dict:
        """The model-initialisation statistics: ``atomic_numbers``, ``e0s`` (``"fit"``, ``{element: eV}``, or
        ``"dataset"``/``"iso_atoms"`` for ``given_e0s`` shipped with the dataset), ``avg_num_neighbors``,
        ``scale`` (force RMS, 1 if zero) and ``shift`` (mean interaction energy per atom)."""
        numbers = self._check_numbers(atomic_numbers)
        if isinstance(e0s_cfg, str) and e0s_cfg.strip().lower() in ("dataset", "iso_atoms"):
            if not given_e0s:
                raise PotentialsError(
                    f"{name}: e0s={e0s_cfg!r} but this dataset provides no E0s (for 3BPA: is iso_atoms.xyz "
                    "next to the training file?); use e0s=fit or {element: eV}"
                )
            e0s = e0s_from_dict_or_fit({int(k): v for k, v in given_e0s.items()}, None, numbers)
        elif isinstance(e0s_cfg, str) and e0s_cfg.strip().lower() == "fit":
            e0s = self.fit_e0s(numbers)
        else:
            e0s = e0s_from_dict_or_fit(e0s_cfg, None, numbers)
        scale = self.force_rms()
        return {
            "atomic_numbers": numbers,
            "e0s": {int(z): float(e) for z, e in e0s.items()},
            "avg_num_neighbors": float(self.avg_num_neighbors()),
            "scale": scale if scale > 0 else 1.0,
            "shift": self.shift(e0s),
        }


def accumulate(graphs) -> StatsAccumulator:
    """A :class:`StatsAccumulator` fed with every graph of ``graphs``."""
    acc = StatsAccumulator()
    for g in _graphs(graphs):
        acc.add_graph(g)
    return acc


def graph_statistics(graphs, e0s_cfg="fit", atomic_numbers: Sequence[int] | None = None) -> dict:
    """:meth:`StatsAccumulator.statistics` of an in-memory list/dataset of graphs."""
    return accumulate(graphs).statistics(e0s_cfg, atomic_numbers)


def elements_in(graphs) -> list[int]:
    """Sorted unique atomic numbers present in ``graphs``."""
    zs = set()
    for g in _graphs(graphs):
        zs.update(int(z) for z in np.unique(g["numbers"].numpy()))
    return sorted(zs)


def fit_e0s(graphs, atomic_numbers: Sequence[int]) -> dict[int, float]:
    """Least-squares isolated-atom energies E0_Z (eV) with total energy ≈ Σ_Z count_Z · E0_Z.

    Rank-deficient compositions (e.g. one stoichiometry only) give the minimum-norm solution and a warning.
    """
    return accumulate(graphs).fit_e0s([int(z) for z in atomic_numbers])


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
    return accumulate(graphs).avg_num_neighbors()


def force_rms(graphs) -> float:
    """RMS (eV/Å) of the force components the loss uses (forces weight > 0, not masked out)."""
    return accumulate(graphs).force_rms()


def mean_interaction_energy_per_atom(graphs, e0s: Mapping[int, float]) -> float:
    """Mean over structures with an energy of (E − Σ_atoms E0_Z) / n, eV/atom."""
    return accumulate(graphs).shift(e0s)
