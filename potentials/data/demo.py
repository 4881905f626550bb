"""The embedded demo dataset: Cu–Au fcc alloys sampled from EMT molecular dynamics (generated, no download).

Each trajectory takes a periodic fcc Cu_(1-x)Au_x supercell (8, 16 or 32 atoms, random substitution,
Vegard lattice constant), applies an isotropic (−3 %, 0, +3 %) plus a random shear (≤ 3 %) strain, and runs
Langevin MD with ASE's EMT at 300, 800 or 1500 K; frames are sampled every few steps. Energy (eV), forces
(eV/Å) and stress (eV/Å³, Voigt) come from EMT and are written as standard extxyz keys
``energy``/``forces``/``stress``. Everything is driven by one seed, so the file is reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from potentials.errors import PotentialsError
from potentials.io import atomic_path

TEMPERATURES_K = (300.0, 800.0, 1500.0)
ISO_STRAINS = (-0.03, 0.0, 0.03)
MAX_SHEAR = 0.03
LATTICE_A = {"Cu": 3.61, "Au": 4.08}  # Å, for Vegard's law
FRAMES_PER_TRAJECTORY = 10
EQUILIBRATION_STEPS = 20
SAMPLE_EVERY = 5
TIMESTEP_FS = 2.0


def _supercell(kind: int, x_au: float, rng: np.random.Generator):
    """An fcc Cu–Au supercell: kind 0 → 8 atoms (2×2×2 primitive), 1 → 16 (2×2×1 cubic), 2 → 32 (2×2×2 cubic)."""
    from ase.build import bulk

    a = (1.0 - x_au) * LATTICE_A["Cu"] + x_au * LATTICE_A["Au"]
    if kind == 0:
        atoms = bulk("Cu", "fcc", a=a).repeat((2, 2, 2))
    elif kind == 1:
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 1))
    else:
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))
    n = len(atoms)
    n_au = int(round(x_au * n))
    symbols = np.array(["Cu"] * n, dtype=object)
    symbols[rng.permutation(n)[:n_au]] = "Au"
    atoms.set_chemical_symbols(symbols.tolist())
    return atoms


def _strain(iso: float, rng: np.random.Generator) -> np.ndarray:
    """Deformation gradient [3, 3]: (1 + iso) I plus a symmetric shear on a random off-diagonal pair."""
    f = np.eye(3) * (1.0 + iso)
    i, j = rng.choice(3, size=2, replace=False)
    gamma = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    f[i, j] += gamma
    f[j, i] += gamma
    return f


def generate_demo_frames(n_structures: int = 300, seed: int = 0) -> list:
    """``n_structures`` Cu–Au ``ase.Atoms`` with EMT energy/forces/stress in a SinglePointCalculator."""
    from ase import Atoms, units
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    if int(n_structures) < 1:
        raise PotentialsError(f"demo data: n_structures must be ≥ 1, got {n_structures}")
    rng = np.random.default_rng(seed)
    frames: list = []
    traj = 0
    while len(frames) < n_structures:
        temperature = TEMPERATURES_K[traj % len(TEMPERATURES_K)]
        iso = ISO_STRAINS[(traj // len(TEMPERATURES_K)) % len(ISO_STRAINS)]
        kind = (traj + traj // 3) % 3  # Latin square: every size at every temperature and strain
        x_au = float(rng.choice([0.0, 1.0])) if traj % 10 == 9 else float(rng.uniform(0.0, 1.0))
        atoms = _supercell(kind, x_au, rng)
        atoms.set_cell(atoms.cell.array @ _strain(iso, rng).T, scale_atoms=True)
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=2.0 * temperature, rng=rng)
        Stationary(atoms)
        dyn = Langevin(
            atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=0.02 / units.fs, fixcm=False, rng=rng
        )
        dyn.run(EQUILIBRATION_STEPS)
        n_take = min(FRAMES_PER_TRAJECTORY, n_structures - len(frames))
        for k in range(n_take):
            if k > 0:
                dyn.run(SAMPLE_EVERY)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            frame.info["config_type"] = f"CuAu_T{int(temperature)}K"
            frame.info["temperature_K"] = temperature
            frame.calc = SinglePointCalculator(
                frame,
                energy=float(atoms.get_potential_energy()),
                forces=atoms.get_forces(apply_constraint=False).copy(),
                stress=atoms.get_stress(voigt=True).copy(),
            )
            frames.append(frame)
        traj += 1
    return frames


def cuau_start_cell(x_au: float = 0.5, iso: float = 0.02, rattle: float = 0.1, seed: int = 12345):
    """A perturbed 32-atom fcc Cu–Au cell (2×2×2 cubic, random substitution at Au fraction ``x_au``, Vegard
    lattice constant) for relaxation benchmarks: isotropic strain ``iso`` plus a random shear (≤ 3 %), positions
    rattled by ``rattle`` Å. Its own seed, so it is not one of the demo MD frames."""
    rng = np.random.default_rng(seed)
    atoms = _supercell(2, x_au, rng)
    atoms.set_cell(atoms.cell.array @ _strain(iso, rng).T, scale_atoms=True)
    atoms.rattle(rattle, seed=seed + 1)
    atoms.pbc = True
    return atoms


def write_demo_split(directory: str | os.PathLike, n_train: int = 300, n_val: int = 50, seed: int = 0) -> dict:
    """Demo Cu–Au frames as ``train.xyz`` (seed ``seed``) and ``valid.xyz`` (independent trajectories, seed
    ``seed + 1``) in ``directory``, with mace-torch's default keys ``REF_energy``/``REF_forces``/``REF_stress``
    (Voigt, eV/Å³) so that both this project and ``mace_run_train`` read the same files. Existing files are kept."""
    import ase.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n, s in (("train", n_train, seed), ("valid", n_val, seed + 1)):
        path = directory / f"{name}.xyz"
        out[name] = str(path)
        if path.exists():
            continue
        frames = generate_demo_frames(n, s)
        for frame in frames:
            res = frame.calc.results
            frame.info["REF_energy"] = float(res["energy"])
            frame.info["REF_stress"] = np.asarray(res["stress"], dtype=float)
            frame.arrays["REF_forces"] = np.asarray(res["forces"], dtype=float)
            frame.calc = None
        with atomic_path(path) as tmp:
            ase.io.write(str(tmp), frames, format="extxyz")
    return out


def ensure_demo_data(path: str | os.PathLike, n_structures: int = 300, seed: int = 0) -> Path:
    """Return ``path`` (an .extxyz); generate it first if it does not exist.

    The file is written atomically (:mod:`potentials.io`), so an interrupted run never leaves a half-written
    dataset.
    """
    import ase.io

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = generate_demo_frames(n_structures, seed)
    with atomic_path(path) as tmp:
        ase.io.write(str(tmp), frames, format="extxyz")
    return path
