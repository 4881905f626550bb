"""scripts/evaluate.py --report (Markdown page, plots, per-element force errors) and the 3BPA experiment configs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import REPO, TINY_MODEL, TINY_STATS

CONFIGS = str(REPO / "configs")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained model saved in Lightning's checkpoint layout (no training)."""
    from potentials.models import build_model

    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL), TINY_STATS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"hyper_parameters": {"model_cfg": dict(TINY_MODEL), "stats": TINY_STATS},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """Four rattled CuAu cells with EMT energy, forces and stress."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for i in range(4):
        atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 1))
        atoms.set_chemical_symbols(["Cu", "Au", "Cu", "Au"])
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        frames.append(atoms)
    path = tmp_path_factory.mktemp("data") / "cuau.extxyz"
    write(path, frames, format="extxyz")
    return path


def test_predict_numbers_align_with_force_components(checkpoint, labelled_file):
    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.evaluation import predict

    model = model_from_checkpoint(checkpoint)
    ds = GraphDataset.from_files([labelled_file], model.r_max)
    graphs = [ds[i] for i in range(len(ds))]
    plain = predict(model, graphs, batch_size=3)
    preds, numbers = predict(model, graphs, batch_size=3, return_numbers=True)
    assert set(plain) == set(preds) == {"energy", "forces", "stress"}
    assert numbers["forces"].shape == preds["forces"][0].shape == (4 * 4 * 3,)
    assert sorted(np.unique(numbers["forces"])) == [29, 79]
    assert np.array_equal(numbers["forces"][:12], np.repeat([29, 79, 29, 79], 3))


def test_report_writes_page_plots_and_per_element_errors(checkpoint, labelled_file, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(checkpoint), str(labelled_file),
         "--report", str(out), "--batch-size", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text(encoding="utf-8")
    for header in ("| file | n |", "E meV/at RMSE", "F meV/Å MAE", "S meV/Å³ RMSE", "## Force errors per element"):
        assert header in text, header
    row = next(line for line in text.splitlines() if line.startswith("| cuau.extxyz |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4" and all(np.isfinite(float(c)) and float(c) > 0 for c in cells[2:])
    for sym, z in (("Cu", 29), ("Au", 79)):
        row = next(line for line in text.splitlines() if line.startswith(f"| {sym} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(z) and cells[2] == "8" and float(cells[3]) > 0
    for png in ("parity.png", "force_errors.png"):
        assert f"]({png})" in text
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


@pytest.mark.parametrize(
    "experiment, model, channels, max_time",
    [("3bpa_mace", "mace", 256, None), ("3bpa_facet", "facet", 256, None), ("3bpa_mace_cpu_budget", "mace", 32, "00:00:30:00")],
)
def test_3bpa_experiments_compose(experiment, model, channels, max_time):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={experiment}"])
    assert cfg.data.name == "3bpa" and cfg.data.train_set == "300K" and cfg.data.val_fraction == 0.1
    assert cfg.data.batch_size == 5
    assert cfg.model.name == model and cfg.model.channels == channels and cfg.model.max_L == 1
    assert cfg.model.max_ell == 3 and cfg.model.r_max == 5.0 and cfg.model.dtype == "float64"
    if model == "mace":
        assert cfg.model.correlation == 3 and cfg.model.num_bessel == 8 and list(cfg.model.radial_hidden) == [64, 64, 64]
    assert cfg.loss.energy == 1.0 and cfg.loss.forces == 1000.0 and cfg.loss.stress == 0.0
    assert cfg.optim.lr == 0.01 and cfg.optim.amsgrad and cfg.ema.decay == 0.99 and cfg.scheduler.name == "plateau"
    assert cfg.trainer.max_time == max_time
    assert cfg.run_name == experiment
