"""MPtrj (CHGNet's Materials Project trajectory dataset, figshare 23713842) in its published variants.

``root`` (a directory, searched recursively, or one file) may hold:

* **native JSON** ``MPtrj_2022.9_full.json`` (also ``.json.gz``): ``{mp_id: {frame_id: {"structure": <pymatgen
  Structure.as_dict()>, "uncorrected_total_energy", "corrected_total_energy", "force" (eV/Å), "stress"
  (3×3, kBar, VASP sign), "magmom", ...}}}``. The 11 GB file is **streamed** with ``ijson`` (one mp_id at a
  time, chunks of ``chunk_size`` frames handed to the converter), never loaded whole.
  Stress → ASE: ``σ_ASE [eV/Å³] = kBar × (−0.1 · ase.units.GPa) = −kBar / 1602.1766208`` (VASP reports
  compression as positive; ASE's stress is (1/V) ∂E/∂ε, tension positive).
  Structures: the dict's lattice matrix, species and Cartesian ``xyz`` (fractional ``abc`` × lattice where
  ``xyz`` is absent) — the same numbers pymatgen's ``Structure.from_dict`` + ``AseAtomsAdaptor`` give;
  ``use_pymatgen: true`` converts through pymatgen itself (slower). Disordered sites are an error.
* **extxyz** (Matbench-Discovery / MACE-MP conversions): ``energy`` = uncorrected total energy, ``forces``,
  ``stress`` already in eV/Å³ with ASE's sign; the corrected energy in ``info`` as
  ``corrected_total_energy`` or ``mp2020_corrected_energy``.
* **ASE db** (``*.db``, e.g. ``../shared/data/MPTrj/``): calculator ``energy`` (uncorrected), ``forces``,
  ``stress`` (eV/Å³), metadata (``corrected_total_energy``, ``mp_id``, ``uid``) in ``row.data`` or key-value pairs.

**Energy target** ``energy``: ``uncorrected`` (raw VASP total energy, as MACE-MP) or ``corrected``
(MP2020-corrected total energy, as CHGNet). A source without the requested energy is an error — never a
silent fallback to the other one.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from potentials.data.formats.base import (
    Frame,
    FrameError,
    Plan,
    available_keys,
    choice,
    frame_from_atoms,
    iter_ase,
    iter_chunks,
    natural_key,
    stress_matrix,
)
from potentials.errors import PotentialsError

NAME = "mptrj"
DEFAULTS = {
    "energy": "uncorrected",  # uncorrected (MACE-MP) | corrected (CHGNet, MP2020)
    "use_pymatgen": False,  # native JSON: build structures through pymatgen (slower; same numbers)
    "chunk_size": 1000,  # native JSON: frames per conversion unit
    "energy_key": "energy",  # extxyz/db: key of the uncorrected energy
    "forces_key": "forces",
    "stress_key": "stress",
    # outlier filter (off by default; see potentials.data.formats.base.outlier_mask)
    "max_force": None,
    "max_energy_deviation": None,
    "energy_window_min_frames": 5,
    "energy_per_atom_range": None,
}

#: kBar (VASP sign) → eV/Å³ (ASE sign); equals −1/1602.1766208.
def kbar_to_ase() -> float:
    from ase import units

    return -0.1 * units.GPa


CORRECTED_KEYS = ("corrected_total_energy", "mp2020_corrected_energy", "corrected_energy")
JSON_ENERGY = {"uncorrected": "uncorrected_total_energy", "corrected": "corrected_total_energy"}


def classify(p: Path) -> str | None:
    name = p.name.lower()
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith((".extxyz", ".xyz")):
        return "extxyz"
    if name.endswith(".db"):
        return "db"
    return None


def discover(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        kind = classify(root)
        if kind is None:
            raise PotentialsError(
                f"mptrj: cannot tell the format of {str(root)!r} (expected .json[.gz], .extxyz or .db)"
            )
        return [(kind, root)]
    found = [(classify(p), p) for p in sorted((q for q in root.rglob("*") if q.is_file()), key=natural_key)]
    found = [(k, p) for k, p in found if k is not None]
    if not found:
        raise PotentialsError(f"mptrj: no MPtrj data under {str(root)!r} (looked for *.json[.gz], *.extxyz, *.db)")
    return found


# ------------------------------------------------------------------------------------------ native JSON


def _open_binary(path: Path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def stream_json(path: str) -> Iterator[tuple[str, str, dict]]:
    """(mp_id, frame_id, frame dict) for every frame, parsed incrementally (one mp_id in memory at a time)."""
    import ijson

    last = None
    try:
        with _open_binary(Path(path)) as fh:
            for mp_id, frames in ijson.kvitems(fh, "", use_float=True):
                last = mp_id
                if not isinstance(frames, dict):
                    raise PotentialsError(f"{path}: entry {mp_id!r} is not a {{frame_id: frame}} object")
                for frame_id, frame in frames.items():
                    yield mp_id, frame_id, frame
    except PotentialsError:
        raise
    except (ijson.JSONError, ijson.IncompleteJSONError, OSError, EOFError, ValueError) as exc:
        after = f" after mp_id {last!r}" if last else ""
        detail = " ".join(str(exc).split())  # the parser's message spans lines; errors are one line
        raise PotentialsError(f"{path}: truncated or corrupt JSON{after} ({type(exc).__name__}: {detail})") from None


def json_units(path: str, chunk: int) -> Iterator[tuple]:
    index = 0
    for frames in iter_chunks(stream_json(path), chunk):
        yield ("json", path, index, frames)
        index += len(frames)


def structure_arrays(s: dict, where: str, use_pymatgen: bool = False):
    """(positions, numbers, cell, pbc) from a pymatgen ``Structure.as_dict()``."""
    if use_pymatgen:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        try:
            structure = Structure.from_dict(s)
        except Exception as exc:
            raise FrameError(f"{where}: invalid structure ({type(exc).__name__}: {exc})") from None
        if not structure.is_ordered:
            raise FrameError(f"{where}: disordered structure (partial occupancies)")
        atoms = AseAtomsAdaptor.get_atoms(structure)
        return atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc
    from ase.data import atomic_numbers

    try:
        lattice = s["lattice"]
        cell = np.asarray(lattice["matrix"], dtype=np.float64)
        sites = s["sites"]
    except (KeyError, TypeError) as exc:
        raise FrameError(f"{where}: structure dict lacks {exc}") from None
    numbers = np.empty(len(sites), dtype=np.int64)
    positions = np.empty((len(sites), 3))
    for i, site in enumerate(sites):
        species = site.get("species") or []
        if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-8:
            raise FrameError(f"{where}: site {i} is disordered ({species})")
        el = species[0].get("element")
        z = atomic_numbers.get(el) if isinstance(el, str) else None
        if z is None or z == 0:
            raise FrameError(f"{where}: site {i} has an unknown element {el!r}")
        numbers[i] = z
        if site.get("xyz") is not None:
            positions[i] = site["xyz"]
        else:
            positions[i] = np.asarray(site["abc"], dtype=np.float64) @ cell
    pbc = np.asarray(lattice.get("pbc", (True, True, True)), dtype=bool)
    return positions, numbers, cell, pbc


def frame_from_json(mp_id: str, frame_id: str, d: dict, path: str, index: int, options: dict) -> Frame:
    where = f"{path}, frame {index} ({frame_id})"
    if not isinstance(d, dict) or "structure" not in d:
        raise FrameError(f"{where}: no 'structure'")
    positions, numbers, cell, pbc = structure_arrays(d["structure"], where, options["use_pymatgen"])
    ekey = JSON_ENERGY[options["energy"]]
    energy = d.get(ekey)
    if energy is None:
        raise FrameError(f"{where}: no {ekey!r} (energy={options['energy']!r})")
    if d.get("force") is None:
        raise FrameError(f"{where}: no 'force'")
    stress = d.get("stress")
    if stress is not None:
        stress = stress_matrix(stress, where, "stress (kBar)")
        if stress.shape != (3, 3):
            raise FrameError(f"{where}: stress has shape {stress.shape}, expected (3, 3)")
        stress = stress * kbar_to_ase()
    return Frame(positions=positions, numbers=numbers, cell=cell, pbc=pbc, source=path, index=index,
                 energy=energy, forces=d["force"], stress=stress,
                 label=str(frame_id), system=str(d.get("mp_id", mp_id)))


def convert_json(unit, options) -> Iterator:
    _, path, start, frames = unit
    for k, (mp_id, frame_id, d) in enumerate(frames):
        try:
            yield frame_from_json(mp_id, frame_id, d, path, start + k, options)
        except FrameError as exc:
            yield exc
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            yield FrameError(f"{path}, frame {start + k} ({frame_id}): malformed frame ({type(exc).__name__}: {exc})")


# ------------------------------------------------------------------------------------------ extxyz, db


def _corrected(stores: list[dict], where: str, keys_hint: str):
    for store in stores:
        for key in CORRECTED_KEYS:
            if isinstance(store, dict) and store.get(key) is not None:
                return store[key]
    raise FrameError(f"{where}: energy=corrected but no corrected energy ({' / '.join(CORRECTED_KEYS)}; "
                     f"available: {keys_hint})")


def _ids(info: dict, fallback: str) -> tuple[str, str]:
    mp_id = info.get("mp_id") or info.get("material_id")
    uid = info.get("uid") or info.get("frame_id")
    if uid is None and all(info.get(k) is not None for k in ("task_id", "calc_id", "ionic_step")):
        uid = f"{info['task_id']}-{info['calc_id']}-{info['ionic_step']}"
    return (str(uid) if uid is not None else ""), (str(mp_id) if mp_id is not None else fallback)


def convert_extxyz(unit, options) -> Iterator:
    _, path = unit
    for i, atoms in iter_ase(path):
        try:
            uid, mp_id = _ids(atoms.info, path)
            ekey = options["energy_key"] if options["energy"] == "uncorrected" else None
            f = frame_from_atoms(atoms, path, i, ekey, options["forces_key"], options["stress_key"],
                                 label=uid, system=mp_id)
            if options["energy"] == "corrected":
                f.energy = _corrected([atoms.info], f.where, available_keys(atoms))
            yield f
        except FrameError as exc:
            yield exc


def convert_db(unit, options) -> Iterator:
    import ase.db

    _, path = unit
    try:
        db = ase.db.connect(path, type="db")
        rows = db.select()
        i = -1
        for i, row in enumerate(rows):
            try:
                atoms = row.toatoms()
                data = dict(row.data or {})
                kvp = dict(row.key_value_pairs or {})
                uid, mp_id = _ids({**data, **kvp}, path)
                ekey = options["energy_key"] if options["energy"] == "uncorrected" else None
                f = frame_from_atoms(atoms, path, i, ekey, options["forces_key"], options["stress_key"],
                                     label=uid or f"id={row.id}", system=mp_id)
                if options["energy"] == "corrected":
                    hint = ", ".join(sorted(set(data) | set(kvp))) or "no metadata"
                    f.energy = _corrected([kvp, data], f.where, hint)
                yield f
            except FrameError as exc:
                yield exc
    except PotentialsError:
        raise
    except Exception as exc:
        raise PotentialsError(f"cannot read ASE database {path!r}: {type(exc).__name__}: {exc}") from exc
    if i < 0:
        raise PotentialsError(f"data file {path!r} contains no structures")


def convert(unit, options) -> Iterator:
    return {"json": convert_json, "extxyz": convert_extxyz, "db": convert_db}[unit[0]](unit, options)


def plan(root: Path, split: str, options: dict) -> Plan:
    opts = dict(options)
    opts["energy"] = choice(NAME, "energy", opts["energy"], ("uncorrected", "corrected"))
    chunk = int(opts["chunk_size"])
    if chunk < 1:
        raise PotentialsError(f"mptrj: chunk_size must be >= 1, got {chunk}")
    sources = discover(root)

    def units() -> Iterator[tuple]:
        for kind, p in sources:
            path = str(p.resolve())
            if kind == "json":
                yield from json_units(path, chunk)
            else:
                yield (kind, path)

    convert_options: dict[str, Any] = {k: opts[k] for k in ("energy", "use_pymatgen", "energy_key", "forces_key",
                                                           "stress_key")}
    return Plan(
        files=[p for _, p in sources],
        units=units(),
        convert=convert,
        convert_options=convert_options,
        extras={"energy": opts["energy"]},
        filters={k: opts[k] for k in ("max_force", "max_energy_deviation", "energy_window_min_frames",
                                       "energy_per_atom_range")},
    )
