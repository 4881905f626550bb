"""scripts/export_data.py: the exported extxyz holds exactly the training graphs' frames and targets."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "scripts"))
import export_data  # noqa: E402


def _training_sets(overrides):
    """The (train, val) datasets scripts/train.py would build for these overrides (independently of export)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from potentials.train.run import build_datamodule

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    dm = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), float(cfg.model.r_max), int(cfg.seed))
    dm.load()
    return dm.train_set, dm.val_set


def _compare(frames, dataset, split):
    """Every exported frame equals the training graph (positions, cell, targets, fixed atoms, tags)."""
    from ase.constraints import FixAtoms

    assert len(frames) == len(dataset) > 0
    for i, atoms in enumerate(frames):
        g, info = dataset[i], dataset.frame_info(i)
        where = f"frame {i} ({info['source_file']}, {info['source_index']})"
        assert atoms.info["split"] == split
        assert atoms.info["source_file"] == info["source_file"] and atoms.info["source_index"] == info["source_index"]
        np.testing.assert_array_equal(atoms.numbers, g["numbers"].numpy(), err_msg=where)
        np.testing.assert_allclose(atoms.positions, g["positions"].numpy(), rtol=0, atol=1e-7, err_msg=where)
        pbc = g["pbc"].reshape(3).numpy()
        np.testing.assert_array_equal(atoms.pbc, pbc)
        if pbc.any():
            np.testing.assert_allclose(atoms.cell.array, g["cell"].reshape(3, 3).numpy(), atol=1e-7)
        res = atoms.calc.results if atoms.calc is not None else {}
        if float(g["energy_weight"][0]) > 0:
            assert res["energy"] == pytest.approx(float(g["energy"][0]), abs=1e-7), where
        else:
            assert "energy" not in res
        if float(g["forces_weight"][0]) > 0:
            np.testing.assert_allclose(res["forces"], g["forces"].numpy(), rtol=0, atol=1e-7, err_msg=where)
        if float(g["stress_weight"][0]) > 0:
            s = res["stress"]  # ASE Voigt xx yy zz yz xz xy
            full = np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
            np.testing.assert_allclose(full, g["stress"].reshape(3, 3).numpy(), rtol=0, atol=1e-9, err_msg=where)
        else:
            assert "stress" not in res
        fixed = info["fixed"]
        got = np.zeros(len(atoms), bool)
        for c in atoms.constraints:
            assert isinstance(c, FixAtoms)
            got[c.get_indices()] = True
        np.testing.assert_array_equal(got, np.zeros(len(atoms), bool) if fixed is None else fixed, err_msg=where)
        if info["tags"] is not None:
            np.testing.assert_array_equal(atoms.get_tags(), info["tags"], err_msg=where)


def test_export_demo_files_equals_training_graphs(demo_file, tmp_path):
    import ase.io

    overrides = ["data=files", f"data.train_files=[{demo_file}]", "model.r_max=4.0"]
    out = tmp_path / "train.extxyz"
    counts = export_data.export(overrides + [f"out={out}", "split=all"])
    train, val = _training_sets(overrides)
    assert counts == {"train": len(train), "val": len(val)}
    frames = ase.io.read(out, ":")
    _compare(frames[:len(train)], train, "train")
    _compare(frames[len(train):], val, "val")
    # provenance points at the source frame (independent read of the original file)
    src = ase.io.read(demo_file, ":")
    for a in frames[:5]:
        assert a.info["source_file"] == str(demo_file)
        np.testing.assert_allclose(a.positions, src[a.info["source_index"]].positions, atol=1e-7)
    # the stress written is the file's (ASE units/sign), not transformed
    k = frames[0].info["source_index"]
    np.testing.assert_allclose(frames[0].get_stress(), src[k].get_stress(), atol=1e-9)


REAL = [("oc20", "OC20", []), ("mptrj", "MPTrj", []), ("3bpa", "3BPA", ["data.e0s=iso_atoms"])]


@pytest.mark.parametrize("name,folder,extra", REAL, ids=[r[0] for r in REAL])
def test_export_real_samples_equal_training_graphs(name, folder, extra, tmp_path):
    import ase.io

    root = SHARED_DATA / folder
    if not root.is_dir():
        pytest.skip(f"real dataset sample absent ({root})")
    overrides = [f"data={name}", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *extra]
    out = tmp_path / f"{name}.extxyz"
    counts = export_data.export(overrides + [f"out={out}"])
    train, _ = _training_sets(overrides)
    assert counts == {"train": len(train)}
    frames = ase.io.read(out, ":")
    _compare(frames, train, "train")
    if name == "oc20":  # fixed sub-surface atoms and tags survive the round trip
        assert any(a.constraints for a in frames) and any(a.get_tags().any() for a in frames)
    if name == "mptrj":
        assert any("stress" in a.calc.results for a in frames)


def test_export_bad_arguments_are_one_line_errors(tmp_path):
    from potentials.errors import PotentialsError

    with pytest.raises(PotentialsError, match="out=FILE"):
        export_data.export(["data=demo"])
    with pytest.raises(PotentialsError, match="split must be"):
        export_data.export([f"out={tmp_path / 'x.extxyz'}", "split=test"])
    with pytest.raises(PotentialsError, match="bad override") as exc:
        export_data.export([f"out={tmp_path / 'x.extxyz'}", "data=nosuchdata"])
    assert "\n" not in str(exc.value) and "oc20" in str(exc.value)  # one line, listing the choices
    assert list(tmp_path.iterdir()) == []
