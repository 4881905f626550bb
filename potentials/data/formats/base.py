"""Shared pieces of the dataset-format loaders: the :class:`Frame` record, validation, option handling,
the outlier filter and helpers to read ASE files frame by frame.

A format module turns its published files into a stream of :class:`Frame` records in ASE units
(Å, eV, eV/Å, eV/Å³ with ASE's stress sign). :mod:`potentials.data.cache` turns frames into graphs and
stores them. Everything that depends on the published format (keys, units, signs, referencing) happens
in the format module; everything below is format-independent.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from potentials.errors import PotentialsError

log = logging.getLogger("potentials.data")

MAX_Z = 118


@dataclass
class Frame:
    """One labelled structure in ASE units (Å, eV, eV/Å, eV/Å³ with ASE's sign: tension positive).

    ``source`` is the file it came from and ``index`` the frame's position in that file (provenance);
    ``label`` is a human-readable id (e.g. ``random1234/frame5`` or an MPtrj ``mp-1-0-3``);
    ``system`` groups frames of one system/trajectory (used by the relative outlier filter).
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    source: str
    index: int
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None  # 3×3
    fixed: np.ndarray | None = None  # [n] bool, True = fixed
    tags: np.ndarray | None = None  # [n] int
    label: str = ""
    system: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}, frame {self.index}" + (f" ({self.label})" if self.label else "")


class FrameError(PotentialsError):
    """A problem with one frame (missing target, NaN, unknown element, ...): raised or skipped as configured."""


def finite_array(value, name: str, where: str, shape: tuple | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FrameError(f"{where}: {name} is not numeric ({exc})") from None
    if shape is not None and arr.shape != shape:
        raise FrameError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise FrameError(f"{where}: {name} contains NaN or inf")
    return arr


def stress_matrix(value, where: str, name: str = "stress") -> np.ndarray:
    """A 3×3 stress from Voigt-6 (ASE order xx yy zz yz xz xy), 9 or 3×3 values; clear error otherwise."""
    s = finite_array(value, name, where)
    if s.shape == (3, 3):
        return s
    if s.shape == (9,):
        return s.reshape(3, 3)
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.shape == (1, 3, 3):
        return s[0]
    raise FrameError(f"{where}: {name} has shape {s.shape}, expected (6,), (9,) or (3, 3)")


def validate(frame: Frame, require_energy: bool = True, require_forces: bool = True) -> Frame:
    """Check shapes, finiteness and element numbers; convert stress to 3×3. Raises :class:`FrameError`."""
    where = frame.where
    n = len(frame.numbers)
    if n == 0:
        raise FrameError(f"{where}: structure has no atoms")
    numbers = np.asarray(frame.numbers)
    if numbers.dtype.kind == "f":
        if not np.all(np.isfinite(numbers)) or np.any(numbers != np.round(numbers)):
            raise FrameError(f"{where}: atomic numbers are not integers")
    numbers = numbers.astype(np.int64)
    bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
    if bad.size:
        raise FrameError(f"{where}: unknown element (atomic number {int(bad[0])})")
    frame.numbers = numbers
    frame.positions = finite_array(frame.positions, "positions", where, (n, 3))
    frame.cell = finite_array(frame.cell, "cell", where, (3, 3))
    frame.pbc = np.asarray(frame.pbc, dtype=bool).reshape(3)
    if frame.energy is None:
        if require_energy:
            raise FrameError(f"{where}: no energy")
    else:
        e = finite_array(frame.energy, "energy", where)
        if e.size != 1:
            raise FrameError(f"{where}: energy has shape {e.shape}, expected a scalar")
        frame.energy = float(e.reshape(()))
    if frame.forces is None:
        if require_forces:
            raise FrameError(f"{where}: no forces")
    else:
        frame.forces = finite_array(frame.forces, "forces", where, (n, 3))
    if frame.stress is not None:
        frame.stress = stress_matrix(frame.stress, where)
    if frame.fixed is not None:
        fixed = np.asarray(frame.fixed)
        if fixed.shape != (n,):
            raise FrameError(f"{where}: fixed-atom mask has shape {fixed.shape}, expected ({n},)")
        frame.fixed = fixed.astype(bool)
    if frame.tags is not None:
        tags = np.asarray(frame.tags)
        if tags.shape != (n,):
            raise FrameError(f"{where}: tags have shape {tags.shape}, expected ({n},)")
        frame.tags = tags.astype(np.int64)
    return frame


# --------------------------------------------------------------------------------------------- options


def check_options(fmt: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``options``; an unknown option is a clear error (catches typos)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise PotentialsError(
            f"data format {fmt!r}: unknown option(s) {unknown}; valid options: {sorted(defaults)}"
        )
    out = dict(defaults)
    out.update(options)
    return out


def choice(fmt: str, name: str, value, allowed: Sequence[str]) -> str:
    v = str(value).strip().lower() if value is not None else None
    if v not in allowed:
        raise PotentialsError(f"data format {fmt!r}: {name}={value!r} is not one of {list(allowed)}")
    return v


# ------------------------------------------------------------------------------------------- discovery


def natural_key(path: Path) -> list:
    """Sort key that orders ``2.extxyz`` before ``10.extxyz``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def require_root(fmt: str, root) -> Path:
    if root is None or str(root).strip() in ("", "???"):
        raise PotentialsError(f"data format {fmt!r}: no data.root given (a directory or a file)")
    p = Path(os.path.expanduser(str(root)))
    if not p.exists():
        raise PotentialsError(f"data format {fmt!r}: data.root {str(p)!r} does not exist")
    return p


# ----------------------------------------------------------------------------------------- ASE helpers


def iter_ase(path: str | os.PathLike, fileobj=None, fmt: str | None = None) -> Iterator[tuple[int, Any]]:
    """(index, ase.Atoms) for every frame of an ASE-readable file, streamed. A file that cannot be parsed
    raises :class:`PotentialsError` naming the file and the frame where reading stopped."""
    import ase.io
    from ase.io.formats import UnknownFileTypeError

    path = str(path)
    i = -1
    try:
        if fileobj is not None:
            it = ase.io.iread(fileobj, index=":", format=fmt or "extxyz")
        else:
            if os.path.getsize(path) == 0:
                raise PotentialsError(f"data file {path!r} is empty")
            it = ase.io.iread(path, index=":", format=fmt)
        for i, atoms in enumerate(it):
            yield i, atoms
    except PotentialsError:
        raise
    except UnknownFileTypeError as exc:
        raise PotentialsError(f"cannot read data file {path!r}: ASE does not recognise its format ({exc})") from None
    except Exception as exc:  # ASE raises many types for truncated/corrupt files
        msg = str(exc) or type(exc).__name__
        raise PotentialsError(
            f"cannot read data file {path!r} at frame {i + 1} (file truncated or corrupt?): "
            f"{type(exc).__name__}: {msg}"
        ) from exc
    if i < 0:
        raise PotentialsError(f"data file {path!r} contains no structures")


def calc_results(atoms) -> dict:
    calc = getattr(atoms, "calc", None)
    return dict(getattr(calc, "results", None) or {}) if calc is not None else {}


def fixed_mask(atoms) -> np.ndarray | None:
    """Boolean mask of atoms fixed by ``FixAtoms`` constraints (None if there are none)."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    found = False
    for c in atoms.constraints or []:
        if isinstance(c, FixAtoms):
            mask[np.asarray(c.index, dtype=np.int64)] = True
            found = True
    return mask if found else None


def lookup(atoms, key: str | None, per_atom: bool):
    """``key`` from ``atoms.arrays``/``atoms.info`` or the raw calculator results (no constraint applied)."""
    if key is None:
        return None
    stores = (atoms.arrays, atoms.info) if per_atom else (atoms.info, atoms.arrays)
    for store in stores:
        if key in store and key not in ("positions", "numbers"):
            return store[key]
    res = calc_results(atoms)
    value = res.get(key)
    return value


def available_keys(atoms) -> str:
    keys = set(atoms.info) | (set(atoms.arrays) - {"positions", "numbers"}) | set(calc_results(atoms))
    return ", ".join(sorted(keys)) or "none"


def frame_from_atoms(
    atoms,
    source: str,
    index: int,
    energy_key: str | None = "energy",
    forces_key: str | None = "forces",
    stress_key: str | None = "stress",
    label: str = "",
    system: str = "",
) -> Frame:
    """A :class:`Frame` from ``ase.Atoms``: energy/forces/stress under the given keys (info/arrays first,
    then the raw calculator results), fixed atoms from ``FixAtoms``, tags if any is non-zero or stored."""
    f = Frame(
        positions=np.asarray(atoms.positions, dtype=np.float64),
        numbers=np.asarray(atoms.numbers),
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        source=source,
        index=index,
        label=label,
        system=system,
    )
    where = f.where
    e = lookup(atoms, energy_key, per_atom=False)
    if energy_key is not None and e is None:
        raise FrameError(f"{where}: no energy key {energy_key!r} (available: {available_keys(atoms)})")
    f.energy = e
    fo = lookup(atoms, forces_key, per_atom=True)
    if forces_key is not None and fo is None:
        raise FrameError(f"{where}: no forces key {forces_key!r} (available: {available_keys(atoms)})")
    f.forces = fo
    s = lookup(atoms, stress_key, per_atom=False)
    f.stress = s
    f.fixed = fixed_mask(atoms)
    if "tags" in atoms.arrays:
        f.tags = np.asarray(atoms.arrays["tags"])
    return f


# -------------------------------------------------------------------------------------- outlier filter

OUTLIER_DEFAULTS = {
    "max_force": None,  # eV/Å: drop frames with any per-atom force norm above this (all atoms)
    "max_energy_deviation": None,  # eV/atom: drop frames whose E/atom deviates from their system's median
    "energy_window_min_frames": 5,  # the median test applies to systems with at least this many frames
    "energy_per_atom_range": None,  # [lo, hi] eV/atom: absolute window on the (target) energy per atom
}


@dataclass
class FilterReport:
    total: int
    kept: int
    reasons: dict
    first: list

    @property
    def dropped(self) -> int:
        return self.total - self.kept


def outlier_mask(
    energy: np.ndarray,
    natoms: np.ndarray,
    fmax: np.ndarray,
    system_id: np.ndarray,
    *,
    max_force: float | None = None,
    max_energy_deviation: float | None = None,
    energy_window_min_frames: int = 5,
    energy_per_atom_range: Sequence[float] | None = None,
    describe: Callable[[int], str] | None = None,
) -> tuple[np.ndarray, FilterReport]:
    """Boolean keep-mask over frames and a report (counts per reason, first offenders).

    * ``max_force``: any per-atom force norm (eV/Å, fixed atoms included) above it → drop.
    * ``max_energy_deviation``: |E/n − median(E/n of the same system)| above it (eV/atom) → drop; only for
      systems with at least ``energy_window_min_frames`` frames (a median of few frames means nothing).
      Catches SCF failures inside relaxation trajectories (an OC20 sid, an MPtrj mp_id, a file).
    * ``energy_per_atom_range``: E/n outside [lo, hi] → drop.
    Frames without energy (NaN) are never dropped by the energy tests.
    """
    n = len(energy)
    keep = np.ones(n, dtype=bool)
    reasons: dict[str, int] = {}
    epa = energy / np.maximum(natoms, 1)
    if max_force is not None:
        bad = np.nan_to_num(fmax, nan=0.0) > float(max_force)
        reasons[f"max |F| > {float(max_force):g} eV/Å"] = int(bad.sum())
        keep &= ~bad
    if max_energy_deviation is not None:
        bad = np.zeros(n, dtype=bool)
        order = np.argsort(system_id, kind="stable")
        sid_sorted = system_id[order]
        bounds = np.flatnonzero(np.diff(sid_sorted)) + 1
        for group in np.split(order, bounds):
            vals = epa[group]
            ok = np.isfinite(vals)
            if ok.sum() < int(energy_window_min_frames):
                continue
            med = np.median(vals[ok])
            bad[group] = ok & (np.abs(vals - med) > float(max_energy_deviation))
        reasons[f"|E/atom − system median| > {float(max_energy_deviation):g} eV/atom"] = int(bad.sum())
        keep &= ~bad
    if energy_per_atom_range is not None:
        lo, hi = (float(x) for x in energy_per_atom_range)
        bad = np.isfinite(epa) & ((epa < lo) | (epa > hi))
        reasons[f"E/atom outside [{lo:g}, {hi:g}] eV/atom"] = int(bad.sum())
        keep &= ~bad
    first = [describe(int(i)) if describe else str(int(i)) for i in np.flatnonzero(~keep)[:5]]
    return keep, FilterReport(total=n, kept=int(keep.sum()), reasons=reasons, first=first)


def outlier_options(fmt: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, default in OUTLIER_DEFAULTS.items():
        value = options.get(key, default)
        if key == "energy_per_atom_range" and value is not None:
            try:
                lo, hi = (float(x) for x in value)
            except (TypeError, ValueError):
                raise PotentialsError(
                    f"data format {fmt!r}: energy_per_atom_range must be [lo, hi], got {value!r}"
                ) from None
            if not lo < hi:
                raise PotentialsError(f"data format {fmt!r}: energy_per_atom_range {value!r} is empty")
            value = [lo, hi]
        elif key in ("max_force", "max_energy_deviation") and value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise PotentialsError(f"data format {fmt!r}: {key} must be a number or null, got {value!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise PotentialsError(f"data format {fmt!r}: {key} must be > 0, got {value!r}")
        out[key] = value
    return out


def iter_chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Plan:
    """What a format module hands to the cache builder for one split.

    ``units`` are picklable work items (a file, a range of LMDB keys, a chunk of JSON frames), possibly
    produced lazily while streaming; ``convert(unit, convert_options)`` (a module-level function, so a process
    pool can run it) yields :class:`Frame` records or :class:`FrameError` instances. ``files`` are the sources
    whose size+mtime key the cache; ``convert_options`` are the options that change the converted values
    (also part of the key). ``extras`` (JSON-able, e.g. E0s) are stored in the cache; ``read_options``
    (``forces_mask``, ``tags``) and ``filters`` (outlier filter) apply when reading, so changing them never
    needs a new conversion.
    """

    files: list
    units: Iterable
    convert: Callable
    convert_options: dict
    total_frames: int | None = None
    extras: dict = field(default_factory=dict)
    read_options: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)
    require_energy: bool = True
    require_forces: bool = True
