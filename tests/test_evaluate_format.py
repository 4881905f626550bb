"""scripts/evaluate.py --format: data settings default to the checkpoint's training run, drops are reported."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA, TINY_MODEL

sys.path.insert(0, str(REPO / "scripts"))
import evaluate  # noqa: E402

OC20_FILE = SHARED_DATA / "OC20" / "random1000120.traj"  # 112 frames; frame 1 is an SCF outlier
MPTRJ_DB = SHARED_DATA / "MPTrj" / "10_thin_mp_traj_systems.db"


def _checkpoint(path, data_config):
    """A checkpoint of a tiny random model (elements H..Bi) with the given training data config."""
    from potentials.models import build_model

    zs = list(range(1, 84))
    stats = dict(atomic_numbers=zs, e0s={z: -1.0 for z in zs}, avg_num_neighbors=20.0, scale=1.0, shift=0.0)
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, stats)
    ckpt = {"hyper_parameters": {"model_cfg": dict(TINY_MODEL), "stats": stats},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    if data_config is not None:
        ckpt["data_config"] = data_config
    torch.save(ckpt, path)
    return str(path)


def _run(tmp_path, ckpt, root, fmt, *extra):
    out = tmp_path / f"res{len(list(tmp_path.glob('res*.json')))}.json"
    assert evaluate.main([ckpt, "--format", fmt, "--root", str(root), "--cache-dir", str(tmp_path / "cache"),
                          "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())["test"]


@pytest.mark.skipif(not OC20_FILE.is_file(), reason=f"real OC20 sample absent ({OC20_FILE})")
def test_oc20_uses_training_filter_settings_and_reports_drops(tmp_path, capsys):
    import ase.io

    n_all = len(ase.io.read(OC20_FILE, ":"))
    no_filter = _checkpoint(tmp_path / "a.ckpt", {"format": "oc20", "max_force": None, "max_energy_deviation": None})
    r = _run(tmp_path, no_filter, OC20_FILE, "oc20")
    assert r["n_structures"] == n_all  # trained without the filter → every test frame evaluated
    assert r["dropped"] == {"skipped_at_conversion": 0, "filtered": 0, "filter_reasons": {}}
    assert r["data_options"]["max_force"] is None
    assert "data settings from the training run" in capsys.readouterr().out

    defaults = _checkpoint(tmp_path / "b.ckpt", None)  # no recorded settings → format defaults, said so
    r = _run(tmp_path, defaults, OC20_FILE, "oc20")
    out = capsys.readouterr().out
    assert "records no data settings" in out
    assert r["dropped"]["filtered"] >= 1 and r["n_structures"] == n_all - r["dropped"]["filtered"]
    assert f"outlier filter dropped {r['dropped']['filtered']} of {n_all} test frames" in out

    r = _run(tmp_path, defaults, OC20_FILE, "oc20", "--data", "max_force=null", "max_energy_deviation=null")
    assert r["n_structures"] == n_all and "max_energy_deviation overridden" in capsys.readouterr().out


@pytest.mark.skipif(not MPTRJ_DB.is_file(), reason=f"real MPtrj sample absent ({MPTRJ_DB})")
def test_mptrj_uses_training_energy_choice(tmp_path):
    corrected = _checkpoint(tmp_path / "c.ckpt", {"format": "mptrj", "energy": "corrected"})
    uncorrected = _checkpoint(tmp_path / "u.ckpt", {"format": "mptrj", "energy": "uncorrected"})
    rc = _run(tmp_path, corrected, MPTRJ_DB, "mptrj")
    ru = _run(tmp_path, uncorrected, MPTRJ_DB, "mptrj")
    ro = _run(tmp_path, uncorrected, MPTRJ_DB, "mptrj", "--data", "energy=corrected")
    assert rc["data_options"]["energy"] == "corrected" and ru["data_options"]["energy"] == "uncorrected"
    # same weights: the energy error differs only through the reference energies evaluated against
    assert rc["energy_rmse"] != pytest.approx(ru["energy_rmse"], rel=1e-6)
    assert ro["energy_rmse"] == pytest.approx(rc["energy_rmse"], rel=1e-12)
    assert rc["forces_rmse"] == pytest.approx(ru["forces_rmse"], rel=1e-12)


def test_bad_data_override_is_one_line_error(tmp_path):
    from potentials.errors import PotentialsError

    with pytest.raises(PotentialsError, match="--data 'nonsense=1'"):
        evaluate.format_options("oc20", None, ["nonsense=1"])
    opts, origin = evaluate.format_options("mptrj", {"format": "oc20", "energy_reference": "txt"}, ["energy=corrected"])
    assert opts == {"energy": "corrected"} and "trained on format 'oc20'" in origin


def _synthetic_oc20(d, n_files=3, n_frames=6):
    """Small OC20-like relaxations (random<sid>.traj, EMT slabs); frame 2 of the first has a 500 eV/Å force."""
    from ase.io import Trajectory

    from tests.test_datasets import slab_frames

    d.mkdir(parents=True, exist_ok=True)
    for s in range(n_files):
        with Trajectory(str(d / f"random{100 + s}.traj"), "w") as traj:
            for k, a in enumerate(slab_frames(n=n_frames, seed=10 * s)):
                if s == 0 and k == 2:
                    a.calc.results["forces"] = a.calc.results["forces"].copy()
                    a.calc.results["forces"][3] = [500.0, 0.0, 0.0]
                traj.write(a)
    return d


def test_synthetic_oc20_filter_follows_checkpoint(tmp_path, capsys):
    root = _synthetic_oc20(tmp_path / "oc20")
    trained_unfiltered = _checkpoint(tmp_path / "a.ckpt", {"format": "oc20", "max_force": None,
                                                           "max_energy_deviation": None})
    r = _run(tmp_path, trained_unfiltered, root, "oc20")
    assert r["n_structures"] == 18 and r["dropped"]["filtered"] == 0
    trained_filtered = _checkpoint(tmp_path / "b.ckpt", {"format": "oc20", "max_force": 100.0})
    r = _run(tmp_path, trained_filtered, root, "oc20")
    assert r["n_structures"] == 17 and r["dropped"]["filtered"] == 1
    assert "outlier filter dropped 1 of 18 test frames (max |F| > 100 eV/Å: 1" in capsys.readouterr().out
