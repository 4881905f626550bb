"""Uncertainty of a potential's predictions: committees (deep ensembles) and a single-model last-layer
estimate (LLPR), a common result format, and calibration metrics.

Every estimator has ``r_max`` and ``evaluate(graph, stress=...)`` returning, for a (batched) graph with B
structures and n atoms: ``energy`` [B] (eV), ``forces`` [n, 3] (eV/Å), ``stress`` [B, 3, 3] (eV/Å³, when asked)
and their spreads ``energy_std`` [B], ``forces_std`` [n] (√Σ_α Var F_iα), ``stress_std`` [B, 3, 3]; see
:func:`estimator_results` for the calculator's ``results`` keys.
"""

from __future__ import annotations

import numpy as np
import torch

STD_KEYS = ("energy_std", "forces_std", "stress_std")


def _voigt(t: torch.Tensor) -> np.ndarray:
    s = t.detach().cpu().to(torch.float64).numpy()
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def estimator_results(estimator, graph, periodic: bool) -> dict:
    """ASE ``results`` for one structure: ``energy``/``free_energy``/``forces``/``stress`` (mean or single model)
    and ``energy_std`` (eV), ``forces_std`` [n] (eV/Å), ``stress_std`` [6] (eV/Å³, Voigt, periodic only); a
    committee adds ``energy_ensemble`` [M], ``forces_ensemble`` [M, n, 3] and ``stress_ensemble`` [M, 6]."""
    out = estimator.evaluate(graph, stress=periodic)
    res = {"energy": float(out["energy"][0]), "forces": out["forces"].detach().cpu().to(torch.float64).numpy()}
    res["free_energy"] = res["energy"]
    res["energy_std"] = float(out["energy_std"][0])
    res["forces_std"] = out["forces_std"].detach().cpu().to(torch.float64).numpy()
    if periodic:
        res["stress"] = _voigt(out["stress"][0])
        res["stress_std"] = _voigt(out["stress_std"][0])
    if "energy_ensemble" in out:
        res["energy_ensemble"] = out["energy_ensemble"][:, 0].detach().cpu().to(torch.float64).numpy()
        res["forces_ensemble"] = out["forces_ensemble"].detach().cpu().to(torch.float64).numpy()
        if periodic:
            res["stress_ensemble"] = np.stack([_voigt(s[0]) for s in out["stress_ensemble"]])
    return res
