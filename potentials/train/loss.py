"""Weighted loss on energy per atom, forces and stress, and the per-quantity error metrics.

Energies are compared per atom (eV/atom), forces per component (eV/Å), stress per component (eV/Å³).
Per-structure weights (``energy_weight``, ``forces_weight``, ``stress_weight``) mask missing targets; an
optional per-atom ``forces_mask`` (0 on fixed atoms) multiplies the forces weight.
"""

from __future__ import annotations

import torch

from potentials.data.graph import AtomicGraph


def errors(pred: dict[str, torch.Tensor], graph: AtomicGraph) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Residuals and their per-element weights for each target present: name → (residual, weight)."""
    out = {}
    n = graph["num_atoms"].to(torch.float64)
    if "energy" in graph:
        out["energy"] = ((pred["energy"] - graph["energy"]) / n, graph["energy_weight"])
    if "forces" in graph and "forces" in pred:
        w = graph["forces_weight"][graph["batch"]]
        if "forces_mask" in graph:  # per-atom mask, e.g. 0 on fixed atoms (OC20)
            w = w * graph["forces_mask"].to(w.dtype)
        w = w[:, None].expand(-1, 3)
        out["forces"] = (pred["forces"] - graph["forces"], w)
    if "stress" in graph and "stress" in pred:
        w = graph["stress_weight"][:, None, None].expand(-1, 3, 3)
        out["stress"] = (pred["stress"] - graph["stress"], w)
    return out


def weighted_mse(residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ w r² / Σ [w > 0]  (0 when no element has weight)."""
    count = (weight > 0).sum().clamp(min=1)
    return (weight * residual.pow(2)).sum() / count


class WeightedLoss(torch.nn.Module):
    """L = λ_E · MSE(E/n) + λ_F · MSE(F) + λ_S · MSE(σ)."""

    def __init__(self, energy: float = 1.0, forces: float = 10.0, stress: float = 0.0):
        super().__init__()
        self.coeffs = {"energy": float(energy), "forces": float(forces), "stress": float(stress)}

    def forward(self, pred: dict[str, torch.Tensor], graph: AtomicGraph) -> torch.Tensor:
        total = 0.0
        for key, (res, w) in errors(pred, graph).items():
            if self.coeffs.get(key, 0.0) > 0:
                total = total + self.coeffs[key] * weighted_mse(res, w)
        return total


class ErrorAccumulator:
    """Accumulates squared, absolute and signed errors over an epoch; ``compute`` gives RMSE, MAE and the mean
    signed error ``{key}_me`` (prediction − reference: the energy bias of issue 16) per quantity."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, pred: dict[str, torch.Tensor], graph: AtomicGraph) -> None:
        for key, (res, w) in errors(pred, graph).items():
            mask = w > 0
            r = res.detach()[mask].to(torch.float64)
            n = torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)
            s = torch.stack([r.pow(2).sum(), r.abs().sum(), n, r.sum()])
            self.sums[key] = self.sums.get(key, torch.zeros(4, dtype=torch.float64)) + s.cpu()

    def all_reduce(self, device=None) -> None:
        """Sum the accumulators over all ranks (DDP), in a fixed key order."""
        keys = ["energy", "forces", "stress"]
        local = torch.stack([self.sums.get(k, torch.zeros(4, dtype=torch.float64)) for k in keys])
        local = local.to(device) if device is not None else local
        torch.distributed.all_reduce(local)
        local = local.cpu()
        self.sums = {k: local[i] for i, k in enumerate(keys) if local[i, 2] > 0}

    def compute(self) -> dict[str, float]:
        out = {}
        for key, (sq, ab, n, signed) in self.sums.items():
            if n > 0:
                out[f"{key}_rmse"] = float((sq / n).sqrt())
                out[f"{key}_mae"] = float(ab / n)
                out[f"{key}_me"] = float(signed / n)
        return out
