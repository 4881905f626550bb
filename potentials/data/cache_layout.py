"""On-disk layout of a graph cache (shared by :mod:`cache_build` and :mod:`cache_read`).

One cache is a directory ``<cache_dir>/<name>-<key16>/``::

    meta.json          key spec, field table, counts, skipped frames, source files, extras, throughput
    systems.json       the system (sid / mp_id / file) of each ``system_id``, for the outlier filter and splits
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from potentials.errors import PotentialsError

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
