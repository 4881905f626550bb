"""OC20 (Open Catalyst 2020) S2EF data in every published layout.

``root`` (a directory, searched recursively, or one file) may hold:

* **raw S2EF release**: ``N.extxyz[.xz]`` with its ``N.txt[.xz]`` (headerless CSV ``system_id,frame_number,
  reference_energy``; line *i* describes structure *i*). Energies in the extxyz are total DFT energies (the
  ``energy`` key, not ``free_energy``); forces are read without constraints (fixed atoms keep theirs);
  ``move_mask`` becomes the fixed-atom mask and ``tags`` are kept. A txt whose line count differs from the
  extxyz frame count is an error.
* **legacy LMDB** ``*.lmdb`` (``data.lmdb``, ``data.0000.lmdb``): pickled ``torch_geometric`` ``Data``
  objects, PyG 1 (attributes in ``__dict__``) or PyG 2 (``__dict__["_store"]._mapping``), with the old
  ``y``/``force`` or new ``energy``/``forces`` names; read **without** torch_geometric (its classes are
  mapped to a stand-in; only torch/numpy/builtin classes are otherwise allowed). Keys ``b"0".."N-1"``; the
  ``length`` key gives N. Energies there are whatever preprocessing stored: ``lmdb_energy: referenced``
  (``preprocess_ef.py --ref-energy``, the published S2EF/IS2RE LMDBs) or ``total``.
* **ASE-LMDB** ``*.aselmdb`` (or a ``.lmdb`` whose values are zlib data): zlib-compressed JSON rows, ids
  ``1..nextid-1`` minus ``deleted_ids``, arrays as plain lists (orjson) or ``{"__ndarray__": ...}`` (ASE).
* **plain ASE files**: ``.traj``, ``.db``, ``.json``, ``.xyz`` / ``.extxyz`` without a txt — e.g. the raw
  relaxation trajectories ``random<sid>.traj`` (total energies; the sid is taken from the file name).

**Energy target** (``energy_reference``), applied to every frame or an error — never mixed:

* ``total``: total DFT energy (referenced LMDB energies get ``oc20_ref[sid]`` added back);
* ``txt``: total − the S2EF txt ``reference_energy`` (only raw S2EF pairs, or LMDBs already referenced);
* ``oc20_ref``: total − ``oc20_ref.pkl[f"random{sid}"]`` (``oc20_ref_path``, default ``<root>/oc20_ref.pkl``).

**Fixed atoms**: kept in the cache; with ``fixed_atoms_forces: ignore`` (default) every graph carries a
per-atom ``forces_mask`` (0 on fixed atoms) so the force loss and metrics skip them; ``include`` trains on
them too. **Outliers**: frames with a per-atom |F| above ``max_force`` (eV/Å) or an energy per atom more than
``max_energy_deviation`` (eV/atom) from the median of its system (same sid; systems with at least
``energy_window_min_frames`` frames) are dropped with a logged count — this catches SCF failures inside
relaxations (e.g. frame 1 of random1000120 and random1000194 in ``../shared/data/OC20``).
"""

from __future__ import annotations

import lzma
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from potentials.data.formats.base import (
    Frame,
    FrameError,
    Plan,
    choice,
    frame_from_atoms,
    iter_ase,
    natural_key,
)
from potentials.data.formats.lmdb_readers import (
    aselmdb_ids,
    decode_aselmdb,
    decode_pyg,
    fixed_from_constraints,
    iter_lmdb_records,
    lmdb_length,
    open_text,
    pbc3,
    scalar,
    sniff_lmdb,
    to_numpy,
)
from potentials.errors import PotentialsError

NAME = "oc20"
DEFAULTS = {
    "energy_reference": "total",  # total | txt | oc20_ref
    "oc20_ref_path": None,  # oc20_ref.pkl; default <root>/oc20_ref.pkl when present
    "lmdb_energy": "referenced",  # what legacy data.lmdb files store: referenced | total
    "aselmdb_energy": "total",  # what .aselmdb files store: total | referenced
    "fixed_atoms_forces": "ignore",  # ignore (mask them out of the force loss) | include
    "tags": True,  # add per-atom tags to the graphs
    "chunk_size": 5000,  # frames per conversion unit for LMDB files
    "energy_key": "energy",
    "forces_key": "forces",
    "stress_key": "stress",
    # outlier filter (see potentials.data.formats.base.outlier_mask)
    "max_force": 100.0,
    "max_energy_deviation": 0.4,
    "energy_window_min_frames": 5,
    "energy_per_atom_range": None,
}

ASE_SUFFIXES = (".traj", ".db", ".json", ".xyz", ".extxyz")
SID_RE = re.compile(r"random(\d+)")


@dataclass
class Source:
    kind: str  # s2ef | ase | lmdb | aselmdb
    path: Path
    txt: Path | None = None


# ------------------------------------------------------------------------------------------- discovery


def classify(p: Path) -> Source | None:
    name = p.name
    for ext in (".extxyz.xz", ".extxyz"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            for tname in (f"{stem}.txt", f"{stem}.txt.xz"):
                if (p.parent / tname).exists():
                    return Source("s2ef", p, p.parent / tname)
            return Source("ase", p) if ext == ".extxyz" else None
    if name.endswith(".aselmdb"):
        return Source("aselmdb", p)
    if name.endswith(".lmdb"):
        return Source(sniff_lmdb(p), p)
    if p.suffix in ASE_SUFFIXES:
        return Source("ase", p)
    return None


def discover(root: Path) -> list[Source]:
    if root.is_file():
        src = classify(root)
        if src is None:
            raise PotentialsError(
                f"oc20: cannot tell the format of {str(root)!r} (expected .extxyz[.xz] with a .txt[.xz], "
                ".lmdb, .aselmdb, .traj, .db, .json)"
            )
        return [src]
    sources = []
    for p in sorted((q for q in root.rglob("*") if q.is_file()), key=natural_key):
        if p.name.endswith("-lock") or p.name.startswith("."):
            continue
        src = classify(p)
        if src is not None:
            sources.append(src)
    if not sources:
        raise PotentialsError(f"oc20: no OC20 data under {str(root)!r} (looked for N.extxyz[.xz]+N.txt[.xz], *.lmdb, "
                              "*.aselmdb, *.traj, *.db, *.json)")
    return sources


# --------------------------------------------------------------------------------------------- energies


_REF_CACHE: dict[str, dict] = {}


def load_oc20_ref(path: str) -> dict:
    if path not in _REF_CACHE:
        try:
            with open(path, "rb") as fh:
                ref = pickle.load(fh)
        except Exception as exc:
            raise PotentialsError(f"oc20: cannot read the reference energies {path!r}: {exc}") from None
        if not isinstance(ref, dict):
            raise PotentialsError(f"oc20: {path!r} is not a dict {{'random<sid>': eV}}")
        _REF_CACHE[path] = ref
    return _REF_CACHE[path]


def sid_name(sid) -> str | None:
    if sid is None:
        return None
    if hasattr(sid, "item"):
        sid = sid.item() if getattr(sid, "size", 1) == 1 else sid
    if isinstance(sid, (int, np.integer)):
        return f"random{int(sid)}"
    s = str(sid)
    return s if s.startswith("random") else (f"random{s}" if s.isdigit() else s)


def apply_reference(energy, stored: str, sid: str | None, txt_ref: float | None, options: dict, where: str):
    """The target energy from a stored one of kind ``stored`` (``total``/``referenced``)."""
    if energy is None:
        return None
    if hasattr(energy, "reshape"):
        energy = np.asarray(energy, dtype=np.float64).reshape(-1)
        if energy.size != 1:
            raise FrameError(f"{where}: energy has {energy.size} values, expected one")
        energy = float(energy[0])
    target = options["energy_reference"]
    if target == "total" and stored == "total":
        return energy
    if target in ("txt", "oc20_ref") and stored == "referenced":
        return energy
    if target == "txt":
        if txt_ref is None:  # plan() rejects this; defensive
            raise PotentialsError(f"{where}: energy_reference=txt but this frame has no S2EF txt reference")
        return energy - txt_ref
    # total <- referenced (+ref) or oc20_ref <- total (-ref)
    if sid is None:
        raise FrameError(f"{where}: no system id (sid), so oc20_ref cannot be applied")
    ref = load_oc20_ref(options["oc20_ref_path"]).get(sid)
    if ref is None:
        raise FrameError(f"{where}: system {sid} is not in {options['oc20_ref_path']}")
    return energy + float(ref) if target == "total" else energy - float(ref)


# ------------------------------------------------------------------------------------ raw S2EF and ASE


def read_txt(path: Path) -> list[tuple[str, int | None, float]]:
    rows = []
    with open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split(",")
                if len(parts) != 3:
                    raise PotentialsError(
                        f"{path}:{lineno}: expected 'system_id,frame_number,reference_energy', got {line!r}"
                    )
                sid, fid, ref = parts
                try:
                    ref_e = float(ref)
                except ValueError:
                    raise PotentialsError(f"{path}:{lineno}: reference_energy {ref!r} is not a number") from None
                if not math.isfinite(ref_e):
                    raise PotentialsError(f"{path}:{lineno}: reference_energy is {ref!r}")
                m = re.fullmatch(r"frame(\d+)", fid.strip())
                rows.append((sid.strip(), int(m.group(1)) if m else None, ref_e))
        except (EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
            raise PotentialsError(f"{path}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return rows


def _frame_from_ase(atoms, path: str, i: int, options: dict, sid, fid, txt_ref, stored: str) -> Frame:
    label = f"{sid}/frame{fid if fid is not None else i}" if sid else ""
    f = frame_from_atoms(atoms, path, i, options["energy_key"], options["forces_key"], options["stress_key"],
                         label=label, system=sid or path)
    if f.tags is None:
        f.tags = np.zeros(len(atoms), dtype=np.int64)
    f.energy = apply_reference(f.energy, stored, sid, txt_ref, options, f.where)
    return f


def convert_s2ef(unit, options) -> Iterator:
    _, path, txt = unit
    rows = read_txt(Path(txt))
    n = 0
    fh = open_text(Path(path))
    try:
        for i, atoms in iter_ase(path, fileobj=fh, fmt="extxyz"):
            n = i + 1
            if i >= len(rows):
                raise PotentialsError(f"{path} has more frames than {txt} has lines ({len(rows)})")
            sid, fid, ref = rows[i]
            try:
                yield _frame_from_ase(atoms, path, i, options, sid_name(sid), fid, ref, "total")
            except FrameError as exc:
                yield exc
    finally:
        fh.close()
    if n != len(rows):
        raise PotentialsError(f"{path} has {n} frames but {txt} has {len(rows)} lines; they must correspond 1:1")


def convert_ase(unit, options) -> Iterator:
    _, path = unit
    m = SID_RE.search(Path(path).name)
    file_sid = f"random{m.group(1)}" if m else None
    for i, atoms in iter_ase(path):
        sid = sid_name(atoms.info.get("sid")) or file_sid
        fid = atoms.info.get("fid", i)
        try:
            yield _frame_from_ase(atoms, path, i, options, sid, fid, None, "total")
        except FrameError as exc:
            yield exc


# ------------------------------------------------------------------------------------------- legacy LMDB


def frame_from_pyg(m: dict, path: str, key: int, options: dict) -> Frame:
    where = f"{path}, frame {key}"
    e_names = [options["energy_key"]] + (["y"] if options["energy_key"] == "energy" else [])
    f_names = [options["forces_key"]] + (["force"] if options["forces_key"] == "forces" else [])
    if "pos" not in m or "atomic_numbers" not in m:
        raise FrameError(f"{where}: not an OC20 graph (attributes: {sorted(m)})")
    pos = to_numpy(m["pos"]).astype(np.float64)
    n = pos.shape[0]
    energy = next((m[k] for k in e_names if m.get(k) is not None), None)
    forces = next((m[k] for k in f_names if m.get(k) is not None), None)
    if energy is None:
        raise FrameError(f"{where}: no energy ({' or '.join(e_names)}; attributes: {sorted(m)})")
    if forces is None:
        raise FrameError(f"{where}: no forces ({' or '.join(f_names)}; attributes: {sorted(m)})")
    cell = to_numpy(m.get("cell"))
    cell = np.zeros((3, 3)) if cell is None else cell.astype(np.float64).reshape(-1, 3, 3)[0]
    pbc = to_numpy(m.get("pbc"))
    pbc = np.ones(3, bool) if pbc is None else pbc.astype(bool).reshape(-1)[-3:]
    fixed = to_numpy(m.get("fixed"))
    tags = to_numpy(m.get("tags"))
    sid = sid_name(scalar(m.get("sid")))
    fid = scalar(m.get("fid"))
    stress = to_numpy(m.get(options["stress_key"])) if options["stress_key"] else None
    natoms = scalar(m.get("natoms"))
    if natoms is not None and int(natoms) != n:
        raise FrameError(f"{where}: natoms={natoms} but pos has {n} rows")
    f = Frame(
        positions=pos, numbers=to_numpy(m["atomic_numbers"]), cell=cell, pbc=pbc, source=path, index=key,
        forces=to_numpy(forces), stress=stress,
        fixed=None if fixed is None else fixed.reshape(-1) != 0,
        tags=np.zeros(n, np.int64) if tags is None else tags.reshape(-1),
        label=f"{sid}/frame{fid}" if sid is not None else "", system=sid or path,
    )
    f.energy = apply_reference(scalar(energy), options["lmdb_energy"], sid, None, options, f.where)
    return f


def convert_lmdb(unit, options) -> Iterator:
    """Legacy S2EF/IS2RE ``data.lmdb`` records: pickled PyG graphs, read without torch_geometric."""
    _, path, start, stop = unit
    return iter_lmdb_records(
        path, range(start, stop), "key", "cannot unpickle the stored graph", decode_pyg, frame_from_pyg, options
    )


# -------------------------------------------------------------------------------------------- ASE-LMDB


def frame_from_aselmdb(rec: dict, path: str, row_id: int, options: dict) -> Frame:
    where = f"{path}, frame {row_id}"
    if not isinstance(rec, dict) or "numbers" not in rec or "positions" not in rec:
        raise FrameError(f"{where}: not an ASE-LMDB row (keys: {sorted(rec) if isinstance(rec, dict) else type(rec)})")
    kvp = rec.get("key_value_pairs") or {}
    data = rec.get("data") or {}

    def get(key):
        if key is None:
            return None
        for store in (rec, kvp, data):
            if isinstance(store, dict) and store.get(key) is not None:
                return store[key]
        return None

    numbers = np.asarray(rec["numbers"])
    n = len(numbers)
    energy = get(options["energy_key"])
    forces = get(options["forces_key"])
    if energy is None:
        raise FrameError(f"{where}: no energy key {options['energy_key']!r}")
    if forces is None:
        raise FrameError(f"{where}: no forces key {options['forces_key']!r}")
    sid = sid_name(get("sid"))
    fid = get("fid")
    tags = rec.get("tags")
    f = Frame(
        positions=np.asarray(rec["positions"], dtype=np.float64), numbers=numbers,
        cell=np.asarray(rec.get("cell", np.zeros((3, 3))), dtype=np.float64).reshape(3, 3),
        pbc=pbc3(rec.get("pbc", False)),
        source=path, index=row_id, forces=forces,
        stress=get(options["stress_key"]),
        fixed=fixed_from_constraints(rec.get("constraints"), n),
        tags=np.zeros(n, np.int64) if tags is None else np.asarray(tags),
        label=f"{sid}/frame{fid}" if sid is not None and fid is not None else (sid or f"id={row_id}"),
        system=sid or path,
    )
    f.energy = apply_reference(energy, options["aselmdb_energy"], sid, None, options, f.where)
    return f


def convert_aselmdb(unit, options) -> Iterator:
    """``.aselmdb`` rows (zlib-compressed JSON), skipping deleted ids."""
    _, path, start, stop, deleted = unit
    deleted = set(deleted)
    ids = [i for i in range(start, stop) if i not in deleted]
    return iter_lmdb_records(path, ids, "row", "cannot decode the row", decode_aselmdb, frame_from_aselmdb, options)


# ------------------------------------------------------------------------------------------------- plan


def convert(unit, options) -> Iterator:
    kind = unit[0]
    if kind == "s2ef":
        return convert_s2ef(unit, options)
    if kind == "ase":
        return convert_ase(unit, options)
    if kind == "lmdb":
        return convert_lmdb(unit, options)
    if kind == "aselmdb":
        return convert_aselmdb(unit, options)
    raise ValueError(kind)


def stored_energy(src: Source, options: dict) -> str:
    if src.kind == "lmdb":
        return options["lmdb_energy"]
    if src.kind == "aselmdb":
        return options["aselmdb_energy"]
    return "total"


def plan(root: Path, split: str, options: dict) -> Plan:
    opts = dict(options)
    opts["energy_reference"] = choice(NAME, "energy_reference", opts["energy_reference"], ("total", "txt", "oc20_ref"))
    opts["lmdb_energy"] = choice(NAME, "lmdb_energy", opts["lmdb_energy"], ("referenced", "total"))
    opts["aselmdb_energy"] = choice(NAME, "aselmdb_energy", opts["aselmdb_energy"], ("referenced", "total"))
    fixed_policy = choice(NAME, "fixed_atoms_forces", opts["fixed_atoms_forces"], ("ignore", "include"))
    chunk = int(opts["chunk_size"])
    if chunk < 1:
        raise PotentialsError(f"oc20: chunk_size must be >= 1, got {chunk}")
    sources = discover(root)
    files = []
    for s in sources:
        files.append(s.path)
        if s.txt is not None:
            files.append(s.txt)
    target = opts["energy_reference"]
    # the reference table, if any frame needs it
    needs_ref = [s for s in sources if (target == "oc20_ref" and stored_energy(s, opts) == "total")
                 or (target == "total" and stored_energy(s, opts) == "referenced")]
    ref_path = opts["oc20_ref_path"]
    if ref_path is None and root.is_dir() and (root / "oc20_ref.pkl").exists():
        ref_path = root / "oc20_ref.pkl"
    if needs_ref:
        if ref_path is None or not Path(ref_path).exists():
            why = ("stores referenced energies and energy_reference=total needs them added back" if target == "total"
                   else "stores total energies and energy_reference=oc20_ref needs the reference subtracted")
            raise PotentialsError(
                f"oc20: {needs_ref[0].path} {why}, but no oc20_ref.pkl was found (set oc20_ref_path; download: "
                "https://dl.fbaipublicfiles.com/opencatalystproject/data/oc22/oc20_ref.pkl)"
            )
        ref_path = str(Path(ref_path).resolve())
        files.append(Path(ref_path))
        load_oc20_ref(ref_path)
    opts["oc20_ref_path"] = str(ref_path) if ref_path is not None else None
    if target == "txt":
        bad = [s for s in sources if s.kind != "s2ef" and stored_energy(s, opts) != "referenced"]
        if bad:
            raise PotentialsError(
                f"oc20: energy_reference=txt needs the S2EF .txt reference energies, but {bad[0].path} has none "
                "(use energy_reference=total, or oc20_ref with oc20_ref_path)"
            )
    units: list[Any] = []
    for s in sources:
        path = str(s.path.resolve())
        if s.kind == "s2ef":
            units.append(("s2ef", path, str(s.txt.resolve())))
        elif s.kind == "ase":
            units.append(("ase", path))
        elif s.kind == "lmdb":
            n = lmdb_length(s.path)
            units.extend(("lmdb", path, a, min(a + chunk, n)) for a in range(0, n, chunk))
        else:
            nextid, deleted = aselmdb_ids(s.path)
            for a in range(1, nextid, chunk):
                b = min(a + chunk, nextid)
                units.append(("aselmdb", path, a, b, [d for d in deleted if a <= d < b]))
    convert_options = {k: opts[k] for k in ("energy_reference", "oc20_ref_path", "lmdb_energy", "aselmdb_energy",
                                            "energy_key", "forces_key", "stress_key")}
    return Plan(
        files=files,
        units=units,
        convert=convert,
        convert_options=convert_options,
        extras={"energy_reference": target},
        read_options={"forces_mask": fixed_policy == "ignore", "tags": bool(opts["tags"])},
        filters={k: opts[k] for k in ("max_force", "max_energy_deviation", "energy_window_min_frames",
                                       "energy_per_atom_range")},
    )
