"""Versioned on-disk graph cache: convert a dataset once, then read graphs lazily from memory maps.

Layout of one cache (a directory ``<cache_dir>/<name>-<key16>/``)::

    meta.json          key spec, field table, counts, skipped frames, source files, extras, throughput
    systems.json       the system (sid / mp_id / file) of each ``system_id``, for the outlier filter
    <field>.bin        raw little-endian arrays, one file per field (read with ``numpy.memmap``)
    stats-<hash>.json  training statistics, one per (subset, E0 config), written on first use

Per frame: ``natoms`` ``nedges`` ``cell`` ``pbc`` ``energy`` (NaN = none) ``stress`` (3×3, NaN = none)
``has_forces`` ``fmax`` (max per-atom |F|) ``source_file`` ``source_index`` ``system_id`` ``label_end``;
per atom: ``positions`` ``numbers`` ``forces`` ``fixed`` ``tags``; per edge: ``edges`` (local centre,
neighbour; int32) and ``shifts`` (int8); ``labels`` (UTF-8 bytes of the frame labels).

**Key.** The directory name is a hash of: :data:`FORMAT_VERSION`, the format and split, the source files'
resolved paths with size and mtime (or their SHA-256 with ``fingerprint="sha256"``), the cutoff and every
option that changes the converted values. A changed file, cutoff, option or code version therefore maps to
a different directory: a stale cache is never opened (``meta.json`` also repeats the key and is checked).

**Atomicity.** A cache is built in ``.tmp-<name>@<host>@<pid>@<random>/`` next to its final place, ``meta.json``
is written last, everything is fsynced and the directory is renamed in one step. A conversion killed at any
point leaves only a ``.tmp-*`` directory, which is never opened and is removed by the next build once its
process is gone.

**Scale.** Conversion streams: frames arrive in chunks (``units``), optionally converted by a pool of
processes with a bounded number of chunks in flight, and are appended to the field files. Reading opens
the field files as memory maps; :class:`CachedGraphDataset` holds only per-frame offsets in RAM and builds
each graph on demand, so memory stays bounded for datasets larger than RAM, including in DataLoader
workers (the dataset pickles without its maps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from potentials.data.dataset import GraphDataset
from potentials.data.graph import AtomicGraph
from potentials.data.neighbors import check_cell, neighbor_list
from potentials.errors import PotentialsError
from potentials.io import atomic_open, fsync_dir

log = logging.getLogger("potentials.data")

#: Bump when the stored arrays or the conversion change meaning: every existing cache becomes stale.
FORMAT_VERSION = 1

# name → (dtype, trailing shape, axis: frame | atom | edge | byte)
FIELDS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "natoms": ("<i4", (), "frame"),
    "nedges": ("<i8", (), "frame"),
    "cell": ("<f8", (3, 3), "frame"),
    "pbc": ("|b1", (3,), "frame"),
    "energy": ("<f8", (), "frame"),
    "stress": ("<f8", (3, 3), "frame"),
    "has_forces": ("|b1", (), "frame"),
    "fmax": ("<f8", (), "frame"),
    "source_file": ("<i4", (), "frame"),
    "source_index": ("<i8", (), "frame"),
    "system_id": ("<i4", (), "frame"),
    "label_end": ("<i8", (), "frame"),
    "positions": ("<f8", (3,), "atom"),
    "numbers": ("|u1", (), "atom"),
    "forces": ("<f8", (3,), "atom"),
    "fixed": ("|b1", (), "atom"),
    "tags": ("<i4", (), "atom"),
    "edges": ("<i4", (2,), "edge"),
    "shifts": ("|i1", (3,), "edge"),
    "labels": ("|u1", (), "byte"),
}


# ------------------------------------------------------------------------------------------------- key


def fingerprint_files(paths: Sequence[str | os.PathLike], method: str = "stat") -> list[list]:
    """``[resolved path, size, mtime_ns]`` per file (``method="stat"``) or ``[path, size, sha256]``."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        try:
            st = p.stat()
        except OSError as exc:
            raise PotentialsError(f"data file {str(p)!r} cannot be read: {exc}") from None
        if method == "stat":
            out.append([str(p), int(st.st_size), int(st.st_mtime_ns)])
        elif method == "sha256":
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out.append([str(p), int(st.st_size), h.hexdigest()])
        else:
            raise PotentialsError(f"fingerprint must be 'stat' or 'sha256', got {method!r}")
    return out


def cache_key(spec: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``spec`` plus :data:`FORMAT_VERSION`."""
    full = {"format_version": FORMAT_VERSION, **spec}
    text = json.dumps(full, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ conversion


def frames_to_chunk(
    frames: Iterable,
    cutoff: float,
    *,
    require_energy: bool = True,
    require_forces: bool = True,
    require_edges: bool = True,
    on_bad_frame: str = "raise",
) -> dict[str, Any]:
    """Validate frames, build their neighbour lists and pack them into flat arrays (one chunk).

    ``frames`` yields :class:`~potentials.data.formats.base.Frame` or ``FrameError`` instances (a per-frame
    problem found while reading). Bad frames raise, or with ``on_bad_frame="skip"`` are counted and the first
    few messages kept.
    """
    from potentials.data.formats.base import FrameError, validate

    computed = ("label_end", "labels", "system_id", "source_file")  # filled in by the writer
    cols: dict[str, list] = {name: [] for name in FIELDS if name not in computed}
    labels: list[str] = []
    systems: list[str] = []
    sources: list[str] = []
    skipped, errors = 0, []
    for frame in frames:
        try:
            if isinstance(frame, Exception):
                raise frame
            frame = validate(frame, require_energy=require_energy, require_forces=require_forces)
            where = frame.where
            n = len(frame.numbers)
            check_cell(frame.cell, frame.pbc, where)
            edge_index, shifts = neighbor_list(frame.positions, frame.cell, frame.pbc, cutoff)
            if require_edges and edge_index.shape[1] == 0:
                raise FrameError(
                    f"{where}: no atom has a neighbour within r_max={cutoff} Å; the model would predict "
                    "only isolated-atom energies (increase r_max or check the structure)"
                )
            if shifts.size and np.abs(shifts).max() > 127:
                raise FrameError(
                    f"{where}: periodic image shift {int(np.abs(shifts).max())} is too large (cell too small)"
                )
            if int(frame.numbers.max()) > 255:
                raise FrameError(f"{where}: unknown element")
        except FrameError as exc:
            if on_bad_frame != "skip":
                raise
            skipped += 1
            if len(errors) < 5:
                errors.append(str(exc))
            continue
        cols["natoms"].append(np.int32(n))
        cols["nedges"].append(np.int64(edge_index.shape[1]))
        cols["cell"].append(frame.cell)
        cols["pbc"].append(frame.pbc)
        cols["energy"].append(np.nan if frame.energy is None else frame.energy)
        cols["stress"].append(np.full((3, 3), np.nan) if frame.stress is None else frame.stress)
        has_f = frame.forces is not None
        cols["has_forces"].append(has_f)
        f = frame.forces if has_f else np.zeros((n, 3))
        cols["fmax"].append(float(np.sqrt((f * f).sum(1)).max()) if has_f else np.nan)
        cols["source_index"].append(int(frame.index))
        cols["positions"].append(frame.positions)
        cols["numbers"].append(frame.numbers.astype(np.uint8))
        cols["forces"].append(f)
        cols["fixed"].append(np.zeros(n, bool) if frame.fixed is None else frame.fixed)
        cols["tags"].append(np.zeros(n, np.int32) if frame.tags is None else frame.tags.astype(np.int32))
        cols["edges"].append(edge_index.T.astype(np.int32))
        cols["shifts"].append(shifts.astype(np.int8))
        labels.append(frame.label)
        systems.append(frame.system or frame.source)
        sources.append(frame.source)
    arrays = {}
    for name, values in cols.items():
        dtype, tail, axis = FIELDS[name]
        if not values:
            arrays[name] = np.zeros((0, *tail), dtype=dtype)
        elif axis == "frame":
            arrays[name] = np.asarray(values, dtype=dtype).reshape(-1, *tail)
        else:
            arrays[name] = np.concatenate(values).astype(dtype, copy=False).reshape(-1, *tail)
    return {"arrays": arrays, "labels": labels, "systems": systems, "sources": sources,
            "skipped": skipped, "errors": errors}


def _convert_unit(job) -> dict[str, Any]:
    convert, unit, options, kwargs = job
    frames = convert(unit, options)
    try:
        return frames_to_chunk(frames, **kwargs)
    finally:  # release the reader's files (e.g. an LMDB environment) even when a frame raised
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` in order; with ``workers > 0`` in a process pool with at most ``2 * workers``
    items in flight (so a streamed source is never read far ahead of the conversion)."""
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_tmp_dirs(root: Path) -> None:
    """Remove ``.tmp-<name>@<host>@<pid>@<token>`` build directories of dead processes on this host."""
    host = socket.gethostname()
    for d in root.glob(".tmp-*"):
        try:
            _, tmp_host, pid, _ = d.name.rsplit("@", 3)
            pid = int(pid)
        except ValueError:
            continue
        if tmp_host == host and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class _Writer:
    """Appends chunks to the field files of a cache under construction."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.handles = {name: open(directory / f"{name}.bin", "wb") for name in FIELDS}
        self.lengths = {name: 0 for name in FIELDS}
        self.files: dict[str, int] = {}
        self.systems: dict[str, int] = {}
        self.label_bytes = 0
        self.skipped = 0
        self.errors: list[str] = []

    def append(self, chunk: dict[str, Any]) -> int:
        arrays = dict(chunk["arrays"])
        arrays["source_file"] = np.array(
            [self.files.setdefault(s, len(self.files)) for s in chunk["sources"]], dtype="<i4"
        )
        arrays["system_id"] = np.array(
            [self.systems.setdefault(s, len(self.systems)) for s in chunk["systems"]], dtype="<i4"
        )
        encoded = [s.encode("utf-8") for s in chunk["labels"]]
        ends = self.label_bytes + np.cumsum([len(b) for b in encoded], dtype=np.int64)
        arrays["label_end"] = ends.astype("<i8")
        arrays["labels"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.label_bytes += sum(len(b) for b in encoded)
        for name, (dtype, tail, _) in FIELDS.items():
            arr = np.ascontiguousarray(arrays[name], dtype=dtype)
            self.handles[name].write(arr.tobytes())
            self.handles[name].flush()  # a chunk is on disk before the next one starts
            self.lengths[name] += int(arr.shape[0])
        self.skipped += int(chunk["skipped"])
        room = 5 - len(self.errors)
        if room > 0:
            self.errors.extend(chunk["errors"][:room])
        return int(arrays["natoms"].shape[0])

    def close(self) -> None:
        for fh in self.handles.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


def build_cache(
    final: Path,
    spec: Mapping[str, Any],
    units: Iterable,
    convert: Callable,
    options: Mapping[str, Any],
    cutoff: float,
    *,
    extras: Mapping[str, Any] | None = None,
    workers: int = 0,
    require_energy: bool = True,
    require_forces: bool = True,
    require_edges: bool = True,
    on_bad_frame: str = "raise",
    total_frames: int | None = None,
    progress: bool | None = None,
    label: str = "",
) -> Path:
    """Convert ``units`` (each turned into frames by ``convert(unit, options)``) into the cache ``final``,
    atomically. Returns ``final``. If another process completed the same cache meanwhile, its copy is kept."""
    kwargs = dict(require_energy=require_energy, require_forces=require_forces, require_edges=require_edges,
                  on_bad_frame=on_bad_frame, cutoff=float(cutoff))
    jobs = ((convert, unit, dict(options), kwargs) for unit in units)
    chunks = _ordered_map(_convert_unit, jobs, int(workers))
    return write_cache(final, spec, chunks, cutoff, extras=extras, total_frames=total_frames, progress=progress,
                       label=label)


def write_cache(
    final: Path,
    spec: Mapping[str, Any],
    chunks: Iterable[dict[str, Any]],
    cutoff: float,
    *,
    extras: Mapping[str, Any] | None = None,
    total_frames: int | None = None,
    progress: bool | None = None,
    label: str = "",
) -> Path:
    """Write packed chunks (as made by :func:`frames_to_chunk`) into the cache ``final``, atomically: a
    temporary directory, ``meta.json`` last, fsync, one rename."""
    final = Path(final)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp_dirs(root)
    tmp = root / f".tmp-{final.name}@{socket.gethostname()}@{os.getpid()}@{secrets.token_hex(4)}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_frames, unit="frame", desc=f"converting {label or final.name}",
                   disable=(None if progress is None else not progress), leave=False)
        writer = _Writer(tmp)
        try:
            for chunk in chunks:
                added = writer.append(chunk)
                bar.update(added + int(chunk["skipped"]))
        finally:
            writer.close()
            bar.close()
        seconds = time.perf_counter() - start
        n_frames = writer.lengths["natoms"]
        if n_frames == 0:
            first = f" (first problem: {writer.errors[0]})" if writer.errors else ""
            raise PotentialsError(f"{label or final.name}: no usable structures in the data{first}")
        files = [None] * len(writer.files)
        for name, i in writer.files.items():
            files[i] = name
        systems = [None] * len(writer.systems)
        for name, i in writer.systems.items():
            systems[i] = name
        meta = {
            "complete": True,
            "format_version": FORMAT_VERSION,
            "key": final.name,
            "spec": json.loads(json.dumps(spec, default=str)),
            "cutoff": float(cutoff),
            "fields": {name: [dtype, list(tail), writer.lengths[name]] for name, (dtype, tail, _) in FIELDS.items()},
            "num_frames": n_frames,
            "num_atoms": writer.lengths["positions"],
            "num_edges": writer.lengths["edges"],
            "skipped": writer.skipped,
            "skipped_first": writer.errors,
            "files": files,
            "num_systems": len(systems),
            "extras": dict(extras or {}),
            "seconds": seconds,
            "frames_per_second": (n_frames + writer.skipped) / max(seconds, 1e-9),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(tmp / "systems.json", "w") as fh:
            json.dump(systems, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with atomic_open(tmp / "meta.json", "w", fsync=True) as fh:
            json.dump(meta, fh)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_valid_cache(final):
                raise
            log.info("cache %s was completed by another process; using it", final)
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = cache_size(final)
    log.info(
        "%s: converted %d frames (%d skipped) in %.1f s (%.0f frames/s) into %s (%.1f MB)",
        label or final.name, n_frames, writer.skipped, seconds, meta["frames_per_second"], final, size / 1e6,
    )
    if writer.skipped:
        log.warning("%s: skipped %d bad frame(s); first: %s", label or final.name, writer.skipped, writer.errors[0])
    return final


def read_meta(path: Path) -> dict | None:
    try:
        with open(Path(path) / "meta.json") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_valid_cache(path: Path, key: str | None = None) -> bool:
    """A complete cache of this code version (and ``key`` if given) whose field files have the right sizes."""
    meta = read_meta(path)
    if not meta or not meta.get("complete") or meta.get("format_version") != FORMAT_VERSION:
        return False
    if key is not None and meta.get("key") != key:
        return False
    for name, (dtype, tail, length) in meta.get("fields", {}).items():
        f = Path(path) / f"{name}.bin"
        expected = int(length) * int(np.prod(tail, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not f.exists() or f.stat().st_size != expected:
            return False
    return set(meta.get("fields", {})) == set(FIELDS)


def cache_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


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
        (shift) of this dataset, computed by streaming over chunks of frames; the result is stored in the
        cache directory and reused. ``e0s_cfg``: ``"fit"``, ``{element: eV}``, or ``"dataset"``/``"iso_atoms"``
        for E0s provided by the dataset (3BPA's ``iso_atoms.xyz``)."""
        from potentials.data.stats import e0s_from_dict_or_fit

        key_src = json.dumps({"idx": hashlib.sha256(self.indices.tobytes()).hexdigest(), "e0s": e0s_cfg,
                              "z": list(atomic_numbers) if atomic_numbers else None, "mask": self.forces_mask,
                              "v": 1}, sort_keys=True, default=str)
        stats_file = self.path / f"stats-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json"
        try:
            with open(stats_file) as fh:
                stats = json.load(fh)
            stats["e0s"] = {int(z): float(e) for z, e in stats["e0s"].items()}
            log.info("%s: statistics read from %s", self.name, stats_file)
            return stats
        except (OSError, ValueError, KeyError):
            pass
        frames_all = self.indices
        numbers_map, forces_map, fixed_map = self._map("numbers"), self._map("forces"), self._map("fixed")
        energy = np.asarray(self._map("energy")[frames_all], dtype=np.float64)
        natoms = np.asarray(self._map("natoms")[frames_all], dtype=np.int64)
        nedges = np.asarray(self._map("nedges")[frames_all], dtype=np.int64)
        has_f = np.asarray(self._map("has_forces")[frames_all], dtype=bool)
        # pass 1: elements
        present = np.zeros(256, dtype=bool)
        for s in range(0, len(frames_all), chunk):
            rows, _ = self._atom_index(frames_all[s:s + chunk])
            present[np.unique(np.asarray(numbers_map[rows]))] = True
        zs = [int(z) for z in np.flatnonzero(present)]
        numbers = [int(z) for z in atomic_numbers] if atomic_numbers else zs
        missing = sorted(set(zs) - set(numbers))
        if missing:
            raise PotentialsError(
                f"{self.name}: elements {missing} are in the data but not in atomic_numbers {numbers}"
            )
        col = np.full(256, -1, dtype=np.int64)
        col[numbers] = np.arange(len(numbers))
        nz = len(numbers)
        # pass 2: composition normal equations, force sums
        ata, ate = np.zeros((nz, nz)), np.zeros(nz)
        sum_epa, sum_comp_pa, n_e = 0.0, np.zeros(nz), 0
        f_sq, f_count = 0.0, 0
        has_e = np.isfinite(energy)
        for s in range(0, len(frames_all), chunk):
            fr = frames_all[s:s + chunk]
            rows, local = self._atom_index(fr)
            z = np.asarray(numbers_map[rows], dtype=np.int64)
            comp = np.bincount(local * nz + col[z], minlength=len(fr) * nz).reshape(len(fr), nz).astype(np.float64)
            e_ok = has_e[s:s + len(fr)]
            a, e_chunk, n_chunk = comp[e_ok], energy[s:s + len(fr)][e_ok], natoms[s:s + len(fr)][e_ok]
            ata += a.T @ a
            ate += a.T @ e_chunk
            sum_epa += float((e_chunk / n_chunk).sum())
            sum_comp_pa += (a / n_chunk[:, None]).sum(0)
            n_e += int(e_ok.sum())
            atom_ok = has_f[s:s + len(fr)][local]
            if self.forces_mask:
                atom_ok &= ~np.asarray(fixed_map[rows], dtype=bool)
            f = np.asarray(forces_map[rows[atom_ok]], dtype=np.float64)
            f_sq += float((f * f).sum())
            f_count += f.size
        if isinstance(e0s_cfg, str) and e0s_cfg.strip().lower() in ("dataset", "iso_atoms"):
            given = self.extras.get("e0s")
            if not given:
                raise PotentialsError(
                    f"{self.name}: e0s={e0s_cfg!r} but this dataset provides no E0s (for 3BPA: is iso_atoms.xyz "
                    "next to the training file?); use e0s=fit or {element: eV}"
                )
            e0s = e0s_from_dict_or_fit({int(k): v for k, v in given.items()}, [], numbers)
        elif isinstance(e0s_cfg, str) and e0s_cfg.strip().lower() == "fit":
            if not has_e.any():
                raise PotentialsError("cannot fit E0s: no structure in the training data has an energy")
            coef, _, rank, _ = np.linalg.lstsq(ata, ate, rcond=None)
            if rank < nz:
                absent = [zz for k, zz in enumerate(numbers) if ata[k, k] == 0]
                log.warning(
                    "E0 fit is underdetermined (composition matrix rank %d < %d elements%s); using the "
                    "minimum-norm solution — consider giving E0s explicitly", rank, nz,
                    f"; elements absent from the data: {absent}" if absent else "",
                )
            e0s = {z: float(c) for z, c in zip(numbers, coef)}
        else:
            e0s = e0s_from_dict_or_fit(e0s_cfg, [], numbers)
        if f_count == 0:
            raise PotentialsError("cannot compute the force RMS: no structure in the data has forces")
        e0v = np.array([e0s[z] for z in numbers])
        if n_e == 0:
            raise PotentialsError("cannot compute the mean interaction energy: no structure has an energy")
        shift = float((sum_epa - sum_comp_pa @ e0v) / n_e)
        scale = float(np.sqrt(f_sq / f_count))
        stats = {
            "atomic_numbers": numbers,
            "e0s": {int(z): float(e) for z, e in e0s.items()},
            "avg_num_neighbors": float(nedges.sum() / max(natoms.sum(), 1)),
            "scale": scale if scale > 0 else 1.0,
            "shift": shift,
        }
        try:
            with atomic_open(stats_file, "w", mkdir=False) as fh:
                json.dump(stats, fh)
        except OSError as exc:  # a read-only cache still works
            log.info("could not store statistics in %s: %s", stats_file, exc)
        return stats


def open_or_build(
    cache_dir: str | os.PathLike,
    name: str,
    spec: Mapping[str, Any],
    build: Callable[[Path], Path],
    rebuild: bool = False,
) -> Path:
    """The cache directory for ``spec``: reuse a valid one, else call ``build(final_path)``."""
    key = cache_key(spec)
    final = Path(cache_dir) / f"{name}-{key[:16]}"
    if not rebuild and is_valid_cache(final, key=final.name):
        meta = read_meta(final)
        if meta.get("spec") == json.loads(json.dumps(spec, default=str)):
            log.info("%s: using cache %s (%d frames)", name, final, meta["num_frames"])
            return final
    if final.exists():
        log.warning("removing stale or incomplete cache %s", final)
        shutil.rmtree(final, ignore_errors=True)
    return build(final)
