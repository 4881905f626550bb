#!/usr/bin/env python
"""Evaluate a checkpoint on labelled structure files.

    python scripts/evaluate.py CKPT FILE [FILE ...] [--json OUT.json] [--plot OUT.png] [--report OUT_DIR]
    python scripts/evaluate.py CKPT --format 3bpa --root PATH/dataset_3BPA [--test-sets 300K,600K,dih]
    python scripts/evaluate.py CKPT --format oc20|mptrj --root PATH

Prints per-file (or per test set: 3BPA 300K/600K/1200K/dihedral scans, one row each) RMSE/MAE of energy per
atom (meV/atom), forces (meV/Å) and stress (meV/Å³, where present).

--report OUT_DIR writes OUT_DIR/report.md: the metrics table, parity plots (parity.png: energy, forces,
stress), a force-error histogram (force_errors.png) and per-element force errors (all files together).

--uncertainty llpr|llpr-jacobian|committee [--members CKPT ...] adds the calibration of the predicted spread
(potentials.uncertainty.report): Spearman ρ(σ, error) per structure and per atom, calibration curve, miscalibration
area, written to OUT_DIR/uncertainty.md and calibration.png (OUT_DIR = --report, else ./uncertainty_report).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402


COLS = [("energy", "E meV/at"), ("forces", "F meV/Å"), ("stress", "S meV/Å³")]


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def force_error_histogram(preds: dict, path: Path, title: str = "") -> Path:
    """Histogram of force-component errors (meV/Å), written atomically (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ref, pred = preds["forces"]
    d = (pred - ref) * 1000.0
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    ax.hist(d, bins=min(100, max(10, d.size // 10)), color="C0", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("force component error, predicted − reference (meV/Å)")
    ax.set_ylabel("count")
    ax.set_title(title or f"force errors: RMSE {np.sqrt(np.mean(d**2)):.2f} meV/Å")
    fig.tight_layout()
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def per_element_force_errors(preds: dict, numbers: dict) -> dict[str, dict]:
    """Force RMSE/MAE (meV/Å) per element: ``{symbol: {n_atoms, forces_rmse, forces_mae}}``."""
    import numpy as np
    from ase.data import chemical_symbols

    if "forces" not in preds or "forces" not in numbers:
        return {}
    ref, pred = preds["forces"]
    z = numbers["forces"]
    out = {}
    for zi in np.unique(z):
        sel = z == zi
        d = (pred[sel] - ref[sel]) * 1000.0
        out[chemical_symbols[int(zi)]] = {
            "Z": int(zi), "n_atoms": int(sel.sum() // 3),
            "forces_rmse": float(np.sqrt(np.mean(d**2))), "forces_mae": float(np.mean(np.abs(d))),
        }
    return out


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_report(out_dir, results: dict, merged: dict, numbers: dict, checkpoint: str) -> Path:
    """OUT_DIR/report.md with the metrics table, parity plots, force-error histogram and per-element errors."""
    from potentials.train.evaluation import parity_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = os.path.basename(checkpoint)
    lines = [f"# Evaluation report: `{title}`", "", f"Checkpoint: `{checkpoint}`", "",
             "## Errors per file / test set", "",
             "Energy per atom in meV/atom, force components in meV/Å, stress components in meV/Å³.", "",
             "| file | n | " + " | ".join(f"{name} RMSE | {name} MAE" for _, name in COLS) + " |",
             "|---|---:|" + "---:|---:|" * len(COLS)]
    for f, r in results.items():
        cells = " | ".join(f"{_cell(r.get(k + '_rmse'))} | {_cell(r.get(k + '_mae'))}" for k, _ in COLS)
        lines.append(f"| {os.path.basename(f)} | {r['n_structures']} | {cells} |")
    if merged:
        parity_plot(merged, out / "parity.png", title=title)
        lines += ["", "## Parity plots (all files)", "", "![parity plots](parity.png)"]
    if "forces" in merged:
        force_error_histogram(merged, out / "force_errors.png")
        lines += ["", "## Force-error histogram (all files)", "", "![force-error histogram](force_errors.png)"]
        elements = per_element_force_errors(merged, numbers)
        lines += ["", "## Force errors per element (all files)", "",
                  "| element | Z | atoms | F RMSE meV/Å | F MAE meV/Å |", "|---|---:|---:|---:|---:|"]
        for sym, e in elements.items():
            lines.append(f"| {sym} | {e['Z']} | {e['n_atoms']} | {e['forces_rmse']:.3f} | {e['forces_mae']:.3f} |")
    text = "\n".join(lines) + "\n"
    return _atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("files", nargs="*")
    p.add_argument("--format", help="a published dataset format (3bpa, oc20, mptrj) read from --root")
    p.add_argument("--root", help="dataset directory or file for --format")
    p.add_argument("--test-sets", help="3bpa: comma-separated test sets (default: all present under --root)")
    p.add_argument("--cache-dir", default="data/cache", help="graph cache for --format (default data/cache)")
    p.add_argument("--json", help="write the metrics as JSON here")
    p.add_argument("--plot", help="write a parity plot (all files together) here")
    p.add_argument("--report", metavar="OUT_DIR", help="write OUT_DIR/report.md with tables and plots")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", help="evaluate with another tensor-product engine (same weights)")
    p.add_argument("--uncertainty", choices=["llpr", "llpr-jacobian", "committee"], help="also report the calibration of this spread")
    p.add_argument("--members", nargs="+", default=[], help="--uncertainty committee: the other members' checkpoints")
    args = p.parse_args(argv)

    import numpy as np

    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.evaluation import error_table, parity_plot, predict

    if not args.files and not args.format:
        raise PotentialsError("give structure files, or --format with --root")
    overrides = {"tp": args.tp} if args.tp else {}
    model = model_from_checkpoint(args.checkpoint, device=args.device, **overrides)
    if args.uncertainty:
        from potentials.uncertainty import report as unc

        estimator, unc_sets = unc.make_estimator(args.checkpoint, args.uncertainty, args.members, args.device, **overrides), {}
    sets = [(f, None) for f in args.files]
    if args.format:
        from potentials.data.formats import load_dataset

        if not args.root:
            raise PotentialsError("--format needs --root (a dataset directory or file)")
        if args.format.lower() == "3bpa":
            from potentials.data.formats.three_bpa import available_test_sets

            names = args.test_sets.split(",") if args.test_sets else available_test_sets(Path(args.root))
            if not names:
                raise PotentialsError(f"3bpa: no test set files (test_300K.xyz, ...) under {args.root!r}")
            splits = [f"test_{n.strip().removeprefix('test_')}" for n in names]
        else:
            splits = ["test"]
        for split in splits:
            sets.append((split, lambda split=split: load_dataset(
                args.format, root=args.root, split=split, cutoff=model.r_max, cache_dir=args.cache_dir,
                energy_key=args.energy_key, forces_key=args.forces_key,
                stress_key=None if args.format.lower() == "3bpa" else args.stress_key,
            )))
    results, all_preds, all_numbers = {}, {}, []
    for f, load in sets:
        ds = load() if load is not None else GraphDataset.from_files(
            [f], model.r_max, energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key,
        )
        preds, numbers = predict(
            model, [ds[i] for i in range(len(ds))], batch_size=args.batch_size, device=args.device, return_numbers=True,
        )
        if "forces" in numbers:
            all_numbers.append(numbers["forces"])
        results[f] = {"n_structures": len(ds), **error_table(preds)}
        if args.uncertainty:
            unc_sets[f] = unc.predict_with_uncertainty(estimator, [ds[i] for i in range(len(ds))], args.batch_size, args.device, f)
        for k, (r, q) in preds.items():
            all_preds.setdefault(k, []).append((r, q))

    cols = COLS
    header = f"{'file':<40} {'n':>6} " + " ".join(f"{name + ' RMSE':>16} {name + ' MAE':>15}" for _, name in cols)
    print(header)
    for f, r in results.items():
        cells = []
        for key, _ in cols:
            cells.append(f"{r.get(key + '_rmse', float('nan')):>16.3f} {r.get(key + '_mae', float('nan')):>15.3f}")
        print(f"{os.path.basename(f)[:40]:<40} {r['n_structures']:>6} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    merged = {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in all_preds.items()}
    if args.plot:
        parity_plot(merged, args.plot, title=os.path.basename(args.checkpoint))
        print(f"parity plot: {args.plot}")
    if args.report:
        numbers = {"forces": np.concatenate(all_numbers)} if all_numbers else {}
        report = write_report(args.report, results, merged, numbers, args.checkpoint)
        print(f"report: {report}")
    if args.uncertainty:
        print("\n".join(unc.summary_lines(unc_sets)))
        print(f"uncertainty report: {unc.write_uncertainty_report(unc_sets, args.report or 'uncertainty_report', args.uncertainty)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
