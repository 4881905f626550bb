"""Graph cache builder: convert frames once into the on-disk layout of :mod:`cache_layout`, atomically.

**Atomicity.** A cache is built in ``.tmp-<name>@<host>@<pid>@<random>/`` next to its final place, ``meta.json``
is written last, everything is fsynced and the directory is renamed in one step. A conversion killed at any
point leaves only a ``.tmp-*`` directory, which is never opened and is removed by the next build once its
process is gone.

**Scale.** Conversion streams: frames arrive in chunks (``units``), optionally converted by a pool of
processes with a bounded number of chunks in flight, and are appended to the field files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from potentials.data import cache_layout as layout
from potentials.data.cache_layout import FIELDS, cache_key, cache_size, is_valid_cache, read_meta
from potentials.data.neighbors import check_cell, neighbor_list
from potentials.errors import PotentialsError
from potentials.io import atomic_open, fsync_dir

log = logging.getLogger("potentials.data")


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
            "format_version": layout.FORMAT_VERSION,
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
