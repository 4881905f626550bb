"""One streaming statistics accumulator for in-memory and cached datasets (potentials/data/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest


def test_streamed_qr_fit_equals_full_lstsq_with_late_elements():
    from potentials.data.stats import StatsAccumulator

    rng = np.random.default_rng(0)
    zs = np.array([1, 6, 8, 29, 79])
    e0 = {1: -13.6, 6: -1029.5, 8: -2042.0, 29: -3.2, 79: -1.7}
    frames = []
    for k in range(300):
        pool = zs[: 2 + min(k // 60, 3)]  # new elements keep appearing as the stream goes on
        n = int(rng.integers(2, 9))
        numbers = rng.choice(pool, n)
        energy = sum(e0[int(z)] for z in numbers) + rng.normal(0, 0.05) * n
        frames.append((numbers, energy if k % 7 else np.nan))  # every 7th frame has no energy
    acc = StatsAccumulator(flush_rows=16)
    for s in range(0, len(frames), 11):
        part = frames[s:s + 11]
        acc.add(np.concatenate([f[0] for f in part]), [len(f[0]) for f in part], [f[1] for f in part])
    fit = acc.fit_e0s(list(zs))
    with_e = [f for f in frames if np.isfinite(f[1])]
    a = np.array([[np.sum(f[0] == z) for z in zs] for f in with_e], float)
    ref = np.linalg.lstsq(a, np.array([f[1] for f in with_e]), rcond=None)[0]
    np.testing.assert_allclose([fit[int(z)] for z in zs], ref, rtol=1e-10, atol=1e-8)
    shift = np.mean([(f[1] - sum(fit[int(z)] for z in f[0])) / len(f[0]) for f in with_e])
    assert acc.shift(fit) == pytest.approx(shift, abs=1e-10)


def _slab_traj(path):
    """A Cu slab relaxation-like trajectory: the bottom layer is fixed and has large forces."""
    from ase.build import fcc111
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms
    from ase.io import Trajectory

    rng = np.random.default_rng(1)
    with Trajectory(str(path), "w") as traj:
        for k in range(4):
            atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
            atoms.rattle(0.05, seed=k)
            fixed = atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.5
            atoms.set_constraint(FixAtoms(mask=fixed))
            forces = rng.normal(0, 0.1, (len(atoms), 3))
            forces[fixed] = 5.0  # what a relaxation reports on fixed atoms: never trained on
            atoms.calc = SinglePointCalculator(atoms, energy=-40.0 - 0.1 * k, forces=forces)
            traj.write(atoms)
    return fixed


def test_cached_and_in_memory_statistics_share_the_fixed_atom_rule(tmp_path):
    from potentials.data.dataset import GraphDataset
    from potentials.data.formats import load_dataset

    fixed = _slab_traj(tmp_path / "slab.traj")
    ds = load_dataset("oc20", root=str(tmp_path / "slab.traj"), cutoff=3.0, cache_dir=str(tmp_path / "c"),
                      max_force=None, max_energy_deviation=None)
    graphs = [ds[i] for i in range(len(ds))]
    assert "forces_mask" in graphs[0] and graphs[0]["forces_mask"].numpy().sum() == (~fixed).sum()
    cached = ds.statistics("fit")
    in_memory = GraphDataset(graphs).statistics("fit")
    assert in_memory["scale"] == pytest.approx(cached["scale"], rel=1e-12)
    assert in_memory["avg_num_neighbors"] == pytest.approx(cached["avg_num_neighbors"], rel=1e-12)
    assert in_memory["shift"] == pytest.approx(cached["shift"], abs=1e-10)
    assert in_memory["e0s"][29] == pytest.approx(cached["e0s"][29], rel=1e-12)
    # the scale is the RMS over free atoms only (fixed atoms' 5 eV/Å forces excluded)
    free = np.concatenate([g["forces"].numpy()[g["forces_mask"].numpy() > 0] for g in graphs])
    assert cached["scale"] == pytest.approx(np.sqrt(np.mean(free**2)), rel=1e-12) and cached["scale"] < 1.0
