"""Graph cache reader: :class:`CachedGraphDataset` builds graphs on demand from a cache's memory maps.

Reading opens the field files (:mod:`cache_layout`) as memory maps; the dataset holds only per-frame
offsets in RAM and builds each graph on demand, so memory stays bounded for datasets larger than RAM,
including in DataLoader workers (the dataset pickles without its maps).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from potentials.data.cache_layout import is_valid_cache, read_meta
from potentials.data.dataset import GraphDataset
from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.io import atomic_open

log = logging.getLogger("potentials.data")


# --------------------------------------------------------------------------------------------- reading


class _Sources(Sequence):
    """Lazy ``"<file>, frame <i> (<label>)"`` strings for a cached dataset."""

    def __init__(self, ds: "CachedGraphDataset"):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ds.describe(int(self.ds.indices[i]))


class CachedGraphDataset(GraphDataset):
    """A :class:`GraphDataset` whose graphs are built on demand from a cache's memory maps.

    Args:
        path: the cache directory.
        indices: frames (of the cache) in this dataset, default all.
        forces_mask: add a per-atom ``forces_mask`` (0 for fixed atoms, 1 otherwise) so the force loss
            ignores fixed atoms.
        tags: add the per-atom ``tags`` (long) to every graph.
        name: used in messages.
    """

    def __init__(self, path, indices: Sequence[int] | None = None, *, forces_mask: bool = False,
                 tags: bool = False, name: str = ""):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if not self.meta or not is_valid_cache(self.path):
            raise PotentialsError(f"{self.path} is not a complete graph cache of this code version")
        self.name = name or self.path.name
        self.forces_mask, self.include_tags = bool(forces_mask), bool(tags)
        n = int(self.meta["num_frames"])
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError("cache indices out of range")
        self._maps: dict[str, np.ndarray] = {}

    # -- memory maps (re-opened lazily in every process; never pickled) --
    def _map(self, name: str) -> np.ndarray:
        maps = self.__dict__.setdefault("_maps", {})
        if name not in maps:
            dtype, tail, length = self.meta["fields"][name]
            if int(length) == 0:
                maps[name] = np.zeros((0, *tail), dtype=dtype)
            else:
                maps[name] = np.memmap(self.path / f"{name}.bin", dtype=dtype, mode="r", shape=(int(length), *tail))
        return maps[name]

    def _offsets(self, name: str) -> np.ndarray:
        """Cumulative atom (``natoms``) or edge (``nedges``) offsets per frame, computed once per process."""
        key = f"_off_{name}"
        off = self.__dict__.get(key)
        if off is None:
            off = np.zeros(int(self.meta["num_frames"]) + 1, dtype=np.int64)
            np.cumsum(self._map(name), dtype=np.int64, out=off[1:])
            self.__dict__[key] = off
        return off

    @property
    def _atom_off(self) -> np.ndarray:
        return self._offsets("natoms")

    @property
    def _edge_off(self) -> np.ndarray:
        return self._offsets("nedges")

    def __getstate__(self):  # for DataLoader workers: no maps, no offsets (rebuilt lazily there)
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_off_") and k != "_systems"}
        state["_maps"] = {}
        return state

    # -- GraphDataset interface --
    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def graphs(self):  # list-like view, built on access
        return self

    @property
    def sources(self):
        return _Sources(self)

    @property
    def atomic_numbers(self):
        return [self._map("numbers")[self._atom_off[k]:self._atom_off[k + 1]].astype(np.int64) for k in self.indices]

    @property
    def extras(self) -> dict:
        return self.meta.get("extras", {})

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices: Sequence[int]) -> "CachedGraphDataset":
        out = object.__new__(CachedGraphDataset)
        out.__dict__.update(self.__getstate__())
        out.indices = self.indices[np.asarray([int(i) for i in indices], dtype=np.int64)]
        return out

    def select_frames(self, keep: np.ndarray) -> "CachedGraphDataset":
        """Subset by a boolean mask over this dataset's frames."""
        return self.subset(np.flatnonzero(np.asarray(keep, dtype=bool)))

    def describe(self, frame: int) -> str:
        files = self.meta["files"]
        src = files[int(self._map("source_file")[frame])]
        idx = int(self._map("source_index")[frame])
        ends = self._map("label_end")
        lo = int(ends[frame - 1]) if frame > 0 else 0
        label = bytes(self._map("labels")[lo:int(ends[frame])]).decode("utf-8")
        return f"{src}, frame {idx}" + (f" ({label})" if label else "")

    def frame_info(self, idx: int) -> dict:
        """Provenance and per-atom extras of this dataset's frame ``idx`` (see :meth:`GraphDataset.frame_info`)."""
        k = int(self.indices[idx])
        a0, a1 = int(self._atom_off[k]), int(self._atom_off[k + 1])
        ends = self._map("label_end")
        lo = int(ends[k - 1]) if k > 0 else 0
        systems = self.__dict__.get("_systems")
        if systems is None:
            try:
                with open(self.path / "systems.json") as fh:
                    systems = json.load(fh)
            except (OSError, ValueError):
                systems = []
            self.__dict__["_systems"] = systems
        sid = int(self._map("system_id")[k])
        return {
            "source_file": self.meta["files"][int(self._map("source_file")[k])],
            "source_index": int(self._map("source_index")[k]),
            "label": bytes(self._map("labels")[lo:int(ends[k])]).decode("utf-8"),
            "system": systems[sid] if sid < len(systems) else str(sid),
            "fixed": np.array(self._map("fixed")[a0:a1], dtype=bool),
            "tags": np.array(self._map("tags")[a0:a1], dtype=np.int64),
        }

    def frame_arrays(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-frame arrays of this dataset's frames (``natoms``, ``energy``, ``fmax``, ``system_id``, ...)."""
        return {name: np.asarray(self._map(name)[self.indices]) for name in names}

    def __getitem__(self, idx) -> AtomicGraph:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        k = int(self.indices[idx])
        a0, a1 = int(self._atom_off[k]), int(self._atom_off[k + 1])
        e0, e1 = int(self._edge_off[k]), int(self._edge_off[k + 1])
        n = a1 - a0
        pbc = np.array(self._map("pbc")[k], dtype=bool)
        cell = np.array(self._map("cell")[k], dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        g = AtomicGraph(
            positions=torch.from_numpy(np.array(self._map("positions")[a0:a1], dtype=np.float64)),
            numbers=torch.from_numpy(np.array(self._map("numbers")[a0:a1], dtype=np.int64)),
            cell=torch.from_numpy(cell).unsqueeze(0),
            pbc=torch.from_numpy(pbc).unsqueeze(0),
            edge_index=torch.from_numpy(np.array(self._map("edges")[e0:e1], dtype=np.int64).T.copy()),
            shifts=torch.from_numpy(np.array(self._map("shifts")[e0:e1], dtype=np.float64)),
            num_atoms=torch.tensor([n], dtype=torch.long),
        )
        energy = float(self._map("energy")[k])
        has_e = np.isfinite(energy)
        g["energy"] = torch.tensor([energy if has_e else 0.0], dtype=torch.float64)
        has_f = bool(self._map("has_forces")[k])
        g["forces"] = torch.from_numpy(np.array(self._map("forces")[a0:a1], dtype=np.float64))
        stress = np.array(self._map("stress")[k], dtype=np.float64)
        has_s = bool(np.all(np.isfinite(stress)))
        g["stress"] = torch.from_numpy(stress if has_s else np.zeros((3, 3))).unsqueeze(0)
        g["energy_weight"] = torch.tensor([1.0 if has_e else 0.0], dtype=torch.float64)
        g["forces_weight"] = torch.tensor([1.0 if has_f else 0.0], dtype=torch.float64)
        g["stress_weight"] = torch.tensor([1.0 if has_s else 0.0], dtype=torch.float64)
        if self.forces_mask:
            g["forces_mask"] = torch.from_numpy(1.0 - np.array(self._map("fixed")[a0:a1], dtype=np.float64))
        if self.include_tags:
            g["tags"] = torch.from_numpy(np.array(self._map("tags")[a0:a1], dtype=np.int64))
        return g

    # -- streamed statistics (training split only), stored in the cache --
    def _atom_index(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Atom rows of ``frames`` and the position (0..len(frames)-1) of the frame each belongs to."""
        starts = self._atom_off[frames]
        counts = self._atom_off[frames + 1] - starts
        local = np.repeat(np.arange(len(frames)), counts)
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return np.arange(int(counts.sum())) + offsets, local

    def statistics(self, e0s_cfg: Any = "fit", atomic_numbers: Sequence[int] | None = None,
                   chunk: int = 20000) -> dict[str, Any]:
        """Element table, E0s, average neighbours, force RMS (scale) and mean interaction energy per atom
        (shift) of this dataset, streamed over chunks of frames through the same
        :class:`~potentials.data.stats.StatsAccumulator` as in-memory datasets (fixed atoms count in the force
        RMS only when the force loss uses them); the result is stored in the cache directory and reused.
        ``e0s_cfg``: ``"fit"``, ``{element: eV}``, or ``"dataset"``/``"iso_atoms"`` for E0s provided by the
        dataset (3BPA's ``iso_atoms.xyz``)."""
        from potentials.data.stats import StatsAccumulator

        key_src = json.dumps({"idx": hashlib.sha256(self.indices.tobytes()).hexdigest(), "e0s": e0s_cfg,
                              "z": list(atomic_numbers) if atomic_numbers else None, "mask": self.forces_mask,
                              "v": 2}, sort_keys=True, default=str)
        stats_file = self.path / f"stats-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json"
        try:
            with open(stats_file) as fh:
                stats = json.load(fh)
            stats["e0s"] = {int(z): float(e) for z, e in stats["e0s"].items()}
            log.info("%s: statistics read from %s", self.name, stats_file)
            return stats
        except (OSError, ValueError, KeyError):
            pass
        numbers_map, forces_map, fixed_map = self._map("numbers"), self._map("forces"), self._map("fixed")
        energy_map, natoms_map = self._map("energy"), self._map("natoms")
        nedges_map, has_f_map = self._map("nedges"), self._map("has_forces")
        acc = StatsAccumulator()
        for s in range(0, len(self.indices), chunk):
            fr = self.indices[s:s + chunk]
            rows, local = self._atom_index(fr)
            ok = np.asarray(has_f_map[fr], dtype=bool)[local]
            if self.forces_mask:
                ok &= ~np.asarray(fixed_map[rows], dtype=bool)
            acc.add(np.asarray(numbers_map[rows]), np.asarray(natoms_map[fr]), np.asarray(energy_map[fr]),
                    np.asarray(forces_map[rows], dtype=np.float64), ok, n_edges=int(np.asarray(nedges_map[fr]).sum()))
        stats = acc.statistics(e0s_cfg, atomic_numbers, given_e0s=self.extras.get("e0s"), name=self.name)
        try:
            with atomic_open(stats_file, "w", mkdir=False) as fh:
                json.dump(stats, fh)
        except OSError as exc:  # a read-only cache still works
            log.info("could not store statistics in %s: %s", stats_file, exc)
        return stats
