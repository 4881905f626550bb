"""A training-time consumer of each rank's global torch RNG, for the DDP resume test (tests/test_cluster.py).

Loaded into ``scripts/train.py`` subprocesses through Lightning's ``lightning.pytorch.callbacks_factory``
entry point (:func:`write_entry_point`) when ``POTENTIALS_TEST_JITTER`` is set: before every training batch it
moves the positions by 1e-3 Å × randn from the global RNG, so the weights depend on every rank's RNG stream.
With ``POTENTIALS_TEST_SIGNAL_AT_STEP=N`` rank 0 also sends itself SIGUSR1 (the cluster preemption signal) right
after global step N, so that the interruption lands at a chosen step instead of wherever a polling test happens to
send it (mid-epoch vs the epoch's last step resume differently).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ENV_VAR = "POTENTIALS_TEST_JITTER"
SIGNAL_VAR = "POTENTIALS_TEST_SIGNAL_AT_STEP"


class JitterPositions(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pos = batch["positions"]
        batch["positions"] = pos + 1e-3 * torch.randn(pos.shape, dtype=pos.dtype).to(pos.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = os.environ.get(SIGNAL_VAR)
        if at and trainer.global_step == int(at) and trainer.global_rank == 0:
            import signal

            os.kill(os.getpid(), signal.SIGUSR1)


def callbacks_factory():
    return [JitterPositions()] if os.environ.get(ENV_VAR) else []


def write_entry_point(directory: Path) -> Path:
    info = Path(directory) / "potentials_test_rng_probe-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: potentials-test-rng-probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[lightning.pytorch.callbacks_factory]\nrng_probe = {__name__}:callbacks_factory\n")
    return Path(directory)
