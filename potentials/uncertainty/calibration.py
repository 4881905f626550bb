"""How well a predicted spread σ matches actual errors e (numpy only; no model code).

* ``spearman(σ, |e|)``: rank correlation; compare with ``simulated_spearman(σ)``, the value expected if the errors
  really were e ~ N(0, σ²) (ρ stays below 1 even for a perfect σ; Rasmussen et al., J Cheminf 15, 121 (2023)).
* ``calibration_curve``: structures sorted by σ, equal-count bins, RMV = √mean σ² vs RMSE = √mean e² per bin
  (diagonal = calibrated).
* ``miscalibration_area``: ∫₀¹ |observed − expected| dp of the coverage of Gaussian central intervals
  |e| ≤ z_p σ, z_p = √2 erf⁻¹(p), on a grid of ``n_levels`` p values (trapezoid rule).
* ``zms`` = mean(e²/σ²) (≈ 1 when calibrated) and the Gaussian negative log-likelihood per sample.
"""

from __future__ import annotations

import numpy as np

from potentials.errors import PotentialsError


def _check(sigma, errors, what: str = "calibration"):
    s = np.asarray(sigma, dtype=np.float64).ravel()
    e = np.asarray(errors, dtype=np.float64).ravel()
    if s.shape != e.shape:
        raise PotentialsError(f"{what}: {s.size} predicted σ but {e.size} errors")
    if s.size == 0:
        raise PotentialsError(f"{what}: no samples")
    if np.any(~np.isfinite(s)) or np.any(s < 0) or np.any(~np.isfinite(e)):
        raise PotentialsError(f"{what}: σ must be finite and ≥ 0 and errors finite")
    return s, e


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    from scipy.stats import rankdata

    return rankdata(x)


def spearman(x, y) -> float:
    """Spearman rank correlation of x and y [N] (NaN when either is constant)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise PotentialsError(f"spearman: need two finite arrays of equal, non-zero length (got {x.size} and {y.size})")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def simulated_spearman(sigma, n_draws: int = 20, seed: int = 0, components: int = 1) -> float:
    """Mean ρ(σ, ‖e‖) over ``n_draws`` draws of an error with ``components`` Gaussian components each of variance
    σ²/components (‖e‖ = |e| for one): the ρ a perfectly calibrated σ would reach on these σ values."""
    s = np.asarray(sigma, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    vals = [
        spearman(s, np.linalg.norm(rng.normal(size=(s.size, components)) * (s / np.sqrt(components))[:, None], axis=1))
        for _ in range(n_draws)
    ]
    return float(np.nanmean(vals))


def calibration_curve(sigma, errors, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Sorted by σ, split into ``n_bins`` equal-count bins: ``rmv`` (√mean σ²), ``rmse`` (√mean e²), ``count``."""
    s, e = _check(sigma, errors)
    order = np.argsort(s, kind="stable")
    bins = [b for b in np.array_split(order, min(int(n_bins), s.size)) if b.size]
    return {
        "rmv": np.array([np.sqrt(np.mean(s[b] ** 2)) for b in bins]),
        "rmse": np.array([np.sqrt(np.mean(e[b] ** 2)) for b in bins]),
        "count": np.array([b.size for b in bins]),
    }


def coverage(sigma, errors, levels) -> np.ndarray:
    """Observed fraction of |e| ≤ z_p σ for each central-interval level p (expected: p for Gaussian e)."""
    from scipy.special import erfinv

    s, e = _check(sigma, errors)
    z = np.sqrt(2.0) * erfinv(np.clip(np.asarray(levels, dtype=np.float64), 0.0, 1.0))
    ratio = np.where(s > 0, np.abs(e) / np.where(s > 0, s, 1.0), np.where(e == 0, 0.0, np.inf))
    ratio = np.sort(ratio)
    return np.searchsorted(ratio, z, side="right") / ratio.size


def miscalibration_area(sigma, errors, n_levels: int = 1001) -> float:
    """∫₀¹ |coverage(p) − p| dp (0 = calibrated, 0.5 = worst), trapezoid rule on ``n_levels`` points."""
    p = np.linspace(0.0, 1.0, int(n_levels))
    d = np.abs(coverage(sigma, errors, p) - p)
    return float(np.sum(0.5 * (d[1:] + d[:-1]) * np.diff(p)))


def zms(sigma, errors) -> float:
    """mean(e²/σ²) over samples with σ > 0."""
    s, e = _check(sigma, errors)
    keep = s > 0
    return float(np.mean((e[keep] / s[keep]) ** 2)) if keep.any() else float("nan")


def gaussian_nll(sigma, errors) -> float:
    """Mean ½[ln(2πσ²) + e²/σ²] over samples with σ > 0."""
    s, e = _check(sigma, errors)
    keep = s > 0
    s, e = s[keep], e[keep]
    return float(np.mean(0.5 * (np.log(2 * np.pi * s**2) + (e / s) ** 2))) if s.size else float("nan")


def calibration_report(sigma, errors, n_bins: int = 10, components: int = 1) -> dict:
    """All metrics for one granularity, σ [N] and errors e [N] (signed, or norms ‖e‖ of ``components``-component
    errors with σ² = Σ variances): ``spearman`` ρ(σ, |e|) with its simulated reference, the calibration curve,
    and, for ``components == 1``, miscalibration area, ZMS and NLL (NaN otherwise)."""
    s, e = _check(sigma, errors)
    curve = calibration_curve(s, e, n_bins)
    gauss = components == 1
    return {
        "n": int(s.size),
        "spearman": spearman(s, np.abs(e)),
        "spearman_simulated": simulated_spearman(s, components=components),
        "miscalibration_area": miscalibration_area(s, e) if gauss else float("nan"),
        "zms": zms(s, e) if gauss else float("nan"), "nll": gaussian_nll(s, e) if gauss else float("nan"),
        "rmv": float(np.sqrt(np.mean(s**2))), "rmse": float(np.sqrt(np.mean(e**2))),
        "curve": {k: v.tolist() for k, v in curve.items()},
    }


def plot_calibration(reports: dict[str, dict], path, title: str = "", unit: str = "") -> None:
    """RMSE vs RMV (log-log) of each report's curve, with the diagonal; PNG written to ``path`` (caller makes it
    atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4.0), squeeze=False)
    for ax, (name, rep) in zip(axes[0], reports.items()):
        rmv, rmse = np.asarray(rep["curve"]["rmv"]), np.asarray(rep["curve"]["rmse"])
        pos = np.concatenate([rmv[rmv > 0], rmse[rmse > 0]])
        if pos.size:
            lo, hi = pos.min() / 1.5, pos.max() * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot(rmv, rmse, "o-")
        ax.set_xlabel(f"predicted σ, RMV per bin {unit}")
        ax.set_ylabel(f"observed RMSE per bin {unit}")
        ax.set_title(f"{name}\nρ={rep['spearman']:.2f}, area={rep['miscalibration_area']:.3f}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
