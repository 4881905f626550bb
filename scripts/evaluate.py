#!/usr/bin/env python
"""Evaluate a checkpoint on labelled structure files.

    python scripts/evaluate.py CKPT FILE [FILE ...] [--json OUT.json] [--plot OUT.png]
    python scripts/evaluate.py CKPT --format 3bpa --root PATH/dataset_3BPA [--test-sets 300K,600K,dih]
    python scripts/evaluate.py CKPT --format oc20|mptrj --root PATH

Prints per-file (or per test set: 3BPA 300K/600K/1200K/dihedral scans, one row each) RMSE/MAE of energy per
atom (meV/atom), forces (meV/Å) and stress (meV/Å³, where present).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402


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
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", help="evaluate with another tensor-product engine (same weights)")
    args = p.parse_args(argv)

    import numpy as np

    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.evaluation import error_table, parity_plot, predict

    if not args.files and not args.format:
        raise PotentialsError("give structure files, or --format with --root")
    overrides = {"tp": args.tp} if args.tp else {}
    model = model_from_checkpoint(args.checkpoint, device=args.device, **overrides)
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
    results, all_preds = {}, {}
    for f, load in sets:
        ds = load() if load is not None else GraphDataset.from_files(
            [f], model.r_max, energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key,
        )
        preds = predict(model, [ds[i] for i in range(len(ds))], batch_size=args.batch_size, device=args.device)
        results[f] = {"n_structures": len(ds), **error_table(preds)}
        for k, (r, q) in preds.items():
            all_preds.setdefault(k, []).append((r, q))

    cols = [("energy", "E meV/at"), ("forces", "F meV/Å"), ("stress", "S meV/Å³")]
    header = f"{'file':<40} {'n':>6} " + " ".join(f"{name + ' RMSE':>16} {name + ' MAE':>15}" for _, name in cols)
    print(header)
    for f, r in results.items():
        cells = []
        for key, _ in cols:
            cells.append(f"{r.get(key + '_rmse', float('nan')):>16.3f} {r.get(key + '_mae', float('nan')):>15.3f}")
        print(f"{os.path.basename(f)[:40]:<40} {r['n_structures']:>6} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        merged = {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in all_preds.items()}
        parity_plot(merged, args.plot, title=os.path.basename(args.checkpoint))
        print(f"parity plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
