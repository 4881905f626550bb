"""Generic readers behind the OC20 loader (no OC20 meaning here): LMDB environments, PyG pickles without
torch_geometric, ASE-LMDB rows, and record iteration that turns every per-record problem into a
:class:`~potentials.data.formats.base.FrameError` naming the file and key.
"""

from __future__ import annotations

import io
import lzma
import pickle
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from potentials.data.formats.base import FrameError
from potentials.errors import PotentialsError


def open_text(path: Path):
    if str(path).endswith(".xz"):
        return lzma.open(path, "rt")
    return open(path, "r")


def sniff_lmdb(path: Path) -> str:
    """``lmdb`` (pickles) or ``aselmdb`` (zlib JSON), from the first stored value."""
    env = open_env(path)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                if key in (b"length", b"nextid", b"metadata", b"deleted_ids"):
                    continue
                return "aselmdb" if value[:1] == b"\x78" else "lmdb"
            raw = txn.get(b"nextid")
            return "aselmdb" if raw is not None and raw[:1] == b"\x78" else "lmdb"
    finally:
        env.close()


def open_env(path: Path):
    import lmdb

    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=256)
    except lmdb.Error as exc:
        raise PotentialsError(f"cannot open LMDB {str(path)!r} (truncated or corrupt?): {exc}") from None
    # LMDB memory-maps the file and trusts its page table: reading a page past the end of a truncated file
    # kills the process (SIGBUS). Its meta page records the last page, so a short file is caught here.
    try:
        needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
        size = Path(path).stat().st_size
    except (lmdb.Error, OSError, KeyError) as exc:
        env.close()
        raise PotentialsError(f"cannot read LMDB {str(path)!r} (truncated or corrupt?): {exc}") from None
    if size < needed:
        env.close()
        raise PotentialsError(f"LMDB {str(path)!r} is truncated: {size} bytes, its page table needs {needed}")
    return env


class PygStandIn:
    """Stand-in for any ``torch_geometric`` class met while unpickling: keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


_STANDINS: dict[tuple[str, str], type] = {}
_SAFE_MODULES = ("torch", "numpy", "collections", "copyreg", "_codecs", "enum")
_SAFE_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "slice", "complex", "bytearray", "bytes", "int",
                  "float", "str", "bool", "object", "range"}


class PygUnpickler(pickle.Unpickler):
    """Unpickles PyG ``Data`` without torch_geometric: its classes become :class:`PygStandIn` subclasses;
    only torch/numpy/standard containers are otherwise allowed (no arbitrary code from a data file)."""

    def find_class(self, module, name):
        top = module.split(".")[0]
        if top == "torch_geometric":
            key = (module, name)
            if key not in _STANDINS:
                _STANDINS[key] = type(name, (PygStandIn,), {"__module__": "potentials.data.formats.lmdb_readers._pyg"})
            return _STANDINS[key]
        if top in _SAFE_MODULES or (module == "builtins" and name in _SAFE_BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def pyg_mapping(obj) -> dict:
    """The attribute dict of an unpickled PyG ``Data`` (PyG 1: ``__dict__``; PyG 2: ``_store._mapping``)."""
    d = getattr(obj, "__dict__", None)
    if d is None:
        if isinstance(obj, dict):
            return obj
        raise TypeError(f"unexpected pickled object of type {type(obj).__name__}")
    store = d.get("_store")
    if store is not None:
        mapping = getattr(store, "__dict__", {}).get("_mapping")
        if mapping is None and isinstance(store, dict):
            mapping = store.get("_mapping")
        if mapping is None:
            raise TypeError("PyG 2 Data without a _store._mapping")
        return dict(mapping)
    return {k: v for k, v in d.items() if not (k.startswith("__") and k.endswith("__"))}


def decode_pyg(raw: bytes) -> dict:
    """The attribute dict of one pickled PyG ``Data`` record (see :class:`PygUnpickler`)."""
    return pyg_mapping(PygUnpickler(io.BytesIO(raw)).load())


def to_numpy(value) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def scalar(value):
    if value is None:
        return None
    arr = to_numpy(value)
    return arr.reshape(-1)[0].item() if arr.size == 1 else arr


def lmdb_length(path: Path) -> int:
    env = open_env(path)
    try:
        with env.begin() as txn:
            raw = txn.get(b"length")
            if raw is not None:
                try:
                    return int(pickle.loads(raw))
                except Exception:
                    raise PotentialsError(f"{path}: the 'length' entry is corrupt") from None
            return int(env.stat()["entries"])
    finally:
        env.close()


def iter_lmdb_records(path, ids, what: str, decode_failure: str, decode, to_frame, options) -> Iterator:
    """Frames (or :class:`FrameError`) of the LMDB records with decimal-string keys ``ids``: each raw value is
    ``decode``d, then turned into a frame by ``to_frame(record, path, id, options)``."""
    env = open_env(Path(path))
    try:
        with env.begin() as txn:
            for key in ids:
                raw = txn.get(str(key).encode("ascii"))
                where = f"{path}, frame {key}"
                if raw is None:
                    yield FrameError(f"{where}: {what} {key} is missing (file truncated or corrupt?)")
                    continue
                try:
                    record = decode(raw)
                except Exception as exc:
                    yield FrameError(f"{where}: {decode_failure} ({type(exc).__name__}: {exc})")
                    continue
                try:
                    yield to_frame(record, path, key, options)
                except FrameError as exc:
                    yield exc
                except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                    yield FrameError(f"{where}: malformed record ({type(exc).__name__}: {exc})")
    finally:
        env.close()


def decode_aselmdb(raw: bytes):
    """A zlib-compressed JSON value of an ASE-LMDB, either dialect (plain lists or ``__ndarray__``)."""
    from ase.io.jsonio import decode

    return decode(zlib.decompress(raw).decode("utf-8"), always_array=False)


def aselmdb_ids(path: Path) -> tuple[int, list[int]]:
    """(nextid, sorted deleted ids)."""
    env = open_env(path)
    try:
        with env.begin() as txn:
            raw = txn.get(b"nextid")
            try:
                nextid = int(decode_aselmdb(raw)) if raw is not None else 1
                raw = txn.get(b"deleted_ids")
                deleted = sorted(int(i) for i in decode_aselmdb(raw)) if raw is not None else []
            except Exception as exc:
                raise PotentialsError(f"{path}: corrupt ASE-LMDB bookkeeping ({type(exc).__name__}: {exc})") from None
            return nextid, deleted
    finally:
        env.close()


def fixed_from_constraints(constraints, n: int) -> np.ndarray | None:
    if not constraints:
        return None
    mask = np.zeros(n, dtype=bool)
    found = False
    for c in constraints:
        if isinstance(c, dict):
            if c.get("name") != "FixAtoms":
                continue
            kw = c.get("kwargs", c)
            idx = kw.get("indices", kw.get("index"))
            if idx is None and kw.get("mask") is not None:
                idx = np.flatnonzero(np.asarray(kw["mask"], dtype=bool))
        elif type(c).__name__ == "FixAtoms":
            idx = c.index
        else:
            continue
        mask[np.asarray(idx, dtype=np.int64)] = True
        found = True
    return mask if found else None


def pbc3(value) -> np.ndarray:
    pbc = np.asarray(value, dtype=bool).reshape(-1)
    return np.repeat(pbc, 3) if pbc.size == 1 else pbc
