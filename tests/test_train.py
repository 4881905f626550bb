"""End to end: Hydra config → training → checkpoint → resume → calculator → relaxation; bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from potentials.errors import PotentialsError
from tests.conftest import REPO, TINY_MODEL

CONFIGS = str(REPO / "configs")


def make_cfg(demo_file, *overrides):
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k not in ("name", "radial_hidden")]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "data=files", f"data.train_files=[{demo_file}]", "data.batch_size=4", "data.val_fraction=0.2",
                "model.radial_hidden=[8]", "trainer.max_epochs=1", "trainer.enable_model_summary=false",
                "trainer.enable_checkpointing=true", "logger=csv", "parity_plot=true", *model, *overrides,
            ],
        )


@pytest.fixture(scope="module")
def trained_run(demo_file, tmp_path_factory):
    """One tiny run of 1 epoch, then a resumed run to 2 epochs in the same run directory."""
    from potentials.train.run import train

    run_dir = tmp_path_factory.mktemp("run")
    first = train(make_cfg(demo_file, "trainer.max_epochs=1"), run_dir)
    step1 = torch.load(first["last"], weights_only=False)["global_step"]
    second = train(make_cfg(demo_file, "trainer.max_epochs=2"), run_dir)
    return run_dir, first, second, step1


def test_config_composes_with_overrides(demo_file):
    cfg = make_cfg(demo_file, "model.channels=8", "trainer.max_epochs=3", "optim.lr=0.005")
    assert cfg.model.channels == 8 and cfg.trainer.max_epochs == 3 and cfg.optim.lr == 0.005
    assert cfg.model.tp == "cg" and cfg.logger.name == "csv"


def test_unknown_config_key_is_rejected(demo_file):
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        make_cfg(demo_file, "model.not_a_key=1")


def test_training_writes_artifacts_and_resumes(trained_run):
    run_dir, first, second, step1 = trained_run
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.csv", "parity.png"):
        assert (run_dir / name).is_file(), name
    ckpt = torch.load(second["last"], weights_only=False)
    assert step1 > 0
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * step1  # continued, not restarted at 0
    assert "current_model_state" in ckpt and "averaging_state" in ckpt  # EMA saved
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["data_config"]["name"] == "files" and ckpt["data_config"]["val_fraction"] == 0.2  # evaluate.py defaults
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for key in ("val_energy_rmse", "val_forces_rmse", "val_stress_rmse", "train_loss"):
        assert key in header
    assert not list(run_dir.rglob("*.tmp"))


def losses_of_a_few_steps(model_cfg: dict, demo_file, batch_size: int, steps: int = 12) -> list[float]:
    """Train ``model_cfg`` on one demo batch for ``steps`` Adam steps; the loss after each step."""
    from potentials.train.datamodule import PotentialDataModule
    from potentials.train.module import PotentialModule

    torch.manual_seed(0)
    dm = PotentialDataModule([demo_file], r_max=model_cfg["r_max"], batch_size=batch_size, seed=0)
    dm.setup()
    module = PotentialModule(model_cfg, dm.statistics(), loss={"energy": 1, "forces": 10, "stress": 100},
                             optim={"lr": 0.01})
    optimizer = module.configure_optimizers()["optimizer"]
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module.loss_fn(module(batch, training=True), batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_a_few_steps_lower_the_loss(demo_file):
    losses = losses_of_a_few_steps(TINY_MODEL, demo_file, batch_size=8)
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_roundtrip_through_calculator(trained_run, demo_file):
    import ase.io

    from potentials import PotentialCalculator
    from potentials.calculator import model_from_checkpoint
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import energy_forces_stress

    run_dir, _, second, _ = trained_run
    ckpt = torch.load(second["last"], weights_only=False)
    model = model_from_checkpoint(second["last"])
    for k, v in model.state_dict().items():  # the EMA weights are what the calculator uses
        torch.testing.assert_close(v, ckpt["state_dict"]["model." + k])
    atoms = ase.io.read(demo_file, index=0)
    atoms.calc = PotentialCalculator.from_checkpoint(second["last"], device="cpu")
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    out = energy_forces_stress(model, collate([atoms_to_graph(atoms, model.r_max)]), forces=True, stress=True)
    assert abs(e - float(out["energy"][0])) < 1e-10
    np.testing.assert_allclose(f, out["forces"].detach().numpy(), atol=1e-10)
    sigma = out["stress"][0].detach().numpy()  # Voigt order xx yy zz yz xz xy
    np.testing.assert_allclose(s, sigma[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]], rtol=0, atol=1e-12)
    assert atoms.get_potential_energy(apply_constraint=False) == atoms.calc.results["free_energy"]


def test_calculator_relaxes_a_perturbed_demo_structure(trained_run, demo_file):
    import ase.io
    from ase.optimize import FIRE

    from potentials import PotentialCalculator

    _, _, second, _ = trained_run
    atoms = ase.io.read(demo_file, index=5)
    atoms.rattle(0.05, seed=2)
    atoms.calc = PotentialCalculator.from_checkpoint(second["last"])
    FIRE(atoms, logfile=None).run(fmax=0.05, steps=1000)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05


def test_relax_and_evaluate_scripts(trained_run, demo_file, tmp_path):
    import ase.io

    _, _, second, _ = trained_run
    structure = tmp_path / "start.extxyz"
    atoms = ase.io.read(demo_file, index=3)
    atoms.rattle(0.03, seed=1)
    ase.io.write(structure, atoms)
    out = tmp_path / "relaxed.extxyz"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/relax.py"), str(second["last"]), str(structure), "--fmax", "0.05",
         "--cell", "--steps", "1000", "--out", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fmax" in r.stdout and out.is_file() and out.with_suffix(".traj").is_file()
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluate.py"), str(second["last"]), str(demo_file),
         "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())[str(demo_file)]
    assert metrics["n_structures"] == 40 and metrics["forces_rmse"] > 0 and (tmp_path / "p.png").is_file()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from potentials import PotentialCalculator

    with pytest.raises(PotentialsError, match="does not exist"):
        PotentialCalculator.from_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PotentialsError, match="cannot be read"):
        PotentialCalculator.from_checkpoint(bad)


def test_calculator_rejects_weight_changing_override(trained_run):
    from potentials import PotentialCalculator

    with pytest.raises(PotentialsError, match="channels"):
        PotentialCalculator.from_checkpoint(trained_run[2]["last"], channels=64)


def test_script_errors_are_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluate.py"), str(tmp_path / "missing.ckpt"), "x.xyz"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.ckpt" in r.stderr
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), "data=files", f"data.train_files=[{tmp_path}/none.xyz]",
         f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "none.xyz" in r.stderr


def test_empty_dataset_and_resume_mismatch(demo_file, tmp_path, trained_run):
    import shutil

    from potentials.train.run import train

    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(PotentialsError, match="empty.xyz"):
        train(make_cfg(empty), tmp_path / "r1")
    run_copy = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_copy)
    with pytest.raises(PotentialsError, match="channels"):
        train(make_cfg(demo_file, "model.channels=8"), run_copy)
