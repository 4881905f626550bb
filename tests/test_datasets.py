"""Published dataset formats (3BPA, OC20, MPtrj) and the on-disk graph cache.

* every loader against reading the same files with ASE directly (real samples in ../shared/data, skipped
  when absent), after the documented conversions;
* round trips through writers made here: an S2EF extxyz+txt pair (also .xz), legacy LMDBs with PyG-1 and
  PyG-2 style pickles (made without torch_geometric), .aselmdb in both JSON encodings, an MPtrj JSON built
  from the shared MPTrj db (kBar, VASP sign);
* cache invalidation (file, cutoff, code version), atomicity after a kill, bounded memory;
* the OC20 outlier filter; bad input.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from potentials.errors import PotentialsError
from tests.conftest import REPO, SHARED_DATA

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real dataset samples not present ({SHARED_DATA} is missing)"
)
CUTOFF = 4.5  # the default model r_max: conversions below are shared with the config tests


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def load(fmt, **kw):
    from potentials.data.formats import load_dataset

    kw.setdefault("cutoff", CUTOFF)
    return load_dataset(fmt, **kw)


def voigt_to_3x3(s):
    from ase.stress import voigt_6_to_full_3x3_stress

    return voigt_6_to_full_3x3_stress(np.asarray(s))


# ----------------------------------------------------------------------------------------------- 3BPA


@needs_shared
def test_3bpa_matches_ase(cache_dir):
    import ase.io

    from potentials.data.neighbors import atoms_to_graph

    root = SHARED_DATA / "3BPA"
    ds = load("3bpa", root=str(root), cache_dir=cache_dir)
    frames = ase.io.read(root / "train_300K.xyz", ":")
    assert len(ds) == len(frames) == 500
    for i in (0, 1, 250, 499):
        g, a = ds[i], frames[i]
        assert float(g["energy"]) == a.get_potential_energy()
        np.testing.assert_array_equal(g["forces"].numpy(), a.get_forces())
        np.testing.assert_array_equal(g["positions"].numpy(), a.positions)
        ref = atoms_to_graph(a, CUTOFF, energy=a.get_potential_energy(), forces=a.get_forces())
        assert set(g) == set(ref)
        for key in ref:
            torch.testing.assert_close(g[key], ref[key], rtol=0, atol=0)
        assert "dataset_3BPA" in ds.sources[i] or "train_300K.xyz, frame" in ds.sources[i]
    # E0s read from iso_atoms.xyz (the published values), used with e0s: iso_atoms
    stats = ds.statistics("iso_atoms")
    assert stats["e0s"] == {1: -13.587222780835477, 6: -1029.4889999855063, 7: -1484.9814568572233,
                            8: -2041.9816003861047}
    # streamed statistics agree with the in-memory ones
    from potentials.data.stats import average_num_neighbors, fit_e0s, force_rms, mean_interaction_energy_per_atom

    graphs = list(ds)
    assert stats["avg_num_neighbors"] == pytest.approx(average_num_neighbors(graphs), rel=1e-12)
    assert stats["scale"] == pytest.approx(force_rms(graphs), rel=1e-12)
    assert stats["shift"] == pytest.approx(mean_interaction_energy_per_atom(graphs, stats["e0s"]), abs=1e-9)
    fitted = ds.statistics("fit")["e0s"]
    for z, e in fit_e0s(graphs, [1, 6, 7, 8]).items():
        assert fitted[z] == pytest.approx(e, rel=1e-9)


@needs_shared
def test_3bpa_seeded_450_50_split_and_test_set_names(cache_dir, tmp_path):
    from potentials.data.formats import load_splits
    from potentials.data.formats.three_bpa import available_test_sets

    train, val = load_splits("3bpa", cutoff=CUTOFF, seed=0, val_fraction=0.1, root=str(SHARED_DATA / "3BPA"),
                             cache_dir=cache_dir)
    assert (len(train), len(val)) == (450, 50)
    again = load_splits("3bpa", cutoff=CUTOFF, seed=0, val_fraction=0.1, root=str(SHARED_DATA / "3BPA"),
                        cache_dir=cache_dir)[1]
    assert list(val.indices) == list(again.indices) and not set(val.indices) & set(train.indices)
    # BOTNet naming (merged dihedral scans) vs ACS naming, both under dataset_3BPA/
    d = tmp_path / "dataset_3BPA"
    d.mkdir()
    for name in ("iso_atoms.xyz", "train_300K.xyz"):
        os.symlink(SHARED_DATA / "3BPA" / name, d / name)
    os.symlink(SHARED_DATA / "3BPA" / "train_300K.xyz", d / "test_dih.xyz")
    assert available_test_sets(tmp_path) == ["dih"]
    with pytest.raises(PotentialsError, match="merged: use test set 'dih'"):
        load("3bpa", root=str(tmp_path), split="test_dih_beta120", cache_dir=cache_dir)
    os.symlink(SHARED_DATA / "3BPA" / "train_300K.xyz", d / "test_dih_beta150.xyz")
    os.symlink(SHARED_DATA / "3BPA" / "train_300K.xyz", d / "test_600K.xyz")
    assert available_test_sets(tmp_path) == ["600K", "dih_beta150", "dih"]
    assert len(load("3bpa", root=str(tmp_path), split="dih_beta150", cache_dir=cache_dir)) == 500
    with pytest.raises(PotentialsError, match="unknown split"):
        load("3bpa", root=str(tmp_path), split="test_900K", cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------------- OC20


@pytest.fixture(scope="module")
def oc20_all(cache_dir):
    """All shared OC20 frames, unfiltered (the filter applies at read time; same cache as the default)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real dataset samples not present ({SHARED_DATA} is missing)")
    return load("oc20", root=str(SHARED_DATA / "OC20"), cache_dir=cache_dir, max_force=None,
                max_energy_deviation=None)


def test_oc20_matches_ase(oc20_all):
    import ase.io

    files = sorted((SHARED_DATA / "OC20").glob("*.traj")) + [SHARED_DATA / "OC20" / "atoms.json"]
    frames = {}
    for f in files:
        for i, a in enumerate(ase.io.read(f, ":")):
            frames[(str(f.resolve()), i)] = a
    assert len(oc20_all) == len(frames) == 1318
    files_seen = set()
    for k in range(0, len(oc20_all), 7):
        src = oc20_all.sources[k]
        path, idx = src.split(", frame ")
        a = frames[(path, int(idx.split(" ")[0]))]
        files_seen.add(path)
        g = oc20_all[k]
        assert float(g["energy"]) == a.get_potential_energy(apply_constraint=False)  # total energy, not free
        np.testing.assert_array_equal(g["forces"].numpy(), a.get_forces(apply_constraint=False))
        fixed = np.zeros(len(a), bool)
        fixed[a.constraints[0].index] = True
        np.testing.assert_array_equal(g["forces_mask"].numpy(), (~fixed).astype(float))
        np.testing.assert_array_equal(g["tags"].numpy(), a.get_tags())
        np.testing.assert_array_equal(g["positions"].numpy(), a.positions)
        assert float(g["stress_weight"]) == 0.0
    assert len(files_seen) == len(files)
    # atoms.json: tags 1 on CO survive, sid from the file name where it has one
    k = next(i for i in range(len(oc20_all)) if "atoms.json" in oc20_all.sources[i])
    assert oc20_all[k]["tags"].tolist()[:2] == [1, 1]
    assert sum(s.endswith("random1000120.traj, frame 1 (random1000120/frame1)") for s in oc20_all.sources) == 1


def test_oc20_outlier_filter_catches_the_two_scf_failures(oc20_all, cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="potentials.data"):
        ds = load("oc20", root=str(SHARED_DATA / "OC20"), cache_dir=cache_dir)  # default filter
    assert ds.path == oc20_all.path  # same cache: the filter is applied when reading
    rep = ds.filter_report
    assert (rep.total, rep.dropped) == (1318, 2)
    dropped = sorted(set(oc20_all.indices) - set(ds.indices))
    names = [oc20_all.describe(int(i)) for i in dropped]
    assert any("random1000120.traj, frame 1 " in n + " " for n in names)
    assert any("random1000194.traj, frame 1 " in n + " " for n in names)
    assert "outlier filter dropped 2 of 1318 frames" in caplog.text
    # each test alone is configurable: the force threshold only catches the 308 eV/Å frame
    only_f = load("oc20", root=str(SHARED_DATA / "OC20"), cache_dir=cache_dir, max_energy_deviation=None)
    assert only_f.filter_report.dropped == 1
    window = load("oc20", root=str(SHARED_DATA / "OC20"), cache_dir=cache_dir, max_force=None,
                  max_energy_deviation=None, energy_per_atom_range=[-9.0, -2.0])
    assert window.filter_report.dropped > 0


def test_fixed_atoms_are_masked_out_of_the_force_loss(oc20_all, cache_dir):
    from potentials.data.graph import collate
    from potentials.train.loss import ErrorAccumulator, errors

    batch = collate([oc20_all[0], oc20_all[1]])
    pred = {"energy": batch["energy"] + 1.0, "forces": batch["forces"] + 1.0}
    res, w = errors(pred, batch)["forces"]
    fixed = batch["forces_mask"] == 0
    assert fixed.any() and (w[fixed] == 0).all() and (w[~fixed] == 1).all()
    acc = ErrorAccumulator()
    acc.update(pred, batch)
    assert acc.sums["forces"][2] == 3 * int((~fixed).sum())
    incl = load("oc20", root=str(SHARED_DATA / "OC20" / "atoms.json"), cache_dir=cache_dir,
                fixed_atoms_forces="include", tags=False)
    assert "forces_mask" not in incl[0] and "tags" not in incl[0]


def slab_frames(n=4, seed=0):
    """OC20-like adslabs (EMT labels): tags 0 sub-surface / 1 surface / 2 adsorbate, sub-surface fixed."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    frames = []
    for k in range(n):
        a = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
        add_adsorbate(a, "O", 1.5, "fcc")
        a.info.pop("adsorbate_info", None)
        t = a.get_tags()
        tags = np.where(t == 0, 2, np.where(t == 1, 1, 0))
        a.set_tags(tags)
        a.pbc = True
        a.set_constraint(FixAtoms(mask=tags == 0))
        a.rattle(0.05, seed=seed + k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces(apply_constraint=False)
        a.calc = SinglePointCalculator(a, energy=e, forces=f, free_energy=e + 0.25)
        frames.append(a)
    return frames


def write_s2ef(d: Path, stem: str, frames, refs, xz=False, first=0):
    import ase.io

    d.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    lines = "".join(f"random{1000 + i},frame{3 * i},{r!r}\n" for i, r in enumerate(refs, start=first))
    if xz:
        (d / f"{stem}.extxyz.xz").write_bytes(lzma.compress(buf.getvalue().encode()))
        (d / f"{stem}.txt.xz").write_bytes(lzma.compress(lines.encode()))
    else:
        (d / f"{stem}.extxyz").write_text(buf.getvalue())
        (d / f"{stem}.txt").write_text(lines)


def test_s2ef_extxyz_txt_round_trip(tmp_path, cache_dir):
    frames = slab_frames(5)
    refs = [0.125 * i - 1.0 for i in range(5)]
    root = tmp_path / "s2ef_train" / "s2ef_train"
    write_s2ef(root, "0", frames[:3], refs[:3])
    write_s2ef(root, "1", frames[3:], refs[3:], xz=True, first=3)
    import ase.io

    tot = load("oc20", root=str(tmp_path / "s2ef_train"), cache_dir=cache_dir)
    frames = ase.io.read(root / "0.extxyz", ":") + ase.io.read(  # what ASE itself reads back
        io.StringIO(lzma.decompress((root / "1.extxyz.xz").read_bytes()).decode()), ":", format="extxyz")
    ref = load("oc20", root=str(tmp_path / "s2ef_train"), cache_dir=cache_dir, energy_reference="txt")
    assert len(tot) == len(ref) == 5 and tot.path != ref.path
    for i, a in enumerate(frames):
        e = a.get_potential_energy()
        assert float(tot[i]["energy"]) == e  # "energy", not free_energy
        assert float(ref[i]["energy"]) == pytest.approx(e - refs[i], abs=1e-12)
        np.testing.assert_array_equal(tot[i]["forces"].numpy(), a.get_forces(apply_constraint=False))
        np.testing.assert_array_equal(tot[i]["tags"].numpy(), a.get_tags())
        np.testing.assert_array_equal(tot[i]["forces_mask"].numpy(), (a.get_tags() != 0).astype(float))
    assert "random1004/frame12" in ref.sources[4] and ref.sources[4].endswith("(random1004/frame12)")
    # a txt whose line count disagrees with its extxyz
    (root / "0.txt").write_text("random1,frame0,-1.0\n")
    with pytest.raises(PotentialsError, match="has 3 frames but .*0.txt has 1 lines|more frames than"):
        load("oc20", root=str(tmp_path / "s2ef_train"), cache_dir=cache_dir)


def test_oc20_energy_references_are_never_mixed(tmp_path, cache_dir):
    import ase.io

    frames = slab_frames(3)
    write_s2ef(tmp_path / "d", "0", frames[:2], [0.5, 0.25])
    ase.io.write(tmp_path / "d" / "random77.traj", frames[2:])
    with pytest.raises(PotentialsError, match=r"random77.traj has none"):
        load("oc20", root=str(tmp_path / "d"), cache_dir=cache_dir, energy_reference="txt")
    with pytest.raises(PotentialsError, match="oc20_ref"):
        load("oc20", root=str(tmp_path / "d"), cache_dir=cache_dir, energy_reference="oc20_ref")
    refs = {"random1000": 0.5, "random1001": 0.25, "random77": 2.0}
    (tmp_path / "d" / "oc20_ref.pkl").write_bytes(pickle.dumps(refs))
    ds = load("oc20", root=str(tmp_path / "d"), cache_dir=cache_dir, energy_reference="oc20_ref")
    got = [float(g["energy"]) for g in ds]
    want = [a.get_potential_energy() - r for a, r in zip(frames, [0.5, 0.25, 2.0])]
    np.testing.assert_allclose(got, want, atol=1e-12)


# ---- legacy LMDB (pickled PyG Data), written without torch_geometric ----


def _fake_pyg():
    """Stand-ins for torch_geometric.data.{data,storage} classes, registered under the real module names
    only while pickling (torch_geometric itself is not installed)."""
    mods = {name: types.ModuleType(name) for name in (
        "torch_geometric", "torch_geometric.data", "torch_geometric.data.data", "torch_geometric.data.storage")}

    def cls(module, name):
        c = type(name, (), {})
        c.__module__, c.__qualname__ = module, name
        setattr(mods[module], name, c)
        return c

    return mods, cls("torch_geometric.data.data", "Data"), cls("torch_geometric.data.storage", "GlobalStorage"), \
        cls("torch_geometric.data.data", "DataTensorAttr"), cls("torch_geometric.data.data", "DataEdgeAttr")


def write_legacy_lmdb(path: Path, frames, style: str, sids):
    import lmdb

    mods, Data, GlobalStorage, TensorAttr, EdgeAttr = _fake_pyg()
    assert "torch_geometric" not in sys.modules
    sys.modules.update(mods)
    try:
        env = lmdb.open(str(path), subdir=False, map_size=1 << 26, meminit=False)
        with env.begin(write=True) as txn:
            for i, a in enumerate(frames):
                fixed = np.zeros(len(a))
                fixed[a.constraints[0].index] = 1
                attrs = dict(
                    pos=torch.tensor(a.positions, dtype=torch.float32),
                    cell=torch.tensor(a.cell.array, dtype=torch.float32).view(1, 3, 3),
                    natoms=len(a), tags=torch.tensor(a.get_tags(), dtype=torch.long), sid=sids[i], fid=i,
                )
                if style == "pyg1":  # old names, float atomic numbers / fixed
                    attrs.update(atomic_numbers=torch.tensor(a.numbers, dtype=torch.float32),
                                 fixed=torch.tensor(fixed, dtype=torch.float32), y=a.get_potential_energy() - 1.0,
                                 force=torch.tensor(a.get_forces(apply_constraint=False), dtype=torch.float32))
                    d = Data()
                    d.__dict__.update(attrs, __num_nodes__=None)
                else:  # PyG 2: attributes in _store._mapping, new names
                    attrs.update(atomic_numbers=torch.tensor(a.numbers, dtype=torch.uint8),
                                 fixed=torch.tensor(fixed, dtype=torch.int32), energy=a.get_potential_energy() - 1.0,
                                 forces=torch.tensor(a.get_forces(apply_constraint=False), dtype=torch.float32),
                                 pbc=torch.tensor([[True, True, True]]))
                    d, store = Data(), GlobalStorage()
                    store.__dict__.update(_mapping=attrs, _parent=d)
                    d.__dict__.update(_store=store, _tensor_attr_cls=TensorAttr, _edge_attr_cls=EdgeAttr)
                txn.put(str(i).encode("ascii"), pickle.dumps(d, protocol=-1))
            txn.put(b"length", pickle.dumps(len(frames), protocol=-1))
        env.close()
    finally:
        for name in mods:
            sys.modules.pop(name, None)
    Path(str(path) + "-lock").unlink(missing_ok=True)


@pytest.mark.parametrize("style", ["pyg1", "pyg2"])
def test_legacy_lmdb_round_trip_without_torch_geometric(tmp_path, cache_dir, style):
    frames = slab_frames(3, seed=10)
    d = tmp_path / "lmdb"
    d.mkdir()
    write_legacy_lmdb(d / "data.0000.lmdb", frames[:2], style, sids=[5, 6])
    write_legacy_lmdb(d / "data.0001.lmdb", frames[2:], style, sids=[7])
    ds = load("oc20", root=str(d), cache_dir=cache_dir, energy_reference="txt")  # stored: referenced
    assert "torch_geometric" not in sys.modules
    assert len(ds) == 3
    for i, a in enumerate(frames):
        g = ds[i]
        assert float(g["energy"]) == pytest.approx(a.get_potential_energy() - 1.0, abs=1e-12)
        np.testing.assert_array_equal(g["positions"].numpy(), a.positions.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(g["forces"].numpy(),
                                      a.get_forces(apply_constraint=False).astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(g["numbers"].numpy(), a.numbers)
        np.testing.assert_array_equal(g["forces_mask"].numpy(), (a.get_tags() != 0).astype(float))
        np.testing.assert_array_equal(g["tags"].numpy(), a.get_tags())
    assert ds.sources[2].endswith("data.0001.lmdb, frame 0 (random7/frame0)")
    # referenced energies cannot silently become totals
    with pytest.raises(PotentialsError, match="referenced energies .* oc20_ref"):
        load("oc20", root=str(d), cache_dir=cache_dir, energy_reference="total")
    (d / "oc20_ref.pkl").write_bytes(pickle.dumps({"random5": 1.0, "random6": 1.0, "random7": 1.0}))
    tot = load("oc20", root=str(d), cache_dir=cache_dir, energy_reference="total")
    np.testing.assert_allclose([float(g["energy"]) for g in tot], [a.get_potential_energy() for a in frames],
                               atol=1e-12)


def test_legacy_lmdb_bad_records(tmp_path, cache_dir):
    import lmdb

    frames = slab_frames(2, seed=20)
    path = tmp_path / "data.lmdb"
    write_legacy_lmdb(path, frames, "pyg2", sids=[1, 2])
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"1", b"\x80\x05not a pickle")
    env.close()
    with pytest.raises(PotentialsError, match=r"data.lmdb, frame 1: cannot unpickle"):
        load("oc20", root=str(path), cache_dir=cache_dir, energy_reference="txt")
    ds = load("oc20", root=str(path), cache_dir=cache_dir, energy_reference="txt", on_bad_frame="skip")
    assert len(ds) == 1 and ds.meta["skipped"] == 1 and "frame 1" in ds.meta["skipped_first"][0]
    # a pickle that would run code is refused
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"1", pickle.dumps(os.system, protocol=-1))
    env.close()
    with pytest.raises(PotentialsError, match="refusing to load"):
        load("oc20", root=str(path), cache_dir=cache_dir, energy_reference="txt", rebuild=True)


# ---- ASE-LMDB (.aselmdb) ----


def write_aselmdb(path: Path, frames, encoding: str, delete_id: int | None = None):
    import lmdb
    import orjson
    from ase.db.row import AtomsRow
    from ase.io.jsonio import encode

    env = lmdb.open(str(path), subdir=False, map_size=1 << 26, meminit=False)
    with env.begin(write=True) as txn:
        for i, a in enumerate(frames, start=1):
            row = AtomsRow(a)
            dct = {k: v for k, v in row.__dict__.items() if not k.startswith("_") and k != "id"}
            dct.update(mtime=1.0, user="test", key_value_pairs={}, data={"sid": 300 + i, "fid": i})
            dct["constraints"] = [c.todict() for c in a.constraints]
            if encoding == "orjson":  # FC's LMDBDatabase: plain nested lists
                dct["cell"] = np.asarray(dct["cell"])
                raw = orjson.dumps(dct, option=orjson.OPT_SERIALIZE_NUMPY)
            else:  # upstream ase-db-backends: ase.io.jsonio.encode → {"__ndarray__": ...}
                raw = encode(dct).encode()
                assert b"__ndarray__" in raw
            txn.put(str(i).encode("ascii"), zlib.compress(raw))
        deleted = []
        if delete_id is not None:
            txn.delete(str(delete_id).encode("ascii"))
            deleted = [delete_id]
        txn.put(b"nextid", zlib.compress(json.dumps(len(frames) + 1).encode()))
        txn.put(b"deleted_ids", zlib.compress(json.dumps(deleted).encode()))
        txn.put(b"metadata", zlib.compress(b"{}"))
    env.close()
    Path(str(path) + "-lock").unlink(missing_ok=True)


@pytest.mark.parametrize("encoding", ["orjson", "ase"])
def test_aselmdb_round_trip_both_encodings(tmp_path, cache_dir, encoding):
    frames = slab_frames(4, seed=30)
    path = tmp_path / f"train_{encoding}.aselmdb"
    write_aselmdb(path, frames, encoding, delete_id=2)
    ds = load("oc20", root=str(path), cache_dir=cache_dir)
    kept = [frames[0], frames[2], frames[3]]
    assert len(ds) == 3
    for g, a in zip(ds, kept):
        assert float(g["energy"]) == a.get_potential_energy()
        np.testing.assert_array_equal(g["forces"].numpy(), a.get_forces(apply_constraint=False))
        np.testing.assert_array_equal(g["positions"].numpy(), a.positions)
        np.testing.assert_array_equal(g["forces_mask"].numpy(), (a.get_tags() != 0).astype(float))
        np.testing.assert_array_equal(g["tags"].numpy(), a.get_tags())
        np.testing.assert_array_equal(g["cell"][0].numpy(), a.cell.array)
    assert ds.sources[1].endswith("frame 3 (random303/frame3)")


# ---------------------------------------------------------------------------------------------- MPtrj


@needs_shared
def test_mptrj_db_matches_ase(cache_dir):
    import ase.db

    root = SHARED_DATA / "MPTrj"
    ds = load("mptrj", root=str(root), cache_dir=cache_dir)
    rows = [r for f in ("10_mptraj_systems.db", "10_thin_mp_traj_systems.db")
            for r in ase.db.connect(root / f).select()]
    assert len(ds) == len(rows) == 21
    for g, r in zip(ds, rows):
        assert float(g["energy"]) == r.energy  # uncorrected (raw VASP) by default
        np.testing.assert_array_equal(g["forces"].numpy(), r.forces)
        np.testing.assert_array_equal(g["stress"][0].numpy(), voigt_to_3x3(r.stress))  # already ASE units
        assert float(g["stress_weight"]) == 1.0
    corrected = load("mptrj", root=str(root / "10_thin_mp_traj_systems.db"), cache_dir=cache_dir, energy="corrected")
    thin = list(ase.db.connect(root / "10_thin_mp_traj_systems.db").select())
    assert [float(g["energy"]) for g in corrected] == [r.data["corrected_total_energy"] for r in thin]
    assert corrected.sources[0].endswith(f"({thin[0].data['uid']})")
    with pytest.raises(PotentialsError, match="energy=corrected but no corrected energy"):
        load("mptrj", root=str(root / "10_mptraj_systems.db"), cache_dir=cache_dir, energy="corrected")


def mptrj_json_from_db(db_path: Path) -> tuple[dict, list]:
    """The native MPtrj schema built from an ASE db: pymatgen structure dicts, stress in kBar with VASP sign."""
    import ase.db
    from ase import units
    from pymatgen.io.ase import AseAtomsAdaptor

    out, rows = {}, []
    for r in ase.db.connect(db_path).select():
        atoms = r.toatoms()
        atoms.calc = None
        kbar = voigt_to_3x3(r.stress) / (-0.1 * units.GPa)  # VASP: compression positive, kBar
        d = r.data
        out.setdefault(d["mp_id"], {})[d["uid"]] = {
            "structure": AseAtomsAdaptor.get_structure(atoms).as_dict(),
            "uncorrected_total_energy": r.energy,
            "corrected_total_energy": d["corrected_total_energy"],
            "energy_per_atom": d["energy_per_atom"], "ef_per_atom": d["ef_per_atom"],
            "e_per_atom_relaxed": d["e_per_atom_relaxed"], "ef_per_atom_relaxed": d["ef_per_atom_relaxed"],
            "force": r.forces.tolist(), "stress": kbar.tolist(),
            "magmom": r.magmoms.tolist() if r.get("magmoms") is not None else None,
            "bandgap": d.get("bandgap"), "mp_id": d["mp_id"],
        }
        rows.append(r)
    return out, rows


@needs_shared
def test_mptrj_json_round_trip_recovers_ase_stress(tmp_path, cache_dir):
    data, rows = mptrj_json_from_db(SHARED_DATA / "MPTrj" / "10_thin_mp_traj_systems.db")
    path = tmp_path / "MPtrj_2022.9_full.json"
    path.write_text(json.dumps(data, default=lambda o: np.asarray(o).tolist()))
    order = [(mp, uid) for mp, fr in data.items() for uid in fr]
    by_uid = {r.data["uid"]: r for r in rows}
    for use_pmg in (False, True):
        ds = load("mptrj", root=str(path), cache_dir=cache_dir, chunk_size=3, use_pymatgen=use_pmg)
        assert len(ds) == len(rows) == 11
        for g, (mp, uid) in zip(ds, order):
            r = by_uid[uid]
            assert float(g["energy"]) == r.energy
            np.testing.assert_array_equal(g["forces"].numpy(), r.forces)
            # kBar (VASP sign) → eV/Å³ (ASE sign): exact up to the last bit of the kBar value
            np.testing.assert_allclose(g["stress"][0].numpy(), voigt_to_3x3(r.stress), rtol=1e-15, atol=0)
            np.testing.assert_allclose(g["positions"].numpy(), r.positions, atol=1e-10)
            np.testing.assert_array_equal(g["numbers"].numpy(), r.numbers)
    ds = load("mptrj", root=str(path), cache_dir=cache_dir, energy="corrected")
    assert [float(g["energy"]) for g in ds] == [by_uid[u].data["corrected_total_energy"] for _, u in order]
    assert ds.sources[0].endswith(f"frame 0 ({order[0][1]})")


def synthetic_mptrj(n_mp=6, frames_per_mp=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for m in range(n_mp):
        a = 3.0 + 0.1 * m
        frames = {}
        for k in range(frames_per_mp):
            sites = [{"species": [{"element": el, "occu": 1}], "abc": list(f),
                      "xyz": list(np.asarray(f) * a), "label": el, "properties": {}}
                     for el, f in (("Li", rng.uniform(0, 0.2, 3)), ("O", 0.5 + rng.uniform(0, 0.2, 3)))]
            frames[f"mp-{m}-0-{k}"] = {
                "structure": {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
                              "lattice": {"matrix": (np.eye(3) * a).tolist(), "pbc": [True, True, True]},
                              "sites": sites},
                "uncorrected_total_energy": -10.0 - m - 0.1 * k, "corrected_total_energy": -11.0 - m,
                "force": rng.normal(size=(2, 3)).tolist(), "stress": np.diag(rng.normal(size=3)).tolist(),
                "magmom": None, "mp_id": f"mp-{m}",
            }
        out[f"mp-{m}"] = frames
    return out


def test_mptrj_json_is_streamed_and_bad_input_is_reported(tmp_path, cache_dir):
    from potentials.data.formats.mptrj import stream_json

    data = synthetic_mptrj()
    text = json.dumps(data)
    good = tmp_path / "ok" / "MPtrj.json"
    good.parent.mkdir()
    good.write_text(text)
    ds = load("mptrj", root=str(good), cache_dir=cache_dir, chunk_size=4)
    assert len(ds) == 18
    # streaming: a truncated file yields its complete leading entries before the error
    bad = tmp_path / "trunc.json"
    bad.write_text(text[: len(text) // 2])
    got = []
    with pytest.raises(PotentialsError, match="truncated or corrupt JSON after mp_id"):
        for item in stream_json(str(bad)):
            got.append(item)
    assert len(got) >= 3
    # per-frame problems name the file and frame
    d = synthetic_mptrj()
    d["mp-1"]["mp-1-0-2"]["structure"]["sites"][0]["species"][0]["element"] = "Xx"
    d["mp-2"]["mp-2-0-1"]["stress"] = [[1.0, 2.0], [3.0, 4.0]]
    d["mp-3"]["mp-3-0-0"]["force"][1] = [0.1, 0.2]  # JSON has no NaN; a ragged force row instead
    p = tmp_path / "bad" / "MPtrj.json"
    p.parent.mkdir()
    p.write_text(json.dumps(d))
    with pytest.raises(PotentialsError, match=r"MPtrj.json, frame 5 \(mp-1-0-2\): site 0 has an unknown element 'Xx'"):
        load("mptrj", root=str(p), cache_dir=cache_dir)
    ds = load("mptrj", root=str(p), cache_dir=cache_dir, on_bad_frame="skip")
    assert len(ds) == 15 and ds.meta["skipped"] == 3
    msgs = " | ".join(ds.meta["skipped_first"])
    assert "unknown element" in msgs and "stress (kBar) has shape (2, 2)" in msgs and "force" in msgs


# ---------------------------------------------------------------------------------------- bad ASE input


def test_bad_ase_files_name_file_and_frame(tmp_path, cache_dir, demo_file):
    import ase.io

    frames = ase.io.read(demo_file, ":6")
    d = tmp_path / "dataset_3BPA"
    d.mkdir()
    frames[3].calc.results["forces"][1, 0] = np.nan
    ase.io.write(d / "train_300K.xyz", frames, format="extxyz")
    with pytest.raises(PotentialsError, match=r"train_300K.xyz, frame 3\b.*forces contains NaN"):
        load("3bpa", root=str(tmp_path), cache_dir=cache_dir, iso_atoms=None)
    ds = load("3bpa", root=str(tmp_path), cache_dir=cache_dir, iso_atoms=None, on_bad_frame="skip")
    assert len(ds) == 5 and ds.meta["skipped"] == 1
    text = (d / "train_300K.xyz").read_text()
    (d / "train_300K.xyz").write_text(text[: int(len(text) * 0.6)])
    with pytest.raises(PotentialsError, match=r"cannot read data file .*train_300K.xyz.* at frame"):
        load("3bpa", root=str(tmp_path), cache_dir=cache_dir, iso_atoms=None)
    with pytest.raises(PotentialsError, match="unknown option"):
        load("3bpa", root=str(tmp_path), cache_dir=cache_dir, energy_refrence="txt")
    with pytest.raises(PotentialsError, match="does not exist"):
        load("oc20", root=str(tmp_path / "nope"), cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------ cache


def test_cache_reused_and_invalidated_on_file_cutoff_and_version_change(tmp_path, demo_file, monkeypatch):
    import ase.io

    import potentials.data.cache as cache
    import potentials.data.cache_build as cache_build
    import potentials.data.cache_layout as cache_layout

    d = tmp_path / "dataset_3BPA"
    d.mkdir()
    ase.io.write(d / "train_300K.xyz", ase.io.read(demo_file, ":8"), format="extxyz")
    cdir = tmp_path / "cache"
    builds = []
    real = cache_build.write_cache
    monkeypatch.setattr(cache_build, "write_cache", lambda *a, **k: builds.append(1) or real(*a, **k))
    kw = dict(root=str(tmp_path), cache_dir=cdir, iso_atoms=None)
    first = load("3bpa", **kw)
    again = load("3bpa", **kw)
    assert again.path == first.path and len(builds) == 1
    # file change (same size is not enough to hide it: mtime is in the key)
    frames = ase.io.read(d / "train_300K.xyz", ":")
    frames[0].calc.results["energy"] += 1.0
    time.sleep(0.01)
    ase.io.write(d / "train_300K.xyz", frames, format="extxyz")
    changed = load("3bpa", **kw)
    assert changed.path != first.path and len(builds) == 2
    assert float(changed[0]["energy"]) == pytest.approx(float(first[0]["energy"]) + 1.0)
    # cutoff change
    other_cut = load("3bpa", cutoff=3.0, **kw)
    assert other_cut.path != changed.path and len(builds) == 3
    assert other_cut[0]["edge_index"].shape[1] < changed[0]["edge_index"].shape[1]
    # code version change: the old cache is not opened
    monkeypatch.setattr(cache_layout, "FORMAT_VERSION", cache_layout.FORMAT_VERSION + 1)
    bumped = load("3bpa", **kw)
    assert bumped.path != changed.path and len(builds) == 4
    assert not cache.is_valid_cache(changed.path)  # written by "another version"
    monkeypatch.setattr(cache_layout, "FORMAT_VERSION", cache_layout.FORMAT_VERSION - 1)
    # a damaged cache (a field file cut short) is rebuilt, never read
    expected = float(changed[0]["energy"])
    (changed.path / "positions.bin").write_bytes(b"\0" * 8)
    assert not cache.is_valid_cache(changed.path)
    rebuilt = load("3bpa", **kw)
    assert rebuilt.path == changed.path and len(builds) == 5
    assert float(rebuilt[0]["energy"]) == expected
    # sha256 fingerprints: key by content
    by_hash = load("3bpa", fingerprint="sha256", **kw)
    assert by_hash.path != rebuilt.path


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import potentials.data.formats.mptrj as m
    real = m.convert_json
    def slow(unit, options):
        for f in real(unit, options):
            time.sleep(0.05)
            yield f
    m.convert_json = slow
    m.convert = lambda unit, options: slow(unit, options)
    from potentials.data.formats import load_dataset
    load_dataset("mptrj", root={root!r}, cutoff=4.5, cache_dir={cache!r}, chunk_size=1)
    print("finished")
""")


def test_killed_conversion_leaves_no_cache_that_loads(tmp_path):
    import potentials.data.cache as cache

    src = tmp_path / "MPtrj.json"
    src.write_text(json.dumps(synthetic_mptrj(n_mp=20)))
    cdir = tmp_path / "cache"
    script = KILL_SCRIPT.format(repo=str(REPO), root=str(src), cache=str(cdir))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until some chunks are on disk
            tmps = list(cdir.glob(".tmp-*")) if cdir.exists() else []
            if tmps and (tmps[0] / "natoms.bin").exists() and (tmps[0] / "natoms.bin").stat().st_size >= 4 * 5:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the conversion never started: " + proc.stderr.read().decode()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    finals = [p for p in cdir.iterdir() if not p.name.startswith(".tmp-")]
    assert finals == []  # only the temporary directory exists …
    assert all(not cache.is_valid_cache(p) for p in cdir.iterdir())  # … and it is not a cache
    ds = load("mptrj", root=str(src), cache_dir=cdir, chunk_size=7)  # the next run converts afresh
    assert len(ds) == 60
    assert [p.name for p in cdir.iterdir() if p.name.startswith(".tmp-")] == []  # dead build cleaned up


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def synthetic_chunks(n_frames: int, chunk: int, n_atoms: int = 4, seed: int = 0):
    """Packed chunks of tiny periodic structures, generated vectorised (no per-frame Python work)."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(n_atoms), np.arange(n_atoms), indexing="ij")
    pairs = np.stack([i[i != j], j[i != j]], axis=1).astype(np.int32)
    for start in range(0, n_frames, chunk):
        b = min(chunk, n_frames - start)
        na = b * n_atoms
        ne = b * len(pairs)
        yield {
            "arrays": {
                "natoms": np.full(b, n_atoms, np.int32), "nedges": np.full(b, len(pairs), np.int64),
                "cell": np.tile(np.eye(3) * 6.0, (b, 1, 1)), "pbc": np.ones((b, 3), bool),
                "energy": rng.normal(-4.0 * n_atoms, 1.0, b), "stress": np.zeros((b, 3, 3)),
                "has_forces": np.ones(b, bool), "fmax": np.ones(b), "source_index": np.arange(start, start + b),
                "positions": rng.uniform(0, 2.0, (na, 3)), "numbers": rng.choice([29, 79], na).astype(np.uint8),
                "forces": rng.normal(0, 0.5, (na, 3)), "fixed": np.zeros(na, bool), "tags": np.zeros(na, np.int32),
                "edges": np.tile(pairs, (b, 1)), "shifts": np.zeros((ne, 3), np.int8),
            },
            "labels": [""] * b, "systems": ["synthetic"] * b, "sources": ["synthetic"] * b,
            "skipped": 0, "errors": [],
        }


def test_large_cache_reads_with_bounded_memory(tmp_path):
    """200k structures: statistics and multi-worker loading keep the reader's private memory far below the
    cache size (graphs are built on demand from memory maps; workers get the dataset without its maps)."""
    from torch.utils.data import DataLoader, RandomSampler

    from potentials.data.cache import CachedGraphDataset, cache_size, write_cache
    from potentials.data.graph import collate

    n = 200_000
    path = write_cache(tmp_path / "synthetic-0", {"synthetic": n}, synthetic_chunks(n, 25_000), 4.5)
    size = cache_size(path)
    assert size > 80e6
    before = _rss_anon_bytes()
    ds = CachedGraphDataset(path)
    assert len(ds) == n and len(pickle.dumps(ds)) < 2.5e6  # the frame index only
    stats = ds.statistics("fit")
    assert stats["avg_num_neighbors"] == pytest.approx(3.0)
    loader = DataLoader(ds, batch_size=64, sampler=RandomSampler(ds, num_samples=64 * 60,
                        generator=torch.Generator().manual_seed(0)), collate_fn=collate, num_workers=2)
    count = 0
    for batch in loader:
        count += batch.num_graphs
    assert count == 64 * 60
    grown = _rss_anon_bytes() - before
    assert grown < 0.25 * size, f"private memory grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB cache"
    # multi-worker batches equal in-process ones
    sub = ds.subset(range(0, n, 1000))
    a = list(DataLoader(sub, batch_size=50, collate_fn=collate, num_workers=2))
    b = list(DataLoader(sub, batch_size=50, collate_fn=collate, num_workers=0))
    for x, y in zip(a, b):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- configs → datamodule


@needs_shared
@pytest.mark.parametrize("name", ["3bpa", "oc20", "mptrj"])
def test_hydra_data_configs_build_datamodules(name, cache_dir):
    from hydra import compose, initialize_config_dir

    from potentials.train.run import build_datamodule

    root = {"3bpa": "3BPA", "oc20": "OC20", "mptrj": "MPTrj"}[name]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", f"data.root={SHARED_DATA / root}",
                                                      f"data.cache_dir={cache_dir}"])
    from omegaconf import OmegaConf

    dm = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), float(cfg.model.r_max), 0)
    dm.setup("fit")
    stats = dm.statistics()
    assert stats["avg_num_neighbors"] > 0 and stats["scale"] > 0
    if name == "3bpa":
        assert (len(dm.train_set), len(dm.val_set)) == (450, 50)
        assert stats["e0s"][6] == -1029.4889999855063
    if name == "oc20":
        assert len(dm.train_set) + len(dm.val_set) == 1316  # 1318 minus the two SCF failures
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == cfg.data.batch_size
    assert ("forces_mask" in batch) == (name == "oc20")
    assert dm.statistics() == stats  # stored in the cache


def test_download_script_fails_clearly_offline_and_checks_checksums(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import download_data
    finally:
        sys.path.pop(0)
    with pytest.raises(PotentialsError, match="cannot reach nonexistent.invalid"):
        download_data.check_online("https://nonexistent.invalid/x.tar", timeout=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "dataset_3BPA.tar.gz").write_bytes(b"not the published tarball")
    with pytest.raises(SystemExit) as exc:
        download_data.main(["3bpa", "--dest", str(tmp_path / "data"), "--from-dir", str(src)])
    assert exc.value.code == 2
    assert "does not match the published 220edbf2" in capsys.readouterr().err


def test_parallel_conversion_gives_the_same_cache(tmp_path):
    src = tmp_path / "MPtrj.json"
    src.write_text(json.dumps(synthetic_mptrj(n_mp=8)))
    serial = load("mptrj", root=str(src), cache_dir=tmp_path / "a", chunk_size=5)
    parallel = load("mptrj", root=str(src), cache_dir=tmp_path / "b", chunk_size=5, convert_workers=2)
    assert serial.path.name == parallel.path.name  # the worker count is not part of the key
    for name in ("positions", "energy", "stress", "edges", "labels", "source_index"):
        assert (serial.path / f"{name}.bin").read_bytes() == (parallel.path / f"{name}.bin").read_bytes()
    assert [s for s in serial.sources] == [s for s in parallel.sources]
