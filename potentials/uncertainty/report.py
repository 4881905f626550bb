"""Predicted spread vs actual error on labelled data: predictions, metrics per granularity, markdown + plot.

Granularities (design note §4): energy per structure (σ_E vs E error, per atom), forces per structure
(RMV √mean σ_iα² vs RMSE over components), forces per atom (forces_std_i vs |ΔF_i|), force components
(σ_i/√3 vs ΔF_iα; Gaussian metrics: miscalibration area, ZMS, NLL).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from potentials.data.graph import collate
from potentials.errors import PotentialsError
from potentials.uncertainty.calibration import calibration_report, plot_calibration, spearman


def make_estimator(checkpoint, method: str, members=(), device="cpu", **overrides):
    """``method`` "committee" (``checkpoint`` + ``members``) or a single-model method ("llpr")."""
    if method == "committee":
        from potentials.uncertainty.committee import Committee

        if not members:
            raise PotentialsError("--uncertainty committee needs the other members (--members CKPT ...)")
        return Committee.from_checkpoints([checkpoint, *members], device=device, **overrides)
    from potentials.calculator import model_from_checkpoint
    from potentials.uncertainty.llpr import load_estimator

    return load_estimator(checkpoint, model_from_checkpoint(checkpoint, device=device, **overrides), method, device)


def predict_with_uncertainty(estimator, graphs, batch_size: int = 16, device="cpu", where: str = "") -> dict[str, np.ndarray]:
    """Per structure: ``n_atoms``, ``energy_err``/``energy_std`` (eV); per atom: ``forces_err`` [N, 3],
    ``forces_std`` [N], ``structure`` [N] (index of its structure). Every structure needs energy and forces labels
    (``where`` names the data in the error)."""
    acc: dict[str, list] = {k: [] for k in ("n_atoms", "energy_err", "energy_std", "forces_err", "forces_std", "structure")}
    graphs, offset = list(graphs), 0
    for start in range(0, len(graphs), batch_size):
        g = collate(graphs[start:start + batch_size]).to(device)
        if "energy" not in g or "forces" not in g:
            raise PotentialsError(f"uncertainty report{' (' + str(where) + ')' if where else ''}: structures "
                                  f"{start}–{start + batch_size - 1} lack energy or forces labels")
        out = estimator.evaluate(g, stress=False)
        acc["n_atoms"].append(g["num_atoms"].cpu().numpy())
        acc["energy_err"].append((out["energy"].to(torch.float64) - g["energy"]).cpu().numpy())
        acc["energy_std"].append(out["energy_std"].cpu().to(torch.float64).numpy())
        acc["forces_err"].append((out["forces"].to(torch.float64) - g["forces"]).cpu().numpy())
        acc["forces_std"].append(out["forces_std"].cpu().to(torch.float64).numpy())
        acc["structure"].append(g["batch"].cpu().numpy() + offset)
        offset += int(g["num_atoms"].shape[0])
    return {k: np.concatenate(v) for k, v in acc.items()}


def per_structure_forces(pred: dict) -> tuple[np.ndarray, np.ndarray]:
    """Force spread √(mean_i σ_i²/3) and force RMSE √(mean ΔF_iα²) per structure (eV/Å)."""
    n = np.bincount(pred["structure"], minlength=len(pred["n_atoms"])).astype(float)
    var = np.bincount(pred["structure"], weights=pred["forces_std"] ** 2, minlength=len(n)) / (3 * n)
    mse = np.bincount(pred["structure"], weights=(pred["forces_err"] ** 2).sum(1), minlength=len(n)) / (3 * n)
    return np.sqrt(var), np.sqrt(mse)


def _simulated_structure_rho(pred: dict, n_draws: int = 20, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    sig, _ = per_structure_forces(pred)
    vals = []
    for _ in range(n_draws):
        e = rng.normal(size=pred["forces_err"].shape) * (pred["forces_std"] / np.sqrt(3))[:, None]
        _, rmse = per_structure_forces({**pred, "forces_err": e})
        vals.append(spearman(sig, rmse))
    return float(np.nanmean(vals))


def uncertainty_metrics(pred: dict, n_bins: int = 10) -> dict[str, dict]:
    """Calibration reports (see :func:`calibration_report`) for the four granularities, in meV units."""
    n = pred["n_atoms"].astype(float)
    sig_s, rmse_s = per_structure_forces(pred)
    out = {
        "energy per structure (meV/atom)": calibration_report(1e3 * pred["energy_std"] / n, 1e3 * pred["energy_err"] / n, n_bins),
        "forces per structure (meV/Å)": calibration_report(1e3 * sig_s, 1e3 * rmse_s, n_bins),
        "forces per atom (meV/Å)": calibration_report(
            1e3 * pred["forces_std"], 1e3 * np.linalg.norm(pred["forces_err"], axis=1), n_bins, components=3
        ),
        "force components (meV/Å)": calibration_report(
            1e3 * np.repeat(pred["forces_std"] / np.sqrt(3), 3), 1e3 * pred["forces_err"].ravel(), n_bins
        ),
    }
    # per structure the errors are RMS over components: reference ρ by simulation of every component
    out["forces per structure (meV/Å)"]["spearman_simulated"] = _simulated_structure_rho(pred)
    out["forces per structure (meV/Å)"]["miscalibration_area"] = float("nan")
    out["forces per structure (meV/Å)"]["zms"] = out["forces per structure (meV/Å)"]["nll"] = float("nan")
    return out


def merge_predictions(preds: list[dict]) -> dict:
    out, offset = {}, 0
    for p in preds:
        for k, v in p.items():
            out.setdefault(k, []).append(v + offset if k == "structure" else v)
        offset += len(p["n_atoms"])
    return {k: np.concatenate(v) for k, v in out.items()}


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def summary_lines(per_set: dict[str, dict]) -> list[str]:
    """Markdown table: per set, ρ per structure (energy, forces), ρ per atom and mean spreads vs errors."""
    lines = ["| set | n | ρ E/struct | ρ F/struct | ρ F/atom | mean σ_F/atom meV/Å | RMS |ΔF| meV/Å |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, pred in per_set.items():
        m = uncertainty_metrics(pred)
        fa = m["forces per atom (meV/Å)"]
        lines.append(
            f"| {os.path.basename(str(name))} | {len(pred['n_atoms'])} | {_fmt(m['energy per structure (meV/atom)']['spearman'])} | "
            f"{_fmt(m['forces per structure (meV/Å)']['spearman'])} | {_fmt(fa['spearman'])} | "
            f"{1e3 * float(np.mean(pred['forces_std'])):.2f} | {fa['rmse']:.2f} |"
        )
    return lines


def write_uncertainty_report(per_set: dict[str, dict], out_dir, title: str = "") -> Path:
    """OUT_DIR/uncertainty.md (per-set table + metrics of all sets together) and OUT_DIR/calibration.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = uncertainty_metrics(merge_predictions(list(per_set.values())))
    lines = [f"# Uncertainty calibration{': ' + title if title else ''}", "", "## Per set", "", *summary_lines(per_set),
             "", "## All sets together", "",
             "| granularity | n | Spearman ρ | ρ if calibrated (simulated) | miscalibration area | ZMS | NLL | RMV | RMSE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in metrics.items():
        lines.append(f"| {name} | {r['n']} | {_fmt(r['spearman'])} | {_fmt(r['spearman_simulated'])} | "
                     f"{_fmt(r['miscalibration_area'])} | {_fmt(r['zms'])} | {_fmt(r['nll'])} | {_fmt(r['rmv'])} | {_fmt(r['rmse'])} |")
    lines += ["", "ZMS = mean(e²/σ²) (1 = calibrated); miscalibration area of Gaussian interval coverage (0 = calibrated).",
              "", "![calibration curves](calibration.png)", ""]
    _atomic(out / "calibration.png", lambda tmp: plot_calibration(metrics, tmp, title=title))
    return _atomic(out / "uncertainty.md", lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))


def _atomic(path: Path, write) -> Path:
    from potentials.io import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)
    return path
