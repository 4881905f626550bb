#!/usr/bin/env python
"""Benchmark the uncertainty estimates: calibration in and out of domain, and cost per calculator call.

    python scripts/bench_uncertainty.py --json docs/benchmarks/uncertainty.json

1. Data (ASE EMT, generated here, no download): Cu–Au fcc cells (8 and 16 atoms, random composition) from Langevin
   MD. Training and validation at 300–600 K with ±1 % isotropic strain; test sets: in domain (same recipe, other
   seed), hot (1,200–1,500 K) and strained (±6 % isotropic, ≤5 % shear, 300–600 K).
2. A committee of --members models trained in one command: ``scripts/train.py -m seed=0,1,...`` (Hydra multirun).
3. LLPR fitted on member 0 (FᵀF on the training set, α on the validation set); force spread either local
   ("llpr", no extra backward pass) or from the feature Jacobian ("llpr-jacobian", d extra backward passes).
4. Per-structure force spread √(mean_i σ_i²/3) vs force RMSE: Spearman ρ (all test sets together and in-domain
   only), mean spread per test set, calibration (miscalibration area of force components, ZMS).
5. Cost of one calculator call (energy + forces + stress, torch threads = --threads): plain model, LLPR, committee
   (one backward pass) and the members called one after the other; --warmup untimed and --repeat timed calls.

Rerunning with the same --out-dir reuses the data and the trained committee (its training time is read from
OUT_DIR/training.json); --retrain trains again.

    python scripts/bench_uncertainty.py --cost-only --arch bench tiny reference --json docs/benchmarks/uncertainty.cost.json

times only the committee's evaluation options against one model (no data, no training: the members are --members
seeded random initialisations of each --arch, element table H C N O Cu Au; the cost does not depend on the weight
values) on a 108-atom Cu–Au cell and the 27-atom 3BPA molecule (../shared/data or $POTENTIALS_SHARED_DATA; skipped
if absent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from potentials.io import atomic_path, atomic_write_text  # noqa: E402

from bench_common import REFERENCE_HP, SHARED_DATA  # noqa: E402
from bench_report import REPO, command_line, machine_info, time_calls, timing_stats, write_report  # noqa: E402
from bench_uncertainty_report import cost_markdown, plot, to_markdown  # noqa: E402

LATTICE_A = {"Cu": 3.61, "Au": 4.08}
SETS = {  # name: (temperatures K, isotropic strains, max shear, number of structures, seed)
    "train": ((300.0, 450.0, 600.0), (-0.01, 0.0, 0.01), 0.01, 120, 11),
    "val": ((300.0, 450.0, 600.0), (-0.01, 0.0, 0.01), 0.01, 30, 12),
    "test_in_domain": ((300.0, 450.0, 600.0), (-0.01, 0.0, 0.01), 0.01, 40, 13),
    "test_hot": ((1200.0, 1350.0, 1500.0), (-0.01, 0.0, 0.01), 0.01, 40, 14),
    "test_strained": ((300.0, 450.0, 600.0), (-0.06, 0.06), 0.05, 40, 15),
}
TEST_SETS = ("test_in_domain", "test_hot", "test_strained")


def emt_frames(temperatures, strains, max_shear, n_structures, seed, frames_per_run=5):
    """Cu–Au EMT MD frames with energy/forces/stress (see the module docstring)."""
    from ase import Atoms, units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    rng = np.random.default_rng(seed)
    frames, run = [], 0
    while len(frames) < n_structures:
        t = temperatures[run % len(temperatures)]
        iso = strains[(run // len(temperatures)) % len(strains)]
        x = float(rng.uniform(0.0, 1.0))
        a = (1 - x) * LATTICE_A["Cu"] + x * LATTICE_A["Au"]
        atoms = bulk("Cu", "fcc", a=a).repeat((2, 2, 2)) if run % 2 else bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 1))
        sym = np.array(["Cu"] * len(atoms), dtype=object)
        sym[rng.permutation(len(atoms))[: int(round(x * len(atoms)))]] = "Au"
        atoms.set_chemical_symbols(sym.tolist())
        f = np.eye(3) * (1 + iso)
        i, j = rng.choice(3, 2, replace=False)
        f[i, j] = f[j, i] = rng.uniform(-max_shear, max_shear)
        atoms.set_cell(atoms.cell.array @ f.T, scale_atoms=True)
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=2 * t, rng=rng)
        Stationary(atoms)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=t, friction=0.02 / units.fs, fixcm=False, rng=rng)
        dyn.run(20)
        for k in range(min(frames_per_run, n_structures - len(frames))):
            dyn.run(5)
            fr = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            fr.info.update(temperature_K=t, iso_strain=iso)
            fr.calc = SinglePointCalculator(fr, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                            stress=atoms.get_stress())
            frames.append(fr)
        run += 1
    return frames


def make_data(data_dir: Path) -> dict[str, Path]:
    import ase.io

    paths = {}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in SETS.items():
        path = data_dir / f"{name}.extxyz"
        if not path.exists():
            with atomic_path(path) as tmp:
                ase.io.write(tmp, emt_frames(*spec), format="extxyz")
        paths[name] = path
    return paths


def train_committee(args, paths) -> tuple[list[Path], dict]:
    sweep = args.out_dir / "multirun"
    ckpts = [sweep / f"{s}-seed{s}" / "checkpoints" / "last.ckpt" for s in range(args.members)]
    record = args.out_dir / "training.json"
    if not args.retrain and record.exists() and all(c.exists() for c in ckpts):
        info = json.loads(record.read_text())
        if info.get("members") == args.members and info.get("epochs") == args.epochs:
            return ckpts, {**info, "reused": True}
    seeds = ",".join(str(s) for s in range(args.members))
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", f"seed={seeds}", "run_name=bench_uncertainty",
           "data=files", f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]",
           "data.batch_size=4", f"trainer.max_epochs={args.epochs}", "model.channels=8", "model.readout_hidden=8",
           "model.radial_hidden=[16,16]", "model.r_max=4.5", "parity_plot=false", "checkpoint.every_n_train_steps=null",
           f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    missing = [str(c) for c in ckpts if not c.exists()]
    if missing:
        sys.exit(f"training did not write {missing}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shown = " ".join(c if " " not in c else repr(c) for c in cmd[1:]).replace(str(REPO) + "/", "")
    info = {"command": "python " + shown, "wall_s": wall, "cpu_s": cpu, "members": args.members, "epochs": args.epochs}
    atomic_write_text(record, json.dumps(info))
    return ckpts, info


def fit_llpr_for(ckpt: Path, paths) -> dict:
    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.checkpoint import atomic_torch_save
    from potentials.uncertainty.llpr import file_sha256, fit_llpr, llpr_path

    t0 = time.perf_counter()
    model = model_from_checkpoint(ckpt)
    train = GraphDataset.from_files(paths["train"], model.r_max)
    val = GraphDataset.from_files(paths["val"], model.r_max)
    state = fit_llpr(model, list(train), list(val))
    state["checkpoint_sha256"] = file_sha256(ckpt)
    atomic_torch_save(state, llpr_path(ckpt))
    return {k: state[k] for k in ("dim", "regularizer", "alpha_energy", "alpha_forces", "alpha_forces_jacobian", "alpha_stress")} | {
        "fit_s": time.perf_counter() - t0}


def calibration(estimator, paths, r_max) -> dict:
    from potentials.data.dataset import GraphDataset
    from potentials.uncertainty.calibration import spearman
    from potentials.uncertainty.report import merge_predictions, per_structure_forces, predict_with_uncertainty, uncertainty_metrics

    preds = {s: predict_with_uncertainty(estimator, list(GraphDataset.from_files(paths[s], r_max))) for s in TEST_SETS}
    out = {"sets": {}}
    for s, p in preds.items():
        sig, err = per_structure_forces(p)
        out["sets"][s] = {"n": len(sig), "mean_force_spread_meV": 1e3 * float(sig.mean()),
                          "force_rmse_meV": 1e3 * float(np.sqrt(np.mean(err**2))), "spearman_structure": spearman(sig, err),
                          "spread": (1e3 * sig).tolist(), "error": (1e3 * err).tolist()}
    for name, keys in (("all", TEST_SETS), ("in_domain", ("test_in_domain",))):
        m = uncertainty_metrics(merge_predictions([preds[s] for s in keys]))
        out[name] = {
            "spearman_forces_structure": m["forces per structure (meV/Å)"]["spearman"],
            "spearman_forces_structure_simulated": m["forces per structure (meV/Å)"]["spearman_simulated"],
            "spearman_forces_atom": m["forces per atom (meV/Å)"]["spearman"],
            "spearman_energy_structure": m["energy per structure (meV/atom)"]["spearman"],
            "miscalibration_area_force_components": m["force components (meV/Å)"]["miscalibration_area"],
            "zms_force_components": m["force components (meV/Å)"]["zms"],
            "miscalibration_area_energy": m["energy per structure (meV/atom)"]["miscalibration_area"],
            "curve_forces_structure": m["forces per structure (meV/Å)"]["curve"],
        }
    ood = [out["sets"][s]["mean_force_spread_meV"] for s in ("test_hot", "test_strained")]
    out["ood_over_id_spread"] = min(ood) / out["sets"]["test_in_domain"]["mean_force_spread_meV"]
    return out


def timings(ckpts, args) -> list[dict]:
    from ase.build import bulk
    from ase.calculators.calculator import all_changes

    from potentials.calculator import PotentialCalculator
    from potentials.uncertainty.committee import members_sequential

    rows = []
    for n_rep in args.sizes:
        atoms = bulk("Cu", "fcc", a=3.8, cubic=True).repeat((n_rep, n_rep, n_rep))
        rng = np.random.default_rng(0)
        atoms.numbers[rng.permutation(len(atoms))[: len(atoms) // 2]] = 79
        atoms.rattle(0.05, seed=1)
        plain = PotentialCalculator.from_checkpoint(ckpts[0])
        llpr = PotentialCalculator.from_checkpoint(ckpts[0], uncertainty="llpr")
        llpr_j = PotentialCalculator.from_checkpoint(ckpts[0], uncertainty="llpr-jacobian")
        comm = PotentialCalculator.from_checkpoints(ckpts)
        from potentials.data.neighbors import atoms_to_graph
        import torch

        g = atoms_to_graph(atoms, plain.r_max, where="bench")
        g["batch"] = torch.zeros(len(atoms), dtype=torch.long)

        def call(calc):
            return lambda: calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)

        members = list(comm.estimator.members)
        fns = {"plain": call(plain), "llpr": call(llpr), "llpr-jacobian": call(llpr_j), f"committee_{len(ckpts)}": call(comm),
               f"members_one_by_one_fused_{len(ckpts)}": lambda: members_sequential(members, g, stress=True, fused=True),
               f"members_one_pass_fused_{len(ckpts)}": lambda: one_pass_fused(members, g, stress=True)}
        # interleaved: every round times each variant once, so load changes on the shared machine hit all alike
        for fn in fns.values():
            time_calls(fn, args.warmup, 0)
        times = {k: [] for k in fns}
        for _ in range(args.repeat):
            for k, fn in fns.items():
                times[k] += time_calls(fn, 0, 1)
        stats = {k: timing_stats(v) for k, v in times.items()}
        base = stats["plain"]["median_s"]
        for k, st in stats.items():
            rows.append({"n_atoms": len(atoms), "variant": k, **st, "ratio_median": st["median_s"] / base,
                         "ratio_min": st["min_s"] / stats["plain"]["min_s"]})
    return rows


def one_pass_fused(members, g, stress):
    """The earlier committee path: one backward of Σ_m E_m with the fused kernels."""
    from potentials.nn.ops import fused_inference
    from potentials.uncertainty.committee import members_one_pass

    with fused_inference():
        return members_one_pass(members, g, stress)


@contextlib.contextmanager
def out_of_place_scatter():
    """For the ``committee_N_vmap`` row only: ``scatter_sum`` with an out-of-place ``index_add`` (same numbers), which
    ``torch.func.vmap`` accepts; this branch's in-place one makes the committee fall back to one member at a time."""
    import torch

    import potentials.models.base as mb
    import potentials.nn.tp.base as tb

    def scatter_sum(src, index, dim_size):
        return torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device).index_add(0, index, src)

    saved = tb.scatter_sum, mb.scatter_sum
    tb.scatter_sum = mb.scatter_sum = scatter_sum
    try:
        yield
    finally:
        tb.scatter_sum, mb.scatter_sum = saved


ARCHS = {  # --cost-only architectures (MACE, cg engine, float64)
    "tiny": dict(name="mace", tp="cg", radial="mlp", dtype="float64", r_max=4.0, num_interactions=2, channels=4,
                 max_L=1, max_ell=2, correlation=3, num_bessel=6, cutoff_p=5, radial_hidden=[8], readout_hidden=4),
    "bench": dict(name="mace", tp="cg", radial="mlp", dtype="float64", r_max=4.5, num_interactions=2, channels=8,
                  max_L=1, max_ell=2, correlation=3, num_bessel=8, cutoff_p=5, radial_hidden=[16, 16],
                  readout_hidden=8),  # the committee trained above (configs/model/mace.yaml + the overrides)
    "reference": dict(name="mace", tp="cg", radial="mlp", dtype="float64", **REFERENCE_HP),
}


def cost_structures() -> dict:
    """108-atom Cu–Au cell (periodic: energy, forces, stress) and the 27-atom 3BPA molecule (energy, forces)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.8, cubic=True).repeat((3, 3, 3))
    rng = np.random.default_rng(0)
    atoms.numbers[rng.permutation(len(atoms))[: len(atoms) // 2]] = 79
    atoms.rattle(0.05, seed=1)
    out = {"Cu-Au cell": atoms}
    mol = SHARED_DATA / "3BPA" / "train_300K.xyz"
    if mol.exists():
        import ase.io

        out["3BPA molecule"] = ase.io.read(mol, 0)
    else:
        print(f"skipping the 3BPA molecule: {mol} not found", flush=True)
    return out


def cost_only(args) -> list[dict]:
    import torch
    from ase.calculators.calculator import all_changes

    from potentials.calculator import PotentialCalculator
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import build_model, energy_forces_stress
    from potentials.uncertainty.committee import AUTO_TRIALS, Committee

    stats = dict(atomic_numbers=[1, 6, 7, 8, 29, 79], e0s={}, avg_num_neighbors=12.0, scale=1.0, shift=0.0)
    rows, n = [], args.members
    for arch in args.arch:
        members = []
        for seed in range(n):
            torch.manual_seed(seed)
            members.append(build_model(dict(ARCHS[arch]), stats).eval())
        plain = PotentialCalculator(members[0])
        comm = PotentialCalculator(members[0], estimator=Committee(members))
        for name, atoms in cost_structures().items():
            periodic = bool(atoms.pbc.any())
            props = ["energy", "forces", "stress"] if periodic else ["energy", "forces"]

            def graph():
                g = atoms_to_graph(atoms, members[0].r_max, where="bench")
                g["batch"] = torch.zeros(len(atoms), dtype=torch.long)
                return g

            g = graph()
            by = {k: Committee(members, strategy=k) for k in ("fused", "stored", "vmap")}

            def vmapped():
                with out_of_place_scatter():
                    return by["vmap"].evaluate(graph(), stress=periodic)

            fns = {"plain": lambda: plain.calculate(atoms, props, all_changes),
                   "plain_stored": lambda: energy_forces_stress(members[0], graph(), forces=True, stress=periodic),
                   f"committee_{n}": lambda: comm.calculate(atoms, props, all_changes),
                   f"committee_{n}_fused": lambda: by["fused"].evaluate(graph(), stress=periodic),
                   f"committee_{n}_stored": lambda: by["stored"].evaluate(graph(), stress=periodic),
                   f"committee_{n}_vmap": vmapped,
                   f"members_one_pass_fused_{n}": lambda: one_pass_fused(members, graph(), periodic)}
            comm.estimator.choice.clear()
            for _ in range(3 * AUTO_TRIALS):  # the committee's own choice of strategy, before the warm-up
                fns[f"committee_{n}"]()
            chosen = dict(comm.estimator.choice)
            for fn in fns.values():
                time_calls(fn, args.warmup, 0)
            times = {k: [] for k in fns}
            for _ in range(args.repeat):  # interleaved rounds, as in timings()
                for k, fn in fns.items():
                    times[k] += time_calls(fn, 0, 1)
            st = {k: timing_stats(v) for k, v in times.items()}
            for k, v in st.items():
                rows.append({"arch": arch, "structure": name, "n_atoms": len(atoms), "n_edges": int(g["edge_index"].shape[1]),
                             "variant": k, **v, "auto_choice": list(chosen.values()), "ratio_median": v["median_s"] / st["plain"]["median_s"],
                             "ratio_min": v["min_s"] / st["plain"]["min_s"]})
            print(f"{arch} {name}: " + ", ".join(f"{k} {1e3 * v['min_s']:.1f} ms" for k, v in st.items()), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench_uncertainty")
    ap.add_argument("--json", help="write the report here (and .md/.png beside it)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 3], help="cubic fcc repeats for the timings (32, 108 atoms)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--retrain", action="store_true", help="train the committee again even if OUT_DIR has it")
    ap.add_argument("--cost-only", action="store_true",
                    help="only time the committee options on random-weight members of each --arch (no data, no training)")
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["bench", "reference"],
                    help="architectures for --cost-only")
    args = ap.parse_args(argv)
    if args.warmup < 3 or args.repeat < 5:
        sys.exit("timings need --warmup ≥ 3 and --repeat ≥ 5")

    import torch

    torch.set_num_threads(args.threads)
    payload = {"command": command_line(), "machine": machine_info(args.threads), "members": args.members,
               "threads": args.threads, "warmup": args.warmup, "repeat": args.repeat}
    if args.cost_only:
        payload["arch"] = args.arch
        payload["timings"] = cost_only(args)
        payload["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        write_report(payload, args.json, cost_markdown(payload, ARCHS))
        return 0
    paths = make_data(args.out_dir / "data")
    ckpts, payload["training"] = train_committee(args, paths)
    print(f"trained {len(ckpts)} members in {payload['training']['wall_s']:.0f} s", flush=True)
    payload["llpr"] = fit_llpr_for(ckpts[0], paths)

    from potentials.calculator import model_from_checkpoint
    from potentials.uncertainty.committee import Committee
    from potentials.uncertainty.llpr import load_estimator

    committee = Committee.from_checkpoints(ckpts)
    payload["calibration"] = {"committee": calibration(committee, paths, committee.r_max)}
    for method in ("llpr", "llpr-jacobian"):
        est = load_estimator(ckpts[0], model_from_checkpoint(ckpts[0]), method)
        payload["calibration"][method] = calibration(est, paths, est.r_max)
    payload["timings"] = timings(ckpts, args)
    payload["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    png = None
    if args.json:
        png = Path(args.json).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(png) as tmp:
            plot(payload, tmp)
    write_report(payload, args.json, to_markdown(payload, png.name if png else None), also=[png] if png else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
