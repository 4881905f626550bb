"""LightningDataModule: files → graphs → seeded train/val split → statistics → batched loaders."""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from potentials.data.dataset import GraphDataset, split_dataset
from potentials.data.graph import collate
from potentials.data.stats import (
    average_num_neighbors,
    e0s_from_dict_or_fit,
    elements_in,
    force_rms,
    mean_interaction_energy_per_atom,
)


class PotentialDataModule(pl.LightningDataModule):
    """Reads ``train_files`` (and ``val_files`` if given, else a seeded ``val_fraction`` split).

    ``keys`` maps ``energy_key``/``forces_key``/``stress_key`` to the names in the files.
    ``e0s`` is ``"fit"`` (least squares over the training set) or ``{element: eV}``.
    ``format`` other than ``"ase"`` (``3bpa``, ``oc20``, ``mptrj``) loads through
    :func:`potentials.data.formats.load_splits` with ``dataset_options`` (``root``, ...) into a cached,
    lazily read dataset; ``e0s`` may then also be ``"iso_atoms"`` (E0s shipped with the dataset).
    """

    def __init__(
        self,
        train_files: Sequence[str] | None = None,
        r_max: float = 5.0,
        val_files: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        energy_key: str = "energy",
        forces_key: str = "forces",
        stress_key: str | None = "stress",
        e0s: Any = "fit",
        atomic_numbers: Sequence[int] | None = None,
        shuffle: bool = True,
        format: str = "ase",
        dataset_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.train_files, self.val_files = list(train_files or []), list(val_files or [])
        self.format, self.dataset_options = str(format), dict(dataset_options or {})
        self.r_max, self.val_fraction, self.seed = float(r_max), float(val_fraction), int(seed)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.keys = dict(energy_key=energy_key, forces_key=forces_key, stress_key=stress_key)
        self.e0s_cfg, self.atomic_numbers = e0s, atomic_numbers
        self.shuffle = bool(shuffle)
        self.train_set = self.val_set = None
        self.replay = None  # fine-tuning: a dataset mixed into every training epoch (potentials.train.finetune)

    def load(self) -> None:
        """Read and split the data once (idempotent)."""
        if self.train_set is not None:
            return
        if self.format != "ase":
            from potentials.data.formats import load_splits

            self.train_set, self.val_set = load_splits(
                self.format, cutoff=self.r_max, seed=self.seed, val_fraction=self.val_fraction,
                **self.keys, **self.dataset_options,
            )
            return
        data = GraphDataset.from_files(self.train_files, self.r_max, **self.keys)
        if self.val_files:
            self.train_set, self.val_set = data, GraphDataset.from_files(self.val_files, self.r_max, **self.keys)
        else:
            self.train_set, self.val_set = split_dataset(data, self.val_fraction, self.seed)

    def statistics(self) -> dict[str, Any]:
        """Element table, E0s, average neighbours, force RMS (scale) and mean interaction energy (shift)."""
        self.load()
        if hasattr(self.train_set, "statistics"):  # cached dataset: streamed, stored in the cache
            return self.train_set.statistics(self.e0s_cfg, self.atomic_numbers)
        graphs = [self.train_set[i] for i in range(len(self.train_set))]
        numbers = list(self.atomic_numbers) if self.atomic_numbers else elements_in(graphs)
        e0s = e0s_from_dict_or_fit(self.e0s_cfg, graphs, numbers)
        scale = force_rms(graphs)
        return {
            "atomic_numbers": [int(z) for z in numbers],
            "e0s": {int(z): float(e) for z, e in e0s.items()},
            "avg_num_neighbors": float(average_num_neighbors(graphs)),
            "scale": float(scale) if scale > 0 else 1.0,
            "shift": float(mean_interaction_energy_per_atom(graphs, e0s)),
        }

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """A torchdata ``StatefulDataLoader``: its position inside the epoch is saved in checkpoints, so a run
        interrupted mid-epoch resumes with the same batches (Lightning stores its ``state_dict``).

        The shuffling sampler is torchdata's stateful one with its own generator (seeded by ``seed``), so its
        state (generator + position) is restored exactly; with several ranks (DDP) the training set is split by
        torchdata's ``StatefulDistributedSampler`` (Lightning's sampler replacement is off in the configs, and
        Lightning calls ``set_epoch`` on it). Validation runs on the full set on every rank.
        """
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        if world > 1 and dataset is not self.val_set:  # the training set (with replay, a ConcatDataset)
            sampler = StatefulDistributedSampler(
                dataset, num_replicas=world, rank=trainer.global_rank, shuffle=shuffle, seed=self.seed
            )
        elif shuffle:
            sampler = StatefulRandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = SequentialSampler(dataset)
        return StatefulDataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.replay is not None:
            from torch.utils.data import ConcatDataset

            return self._loader(ConcatDataset([self.train_set, self.replay]), self.batch_size, shuffle=self.shuffle)
        return self._loader(self.train_set, self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)
