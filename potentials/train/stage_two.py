"""MACE's second training stage (``--swa`` in mace-torch): from a given epoch on, other loss weights (energy
weight raised), a lower constant learning rate, and a uniform average of the weights of that stage.

Config (``stage_two`` in ``configs/train.yaml``)::

    stage_two: {enabled: true, start_fraction: 0.8, start_epoch: null, lr: 1.0e-3,
                loss: {energy: 1000.0, forces: 100.0, stress: 0.0}}

``start_epoch`` (if set) wins over ``start_fraction`` × ``trainer.max_epochs``. From the first optimizer step of
``start_epoch``: the loss weights are replaced, every parameter group's learning rate is set to ``lr`` and the
epoch scheduler stops stepping; the averaged weights (which validation and checkpoints use, as with EMA) restart
from the current weights and become the uniform mean of the weights after every stage-two optimizer step
(``torch.optim.swa_utils``-style SWA, per step rather than mace's per epoch). The switch step is stored in the
checkpoint, so a run interrupted anywhere resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from potentials.errors import PotentialsError

LOSS_KEYS = ("energy", "forces", "stress")


def stage_two_start(cfg: dict[str, Any] | None, max_epochs: int | None) -> int | None:
    """First epoch of stage two from the config (``None`` when disabled)."""
    if not cfg or not cfg.get("enabled", False):
        return None
    if cfg.get("start_epoch") is not None:
        start = int(cfg["start_epoch"])
    else:
        frac = float(cfg.get("start_fraction", 0.8))
        if not 0.0 < frac < 1.0:
            raise PotentialsError(f"stage_two.start_fraction must be in (0, 1), got {frac}")
        if not max_epochs or max_epochs < 1:
            raise PotentialsError("stage_two.start_fraction needs trainer.max_epochs > 0 (or set stage_two.start_epoch)")
        start = int(math.floor(frac * max_epochs))
    if start < 1:
        raise PotentialsError(f"stage_two starts at epoch {start}: must be >= 1 (stage one needs an epoch)")
    loss = dict(cfg.get("loss") or {})
    unknown = set(loss) - set(LOSS_KEYS)
    if unknown:
        raise PotentialsError(f"stage_two.loss: unknown key(s) {sorted(unknown)} (allowed: {list(LOSS_KEYS)})")
    if cfg.get("lr") is None or float(cfg["lr"]) <= 0:
        raise PotentialsError(f"stage_two.lr must be > 0, got {cfg.get('lr')!r}")
    return start


class StageTwo(pl.Callback):
    """Switches loss weights and learning rate at ``start_epoch`` (see the module docstring).

    The averaging side lives in :class:`potentials.train.ema.EMA` (``stage_two=`` this callback)."""

    def __init__(self, start_epoch: int, lr: float, loss: dict[str, float] | None = None):
        self.start_epoch, self.lr, self.loss = int(start_epoch), float(lr), dict(loss or {})

    def active(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.start_epoch

    def apply(self, trainer: pl.Trainer, pl_module) -> None:
        """Loss weights, learning rate, scheduler off (idempotent)."""
        coeffs = pl_module.loss_fn.coeffs
        for key, value in self.loss.items():
            coeffs[key] = float(value)
        pl_module.want_stress = coeffs.get("stress", 0.0) > 0
        pl_module.stage_two_active = True
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.on_train_batch_start(trainer, pl_module, None, 0)  # before LearningRateMonitor logs the epoch's lr

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx) -> None:
        # at the first stage-two batch of this process: also after a resume in the middle of an epoch, where
        # Lightning does not call on_train_epoch_start again
        if self.active(trainer) and not pl_module.stage_two_active:
            self.apply(trainer, pl_module)
            if trainer.current_epoch == self.start_epoch:  # no stage-two validation has happened yet
                reset_best(trainer)


def reset_best(trainer: pl.Trainer) -> None:
    """Forget the best-k of val-loss checkpoints: stage-two losses (other weights) are not comparable with stage
    one, so ``best.ckpt`` becomes the best stage-two checkpoint (the files of stage one stay until replaced)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.monitor.startswith("val"):
            cb.best_k_models, cb.kth_best_model_path, cb.best_model_score = {}, "", None
            cb.kth_value = torch.tensor(float("inf") if cb.mode == "min" else -float("inf"))
