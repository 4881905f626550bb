"""A validation log stamped with CPU time, for training runs stopped by a CPU-time budget.

:class:`BudgetLog` appends one JSON line per completed validation (sanity check excluded) to a file, flushed
at once, so that a run killed by an outside budget (``scripts/bench_accuracy.py``) leaves every result it
reached::

    {"event": "val", "epoch": 3, "step": 360, "cpu_s": 512.3, "wall": 1767000000.1,
     "energy_rmse_mev_atom": 1.9, "forces_rmse_mev_A": 61.2, "val_loss": 3.7,
     "stage_two": false, "lr": 0.01, "averaged_weights": true}

plus one ``{"event": "start", "num_parameters": N, ...}`` line at the start of fitting. ``stage_two`` says whether
MACE's second stage (:mod:`potentials.train.stage_two`) was active in the epoch validated, ``lr`` is the first
parameter group's learning rate when the line is written (an epoch scheduler may already have stepped), ``averaged_weights`` whether a weight-averaging callback (EMA, or stage
two's uniform average) supplied the validated weights. ``cpu_s`` is user +
system time of this process and its waited-for children (``os.times``); ``wall`` is ``time.time()``.

Wiring without touching the training code: Lightning loads extra callbacks from the entry-point group
``lightning.pytorch.callbacks_factory``. :func:`write_entry_point` writes a minimal ``*.dist-info`` that
registers :func:`callbacks_factory` there; a process with that directory on ``PYTHONPATH`` and
``POTENTIALS_BUDGET_LOG=<file>`` in its environment gets the callback, any other process gets nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, WeightAveraging

ENV_VAR = "POTENTIALS_BUDGET_LOG"
ENTRY_GROUP = "lightning.pytorch.callbacks_factory"


def cpu_seconds() -> float:
    """User + system CPU time (s) of this process and its terminated, waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class BudgetLog(Callback):
    """Append a CPU-time-stamped JSON line per validation (energies meV/atom, forces meV/Å) to ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _write(self, record: dict[str, Any]) -> None:
        record.update(cpu_s=cpu_seconds(), wall=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            n = sum(p.numel() for p in pl_module.parameters())
            self._write({"event": "start", "num_parameters": int(n), "epoch": trainer.current_epoch,
                         "step": trainer.global_step})

    def on_validation_end(self, trainer, pl_module) -> None:
        # after on_validation_epoch_end: the module's epoch metrics (eV units) are in callback_metrics
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics

        def get(key: str, scale: float = 1.0) -> float | None:
            return float(m[key]) * scale if key in m else None

        self._write({
            "event": "val", "epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
            "energy_rmse_mev_atom": get("val_energy_rmse", 1000.0), "forces_rmse_mev_A": get("val_forces_rmse", 1000.0),
            "val_loss": get("val_loss"), "stage_two": bool(getattr(pl_module, "stage_two_active", False)),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None,
            "averaged_weights": any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks),
        })


def callbacks_factory() -> list[Callback]:
    """Entry point for Lightning: ``[BudgetLog($POTENTIALS_BUDGET_LOG)]``, or ``[]`` when the variable is unset."""
    path = os.environ.get(ENV_VAR)
    return [BudgetLog(path)] if path else []


def write_entry_point(directory: str | os.PathLike) -> Path:
    """Write ``directory/potentials_budget_log-0.dist-info`` registering :func:`callbacks_factory`; returns
    ``directory`` (put it on ``PYTHONPATH`` of the training process)."""
    directory = Path(directory)
    info = directory / "potentials_budget_log-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: potentials-budget-log\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_GROUP}]\nbudget_log = {__name__}:callbacks_factory\n")
    return directory
