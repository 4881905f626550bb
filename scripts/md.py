#!/usr/bin/env python
"""Molecular dynamics with a trained potential and an uncertainty guard.

    python scripts/md.py CKPT START.xyz --steps 2000 --temperature 600 --out md.traj
        [--ensemble nve|nvt|npt] [--timestep 2] [--interval 10]
        [--committee CKPT2 CKPT3 ... | --uncertainty llpr] [--guard 0.3] [--guard-action stop|record]

Ensembles (ASE integrators): ``nve`` VelocityVerlet, ``nvt`` Langevin (--friction, 1/fs), ``npt`` Berendsen
(NPTBerendsen: --pressure GPa, --taut/--taup fs, --compressibility 1/GPa). Writes the trajectory (ASE .traj,
every --interval steps, with momenta) and a log ``OUT.log`` (step, time, energies, temperature, max force spread).

Rerunning the same command resumes from the last frame of the trajectory (positions, momenta, cell; the
Langevin noise restarts from a new stream) and runs only the remaining steps.

Uncertainty guard (needs --committee or --uncertainty): every --check-every steps the spread
ε = max_i forces_std_i (eV/Å; with --guard-relative, max_i forces_std_i / (|F_i| + 0.2 eV/Å)) is compared with
--guard. Frames above it are written to ``OUT-flagged.extxyz`` (positions, cell, per-atom ``forces_std``; no labels,
ready for reference calculations); ``--guard-action stop`` (default) ends the run there (exit code 3).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402

GUARD_STOP_EXIT = 3


def guard_value(results: dict, relative: bool) -> float:
    """max_i forces_std_i, or max_i forces_std_i / (|F_i| + 0.2) (eV/Å; dimensionless)."""
    import numpy as np

    std = np.asarray(results["forces_std"])
    if relative:
        std = std / (np.linalg.norm(results["forces"], axis=1) + 0.2)
    return float(std.max()) if std.size else 0.0


def write_extxyz_atomic(path: Path, frames: list) -> None:
    """Write all ``frames`` to ``path`` through a temporary file and a rename."""
    import ase.io

    from potentials.io import atomic_path

    with atomic_path(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")


def read_resume(traj: Path):
    """All frames of an existing trajectory (empty list if the file is absent or empty)."""
    from ase.io.trajectory import Trajectory

    if not traj.exists() or traj.stat().st_size == 0:
        return []
    try:
        with Trajectory(str(traj), "r") as t:
            return [t[i] for i in range(len(t))]
    except Exception as exc:
        raise PotentialsError(f"{traj}: cannot resume from this trajectory ({type(exc).__name__}: {exc}); move it away") from exc


def make_calculator(args):
    from potentials.calculator import PotentialCalculator

    if args.committee and args.uncertainty:
        raise PotentialsError("give either --committee or --uncertainty, not both")
    if args.committee:
        return PotentialCalculator.from_checkpoints([args.checkpoint, *args.committee], device=args.device)
    return PotentialCalculator.from_checkpoint(args.checkpoint, device=args.device, uncertainty=args.uncertainty)


def make_dynamics(args, atoms, rng):
    from ase import units

    dt = args.timestep * units.fs
    if args.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt)
    if args.ensemble == "nvt":
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt, temperature_K=args.temperature, friction=args.friction / units.fs, fixcm=False, rng=rng)
    from ase.md.nptberendsen import NPTBerendsen

    if not atoms.pbc.all():
        raise PotentialsError(f"{args.structure}: --ensemble npt needs a periodic cell in all directions")
    return NPTBerendsen(
        atoms, dt, temperature_K=args.temperature, pressure_au=args.pressure * units.GPa, taut=args.taut * units.fs,
        taup=args.taup * units.fs, compressibility_au=args.compressibility / units.GPa,
    )


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("structure", help="start structure (any ase.io format; last frame)")
    p.add_argument("--steps", type=int, required=True, help="total MD steps (a resumed run counts those done)")
    p.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities; thermostat target)")
    p.add_argument("--out", required=True, help="trajectory file (.traj)")
    p.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nvt")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    p.add_argument("--pressure", type=float, default=0.0, help="npt: GPa")
    p.add_argument("--taut", type=float, default=100.0, help="npt: thermostat time (fs)")
    p.add_argument("--taup", type=float, default=1000.0, help="npt: barostat time (fs)")
    p.add_argument("--compressibility", type=float, default=0.01, help="npt: 1/GPa")
    p.add_argument("--interval", type=int, default=10, help="write a trajectory frame every N steps")
    p.add_argument("--committee", nargs="+", help="other committee members (CKPT is the first)")
    p.add_argument("--uncertainty", choices=["llpr", "llpr-jacobian"],
                   help="single-model uncertainty (fit with fit_uncertainty.py); llpr-jacobian costs d extra backward passes")
    p.add_argument("--guard", type=float, help="force-spread threshold (eV/Å, or relative with --guard-relative)")
    p.add_argument("--guard-relative", action="store_true", help="divide the spread by |F_i| + 0.2 eV/Å")
    p.add_argument("--guard-action", choices=["stop", "record"], default="stop")
    p.add_argument("--check-every", type=int, default=1, help="guard check every N steps")
    p.add_argument("--flagged", help="flagged frames (default OUT-flagged.extxyz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import numpy as np
    from ase import units
    from ase.io.trajectory import Trajectory
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from tqdm import tqdm

    from potentials.data.dataset import read_atoms

    for name in ("steps", "interval", "check_every"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise PotentialsError(f"--{name.replace('_', '-')} must be ≥ {0 if name == 'steps' else 1}")
    if args.guard is not None and not (args.committee or args.uncertainty):
        raise PotentialsError("--guard needs an uncertainty: --committee CKPT ... or --uncertainty llpr")
    out = Path(args.out)
    log_path = out.with_suffix(".log")
    flagged_path = Path(args.flagged) if args.flagged else out.with_name(out.stem + "-flagged.extxyz")
    previous = read_resume(out)
    done = (len(previous) - 1) * args.interval if previous else 0
    if previous:
        atoms = previous[-1]
        print(f"resuming {out} at step {done} ({len(previous)} frames)")
    else:
        atoms = read_atoms(args.structure, index=-1)[0]
        MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
        Stationary(atoms)
    atoms.calc = make_calculator(args)
    flagged = list(read_atoms(flagged_path)) if previous and flagged_path.exists() else []
    rng = np.random.default_rng([args.seed, done])
    dyn = make_dynamics(args, atoms, rng)
    dyn.nsteps = done  # observers and the step count continue from the trajectory
    out.parent.mkdir(parents=True, exist_ok=True)
    traj = Trajectory(str(out), "a" if previous else "w", atoms)
    dyn.attach(traj.write, interval=args.interval)
    has_unc = bool(args.committee or args.uncertainty)
    log = open(log_path, "a" if previous else "w")
    if not previous:
        log.write("# step  time_ps  Epot_eV  Ekin_eV  T_K  max_forces_std_eV/A\n")

    def write_log():
        spread = guard_value(atoms.calc.results, False) if has_unc and "forces_std" in atoms.calc.results else float("nan")
        ekin = atoms.get_kinetic_energy()
        log.write(f"{dyn.nsteps:8d} {dyn.nsteps * args.timestep / 1000:9.4f} {atoms.get_potential_energy():14.6f} "
                  f"{ekin:12.6f} {ekin / (1.5 * units.kB * len(atoms)):9.2f} {spread:10.5f}\n")
        log.flush()

    dyn.attach(write_log, interval=args.interval)
    stopped = None
    bar = tqdm(total=args.steps, initial=done, unit="step", disable=args.no_progress, dynamic_ncols=True)
    try:
        while dyn.nsteps < args.steps:
            before = dyn.nsteps
            dyn.run(min(args.check_every, args.steps - dyn.nsteps))
            bar.update(dyn.nsteps - before)
            if args.guard is None:
                continue
            eps = guard_value(atoms.calc.results, args.guard_relative)
            bar.set_postfix(spread=f"{eps:.3g}")
            if eps > args.guard:
                frame = atoms.copy()
                frame.calc = None
                frame.info.update(step=dyn.nsteps, guard_value=eps, source=str(out))
                frame.arrays["forces_std"] = np.asarray(atoms.calc.results["forces_std"], dtype=float)
                flagged.append(frame)
                write_extxyz_atomic(flagged_path, flagged)
                if args.guard_action == "stop":
                    stopped = (dyn.nsteps, eps)
                    break
    finally:
        bar.close()
        traj.close()
        log.close()
    if stopped:
        print(f"stopped by the uncertainty guard at step {stopped[0]}: spread {stopped[1]:.4g} > {args.guard}; "
              f"flagged frames in {flagged_path}; trajectory {out}, log {log_path}")
        return GUARD_STOP_EXIT
    msg = f"; {len(flagged)} flagged frame(s) in {flagged_path}" if flagged else ""
    print(f"done: {dyn.nsteps} steps; trajectory {out}, log {log_path}{msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
