"""Evaluate a model on graphs: predictions, error tables and parity plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from potentials.data.graph import AtomicGraph, collate
from potentials.io import atomic_path
from potentials.models import energy_forces_stress
from potentials.models.compiled import CompiledPotential
from potentials.nn.ops import fused_inference


def predict(
    model: torch.nn.Module, graphs: Iterable[AtomicGraph], batch_size: int = 16, device="cpu", return_numbers: bool = False,
    compile: bool = False,
):
    """Reference and predicted energy per atom (eV/atom), force components (eV/Å) and stress components
    (eV/Å³, only structures with stress) as flat numpy arrays: ``{quantity: (ref, pred)}``.

    With ``return_numbers=True`` returns ``(preds, numbers)`` where ``numbers["forces"]`` is the atomic number of
    each scored force component (same length and order as ``preds["forces"]``), for per-element errors.
    ``compile=True`` evaluates through one traced + compiled graph (:mod:`potentials.models.compiled`) for every
    batch size instead of the memory-lean eager kernels."""
    graphs = list(graphs)
    compiled = CompiledPotential(model, params_as_inputs=False) if compile else None
    acc: dict[str, tuple[list, list]] = {"energy": ([], []), "forces": ([], []), "stress": ([], [])}
    force_numbers: list[np.ndarray] = []
    for start in range(0, len(graphs), batch_size):
        g = collate(graphs[start:start + batch_size]).to(device)
        has_stress = "stress" in g and bool((g["stress_weight"] > 0).any())
        if compiled is not None:
            with torch.no_grad():
                out = compiled(g, forces="forces" in g, stress=has_stress)
        else:
            with fused_inference():
                out = energy_forces_stress(model, g, forces="forces" in g, stress=has_stress)
        n = g["num_atoms"].to(torch.float64)
        if "energy" in g:
            acc["energy"][0].append((g["energy"] / n).cpu().numpy())
            acc["energy"][1].append((out["energy"].detach() / n).cpu().numpy())
        if "forces" in g:
            w = g["forces_weight"][g["batch"]] * g["forces_mask"] if "forces_mask" in g else g["forces_weight"][g["batch"]]
            mask = (w > 0).cpu().numpy()  # fixed atoms (forces_mask 0) are not scored
            acc["forces"][0].append(g["forces"].cpu().numpy()[mask].ravel())
            acc["forces"][1].append(out["forces"].detach().cpu().numpy()[mask].ravel())
            force_numbers.append(np.repeat(g["numbers"].cpu().numpy()[mask], 3))
        if has_stress:
            mask = (g["stress_weight"] > 0).cpu().numpy()
            acc["stress"][0].append(g["stress"].cpu().numpy()[mask].ravel())
            acc["stress"][1].append(out["stress"].detach().cpu().numpy()[mask].ravel())
    preds = {k: (np.concatenate(r), np.concatenate(p)) for k, (r, p) in acc.items() if r}
    if return_numbers:
        return preds, ({"forces": np.concatenate(force_numbers)} if force_numbers else {})
    return preds


def error_table(preds: dict) -> dict[str, float]:
    """RMSE/MAE in meV/atom (energy), meV/Å (forces), meV/Å³ (stress)."""
    out = {}
    for key, (ref, pred) in preds.items():
        d = (pred - ref) * 1000.0
        out[f"{key}_rmse"] = float(np.sqrt(np.mean(d**2)))
        out[f"{key}_mae"] = float(np.mean(np.abs(d)))
    return out


UNITS = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å³"}


def parity_plot(preds: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Predicted vs reference scatter per quantity, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("energy", "forces", "stress") if k in preds]
    errs = error_table(preds)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ref, pred = preds[key]
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.scatter(ref, pred, s=4, alpha=0.5)
        ax.set_xlabel(f"reference {key} ({UNITS[key]})")
        ax.set_ylabel(f"predicted {key} ({UNITS[key]})")
        unit = {"energy": "meV/atom", "forces": "meV/Å", "stress": "meV/Å³"}[key]
        ax.set_title(f"{key}: RMSE {errs[f'{key}_rmse']:.2f} {unit}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
