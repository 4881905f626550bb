"""The LightningModule: any model (graph → energy) + derivatives + weighted loss + metrics + optimiser.

It knows nothing about a particular architecture: the model is rebuilt from ``model_cfg`` and
``stats`` (both saved as hyper-parameters, so a checkpoint alone reconstructs the model).
EMA of the weights is Lightning's ``EMAWeightAveraging`` callback (added by the training script); with it,
validation and saved checkpoints use the averaged weights.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.models import build_model
from potentials.models.compiled import compiled_or_eager
from potentials.train.loss import ErrorAccumulator, WeightedLoss

log = logging.getLogger("potentials")
NONFINITE = ("stop", "skip")


class PotentialModule(pl.LightningModule):
    """Training wrapper.

    Args:
        model_cfg: model config (``name``, ``dtype``, architecture options).
        stats: dataset statistics (``atomic_numbers``, ``e0s``, ``avg_num_neighbors``, ``scale``, ``shift``).
        loss: loss weights ``{energy, forces, stress}``.
        optim: ``{name: adam|adamw, lr, weight_decay, amsgrad}``.
        scheduler: ``{name: plateau|cosine|none, ...}``; cosine needs ``t_max`` (epochs).
        nonfinite: what a NaN/inf training loss or gradient does: ``stop`` (raise :class:`PotentialsError`
            before anything is saved, so the last good checkpoint stays) or ``skip`` (drop that optimizer step,
            warn, count it in ``skipped_steps``). All DDP ranks take the same decision.
        freeze: parameter-name prefixes of the model that are not trained (fine-tuning).
    """

    def __init__(
        self,
        model_cfg: dict[str, Any],
        stats: dict[str, Any],
        loss: dict[str, float] | None = None,
        optim: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        nonfinite: str = "stop",
        freeze: list[str] | None = None,
    ):
        super().__init__()
        if nonfinite not in NONFINITE:
            raise PotentialsError(f"nonfinite must be one of {list(NONFINITE)}, got {nonfinite!r}")
        self.save_hyperparameters()
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self.model = build_model(model_cfg, stats)
        if freeze:
            from potentials.train.finetune import apply_freeze

            apply_freeze(self.model, list(freeze))
        # model.compile=true: energy -> forces/stress traced into one graph and compiled (potentials.models.compiled);
        # parameters are graph inputs, so their gradients reach the live weights (optimiser, EMA, DDP unchanged)
        self.heads = list(getattr(self.model, "heads", ["default"]))
        if len(self.heads) > 1 and model_cfg.get("compile", False):
            raise PotentialsError(
                f"model.compile is not supported for multi-head training (heads {self.heads}): the traced graph has no "
                "per-structure head input; use model.compile=false"
            )
        self.compiled = compiled_or_eager(self.model, model_cfg.get("compile", False))
        self.loss_fn = WeightedLoss(**(loss or {}))
        self.optim_cfg = {"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "amsgrad": True, **(optim or {})}
        self.sched_cfg = {"name": "plateau", "factor": 0.8, "patience": 5, **(scheduler or {})}
        self.stress_in_loss = self.loss_fn.coeffs["stress"] > 0
        self.metrics = {"train": ErrorAccumulator(), "val": ErrorAccumulator()}
        if len(self.heads) > 1:  # per-head validation errors, logged as val_<head>_<quantity>_<rmse|mae|me>
            self.metrics.update({f"val_{h}": ErrorAccumulator() for h in self.heads})
        self.stage_two_active = False  # set by potentials.train.stage_two.StageTwo: constant lr, no scheduler steps

    def needs_stress(self, graph: AtomicGraph, training: bool) -> bool:
        """The strain derivative (and in training its double backward) only for a batch with a stress label;
        in training only when the loss weighs stress (validation reports it whenever labels exist)."""
        has_label = "stress" in graph and bool((graph["stress_weight"] > 0).any())
        return has_label and (self.stress_in_loss or not training)

    def forward(self, graph: AtomicGraph, training: bool = False) -> dict[str, torch.Tensor]:
        stress = self.needs_stress(graph, training)
        return self.compiled(graph, forces=True, stress=stress, training=training)

    def _predict_and_loss(self, graph: AtomicGraph, stage: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pred = self(graph, training=stage == "train")
        return pred, self.loss_fn(pred, graph)

    def _step(self, graph: AtomicGraph, stage: str, batch_idx: int = -1) -> torch.Tensor | None:
        pred, loss = self._predict_and_loss(graph, stage)
        if stage == "train" and self._nonfinite("loss", bool(torch.isfinite(loss.detach()).all()), batch_idx):
            return None  # skipped: neither the metrics nor the logged loss see it
        self.metrics[stage].update(pred, graph)
        if stage == "val" and len(self.heads) > 1 and "head" in graph:
            for i, name in enumerate(self.heads):
                self.metrics[f"val_{name}"].update(pred, only_head(graph, i))
        self.log(
            f"{stage}_loss", loss.detach(), batch_size=graph.num_graphs, prog_bar=True, on_step=False, on_epoch=True,
            sync_dist=True,
        )
        return loss

    def training_step(self, graph: AtomicGraph, batch_idx: int) -> torch.Tensor | None:
        return self._step(graph, "train", batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.isfinite().all() for p in self.parameters() if p.grad is not None]
        finite = bool(torch.stack(grads).all()) if grads else True  # one device sync per step
        if self._nonfinite("gradient", finite, self.trainer.fit_loop.epoch_loop.batch_idx if self._trainer else -1):
            for group in optimizer.param_groups:  # Adam leaves parameters without a gradient untouched
                for p in group["params"]:
                    p.grad = None

    def _nonfinite(self, what: str, finite: bool, batch_idx: int) -> bool:
        """True when this step must be skipped (``nonfinite=skip``); raises for ``stop``. Collective under DDP."""
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            return False
        where = f"epoch {self.current_epoch}, batch {batch_idx}, global step {self.global_step}" if self._trainer else "step"
        if self.nonfinite == "stop":
            raise PotentialsError(
                f"non-finite training {what} at {where}: training stopped, nothing saved after the last good "
                "checkpoint (resume from it with a lower optim.lr, or set nonfinite=skip to skip such steps)"
            )
        self.skipped_steps += 1
        log.warning("non-finite training %s at %s: step skipped (%d so far)", what, where, self.skipped_steps)
        return True

    def validation_step(self, graph: AtomicGraph, batch_idx: int) -> None:
        with torch.enable_grad():
            self._step(graph, "val")

    def _log_metrics(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.metrics[stage].all_reduce(self.device)
        for key, value in self.metrics[stage].compute().items():
            self.log(f"{stage}_{key}", value, prog_bar=key == "forces_rmse" and stage == "val")
        self.metrics[stage].reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        for name in self.heads if len(self.heads) > 1 else []:
            self._log_metrics(f"val_{name}")

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if self.stage_two_active:  # stage two runs at its own constant learning rate
            return
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self):
        cfg = dict(self.optim_cfg)
        name = cfg.pop("name").lower()
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if name not in classes:
            raise PotentialsError(f"unknown optim.name={name!r}; available: {sorted(classes)}")
        optimizer = classes[name]([p for p in self.parameters() if p.requires_grad], **cfg)
        sched = dict(self.sched_cfg)
        kind = sched.pop("name").lower()
        if kind == "none":
            return optimizer
        if kind == "plateau":
            s = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=sched.get("factor", 0.8), patience=sched.get("patience", 5)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "monitor": "val_loss", "interval": "epoch"}}
        if kind == "cosine":
            t_max = sched.get("t_max") or (self.trainer.max_epochs if self.trainer and self.trainer.max_epochs > 0 else 100)
            s = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=sched.get("eta_min", 0.0))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
        raise PotentialsError(f"unknown scheduler.name={kind!r}; available: ['plateau', 'cosine', 'none']")


def only_head(graph: AtomicGraph, head: int) -> AtomicGraph:
    """``graph`` with the loss weights of structures of other heads set to 0 (so metrics see only ``head``)."""
    keep = (graph["head"] == head).to(torch.float64)
    return graph.replace(**{k: graph[k] * keep.to(graph[k].dtype) for k in ("energy_weight", "forces_weight", "stress_weight")
                            if k in graph})
