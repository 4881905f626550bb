#!/usr/bin/env python
"""Evaluate a checkpoint on labelled structure files.

    python scripts/evaluate.py CKPT FILE [FILE ...] [--json OUT.json] [--plot OUT.png] [--report OUT_DIR]
    python scripts/evaluate.py CKPT --format 3bpa --root PATH/dataset_3BPA [--test-sets 300K,600K,dih]
    python scripts/evaluate.py CKPT --format oc20|mptrj --root PATH [--data energy_reference=txt ...]

Prints per-file (or per test set: 3BPA 300K/600K/1200K/dihedral scans, one row each) RMSE/MAE of energy per
atom (meV/atom), forces (meV/Å) and stress (meV/Å³, where present).

Multi-head checkpoints (``data=multi``): ``--head NAME`` evaluates every file on that head (default: the first),
``--head all`` on every head, one row per file and head (``file@head``); ``--head NAME=FILE ...`` pairs are also
accepted (``--head mptrj=mp_test.xyz oc20=oc_test.xyz``) to evaluate each file on its own head.

With ``--format``, the data settings (OC20 energy reference, MPtrj corrected/uncorrected energy, outlier
filter, ...) default to the ones the checkpoint was trained with (stored in the checkpoint, else the run's
``.hydra/config.yaml``; else the format's defaults, which it says), and ``--data KEY=VALUE`` overrides them
(e.g. ``--data max_force=null max_energy_deviation=null`` evaluates every frame). Every test frame the
conversion skips or the outlier filter drops is counted and explained on stdout and in the JSON.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402
from potentials.io import atomic_path, atomic_write_text  # noqa: E402


COLS = [("energy", "E meV/at"), ("forces", "F meV/Å"), ("stress", "S meV/Å³")]


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (no half-written files)."""
    with atomic_path(path) as tmp:
        write(str(tmp))
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
    for f, r in results.items():
        d = r.get("dropped") or {}
        if d.get("skipped_at_conversion") or d.get("filtered"):
            why = ", ".join(f"{k}: {v}" for k, v in d.get("filter_reasons", {}).items())
            lines.append(f"\n{os.path.basename(f)}: not evaluated: {d['skipped_at_conversion']} frame(s) skipped at "
                         f"conversion, {d['filtered']} dropped by the outlier filter" + (f" ({why})" if why else ""))
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


#: Dataset options that change the evaluated frames or targets, taken from the checkpoint's data config.
COMMON_DATA_KEYS = ("on_bad_frame", "require_edges")
NOT_FOR_TEST = ("train_set", "test_sets", "chunk_size")


def checkpoint_data_config(path) -> tuple[dict | None, str]:
    """The data config a checkpoint was trained with and where it came from: ``checkpoint["data_config"]``
    (written by training), else ``<run dir>/.hydra/config.yaml`` next to ``checkpoints/``, else ``(None, ...)``."""
    from potentials.calculator import load_checkpoint

    ckpt = load_checkpoint(path)
    if isinstance(ckpt.get("data_config"), dict):
        return dict(ckpt["data_config"]), "the checkpoint"
    hydra_cfg = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        from omegaconf import OmegaConf

        try:
            data = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=True).get("data")
        except Exception as exc:  # noqa: BLE001 - a broken run config: say so, fall back to defaults
            raise PotentialsError(f"{hydra_cfg}: cannot read the run config ({exc})") from None
        if isinstance(data, dict):
            return data, str(hydra_cfg)
    return None, "nowhere (checkpoint without data config)"


def format_options(fmt: str, trained: dict | None, overrides: list[str]) -> tuple[dict, str]:
    """Dataset options for evaluating ``fmt``: the trained data config's (when it used the same format),
    updated with ``overrides`` (``KEY=VALUE``, values parsed as YAML). Returns (options, where they came from)."""
    import yaml

    from potentials.data.formats import get_format

    mod = get_format(fmt)
    allowed = (set(mod.DEFAULTS) - set(NOT_FOR_TEST)) | set(COMMON_DATA_KEYS)
    options: dict = {}
    if trained and str(trained.get("format", "ase")).lower() == fmt:
        options = {k: v for k, v in trained.items() if k in allowed}
        origin = "the training run"
    elif trained:
        origin = f"the {fmt} defaults (the checkpoint was trained on format {trained.get('format', 'ase')!r})"
    else:
        origin = f"the {fmt} defaults (the checkpoint records no data settings)"
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or key not in allowed:
            raise PotentialsError(f"--data {item!r}: expected KEY=VALUE with KEY one of {sorted(allowed)}")
        try:
            options[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            options[key] = text
        origin += f", {key} overridden"
    return options, origin


def describe_drops(name: str, ds) -> dict:
    """Print (and return) every frame the conversion skipped or the outlier filter dropped, and why."""
    out = {"skipped_at_conversion": int(ds.meta.get("skipped", 0)), "filtered": 0, "filter_reasons": {}}
    if out["skipped_at_conversion"]:
        first = (ds.meta.get("skipped_first") or ["?"])[0]
        print(f"{name}: {out['skipped_at_conversion']} test frame(s) skipped at conversion (on_bad_frame=skip); "
              f"first: {first}")
    rep = getattr(ds, "filter_report", None)
    if rep is not None and rep.dropped:
        out["filtered"], out["filter_reasons"] = int(rep.dropped), {k: int(v) for k, v in rep.reasons.items()}
        reasons = ", ".join(f"{k}: {v}" for k, v in rep.reasons.items())
        print(f"{name}: outlier filter dropped {rep.dropped} of {rep.total} test frames ({reasons}); evaluate them "
              "too with --data max_force=null max_energy_deviation=null energy_per_atom_range=null")
    return out


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
    p.add_argument("--data", nargs="+", default=[], metavar="KEY=VALUE",
                   help="--format: override a data setting of the checkpoint's training run (e.g. energy=corrected)")
    p.add_argument("--energy-key", help="key of the energy in the files (default energy)")
    p.add_argument("--forces-key", help="key of the forces (default forces)")
    p.add_argument("--stress-key", help="key of the stress (default stress)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--head", nargs="+", default=[], metavar="NAME|all|NAME=FILE",
                   help="multi-head checkpoints: the head(s) to evaluate on (default: the first head)")
    p.add_argument("--tp", help="evaluate with another tensor-product engine (same weights)")
    p.add_argument("--compile", action="store_true", help="evaluate through the traced + compiled graph")
    p.add_argument("--uncertainty", choices=["llpr", "llpr-jacobian", "committee"], help="also report the calibration of this spread")
    p.add_argument("--members", nargs="+", default=[], help="--uncertainty committee: the other members' checkpoints")
    args = p.parse_args(argv)
    # ``--data K=V ... file.xyz``: arguments without "=" after --data are structure files
    args.files += [a for a in args.data if "=" not in a]
    args.data = [a for a in args.data if "=" in a]

    import numpy as np

    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.evaluation import error_table, parity_plot, predict

    if not args.files and not args.format and not any("=" in h for h in args.head):
        raise PotentialsError("give structure files, or --format with --root")
    overrides = {"tp": args.tp} if args.tp else {}
    model = model_from_checkpoint(args.checkpoint, device=args.device, **overrides)
    if args.uncertainty:
        from potentials.uncertainty import report as unc

        estimator, unc_sets = unc.make_estimator(args.checkpoint, args.uncertainty, args.members, args.device, **overrides), {}
    sets = [(f, None) for f in args.files]
    drops: dict = {}
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
        fmt = args.format.strip().lower()
        key_args = [f"{k}={v}" for k, v in (("energy_key", args.energy_key), ("forces_key", args.forces_key),
                                              ("stress_key", args.stress_key)) if v is not None]
        trained, found = checkpoint_data_config(args.checkpoint)
        options, origin = format_options(fmt, trained, key_args + list(args.data))
        print(f"{fmt} data settings from {origin} (training data config from {found}): "
              + (", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "format defaults"))
        for split in splits:
            sets.append((split, lambda split=split: load_dataset(
                fmt, root=args.root, split=split, cutoff=model.r_max, cache_dir=args.cache_dir, **options,
            )))
    pairs = [h.partition("=") for h in args.head]
    sets += [(f, None) for name, eq, f in pairs if eq and f not in args.files]
    runs = []  # (row name, set name, loader, head or None)
    for f, load in sets:
        paired = [name for name, eq, g in pairs if eq and g == f]
        plain = [name for name, eq, _ in pairs if not eq]
        heads = paired or (model.heads if plain == ["all"] else plain) or [None]
        for h in heads:
            runs.append((f if h is None or len(model.heads) == 1 and not paired else f"{f}@{h}", f, load, h))
    results, all_preds, all_numbers, loaded = {}, {}, [], {}
    for row, f, load, head in runs:
        if head is not None:
            model.select_head(head)  # unknown: one line naming the available heads
        if f not in loaded:
            loaded[f] = load() if load is not None else GraphDataset.from_files(
                [f], model.r_max, energy_key=args.energy_key or "energy", forces_key=args.forces_key or "forces",
                stress_key=args.stress_key or "stress",
            )
            if load is not None:
                drops[f] = describe_drops(f, loaded[f])
        ds = loaded[f]
        preds, numbers = predict(
            model, [ds[i] for i in range(len(ds))], batch_size=args.batch_size, device=args.device, return_numbers=True,
            compile=args.compile,
        )
        if "forces" in numbers:
            all_numbers.append(numbers["forces"])
        results[row] = {"n_structures": len(ds), **error_table(preds), **({"head": head} if head else {})}
        if f in drops:
            results[row]["dropped"] = drops[f]
            results[row]["data_options"] = options
        if args.uncertainty:
            unc_sets[row] = unc.predict_with_uncertainty(estimator, [ds[i] for i in range(len(ds))], args.batch_size, args.device, f)
        for k, (r, q) in preds.items():
            all_preds.setdefault(k, []).append((r, q))

    cols = COLS
    header = f"{'file':<40} {'n':>6} " + " ".join(f"{name + ' RMSE':>16} {name + ' MAE':>15}" for _, name in cols)
    print(header)
    for f, r in results.items():
        cells = []
        for key, _ in cols:
            cells.append(f"{r.get(key + '_rmse', float('nan')):>16.3f} {r.get(key + '_mae', float('nan')):>15.3f}")
        name = os.path.basename(f.rpartition("@")[0] if "head" in r else f) + (f"@{r['head']}" if "head" in r else "")
        print(f"{name[:40]:<40} {r['n_structures']:>6} " + " ".join(cells))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
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
