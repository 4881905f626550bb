"""MACE's second stage (``stage_two``): the switch of loss weights and learning rate happens at the configured
epoch, the averaged weights of stage two are the uniform mean of the stage-two weights, and a run interrupted
before and after the switch ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch

from potentials.errors import PotentialsError
from potentials.train.ema import EMA
from potentials.train.loss import WeightedLoss
from potentials.train.stage_two import StageTwo, stage_two_start
from tests.test_train import make_cfg


class Toy(pl.LightningModule):
    """y = w·x with a constant scheduler (to show it stops stepping) and the attributes StageTwo sets."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1, dtype=torch.float64)
        self.loss_fn = WeightedLoss(energy=1.0, forces=10.0)
        self.want_stress = False
        self.stage_two_active = False
        self.steps_of_scheduler = 0

    def training_step(self, batch, _):
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean() * self.loss_fn.coeffs["energy"]

    def lr_scheduler_step(self, scheduler, metric):
        if self.stage_two_active:
            return
        self.steps_of_scheduler += 1
        scheduler.step()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


class Recorder(pl.Callback):
    """(epoch, lr and energy weight the step used, weights after the step) per optimizer step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append([trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"],
                          pl_module.loss_fn.coeffs["energy"]])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1].append(pl_module.lin.weight.detach().clone())


def test_switch_and_uniform_average_of_stage_two():
    torch.manual_seed(0)
    x = torch.randn(12, 3, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # 3 steps per epoch
    stage = StageTwo(start_epoch=2, lr=0.01, loss={"energy": 7.0})
    ema = EMA(decay=0.9, stage_two=stage)
    rec = Recorder()
    toy = Toy()
    trainer = pl.Trainer(max_epochs=4, callbacks=[stage, rec, ema], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(toy, loader)
    epochs = [r[0] for r in rec.rows]
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [r[1] for r in rec.rows[:6]] == [0.1] * 3 + [0.05] * 3 and all(r[1] == 0.01 for r in rec.rows[6:])
    assert [r[2] for r in rec.rows] == [1.0] * 6 + [7.0] * 6
    assert toy.steps_of_scheduler == 2  # epochs 0 and 1 only
    assert ema.switch_step == 6
    expected = torch.stack([r[3] for r in rec.rows[6:]]).mean(0)  # uniform mean of the 6 stage-two weights
    # on_train_end copies the average into the module
    assert torch.allclose(toy.lin.weight.detach(), expected, atol=1e-15, rtol=0)
    assert not torch.allclose(expected, rec.rows[-1][3])


def test_stage_two_config_errors():
    assert stage_two_start({"enabled": False}, 10) is None
    assert stage_two_start({"enabled": True, "start_fraction": 0.8, "lr": 1e-3}, 10) == 8
    assert stage_two_start({"enabled": True, "start_epoch": 3, "lr": 1e-3}, None) == 3
    with pytest.raises(PotentialsError, match="needs trainer.max_epochs"):
        stage_two_start({"enabled": True, "start_fraction": 0.8, "lr": 1e-3}, -1)
    with pytest.raises(PotentialsError, match="unknown key"):
        stage_two_start({"enabled": True, "start_epoch": 2, "lr": 1e-3, "loss": {"energie": 1.0}}, 10)
    with pytest.raises(PotentialsError, match="must be >= 1"):
        stage_two_start({"enabled": True, "start_fraction": 0.01, "lr": 1e-3}, 10)
    with pytest.raises(PotentialsError, match="lr must be > 0"):
        stage_two_start({"enabled": True, "start_epoch": 2, "lr": 0}, 10)


def lr_by_step(run_dir):
    """Learning rate logged at each epoch start, by global step."""
    with open(run_dir / "metrics.csv") as fh:
        return {int(r["step"]): float(r["lr-Adam"]) for r in csv.DictReader(fh) if r.get("lr-Adam")}


def test_resume_across_the_switch_is_exact(demo_file, tmp_path, monkeypatch):
    """Preempted (SIGUSR1 → preempt.ckpt, as on a cluster) mid-epoch before the switch and again just after it,
    resumed each time: the final averaged and current weights equal an uninterrupted run bit for bit."""
    import os
    import signal

    import potentials.train.run as run_mod
    from potentials.train.module import PotentialModule

    opts = ["stage_two.enabled=true", "stage_two.start_epoch=2", "stage_two.lr=0.002", "stage_two.loss.energy=50",
            "checkpoint.every_n_train_steps=null", "parity_plot=false", "trainer.max_epochs=4"]
    whole = run_mod.train(make_cfg(demo_file, *opts), tmp_path / "whole")

    class Interrupted(PotentialModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):  # after the callbacks: saved at the next step
            if self.trainer.global_step in (11, 17):
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(run_mod, "PotentialModule", Interrupted)
    parts = tmp_path / "parts"
    first = run_mod.train(make_cfg(demo_file, *opts), parts)
    assert first["preempted"] and first["global_step"] == 12  # epoch 1 of stage one
    second = run_mod.train(make_cfg(demo_file, *opts), parts)
    assert second["preempted"] and second["global_step"] == 18  # epoch 2, two steps into stage two
    part = run_mod.train(make_cfg(demo_file, *opts), parts)
    assert not part["preempted"]
    a = torch.load(whole["last"], weights_only=False)
    b = torch.load(part["last"], weights_only=False)
    assert a["global_step"] == b["global_step"] == 32  # 8 steps per epoch
    for key in ("state_dict", "current_model_state"):  # averaged and current weights
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    ema_state = next(v for k, v in b["callbacks"].items() if k.startswith("EMA"))
    assert ema_state["switch_step"] == 16
    assert not all(torch.equal(v, a["current_model_state"][k]) for k, v in a["state_dict"].items())
    assert lr_by_step(whole["run_dir"]) == {0: 0.01, 8: 0.01, 16: 0.002, 24: 0.002}


def test_budget_log_marks_stage_two_validations(tmp_path):
    """The CPU-budget benchmarks' validation log (potentials.train.budget) says which validations ran in stage two,
    at which lr, and that averaged weights were validated — bench_accuracy.py --stage-two reads the stage from it."""
    import json

    from potentials.train.budget import BudgetLog

    class ValToy(Toy):
        def validation_step(self, batch, _):
            x, y = batch
            err = ((self.lin(x) - y) ** 2).mean().sqrt()
            self.log("val_energy_rmse", err)
            self.log("val_forces_rmse", err)

    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)
    stage = StageTwo(start_epoch=2, lr=0.01, loss={"energy": 7.0})
    log = tmp_path / "budget_log.jsonl"
    trainer = pl.Trainer(max_epochs=4, callbacks=[stage, EMA(decay=0.9, stage_two=stage), BudgetLog(log)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(ValToy(), loader, loader)
    vals = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "val"]
    assert [r["epoch"] for r in vals] == [0, 1, 2, 3]
    assert [r["stage_two"] for r in vals] == [False, False, True, True]
    assert all(r["lr"] > 0.01 for r in vals[:2]) and [r["lr"] for r in vals[2:]] == [0.01, 0.01]
    assert all(r["averaged_weights"] for r in vals)
