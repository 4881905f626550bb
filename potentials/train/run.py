"""The training run behind ``scripts/train.py``: config → data → model → Lightning fit → checkpoint,
metrics CSV and parity plot in the run directory. Rerunning with the same run directory resumes."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from potentials.calculator import load_checkpoint, model_from_checkpoint
from potentials.data.demo import ensure_demo_data
from potentials.errors import PotentialsError
from potentials.train.checkpoint import AtomicCheckpointIO, resume_checkpoint
from potentials.train.datamodule import PotentialDataModule
from potentials.train.ema import EMA
from potentials.train.evaluation import error_table, parity_plot, predict
from potentials.train.module import PotentialModule

log = logging.getLogger("potentials")


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_datamodule(data_cfg: dict, r_max: float, seed: int) -> PotentialDataModule:
    data_cfg = dict(data_cfg)
    if data_cfg.pop("generate_demo", False):
        for path in data_cfg["train_files"]:
            ensure_demo_data(path)
    data_cfg.pop("name", None)
    try:
        return PotentialDataModule(r_max=r_max, seed=seed, **data_cfg)
    except TypeError as exc:
        raise PotentialsError(f"bad data config: {exc}") from exc


def build_logger(logger_cfg: dict, run_dir: Path, run_name: str):
    kind = logger_cfg.get("name", "csv")
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", logger_cfg.get("mode", "offline"))
        return WandbLogger(
            project=logger_cfg.get("project", "potentials"), name=run_name, save_dir=str(run_dir),
            id=run_name.replace("/", "_"), resume="allow", mode=logger_cfg.get("mode", "offline"),
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
    out, tmp = run_dir / "metrics.csv", run_dir / f".metrics.csv.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    return out


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) training; returns paths of the artefacts and the final validation errors."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model_cfg = _container(cfg.model)
    resume_from = resume_checkpoint(ckpt_dir) if cfg.resume else None
    if not cfg.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        n = 0
        while (run_dir / f"checkpoints.old-{n}").exists():
            n += 1
        ckpt_dir.rename(run_dir / f"checkpoints.old-{n}")
        log.warning("resume=false: moved existing checkpoints to %s", run_dir / f"checkpoints.old-{n}")

    dm = build_datamodule(_container(cfg.data), float(model_cfg["r_max"]), int(cfg.seed))
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
    else:
        stats = dm.statistics()
    module = PotentialModule(
        model_cfg, stats, loss=_container(cfg.loss), optim=_container(cfg.optim), scheduler=_container(cfg.scheduler)
    )
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir), filename="best", monitor=cfg.checkpoint.monitor, mode="min",
            save_top_k=int(cfg.checkpoint.save_top_k), save_last=True, enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=float(cfg.ema.decay)))
    trainer_kwargs = {k: v for k, v in _container(cfg.trainer).items() if v is not None}
    try:
        trainer = pl.Trainer(
            **trainer_kwargs,
            default_root_dir=str(run_dir),
            logger=build_logger(_container(cfg.logger), run_dir, str(cfg.run_name)),
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            inference_mode=False,
        )
    except TypeError as exc:
        raise PotentialsError(f"bad trainer option: {exc}") from exc
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)

    result: dict[str, Any] = {"run_dir": run_dir, "last": ckpt_dir / "last.ckpt", "metrics": merge_metrics(run_dir)}
    if trainer.is_global_zero and cfg.parity_plot and (ckpt_dir / "last.ckpt").exists():
        model = model_from_checkpoint(ckpt_dir / "last.ckpt")
        preds = predict(model, [dm.val_set[i] for i in range(len(dm.val_set))])
        result["val_errors"] = error_table(preds)
        result["parity"] = parity_plot(preds, run_dir / "parity.png", title=f"{cfg.run_name}: validation set")
        log.info("validation errors (meV units): %s", result["val_errors"])
    return result
