"""Versioned on-disk graph cache: convert a dataset once, then read graphs lazily from memory maps.

This module re-exports the three parts: :mod:`cache_layout` (fields, key, validity), :mod:`cache_build`
(conversion, atomic build) and :mod:`cache_read` (:class:`CachedGraphDataset`).

Layout of one cache directory and the per-frame/atom/edge fields: :mod:`cache_layout`.

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

from potentials.data.cache_build import build_cache, frames_to_chunk, open_or_build, write_cache
from potentials.data.cache_layout import (
    FIELDS,
    FORMAT_VERSION,
    cache_key,
    cache_size,
    fingerprint_files,
    is_valid_cache,
    read_meta,
)
from potentials.data.cache_read import CachedGraphDataset

__all__ = ["CachedGraphDataset", "FIELDS", "FORMAT_VERSION", "build_cache", "cache_key", "cache_size",
           "fingerprint_files", "frames_to_chunk", "is_valid_cache", "open_or_build", "read_meta", "write_cache"]
