"""Atomic file writes: write a temporary file in the target's directory, then rename it into place.

A crash or an exception at any moment leaves either the old file (or none) or the complete new one, never a
half-written file; the temporary file is removed when the writer raises. This is the project's one home for
that pattern (bottom layer: imports nothing from the project).

    with atomic_open("out.json", "w") as fh:      # a file handle
        json.dump(obj, fh)
    with atomic_path("plot.png") as tmp:           # a path, for writers that want a file name
        fig.savefig(tmp)
    atomic_write_text("report.md", text)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename inside it durable); silently does nothing where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same extension, so writers that infer the format from the
    name still work); on normal exit rename it onto ``path``, on an exception remove it and re-raise.

    The temporary name is ``.<name>.<random>.tmp<suffix>`` (hidden, never mistaken for the real file).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, mkdir: bool = True,
                **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``mode`` ``"w"``/``"wb"``/...); on normal exit
    flush (and ``fsync`` if asked), close and rename it onto ``path``; on an exception remove it."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open: mode must write a new file ('w'/'wb'), got {mode!r}")
    mode = mode.replace("x", "w")
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", fsync=fsync, encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


__all__ = ["atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]
