"""Tests of the data pipeline: neighbour lists, graphs, file reading, splitting, statistics, demo data."""

from __future__ import annotations

import logging
import os

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from potentials.data.dataset import GraphDataset, extract_targets, read_atoms, split_dataset
from potentials.data.demo import ensure_demo_data
from potentials.data.graph import collate
from potentials.data.neighbors import atoms_to_graph, neighbor_list, voigt_to_matrix
from potentials.data.stats import (
    average_num_neighbors,
    e0s_from_dict_or_fit,
    elements_in,
    fit_e0s,
    force_rms,
    mean_interaction_energy_per_atom,
)
from potentials.errors import PotentialsError


# --------------------------------------------------------------------------------------- neighbour lists
def _triclinic():
    cell = np.array([[4.1, 0.0, 0.0], [1.3, 3.7, 0.0], [0.9, -1.1, 4.4]])
    rng = np.random.default_rng(1)
    return Atoms("Cu3Au", positions=rng.uniform(0, 1, (4, 3)) @ cell, cell=cell, pbc=True)


def _slab():
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    atoms.rattle(0.05, seed=3)
    return atoms


NL_CASES = {
    "fcc_cu": (lambda: bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)), 4.0),
    "self_images": (lambda: bulk("Cu", "fcc", a=3.6), 5.0),
    "triclinic": (_triclinic, 4.5),
    "slab_ttf": (_slab, 4.0),
    "molecule": (lambda: molecule("CH3CH2OH"), 3.0),
}


@pytest.mark.parametrize("name", list(NL_CASES))
def test_neighbor_list_matches_ase(name):
    make, cutoff = NL_CASES[name]
    atoms = make()
    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    i, j, s = ase_neighbor_list("ijS", atoms, cutoff)
    ours = {(int(a), int(b), tuple(int(x) for x in sh)) for a, b, sh in zip(edge_index[0], edge_index[1], shifts)}
    ref = {(int(a), int(b), tuple(int(x) for x in sh)) for a, b, sh in zip(i, j, s)}
    assert len(ref) > 0
    assert edge_index.shape[1] == len(ours)  # no duplicates
    assert ours == ref
    # r_ij = x_j - x_i + S @ cell is within the cutoff and never zero
    vec = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shifts @ atoms.cell.array
    d = np.linalg.norm(vec, axis=1)
    assert np.all(d <= cutoff + 1e-9) and np.all(d > 1e-6)
    if name == "self_images":
        assert np.all(edge_index[0] == edge_index[1])  # one atom: only its own periodic images
        assert edge_index.shape[1] > 12


# ------------------------------------------------------------------------------------------- graphs
def test_atoms_to_graph_singular_cell():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.2, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(PotentialsError, match="singular"):
        atoms_to_graph(atoms, 4.0, where="f.xyz, frame 3")


def test_atoms_to_graph_no_neighbours():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [10, 0, 0]])
    with pytest.raises(PotentialsError, match="r_max"):
        atoms_to_graph(atoms, 3.0)
    g = atoms_to_graph(atoms, 3.0, require_edges=False)
    assert g["edge_index"].shape == (2, 0)


def test_stress_voigt_to_matrix():
    xx, yy, zz, yz, xz, xy = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
    expected = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    np.testing.assert_array_equal(voigt_to_matrix([xx, yy, zz, yz, xz, xy]), expected)
    # consistent with ASE's own conversion
    from ase.stress import voigt_6_to_full_3x3_stress

    np.testing.assert_array_equal(voigt_to_matrix([xx, yy, zz, yz, xz, xy]), voigt_6_to_full_3x3_stress([xx, yy, zz, yz, xz, xy]))
    atoms = bulk("Cu", "fcc", a=3.6)
    g = atoms_to_graph(atoms, 3.0, energy=-1.0, forces=np.zeros((1, 3)), stress=[xx, yy, zz, yz, xz, xy])
    assert g["stress"].shape == (1, 3, 3)
    np.testing.assert_array_equal(g["stress"][0].numpy(), expected)
    assert float(g["stress_weight"]) == 1.0
    g2 = atoms_to_graph(atoms, 3.0, energy=-1.0, forces=np.zeros((1, 3)))
    assert float(g2["stress_weight"]) == 0.0


def test_collate_offsets_edges():
    a = bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms
    b = molecule("H2O")  # 3 atoms
    ga = atoms_to_graph(a, 3.0, energy=1.0, forces=np.zeros((4, 3)))
    gb = atoms_to_graph(b, 2.0, energy=2.0, forces=np.zeros((3, 3)))
    batch = collate([ga, gb])
    na, ea = 4, ga["edge_index"].shape[1]
    assert batch["edge_index"].shape[1] == ea + gb["edge_index"].shape[1]
    assert torch.equal(batch["edge_index"][:, :ea], ga["edge_index"])
    assert torch.equal(batch["edge_index"][:, ea:], gb["edge_index"] + na)
    assert batch["batch"].tolist() == [0] * 4 + [1] * 3
    assert batch["num_atoms"].tolist() == [4, 3]
    assert batch["cell"].shape == (2, 3, 3) and batch["energy"].tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------------------ reading files
def _frames(n=3):
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))
        atoms.numbers[: k + 1] = 79
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("fmt,suffix", [("extxyz", ".extxyz"), ("traj", ".traj"), ("db", ".db")])
def test_read_formats_match_ase(tmp_path, fmt, suffix):
    frames = _frames()
    path = tmp_path / f"data{suffix}"
    ase.io.write(str(path), frames, format=fmt)
    ref = ase.io.read(str(path), ":")
    ds = GraphDataset.from_files([path], cutoff=4.0)
    assert len(ds) == len(frames) == len(ref)
    for g, a, orig in zip(ds, ref, frames):
        assert float(g["energy"]) == pytest.approx(a.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(g["forces"].numpy(), a.get_forces(apply_constraint=False), atol=1e-12)
        np.testing.assert_allclose(g["stress"][0].numpy(), voigt_to_matrix(a.get_stress()), atol=1e-12)
        # and the values survived the round trip (extxyz prints ~8+ significant digits)
        assert float(g["energy"]) == pytest.approx(orig.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(g["forces"].numpy(), orig.get_forces(), atol=1e-6)
        assert g["numbers"].tolist() == orig.numbers.tolist()
        assert g["positions"].dtype == torch.float64
    assert [z.tolist() for z in ds.atomic_numbers] == [a.numbers.tolist() for a in frames]


def test_forces_are_raw_with_constraints(tmp_path):
    from ase.constraints import FixAtoms

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.set_constraint(FixAtoms([0]))
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=np.ones((4, 3)))
    path = tmp_path / "c.traj"
    ase.io.write(str(path), [atoms], format="traj")
    g = GraphDataset.from_files(path, 4.0)[0]
    assert torch.all(g["forces"] == 1.0)  # get_forces(apply_constraint=False) semantics


def test_custom_keys_in_info(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.info["REF_energy"] = -3.5
    atoms.arrays["REF_forces"] = np.full((4, 3), 0.25)
    path = tmp_path / "ref.extxyz"
    ase.io.write(str(path), [atoms], format="extxyz")
    ds = GraphDataset.from_files(path, 4.0, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    assert float(ds[0]["energy"]) == -3.5
    assert torch.all(ds[0]["forces"] == 0.25)
    assert float(ds[0]["stress_weight"]) == 0.0  # stress missing → weight 0
    with pytest.raises(PotentialsError, match="REF_stress"):
        extract_targets(read_atoms(path)[0], "REF_energy", "REF_forces", "REF_stress", "x", require_stress=True)


def test_missing_energy_key_names_key_and_frame(tmp_path):
    frames = _frames(3)
    frames[1].calc = None
    frames[1].arrays["forces"] = np.zeros((len(frames[1]), 3))
    path = tmp_path / "bad.extxyz"
    ase.io.write(str(path), frames, format="extxyz")
    with pytest.raises(PotentialsError) as exc:
        GraphDataset.from_files([path], cutoff=4.0, energy_key="energy")
    msg = str(exc.value)
    assert "'energy'" in msg and "frame 1" in msg and "bad.extxyz" in msg
    with pytest.raises(PotentialsError, match="'my_energy'.*available"):
        GraphDataset.from_files([path], cutoff=4.0, energy_key="my_energy")


def test_missing_unreadable_and_empty_files(tmp_path):
    missing = tmp_path / "nope.extxyz"
    with pytest.raises(PotentialsError, match="nope.extxyz"):
        read_atoms(missing)
    with pytest.raises(PotentialsError, match="nope.extxyz"):
        GraphDataset.from_files([missing], cutoff=4.0)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(PotentialsError, match="empty.extxyz"):
        read_atoms(empty)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(PotentialsError, match="garbage.extxyz"):
        read_atoms(garbage)


def test_split_dataset(tmp_path):
    graphs = [atoms_to_graph(a, 4.0, energy=float(k)) for k, a in enumerate(_frames(10))]
    ds = GraphDataset(graphs)
    train, val = split_dataset(ds, 0.2, seed=7)
    assert len(train) == 8 and len(val) == 2
    energies = sorted(float(g["energy"]) for g in list(train) + list(val))
    assert energies == [float(k) for k in range(10)]
    train2, val2 = split_dataset(ds, 0.2, seed=7)
    assert [float(g["energy"]) for g in val] == [float(g["energy"]) for g in val2]
    assert len(split_dataset(ds, 0.01, seed=0)[1]) == 1  # at least one validation structure
    with pytest.raises(PotentialsError, match="1 structures"):
        split_dataset(GraphDataset(graphs[:1]), 0.5, seed=0)
    with pytest.raises(PotentialsError, match="0 validation"):
        split_dataset(ds, 0.0, seed=0)


# ----------------------------------------------------------------------------------------------- stats
def _synthetic(e0):
    """Cu/Au structures with varied compositions and energies exactly Σ count · E0."""
    graphs = []
    for k in range(6):
        atoms = bulk("Cu", "fcc", a=3.8, cubic=True).repeat((1, 1, 1 + k % 2))
        atoms.numbers[: k % (len(atoms) + 1)] = 79
        energy = sum(e0[int(z)] for z in atoms.numbers)
        forces = np.full((len(atoms), 3), 0.5 * (k + 1))
        graphs.append(atoms_to_graph(atoms, 3.0, energy=energy, forces=forces))
    return graphs


def test_fit_e0s_recovers_known_values():
    e0 = {29: -3.25, 79: -1.75}
    graphs = _synthetic(e0)
    fit = fit_e0s(graphs, [29, 79])
    assert set(fit) == {29, 79}
    for z in e0:
        assert fit[z] == pytest.approx(e0[z], abs=1e-10)
    assert mean_interaction_energy_per_atom(graphs, fit) == pytest.approx(0.0, abs=1e-10)
    assert elements_in(graphs) == [29, 79]
    assert e0s_from_dict_or_fit("fit", graphs, [29, 79])[79] == pytest.approx(-1.75)
    assert e0s_from_dict_or_fit({"Cu": -1.0, 79: -2.0}, graphs, [29, 79]) == {29: -1.0, 79: -2.0}
    with pytest.raises(PotentialsError, match="Au"):
        e0s_from_dict_or_fit({"Cu": -1.0}, graphs, [29, 79])


def test_fit_e0s_rank_deficient_warns(caplog):
    graphs = [atoms_to_graph(bulk("Cu", "fcc", a=3.6, cubic=True), 3.0, energy=-4.0)] * 3
    with caplog.at_level(logging.WARNING):
        fit = fit_e0s(graphs, [29, 79])
    assert fit[29] == pytest.approx(-1.0) and fit[79] == pytest.approx(0.0)
    assert "underdetermined" in caplog.text


def test_neighbour_and_force_stats():
    graphs = _synthetic({29: 0.0, 79: 0.0})
    n_edges = sum(g["edge_index"].shape[1] for g in graphs)
    n_atoms = sum(len(g["numbers"]) for g in graphs)
    assert average_num_neighbors(graphs) == pytest.approx(n_edges / n_atoms)
    f = torch.cat([g["forces"] for g in graphs]).numpy()
    assert force_rms(graphs) == pytest.approx(np.sqrt(np.mean(f**2)))
    # structures with forces weight 0 are ignored
    graphs[0] = graphs[0].replace(forces_weight=torch.zeros(1, dtype=torch.float64))
    f = torch.cat([g["forces"] for g in graphs[1:]]).numpy()
    assert force_rms(GraphDataset(graphs)) == pytest.approx(np.sqrt(np.mean(f**2)))


# ------------------------------------------------------------------------------------------------- demo
def test_demo_data(tmp_path):
    path = ensure_demo_data(tmp_path / "a" / "demo.extxyz", n_structures=12, seed=3)
    assert path.exists() and os.listdir(path.parent) == ["demo.extxyz"]  # no temp file left behind
    frames = ase.io.read(str(path), ":")
    assert len(frames) == 12
    for atoms in frames:
        assert 8 <= len(atoms) <= 32 and all(atoms.pbc)
        assert set(atoms.get_chemical_symbols()) <= {"Cu", "Au"}
        assert np.isfinite(atoms.get_potential_energy())
        assert atoms.get_forces().shape == (len(atoms), 3)
        assert atoms.get_stress().shape == (6,)
    # reproducible with the same seed
    path2 = ensure_demo_data(tmp_path / "b" / "demo.extxyz", n_structures=12, seed=3)
    assert path.read_bytes() == path2.read_bytes()
    # a second call does not regenerate
    mtime = path.stat().st_mtime_ns
    assert ensure_demo_data(path, n_structures=12, seed=99) == path
    assert path.stat().st_mtime_ns == mtime
    # readable by the dataset pipeline, with stress weight 1
    ds = GraphDataset.from_files(path, cutoff=5.0)
    assert len(ds) == 12 and all(float(g["stress_weight"]) == 1.0 for g in ds)
