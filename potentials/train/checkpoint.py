"""Checkpoint files: atomic writes (temp file + rename); the resume resolver is in ``cluster.py``."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from potentials.io import atomic_open


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated file.
    """
    with atomic_open(path, "wb", fsync=True) as fh:
        torch.save(obj, fh)


class DataConfigCallback(pl.Callback):
    """Store the run's data config in every checkpoint (``checkpoint["data_config"]``), so evaluation can
    default to the data settings the model was trained with (energy reference, MPtrj energy, filters)."""

    def __init__(self, data_cfg: dict[str, Any]):
        self.data_cfg = dict(data_cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["data_config"] = dict(self.data_cfg)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose saves are atomic."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)
