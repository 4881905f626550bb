"""Cluster-ready training: resume resolver, preemption (SIGUSR1/SIGTERM → checkpoint → requeue), RNG state,
SLURM checks.

Policy (see ``docs/cluster.md``):

* one resolver picks the newest valid checkpoint of the run directory by ``global_step``
  (``last.ckpt``, periodic ``step-*.ckpt``, ``preempt.ckpt``, Lightning ``hpc_ckpt_*.ckpt``); an unreadable
  one is skipped with a warning;
* the signal handler only sets a flag; at the next step boundary every rank saves ``preempt.ckpt``
  atomically, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (when under SLURM and requeue is enabled), and
  the run stops cleanly;
* RNG states (torch, numpy, python; every rank's, gathered to rank 0) are saved in every checkpoint and each
  rank restores its own at train start.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from potentials.errors import PotentialsError

log = logging.getLogger("potentials")

CHECKPOINT_PATTERNS = ("last.ckpt", "step-*.ckpt", "preempt.ckpt", "hpc_ckpt_*.ckpt")


def checkpoint_step(path: Path) -> int | None:
    """``global_step`` stored in a checkpoint, or None if the file cannot be read (truncated, not torch)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(ckpt["global_step"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped
        log.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return None


def resolve_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint under ``run_dir`` (and ``run_dir/checkpoints``) by global step.

    At equal steps a preemption checkpoint wins (it is written at the exact step boundary, while a
    ``last.ckpt`` saved as training stops may mark the interrupted epoch as finished), then the newest file.
    """
    run_dir = Path(run_dir)
    candidates: set[Path] = set()
    for folder in (run_dir / "checkpoints", run_dir):
        if folder.is_dir():
            for pattern in CHECKPOINT_PATTERNS:
                candidates.update(p for p in folder.glob(pattern) if p.is_file())
    best: tuple[int, int, float, Path] | None = None
    for path in candidates:
        step = checkpoint_step(path)
        if step is None:
            continue
        key = (step, int(path.name == "preempt.ckpt"), path.stat().st_mtime, path)
        if best is None or key[:3] > best[:3]:
            best = key
    return best[3] if best else None


class RNGStateCallback(pl.Callback):
    """Save every rank's RNG states (torch, numpy, python; CUDA where present) in every checkpoint:
    ``checkpoint["rng_states"] = {rank: states}``, gathered to rank 0, which alone writes the file. Each rank
    restores its own at train start (after the loaders are built, so a resumed run draws the same random numbers
    as an uninterrupted one). A rank without saved states (the world size changed) keeps its seeded RNG, with a
    warning."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_key(self) -> str:
        return "RNGStateCallback"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # every rank builds the checkpoint dict (Trainer.save_checkpoint), so this collective runs on all ranks
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = dict(enumerate(gathered))
        else:
            checkpoint["rng_states"] = {trainer.global_rank: states}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        saved = checkpoint.get("rng_states", {})
        self._pending = saved.get(trainer.global_rank)
        if self._pending is None and saved:
            log.warning(
                "rank %d: no RNG state in the checkpoint (saved ranks %s); continuing with the seeded RNG",
                trainer.global_rank, sorted(saved),
            )

    def on_train_start(self, trainer, pl_module):
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


def in_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def slurm_job_id() -> str | None:
    """The id to requeue: ``ARRAYJOBID_TASKID`` for array jobs, else ``SLURM_JOB_ID``."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


def rendezvous_port(job_id: str | None, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id (same on every node, different between jobs)."""
    if not job_id:
        return 29500
    return base + zlib.crc32(job_id.encode()) % span


def validate_slurm(devices: Any, num_nodes: int) -> None:
    """Check ``trainer.devices``/``num_nodes`` against SLURM's allocation (clear error on mismatch)."""
    if not in_slurm():
        return
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if nodes is not None and int(nodes) != int(num_nodes):
        raise PotentialsError(f"trainer.num_nodes={num_nodes} but SLURM allocated {nodes} node(s) (SLURM_JOB_NUM_NODES)")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is not None and isinstance(devices, int) and devices > 0:
        tasks = int(per_node.split("(")[0])
        if tasks != devices:
            raise PotentialsError(
                f"trainer.devices={devices} but SLURM_NTASKS_PER_NODE={per_node}: launch one task per device "
                "(#SBATCH --ntasks-per-node=<devices>)"
            )
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(slurm_job_id())))


class PreemptionCallback(pl.Callback):
    """On ``signal_name`` (default SIGUSR1) or SIGTERM: flag only; at the next batch end save
    ``preempt.ckpt`` on all ranks, requeue from rank 0 under SLURM, stop training."""

    def __init__(self, checkpoint_dir: str | os.PathLike, signal_name: str = "SIGUSR1", requeue: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signals = {getattr(signal, signal_name), signal.SIGTERM}
        self.requeue = requeue
        self.flag = False
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):  # only sets a flag: never do I/O inside a handler
        self.flag = True

    def on_train_start(self, trainer, pl_module):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread (e.g. some launchers): cannot install
                log.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = trainer.strategy.reduce_boolean_decision(self.flag, all=False)
        if not stop:
            return
        path = self.checkpoint_dir / "preempt.ckpt"
        trainer.save_checkpoint(str(path))  # atomic (AtomicCheckpointIO); every rank takes part
        self.saved = path
        log.warning("preemption signal: saved %s at step %d", path, trainer.global_step)
        if trainer.is_global_zero and self.requeue and in_slurm():
            job = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s", job)
            else:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        trainer.should_stop = True
