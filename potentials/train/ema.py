"""Exponential moving average of the weights: Lightning's ``EMAWeightAveraging``, made safe for e3nn.

Lightning swaps/copies weights between the model and its averaged deep copy by *position* in
``parameters()`` + ``buffers()``. Deep-copying e3nn's code-generated (torch.fx) tensor products registers
graph constants as extra buffers (``_tensor_constant0``), which shifts those positions. After the copy is
made we turn such extra buffers back into plain attributes so both tensor lists line up again.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def warmup_ema_avg_fn(decay: float):
    """EMA update with MACE's (torch_ema's) warm-up: after ``n`` updates the decay is ``min(decay, (1+n)/(10+n))``,
    so early averages follow the fast-moving weights instead of keeping ``decay**n`` of the initialisation."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


def copy_avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
    """No averaging: the "average" is the current weights (EMA off, stage two still to come)."""
    return current


class EMA(EMAWeightAveraging):
    """EMA of parameters and buffers (``decay`` per optimizer step, with MACE's warm-up when ``warmup``);
    validation and checkpoints use it.

    With ``stage_two`` (a :class:`~potentials.train.stage_two.StageTwo`), the average restarts at the first optimizer
    step of stage two and is then the uniform mean of the weights after each stage-two step (SWA). ``enabled=False``
    keeps the "average" equal to the current weights before stage two (SWA without EMA).
    """

    def __init__(self, decay: float = 0.99, warmup: bool = True, stage_two=None, enabled: bool = True, **kwargs):
        super().__init__(decay=decay, **kwargs)
        if not enabled:
            self._kwargs["avg_fn"] = copy_avg_fn
        elif warmup:  # Lightning passes _kwargs on to torch's AveragedModel
            self._kwargs["avg_fn"] = warmup_ema_avg_fn(float(decay))
        self.stage_two = stage_two
        self.switch_step: int | None = None  # global_step before the first stage-two optimizer step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage_two is None or not self.stage_two.active(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step <= self._latest_update_step:
            return
        if self.switch_step is None:
            self.switch_step = trainer.global_step - 1
        k = trainer.global_step - self.switch_step  # 1 at the first stage-two step: the average restarts there
        average = self._average_model
        pairs = zip(
            list(average.module.parameters()) + list(average.module.buffers()),
            list(pl_module.parameters()) + list(pl_module.buffers()),
        )
        with torch.no_grad():
            for avg, cur in pairs:
                if k == 1 or not avg.dtype.is_floating_point:
                    avg.copy_(cur)
                else:
                    avg.add_((cur.detach() - avg) / k)
            average.n_averaged += 1
        self._latest_update_step = trainer.global_step

    def state_dict(self) -> dict:
        return {**super().state_dict(), "switch_step": self.switch_step}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.switch_step = state_dict.get("switch_step")

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is None:
            return
        wanted = {name for name, _ in pl_module.named_buffers()}
        copy = self._average_model.module
        for name, _ in list(copy.named_buffers()):
            if name not in wanted:
                owner_name, _, leaf = name.rpartition(".")
                owner = copy.get_submodule(owner_name)
                tensor = owner._buffers.pop(leaf)
                object.__setattr__(owner, leaf, tensor)
        current = [t.shape for t in pl_module.parameters()] + [t.shape for t in pl_module.buffers()]
        averaged = [t.shape for t in copy.parameters()] + [t.shape for t in copy.buffers()]
        if current != averaged:  # pragma: no cover - would silently corrupt the EMA otherwise
            raise RuntimeError("EMA copy of the model does not line up with the model; cannot average weights")
