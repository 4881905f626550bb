#!/usr/bin/env python
"""Pick the K most informative frames (highest predicted force spread, diverse) for labelling.

(Not named select.py: a scripts/select.py would shadow the standard-library module ``select`` for every script
in this directory.)

    python scripts/select_frames.py CKPT FRAMES.traj [MORE ...] -k 20 --out to_label.extxyz
        (--committee CKPT2 CKPT3 ... | --uncertainty llpr|llpr-jacobian) [--score max|mean] [--pool 100]

Each frame is scored by max_i (or mean) forces_std_i of the committee or single-model estimate; among the --pool
(default 5K) best, frames are taken by farthest-point sampling in the model's per-element readout-feature space,
starting from the highest score, so near-identical frames (consecutive MD steps) are not all chosen and an
identical frame is never chosen twice. The output has positions, cell, pbc and numbers only (no labels) plus
``info`` source/frame/score and a per-atom ``forces_std`` array; it is written atomically.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("files", nargs="+", help="candidate frames (trajectory, extxyz, ...)")
    p.add_argument("-k", type=int, required=True, help="number of frames to select")
    p.add_argument("--out", required=True, help="output extxyz")
    p.add_argument("--committee", nargs="+", help="other committee members (CKPT is the first)")
    p.add_argument("--uncertainty", choices=["llpr", "llpr-jacobian"], help="single-model uncertainty instead of a committee")
    p.add_argument("--score", choices=["max", "mean"], default="max", help="per-frame reduction of forces_std")
    p.add_argument("--pool", type=int, help="candidates kept by score before the diversity step (default 5K)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import ase.io
    import numpy as np
    from ase import Atoms

    from potentials.data.dataset import read_atoms
    from potentials.data.neighbors import atoms_to_graph
    from potentials.uncertainty.report import make_estimator
    from potentials.uncertainty.selection import score_frames, select_diverse

    if bool(args.committee) == bool(args.uncertainty):
        raise PotentialsError("give exactly one of --committee CKPT ... or --uncertainty llpr")
    method = "committee" if args.committee else args.uncertainty
    estimator = make_estimator(args.checkpoint, method, args.committee or (), args.device)
    frames, where, graphs = [], [], []
    for path in args.files:
        for i, atoms in enumerate(read_atoms(path)):
            frames.append(atoms)
            where.append((str(path), i))
            graphs.append(atoms_to_graph(atoms, estimator.r_max, where=f"{path}, frame {i}", require_edges=False))
    scores, desc, stds = score_frames(estimator, graphs, args.batch_size, args.score, args.device)
    chosen = select_diverse(scores, desc, args.k, args.pool)
    if len(chosen) < args.k:
        print(f"warning: only {len(chosen)} distinct frames among the candidates (asked for {args.k})", file=sys.stderr)
    out_frames = []
    for j in chosen:
        a = frames[j]
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        b.info.update(source=where[j][0], frame=where[j][1], score=float(scores[j]))
        b.arrays["forces_std"] = np.asarray(stds[j], dtype=float)
        out_frames.append(b)
    out = Path(args.out)
    from potentials.io import atomic_path

    with atomic_path(out) as tmp:
        ase.io.write(tmp, out_frames, format="extxyz")
    print(f"selected {len(chosen)} of {len(frames)} frames (score {args.score} forces_std, eV/Å: "
          f"{min(scores[chosen]):.4g}–{max(scores[chosen]):.4g}; all frames median {np.median(scores):.4g}) → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
