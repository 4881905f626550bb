"""3BPA (Kovács et al., JCTC 17, 7696 (2021)): the published ``dataset_3BPA/`` xyz files.

Layout (ACS SI zip or davkovacs/BOTNet-datasets; ``root`` is that directory, its parent, or one file)::

    iso_atoms.xyz                      isolated-atom energies (E0s) of H, C, N, O
    train_300K.xyz  train_mixedT.xyz   500 frames each (the training split is a file, not a random pool)
    test_300K.xyz  test_600K.xyz  test_1200K.xyz
    test_dih_beta120.xyz  test_dih_beta150.xyz  test_dih_beta180.xyz     (ACS SI naming)
    test_dih.xyz  (BOTNet-datasets: the three dihedral scans merged; its README calls it test_dih_beta.xyz)

Keys ``energy`` (eV) and ``forces`` (eV/Å) in extended XYZ; non-periodic (the 50 Å lattice is a dummy).
Splits: ``train`` is ``train_<train_set>.xyz`` (``300K`` or ``mixedT``); the validation set is carved out of
it by the caller (a seeded 450/50 split with ``val_fraction=0.1``). Test splits are named ``300K``, ``600K``,
``1200K``, ``dih_beta120``, ``dih_beta150``, ``dih_beta180`` (ACS) or ``dih`` (the merged BOTNet file),
with or without a ``test_`` prefix. E0s come from ``iso_atoms.xyz`` (use ``e0s: iso_atoms``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from potentials.data.formats.base import (
    FrameError,
    Plan,
    frame_from_atoms,
    iter_ase,
)
from potentials.errors import PotentialsError

NAME = "3bpa"
TRAIN_SETS = ("300K", "mixedT")
TEST_FILES = {
    "300K": ("test_300K.xyz",),
    "600K": ("test_600K.xyz",),
    "1200K": ("test_1200K.xyz",),
    "dih_beta120": ("test_dih_beta120.xyz",),
    "dih_beta150": ("test_dih_beta150.xyz",),
    "dih_beta180": ("test_dih_beta180.xyz",),
    "dih": ("test_dih.xyz", "test_dih_beta.xyz"),
}
#: Evaluation order of the published test sets (NequIP's order; ``dih`` is the merged BOTNet file).
TEST_ORDER = ("300K", "600K", "1200K", "dih_beta120", "dih_beta150", "dih_beta180", "dih")

DEFAULTS = {
    "train_set": "300K",  # 300K | mixedT
    "test_sets": None,  # names for scripts/evaluate.py; null = every published test set that is present
    "iso_atoms": "iso_atoms.xyz",  # E0 file, relative to the dataset directory (null = none)
    "energy_key": "energy",
    "forces_key": "forces",
    "stress_key": None,
    # outlier filter (off by default; see potentials.data.formats.base.outlier_mask)
    "max_force": None,
    "max_energy_deviation": None,
    "energy_window_min_frames": 5,
    "energy_per_atom_range": None,
}


def dataset_dir(root: Path) -> Path:
    """The directory holding the 3BPA files: ``root`` itself, or ``root/dataset_3BPA``."""
    if root.is_file():
        return root.parent
    for d in (root, root / "dataset_3BPA"):
        if any((d / f).exists() for f in ("iso_atoms.xyz", "train_300K.xyz", "train_mixedT.xyz")):
            return d
    raise PotentialsError(
        f"3bpa: {str(root)!r} holds no 3BPA files (expected train_300K.xyz / train_mixedT.xyz / iso_atoms.xyz "
        "there or in dataset_3BPA/)"
    )


def test_set_name(split: str) -> str | None:
    s = split[5:] if split.startswith("test_") else split
    if s == "dih_beta":
        s = "dih"
    return s if s in TEST_FILES else None


def test_file(root: Path, name: str) -> Path | None:
    d = dataset_dir(root)
    for fname in TEST_FILES[name]:
        if (d / fname).exists():
            return d / fname
    return None


def available_test_sets(root: Path) -> list[str]:
    """Published test sets present under ``root``, in evaluation order."""
    return [name for name in TEST_ORDER if test_file(Path(root), name) is not None]


def split_file(root: Path, split: str, train_set: str) -> Path:
    if root.is_file():
        if split != "train":
            raise PotentialsError(
                f"3bpa: data.root {str(root)!r} is a single file; split {split!r} needs the directory"
            )
        return root
    d = dataset_dir(root)
    if split == "train":
        f = d / f"train_{train_set}.xyz"
        if not f.exists():
            raise PotentialsError(f"3bpa: training file {str(f)!r} does not exist (train_set={train_set!r})")
        return f
    name = test_set_name(split)
    if name is None:
        raise PotentialsError(
            f"3bpa: unknown split {split!r}; use 'train' or a test set: {list(TEST_ORDER)}"
        )
    f = test_file(root, name)
    if f is None:
        hint = ""
        if name.startswith("dih_beta") and test_file(root, "dih") is not None:
            hint = "; this copy (BOTNet-datasets) has the three dihedral scans merged: use test set 'dih'"
        elif name == "dih" and any(test_file(root, n) for n in ("dih_beta120", "dih_beta150", "dih_beta180")):
            hint = "; this copy (ACS SI) has the scans as dih_beta120/150/180"
        raise PotentialsError(
            f"3bpa: test set {name!r} not found in {str(d)!r} (looked for {list(TEST_FILES[name])}){hint}"
        )
    return f


def read_e0s(path: Path) -> dict[int, float]:
    """{Z: E0 (eV)} from ``iso_atoms.xyz`` (one single-atom frame per element, key ``energy``)."""
    e0s: dict[int, float] = {}
    for i, atoms in iter_ase(path):
        if len(atoms) != 1:
            raise PotentialsError(f"{path}, frame {i}: an isolated-atom frame must hold one atom, found {len(atoms)}")
        e = atoms.calc.results.get("energy") if atoms.calc is not None else atoms.info.get("energy")
        if e is None:
            raise PotentialsError(f"{path}, frame {i}: no energy")
        z = int(atoms.numbers[0])
        if z in e0s:
            raise PotentialsError(f"{path}, frame {i}: element Z={z} appears twice")
        e0s[z] = float(e)
    return e0s


def convert(unit, options) -> Iterator:
    path = unit
    for i, atoms in iter_ase(path):
        try:
            yield frame_from_atoms(
                atoms, path, i, options["energy_key"], options["forces_key"], options["stress_key"],
                label=str(atoms.info.get("config_type", "")), system=Path(path).name,
            )
        except FrameError as exc:
            yield exc


def plan(root: Path, split: str, options: dict) -> Plan:
    train_set = options["train_set"]
    if train_set not in TRAIN_SETS:
        raise PotentialsError(f"3bpa: train_set={train_set!r} is not one of {list(TRAIN_SETS)}")
    if options["test_sets"] is not None:
        for name in options["test_sets"]:
            if test_set_name(str(name)) is None:
                raise PotentialsError(f"3bpa: unknown test set {name!r}; published: {list(TEST_ORDER)}")
    f = split_file(root, split, train_set)
    extras, files = {}, [f]
    if options["iso_atoms"]:
        iso = dataset_dir(root) / options["iso_atoms"]
        if iso.exists():
            extras["e0s"] = {str(z): e for z, e in read_e0s(iso).items()}
            files.append(iso)
    keys = {k: options[k] for k in ("energy_key", "forces_key", "stress_key")}
    return Plan(
        files=files,
        units=[str(f.resolve())],
        convert=convert,
        convert_options=keys,
        extras=extras,
        filters={k: options[k] for k in ("max_force", "max_energy_deviation", "energy_window_min_frames",
                                          "energy_per_atom_range")},
    )
