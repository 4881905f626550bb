"""Energy-level refit: before each validation, fold the model's mean energy error into its per-element shift.

Why (issue 16): with a force-dominated loss (1·MSE(E/N) + 1000·MSE(F), the MACE recipe) the *level* of the
energy — a per-element constant, invisible to forces — drifts by ~1 eV/atom in the first epochs and the small
energy term pulls it back over tens of epochs. mace-torch does the same (measured side by side on 3BPA, same
split, statistics and recipe). A per-element constant changes no force, so it can be fitted in closed form:

    δ = argmin_δ Σ_f w_f ((E_f − Ê_f − Σ_z n_fz δ_z) / N_f)²      (weighted least squares, minimum-norm δ)

over the training set (energies with ``energy_weight > 0``), with the weights that are validated and saved
(the EMA average when EMA is on), and ``δ`` is added to ``scale_shift.shift`` of the model *and* of the EMA
copy (so the average is unchanged except for the level). Compositions that never vary (one molecule) fix only
Σ_z n_z δ_z; the minimum-norm solution then spreads it over the elements in proportion to n_z.

Off by default (MACE has no such step): ``level_refit.enabled=true``. Costs one energy-only pass (no forces)
over the training set per validation; every DDP rank computes the same δ from the full training set.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from potentials.data.graph import collate
from potentials.errors import PotentialsError

log = logging.getLogger("potentials")


@torch.no_grad()
def level_offsets(model: torch.nn.Module, graphs, batch_size: int = 16, device=None) -> torch.Tensor:
    """Per-element energy offsets δ [num_elements] (eV/atom, float64) that minimise the per-atom energy MSE of
    ``model`` over ``graphs`` (an indexable dataset or list of :class:`AtomicGraph`), as in the module docstring."""
    loader = DataLoader(graphs, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    n_el = model.num_elements
    rows, rhs = [], []
    for graph in loader:
        if "energy" not in graph:
            continue
        graph = graph.to(device) if device is not None else graph
        keep = graph["energy_weight"] > 0
        if not bool(keep.any()):
            continue
        pred = model(graph).to(torch.float64)
        species = model.species(graph["numbers"])
        counts = torch.zeros(pred.shape[0], n_el, dtype=torch.float64, device=pred.device)
        counts.index_put_((graph["batch"], species), torch.ones_like(species, dtype=torch.float64), accumulate=True)
        n = graph["num_atoms"].to(torch.float64)
        w = graph["energy_weight"].to(torch.float64).sqrt()
        rows.append((counts / n[:, None] * w[:, None])[keep].cpu())
        rhs.append(((graph["energy"].to(torch.float64) - pred) / n * w)[keep].cpu())
    if not rows:
        raise PotentialsError("level_refit: no training structure has an energy label; disable level_refit")
    a, b = torch.cat(rows), torch.cat(rhs)
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


class EnergyLevelRefit(pl.Callback):
    """Adds :func:`level_offsets` of the training set to ``model.scale_shift.shift`` before each validation
    (not the sanity check). Must come after the EMA callback in the callback list: its
    ``on_validation_epoch_start`` swaps the averaged weights in first, so δ is fitted for the weights validated."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = int(batch_size)
        self.last_offsets: torch.Tensor | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        shift = getattr(getattr(pl_module.model, "scale_shift", None), "shift", None)
        if not isinstance(shift, torch.Tensor):
            raise PotentialsError(f"level_refit needs a model with scale_shift.shift; {type(pl_module.model).__name__} has none")
        if shift.dim() != 1:
            raise PotentialsError(f"level_refit: multi-head models (heads {pl_module.model.heads}) are not supported")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        dm = trainer.datamodule
        train_set = getattr(dm, "train_set", None) if dm is not None else None
        if train_set is None:
            raise PotentialsError("level_refit needs the datamodule's train_set")
        model = pl_module.model
        was_training = model.training
        model.eval()
        delta = level_offsets(model, train_set, self.batch_size, pl_module.device)
        model.train(was_training)
        models = [model]
        for cb in trainer.callbacks:  # the EMA copy (Lightning's WeightAveraging) gets the same δ
            average = getattr(cb, "_average_model", None)
            if average is not None:
                models.append(average.module.model)
        for m in models:
            with torch.no_grad():
                m.scale_shift.shift.add_(delta.to(m.scale_shift.shift))
        self.last_offsets = delta
        log.info("level_refit: shift += %s eV/atom", [round(float(d), 6) for d in delta])
