#!/usr/bin/env python
"""Relax a structure with a trained potential.

    python scripts/relax.py CKPT STRUCTURE [--fmax 0.01] [--optimizer FIRE|BFGS] [--cell] [--steps N]
                            [--out relaxed.extxyz] [--traj relax.traj] [--compile]

With ``--cell`` the cell relaxes too (ASE ``FrechetCellFilter``). Prints energy and fmax per step; writes the
trajectory and the final structure.
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
    p.add_argument("structure", help="any file ase.io.read understands (the last frame is used)")
    p.add_argument("--fmax", type=float, default=0.01, help="force threshold (eV/Å)")
    p.add_argument("--optimizer", default="FIRE", choices=["FIRE", "BFGS", "LBFGS"])
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", default="relaxed.extxyz")
    p.add_argument("--traj", default=None, help="trajectory file (default: OUT with .traj)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", help="tensor-product engine override (same weights)")
    p.add_argument("--compile", action="store_true", help="run the traced + compiled graph (first call compiles)")
    args = p.parse_args(argv)

    import ase.io
    import numpy as np
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE, LBFGS

    from potentials.calculator import PotentialCalculator
    from potentials.data.dataset import read_atoms

    atoms = read_atoms(args.structure, index=-1)[0]
    if args.cell and not atoms.pbc.any():
        raise PotentialsError(f"{args.structure}: --cell needs a periodic structure (pbc is all False)")
    overrides = {"tp": args.tp} if args.tp else {}
    atoms.calc = PotentialCalculator.from_checkpoint(
        args.checkpoint, device=args.device, compile=args.compile, **overrides
    )
    target = FrechetCellFilter(atoms) if args.cell else atoms
    traj = args.traj or str(Path(args.out).with_suffix(".traj"))
    opt = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}[args.optimizer](target, trajectory=traj, logfile=None)

    def report():
        f = target.get_forces()
        print(f"step {opt.nsteps:4d}  energy {atoms.get_potential_energy(): .6f} eV  fmax {np.linalg.norm(f, axis=1).max():.4f} eV/Å")

    opt.attach(report, interval=1)
    converged = opt.run(fmax=args.fmax, steps=args.steps)
    ase.io.write(args.out, atoms, format="extxyz")
    status = "converged" if converged else f"NOT converged in {args.steps} steps"
    print(f"{status}: energy {atoms.get_potential_energy():.6f} eV; wrote {args.out} and {traj}")
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
