#!/usr/bin/env python
"""Fit the single-model uncertainty (LLPR) of a trained checkpoint and store it next to it (CKPT.llpr.pt).

    python scripts/fit_uncertainty.py CKPT --train TRAIN.xyz [--val VAL.xyz] [--regularizer 1e-8]

One no-grad pass over the training structures accumulates FᵀF of the readout features; the calibration
factors α_E, α_F, α_S are fitted on --val (use frames the model was not trained on; without --val the training
set is used and the spread comes out too small). Then:

    PotentialCalculator.from_checkpoint(CKPT, uncertainty="llpr")   # results: energy_std, forces_std, stress_std
    # uncertainty="llpr-jacobian": posterior force σ from the feature Jacobian (d extra backward passes per call)
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import cli_errors  # noqa: E402


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--train", nargs="+", required=True, help="training structure files (labels not needed)")
    p.add_argument("--val", nargs="+", help="labelled held-out files for the calibration factors α")
    p.add_argument("--regularizer", type=float, default=None, help="ς² added to FᵀF (default: smallest that factorises)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.checkpoint import atomic_torch_save
    from potentials.uncertainty.llpr import file_sha256, fit_llpr, llpr_path

    t0 = time.perf_counter()
    model = model_from_checkpoint(args.checkpoint, device=args.device)
    keys = dict(energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key)
    train = GraphDataset.from_files(args.train, model.r_max, **keys)
    val = GraphDataset.from_files(args.val, model.r_max, **keys) if args.val else None
    if val is None:
        print("warning: no --val: α calibrated on the training set (spreads will be too small out of sample)", file=sys.stderr)
    state = fit_llpr(model, list(train), list(val) if val is not None else None, args.batch_size, args.regularizer, args.device)
    state["checkpoint_sha256"] = file_sha256(args.checkpoint)
    state["train_files"] = [str(f) for f in args.train]
    state["val_files"] = [str(f) for f in args.val or []]
    out = llpr_path(args.checkpoint)
    atomic_torch_save(state, out)
    print(f"LLPR: d={state['dim']} features, ς²={state['regularizer']:.3g}, {state['n_train']} training structures; "
          f"α_E={state['alpha_energy']:.4g} α_F={state['alpha_forces']:.4g} (Jacobian {state['alpha_forces_jacobian']:.4g}) "
          f"α_S={state['alpha_stress']:.4g} "
          f"(calibrated on {state['calibrated_on']}, {state['n_calibration']} structures) in {time.perf_counter() - t0:.1f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
