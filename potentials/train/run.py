"""The training run behind ``scripts/train.py``: config → data → model → Lightning fit → checkpoint,
metrics CSV and parity plot in the run directory. Rerunning with the same run directory resumes."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from potentials.calculator import load_checkpoint, model_from_checkpoint
from potentials.data.demo import ensure_demo_data
from potentials.errors import PotentialsError
from potentials.io import atomic_open, atomic_write_text
from potentials.train.checkpoint import AtomicCheckpointIO, DataConfigCallback
from potentials.train.cluster import (
    PreemptionCallback,
    RNGStateCallback,
    in_slurm,
    resolve_latest,
    slurm_job_id,
    validate_slurm,
)
from potentials.train.datamodule import PotentialDataModule
from potentials.train.ema import EMA
from potentials.train.finetune import build_replay, finetune_stats, grown_state
from potentials.train.multihead import (
    HeadDataset,
    MultiHeadDataModule,
    build_multi_datamodule,
    finetune_heads,
    head_grown_state,
    head_names,
)
from potentials.train.evaluation import error_table, parity_plot, predict
from potentials.train.module import PotentialModule
from potentials.train.stage_two import StageTwo, stage_two_start

log = logging.getLogger("potentials")


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_datamodule(data_cfg: dict, r_max: float, seed: int) -> PotentialDataModule:
    data_cfg = dict(data_cfg)
    if "heads" in data_cfg:  # data=multi: one dataset per head (potentials.train.multihead)
        return build_multi_datamodule(data_cfg, r_max, seed, build_datamodule)
    if data_cfg.pop("generate_demo", False):
        for path in data_cfg["train_files"]:
            ensure_demo_data(path)
    data_cfg.pop("name", None)
    fmt = str(data_cfg.pop("format", "ase") or "ase")
    if fmt != "ase":  # published formats: every key the datamodule does not take is a dataset option
        import inspect

        known = set(inspect.signature(PotentialDataModule).parameters)
        options = {k: data_cfg.pop(k) for k in list(data_cfg) if k not in known}
        data_cfg.update(format=fmt, dataset_options=options)
    try:
        return PotentialDataModule(r_max=r_max, seed=seed, **data_cfg)
    except TypeError as exc:
        raise PotentialsError(f"bad data config: {exc}") from exc


def build_logger(logger_cfg: dict, run_dir: Path, run_name: str, wandb_id: str | None = None):
    kind = logger_cfg.get("name", "csv")
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", logger_cfg.get("mode", "offline"))
        return WandbLogger(
            project=logger_cfg.get("project", "potentials"), name=run_name, save_dir=str(run_dir),
            id=wandb_id, resume="allow", mode=logger_cfg.get("mode", "offline"),
        )
    raise PotentialsError(f"unknown logger.name={kind!r}; available: ['csv', 'wandb']")


def merge_metrics(run_dir: Path) -> Path | None:
    """Concatenate the CSV logs of every (resumed) session into ``run_dir/metrics.csv``."""
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows, keys = [], []
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append(row)
                keys.extend(k for k in row if k not in keys)
    if not rows:
        return None
    out = run_dir / "metrics.csv"
    with atomic_open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return out


PRECISIONS = {"64-true": "float64", "32-true": "float32", "bf16-mixed": "float32", "16-mixed": "float32"}


def apply_precision(cfg_precision: str | None, model_cfg: dict, tf32: bool) -> str | None:
    """Map ``trainer.precision`` to the model dtype and the precision Lightning should use.

    ``64-true``/``32-true`` set ``model.dtype`` and need no Lightning plugin (Lightning's ``64-true`` would
    also change torch's default dtype while stepping); ``*-mixed`` keeps a float32 model and lets Lightning
    autocast, which :mod:`potentials.nn.precision` confines to the backbone.
    """
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg_precision is None:
        return None
    key = str(cfg_precision)
    if key not in PRECISIONS:
        raise PotentialsError(f"trainer.precision must be one of {sorted(PRECISIONS)}, got {key!r}")
    if model_cfg.get("dtype") != PRECISIONS[key]:
        log.info("trainer.precision=%s: model.dtype set to %s", key, PRECISIONS[key])
        model_cfg["dtype"] = PRECISIONS[key]
    return key if key.endswith("-mixed") else None


def run_meta(run_dir: Path, run_name: str) -> dict[str, Any]:
    """``run_dir/run_meta.json``: a stable wandb id and the SLURM job ids/restarts of this run (rank 0 writes)."""
    path = run_dir / "run_meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {
        "wandb_id": re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:48] + "-" + uuid.uuid4().hex[:8],
        "slurm_job_ids": [], "restarts": -1,
    }
    meta["restarts"] += 1
    job = slurm_job_id()
    if job and job not in meta["slurm_job_ids"]:
        meta["slurm_job_ids"].append(job)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        atomic_write_text(path, json.dumps(meta, indent=2))
    return meta


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns paths of the artefacts and the final validation errors."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model_cfg = _container(cfg.model)
    init_from = cfg.get("init_from")
    ft = _container(cfg.get("finetune")) or {}
    init = None
    if init_from:  # fine-tuning: the architecture is the checkpoint's (config.model may only set compile; trainer.precision
        # still sets the dtype)
        init = load_checkpoint(init_from)
        model_cfg = {**init["hyper_parameters"]["model_cfg"], "compile": model_cfg.get("compile", False)}
    trainer_kwargs = {k: v for k, v in _container(cfg.trainer).items() if v is not None}
    lightning_precision = apply_precision(trainer_kwargs.pop("precision", None), model_cfg, bool(cfg.get("tf32", False)))
    if lightning_precision:
        trainer_kwargs["precision"] = lightning_precision
    resume_from = resolve_latest(run_dir) if cfg.resume else None
    if not cfg.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        n = 0
        while (run_dir / f"checkpoints.old-{n}").exists():
            n += 1
        ckpt_dir.rename(run_dir / f"checkpoints.old-{n}")
        log.warning("resume=false: moved existing checkpoints to %s", run_dir / f"checkpoints.old-{n}")

    dm = build_datamodule(_container(cfg.data), float(model_cfg["r_max"]), int(cfg.seed))
    replay_head = ft.get("replay_head") if init_from else None
    if replay_head is not None and not isinstance(dm, MultiHeadDataModule):  # the new data gets head "default"
        dm = MultiHeadDataModule([("default", dm, 1.0)], seed=int(cfg.seed), batch_size=dm.batch_size,
                                 val_batch_size=dm.val_batch_size, num_workers=dm.num_workers, shuffle=dm.shuffle)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        stats = ckpt["hyper_parameters"]["stats"]
        saved_model = ckpt["hyper_parameters"]["model_cfg"]
        changed = {k for k in set(saved_model) | set(model_cfg) if saved_model.get(k) != model_cfg.get(k)}
        if changed:
            raise PotentialsError(
                f"cannot resume {resume_from}: model options {sorted(changed)} differ from the checkpoint "
                "(use another run_name, or resume=false to start fresh)"
            )
        log.info("resuming from %s (epoch %s, step %s)", resume_from, ckpt.get("epoch"), ckpt.get("global_step"))
        del ckpt
    elif init is not None:
        init_stats, data_stats = init["hyper_parameters"]["stats"], dm.statistics()
        e0_rule, grow = ft.get("e0s", "keep"), bool(ft.get("new_elements", True))
        stats = finetune_stats(init_stats, data_stats, e0_rule, grow, str(init_from))
        if data_stats.get("heads") or init_stats.get("heads"):  # multi-head: the data's heads (+ the replay head)
            stats, sources = finetune_heads(init_stats, stats, data_stats, replay_head, e0_rule, grow, str(init_from))
    else:
        stats = dm.statistics()
    module = PotentialModule(
        model_cfg, stats, loss=_container(cfg.loss), optim=_container(cfg.optim), scheduler=_container(cfg.scheduler),
        nonfinite=str(cfg.get("nonfinite", "stop")),
        freeze=ft.get("freeze") if init_from else None,
    )
    if init is not None and resume_from is None:  # start from the checkpoint's (EMA) weights
        old = {k[len("model."):]: v for k, v in init["state_dict"].items() if k.startswith("model.")}
        old_names = head_names(init["hyper_parameters"]["stats"])
        if stats.get("heads") or len(old_names) > 1:  # each new head starts as a checkpoint head
            old = head_grown_state(module.model, old, len(old_names), [old_names.index(h) for h in sources])
        module.model.load_state_dict(grown_state(module.model, old, len(init["hyper_parameters"]["stats"]["atomic_numbers"])))
    if init_from:
        dm.replay = build_replay(ft.get("replay"), float(model_cfg["r_max"]), int(cfg.seed), dm.keys,
                                 list(stats["atomic_numbers"]))
        if dm.replay is None and replay_head is not None:
            raise PotentialsError(f"finetune.replay_head={replay_head!r} needs replay data (finetune.replay.files or .data)")
        if dm.replay is not None and isinstance(dm, MultiHeadDataModule):  # replay head, else the first data head
            names = head_names(stats)
            dm.replay = HeadDataset(dm.replay, names.index(replay_head) if replay_head else 0)
    del init
    ck = cfg.checkpoint
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir), filename="best", monitor=ck.monitor, mode="min",
            save_top_k=int(ck.save_top_k), save_last=False, enable_version_counter=False,
        ),
        # last.ckpt at every epoch end: Lightning's save_last only writes it when a best-k checkpoint is written,
        # so after an epoch that did not improve val_loss, last.ckpt would lag behind
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
        LearningRateMonitor(logging_interval="epoch"),
        RNGStateCallback(),
        DataConfigCallback(_container(cfg.data)),
    ]
    if ck.get("every_n_train_steps"):
        callbacks.append(ModelCheckpoint(
            dirpath=str(ckpt_dir), filename="step-{step:08d}", monitor="step", mode="max",
            every_n_train_steps=int(ck.every_n_train_steps), save_top_k=int(ck.get("keep_step_checkpoints", 2)),
            save_on_train_epoch_end=False, enable_version_counter=False, auto_insert_metric_name=False,
        ))
    st_cfg = _container(cfg.get("stage_two")) or {}
    st_start = stage_two_start(st_cfg, trainer_kwargs.get("max_epochs"))
    stage_two = StageTwo(st_start, float(st_cfg["lr"]), st_cfg.get("loss")) if st_start is not None else None
    if cfg.ema.enabled or stage_two is not None:  # stage two averages through the same callback
        callbacks.append(EMA(decay=float(cfg.ema.decay), warmup=bool(cfg.ema.get("warmup", True)),
                             stage_two=stage_two, enabled=bool(cfg.ema.enabled)))
    if stage_two is not None:  # first: the lr it sets at an epoch start is what LearningRateMonitor logs
        callbacks.insert(0, stage_two)
    if cfg.get("level_refit", {}).get("enabled", False):  # after EMA: fits the level of the averaged weights
        from potentials.train.level import EnergyLevelRefit

        callbacks.append(EnergyLevelRefit(batch_size=int(cfg.data.get("val_batch_size") or cfg.data.batch_size)))
    preempt = cfg.get("preemption", {})
    if preempt.get("enabled", True):  # after EMA: its batch-end update must be in the preemption checkpoint
        callbacks.append(PreemptionCallback(ckpt_dir, preempt.get("signal", "SIGUSR1"), bool(preempt.get("requeue", True))))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if in_slurm():
        from lightning.fabric.plugins.environments import SLURMEnvironment

        validate_slurm(trainer_kwargs.get("devices", 1), int(trainer_kwargs.get("num_nodes", 1)))
        if SLURMEnvironment.detect():
            plugins.append(SLURMEnvironment(auto_requeue=False))  # our PreemptionCallback requeues
    meta = run_meta(run_dir, str(cfg.run_name))
    try:
        trainer = pl.Trainer(
            **trainer_kwargs,
            default_root_dir=str(run_dir),
            logger=build_logger(_container(cfg.logger), run_dir, str(cfg.run_name), meta["wandb_id"]),
            callbacks=callbacks,
            plugins=plugins,
            inference_mode=False,
        )
    except (TypeError, ValueError) as exc:
        raise PotentialsError(f"bad trainer option: {exc}") from exc
    initial_val = None
    if init_from and resume_from is None:  # the starting point, on the new validation set (logged at step 0)
        initial_val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        log.info("fine-tuning from %s: initial validation %s", init_from, initial_val)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None, weights_only=False)

    preempted = next((c.saved for c in callbacks if isinstance(c, PreemptionCallback) and c.saved), None)
    result: dict[str, Any] = {
        "run_dir": run_dir, "last": ckpt_dir / "last.ckpt", "metrics": merge_metrics(run_dir) if trainer.is_global_zero else None,
        "preempted": preempted, "global_step": trainer.global_step, "initial_val": initial_val,
    }
    if trainer.is_global_zero and cfg.parity_plot and not preempted and (ckpt_dir / "last.ckpt").exists():
        model = model_from_checkpoint(ckpt_dir / "last.ckpt")
        preds = predict(model, [dm.val_set[i] for i in range(len(dm.val_set))])
        result["val_errors"] = error_table(preds)
        result["parity"] = parity_plot(preds, run_dir / "parity.png", title=f"{cfg.run_name}: validation set")
        log.info("validation errors (meV units): %s", result["val_errors"])
    return result
