#!/usr/bin/env python
"""Wall time and step count of the same relaxations with this project and with mace-torch.

    python scripts/bench_relax.py [--json OUT] [--quick] [--systems 3bpa,bulk,cuau] [--cell | --no-cell]
                                  [--optimizer FIRE] [--fmax 0.05] [--steps 300] [--dtype float64]
                                  [--ckpt [SYSTEM:][LABEL=]OURS.ckpt ...] [--peer-model [SYSTEM:]PEER.model ...]
                                  [--val SYSTEM:FILE ...] [--repeat N] [--threads N] [--no-peer]
                                  [--only mace/cg] [--hp channels=32 ...]
    python scripts/bench_relax.py --write-cuau-data DIR [--n-train 300 --n-val 50]   # the Cu–Au EMT split

Relaxations (identical starting structures on both sides, written once to extxyz):
* ``3bpa``: the first geometry of 3BPA ``train_300K.xyz`` (a 300 K MD snapshot), positions only;
* ``bulk``: fcc Cu (3×3×3 cubic cells, 108 atoms; 2×2×2 with ``--quick``), cell deformed by up to 3 %
  and positions rattled by 0.1 Å; with ``--cell`` (the default) the cell relaxes too (``FrechetCellFilter``);
* ``cuau``: a 32-atom fcc Cu–Au cell (2×2×2 cubic, Au fraction 0.5, Vegard lattice constant), strained by +2 %
  plus a random shear ≤ 3 % and rattled by 0.1 Å (:func:`potentials.data.demo.cuau_start_cell`, its own seed: not
  a training frame); the cell relaxes too with ``--cell``. Models for it are trained on the demo generator's
  Cu–Au EMT frames, written by ``--write-cuau-data DIR`` (``train.xyz``/``valid.xyz``, ``REF_*`` keys).

Models: by default untrained models of identical architecture (the reference hyper-parameters) from random
initialisation. Their energy landscapes differ and have no meaningful minimum, so by default both sides run
a fixed number of optimiser steps (``--fmax 0``): the wall times then compare directly. ``--ckpt`` (this
project's checkpoint) and ``--peer-model`` (a mace-torch ``.model`` file) use trained models instead, and
then the relaxation runs to ``--fmax`` (default 0.05 eV/Å) and the step counts mean something. A ``SYSTEM:``
prefix gives a model to one system only (``--ckpt cuau:runs/x.ckpt 3bpa:runs/y.ckpt``), ``LABEL=`` names its
row. ``--val SYSTEM:FILE`` recomputes each trained model's validation RMSEs (energy per atom, force components,
stress components of the 3×3 tensor) on FILE (extxyz, ``REF_*`` keys), with the same code on both sides, so that
"equal accuracy" is checked on the models actually relaxed. Each relaxation runs in its own process, ``--repeat``
times; the table gives the median wall and CPU time. ``--json OUT`` writes OUT and OUT with ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

SCRIPT = Path(__file__).resolve()


def worker(task: dict) -> dict:
    """This project's side of one relaxation (own process)."""
    import ase.io

    from potentials.calculator import PotentialCalculator, model_from_checkpoint

    rp.set_threads(task["threads"])
    if task.get("checkpoint"):
        model = model_from_checkpoint(task["checkpoint"], dtype=task["dtype"])
    else:
        stats = bc.make_stats(task["atomic_numbers"], task["avg_num_neighbors"], task.get("e0s"))
        model = bc.build_our_model(task["model_cfg"], stats, seed=task.get("seed", 0))
    if task.get("kind") == "eval":
        return bc.predict_frames(PotentialCalculator(model), task["val_file"])
    atoms = ase.io.read(task["structure"], index=-1)
    atoms.calc = PotentialCalculator(model)
    out = bc.timed_relaxation(atoms, task)
    out["model_name"] = str(getattr(model, "model_name", "")) or None
    return out


def split_spec(spec: str, systems) -> tuple[str | None, str | None, str]:
    """``[SYSTEM:][LABEL=]PATH`` → (system or None = every system, label or None, path)."""
    system = None
    head, sep, rest = spec.partition(":")
    if sep and head in systems:
        system, spec = head, rest
    label, sep, path = spec.partition("=")
    return (system, label, path) if sep else (system, None, spec)


def rmse_row(pred: dict, ref: dict) -> dict:
    """Validation RMSEs (meV/atom, meV/Å, meV/Å³) of one model's predictions against the reference frames."""
    import numpy as np

    out = {"val_frames": len(ref["energy"])}
    e = (np.array(pred["energy"]) - np.array(ref["energy"])) / np.array(ref["num_atoms"])
    out["val_energy_rmse"] = 1e3 * float(np.sqrt(np.mean(e**2)))
    f = np.concatenate([np.ravel(np.array(a) - np.array(b)) for a, b in zip(pred["forces"], ref["forces"])])
    out["val_forces_rmse"] = 1e3 * float(np.sqrt(np.mean(f**2)))
    if ref.get("stress") and pred.get("stress") and all(x is not None for x in ref["stress"]):
        sd = np.concatenate([np.ravel(np.array(a) - np.array(b)) for a, b in zip(pred["stress"], ref["stress"])])
        out["val_stress_rmse"] = 1e3 * float(np.sqrt(np.mean(sd**2)))
    return out


def prepare(args, tmp: Path) -> list[dict]:
    import ase.io
    import numpy as np

    from potentials.data.neighbors import atoms_to_graph

    r_max = float(args.hp_values["r_max"])
    out = []
    if "3bpa" in args.systems:
        path = Path(args.data_3bpa)
        if not path.is_file():
            out.append({"system": "3bpa", "skip": f"3BPA file {path} not found (pass --data-3bpa)"})
        else:
            atoms = ase.io.read(str(path), index=0)
            atoms.calc = None
            atoms.pbc = False
            f = tmp / "3bpa.extxyz"
            ase.io.write(str(f), atoms)
            e0s = bc.read_3bpa_e0s(path)
            zs = sorted(set(int(z) for z in atoms.numbers) | set(e0s))
            out.append({
                "system": "3bpa", "cell": False, "num_atoms": len(atoms), "structure": str(f), "atomic_numbers": zs,
                "e0s": {str(z): e0s.get(z, 0.0) for z in zs},
                "avg_num_neighbors": atoms_to_graph(atoms, r_max)["edge_index"].shape[1] / len(atoms),
            })
    if "bulk" in args.systems:
        n = 2 if args.quick else 3
        atoms = bc.cu_bulk(n, rattle=0.0)
        rng = np.random.default_rng(args.seed)
        deform = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
        deform = 0.5 * (deform + deform.T)
        atoms.set_cell(atoms.cell.array @ deform, scale_atoms=True)
        atoms.rattle(0.1, seed=args.seed + 1)
        f = tmp / "cu_perturbed.extxyz"
        ase.io.write(str(f), atoms)
        out.append({
            "system": f"Cu fcc {n}x{n}x{n} perturbed" + (" (+cell)" if args.cell else ""), "cell": bool(args.cell),
            "num_atoms": len(atoms), "structure": str(f), "atomic_numbers": [29], "e0s": {},
            "avg_num_neighbors": atoms_to_graph(atoms, r_max)["edge_index"].shape[1] / len(atoms),
        })
    if "cuau" in args.systems:
        from potentials.data.demo import cuau_start_cell

        atoms = cuau_start_cell(seed=args.seed + 12345)
        f = tmp / "cuau_perturbed.extxyz"
        ase.io.write(str(f), atoms)
        out.append({
            "system": "cuau", "label": "Cu16Au16 fcc perturbed" + (" (+cell)" if args.cell else ""),
            "cell": bool(args.cell), "num_atoms": len(atoms), "structure": str(f), "atomic_numbers": [29, 79], "e0s": {},
            "avg_num_neighbors": atoms_to_graph(atoms, r_max)["edge_index"].shape[1] / len(atoms),
        })
    return out


def model_name(ckpt: str) -> str | None:
    """Model kind (``facet``/``mace``) stored in one of this project's checkpoints."""
    from potentials.calculator import load_checkpoint

    try:
        return str(load_checkpoint(ckpt)["hyper_parameters"]["model_cfg"].get("name"))
    except Exception:  # a label is cosmetic: never fail the benchmark for it
        return None


def reference_frames(path: str) -> dict:
    """Reference energies/forces/stresses (``REF_*`` keys) of a validation file."""
    import ase.io
    import numpy as np

    ref = {"energy": [], "forces": [], "stress": [], "num_atoms": []}
    for a in ase.io.read(path, index=":"):
        ref["energy"].append(float(a.info["REF_energy"]))
        ref["forces"].append(np.asarray(a.arrays["REF_forces"]).tolist())
        st = a.info.get("REF_stress")
        if st is not None:
            st = np.asarray(st, dtype=float)
            st = bc.voigt_to_full(st) if st.shape == (6,) else st.reshape(3, 3)
            st = st.tolist()
        ref["stress"].append(st)
        ref["num_atoms"].append(len(a))
    return ref


def backends_for(args, system: str) -> list[dict]:
    """The rows of one system: mace-torch (untrained, or the ``--peer-model`` for this system), then ours."""
    out = []
    peers = [p for p in args.peer_model or [] if p[0] in (None, system)]
    if not args.no_peer:
        if peers:
            for _, label, path in peers:
                out.append({"label": label or f"mace-torch {Path(path).name}", "side": "peer", "model_path": path,
                            "model": "mace-torch"})
        elif not args.trained:
            out.append({"label": "mace-torch", "side": "peer", "model": "mace-torch"})
    ckpts = [c for c in args.ckpt or [] if c[0] in (None, system)]
    if args.trained:  # each checkpoint's own model (its config decides model and engine)
        for _, label, path in ckpts:
            name = model_name(path)
            out.append({"label": label or f"checkpoint {Path(path).parent.parent.name}/{Path(path).name}",
                        "side": "ours", "variant": None, "ckpt": path, "model": name})
    else:
        out += [{"label": v["label"], "side": "ours", "variant": v, "model": "mace"} for v in bc.our_variants(args.only)]
    return out


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def run(args) -> dict:
    rp.set_threads(args.threads)
    peer = bc.peer_info(args.threads) if not args.no_peer else {"error": "disabled with --no-peer"}
    payload = rp.base_payload("relax", args.threads, bc.hp_description(args.hp_values), peer)
    payload["settings"] = {
        "systems": args.systems, "cell": args.cell, "optimizer": args.optimizer, "fmax": args.fmax,
        "steps": args.steps, "dtype": args.dtype, "checkpoint": args.ckpt, "peer_model": args.peer_model,
        "models": "trained checkpoints" if args.trained else "untrained, identical architecture",
        "quick": args.quick, "repeat": args.repeat, "val": args.val,
    }
    payload["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    rows = payload["rows"]
    labels: list[str] = []
    for system in prepare(args, bc.temp_dir()):
        if "skip" in system:
            rows.append({"system": system["system"], "backend": "*", "side": "both", "status": "skipped", "reason": system["skip"]})
            continue
        task = {
            "threads": args.threads, "dtype": args.dtype, "structure": system["structure"], "cell": system["cell"],
            "atomic_numbers": system["atomic_numbers"], "e0s": system["e0s"], "avg_num_neighbors": system["avg_num_neighbors"],
            "optimizer": args.optimizer, "fmax": args.fmax, "steps": args.steps, "seed": args.seed,
        }
        val_file = args.val.get(system["system"])
        ref = reference_frames(val_file) if val_file else None
        for b in backends_for(args, system["system"]):
            labels.append(b["label"])
            row = {"system": system.get("label", system["system"]), "system_key": system["system"],
                   "num_atoms": system["num_atoms"], "backend": b["label"], "side": b["side"], "model": b.get("model"),
                   "dtype": args.dtype}
            rows.append(row)
            if b["side"] == "peer" and "error" in peer:
                row.update(status="skipped", reason=peer["error"])
                continue

            def call(t):
                if b["side"] == "peer":
                    t = {"kind": "relax", "hp": args.hp_values, **t}
                    if b.get("model_path"):
                        t["model_path"] = b["model_path"]
                    return bc.run_peer(t, timeout=args.timeout_s)
                cfg, dropped = bc.model_config(b["variant"], args.hp_values, args.dtype) if b["variant"] else (None, [])
                if dropped:
                    row["hp_not_taken"] = dropped
                return bc.run_self_worker(SCRIPT, {**t, "model_cfg": cfg, "checkpoint": b.get("ckpt")}, timeout=args.timeout_s)

            if ref is not None and (b.get("ckpt") or b.get("model_path")):
                pred = call({**task, "kind": "eval", "val_file": val_file})
                if "error" in pred:
                    row["val_error"] = pred["error"]
                else:
                    row.update(rmse_row(pred, ref))
            runs = []
            for _ in range(args.repeat):
                raw = call(task)
                if "error" in raw:
                    break
                runs.append(raw)
            if not runs:
                row.update(status="error", reason=raw["error"])
                continue
            last = runs[-1]
            wall, cpu = median([r["wall_s"] for r in runs]), median([r.get("cpu_s") for r in runs])
            row.update(
                status="ok", wall_s=wall, cpu_s=cpu, steps=last["steps"], calls=last["calls"], converged=last["converged"],
                wall_s_runs=[r["wall_s"] for r in runs], cpu_s_runs=[r.get("cpu_s") for r in runs],
                steps_runs=[r["steps"] for r in runs],
                ms_per_step=1e3 * wall / max(last["steps"], 1), ms_per_call=1e3 * wall / max(last["calls"], 1),
                cpu_ms_per_call=(1e3 * cpu / max(last["calls"], 1)) if cpu is not None else None,
                final_energy=last["final_energy"], final_fmax=last["final_fmax"], peak_rss_mb=last["peak_rss_mb"],
            )
            print(f"[{row['system']}] {b['label']}: median {wall:.2f} s wall / {cpu:.2f} s CPU over {len(runs)}, "
                  f"{row['steps']} steps, converged {row['converged']}"
                  + (f", val F RMSE {row['val_forces_rmse']:.1f} meV/Å" if "val_forces_rmse" in row else ""), flush=True)
    for key, side in (("peer", "peer"), ("mace", "ours")):  # speed-ups against mace-torch and against our MACE
        base = {}
        for r in rows:
            if r.get("status") == "ok" and r.get("side") == side and (side == "peer" or r.get("model") == "mace"):
                base.setdefault(r["system"], r)
        for r in rows:
            p = base.get(r["system"])
            if r.get("status") == "ok" and p and r is not p and r.get("side") == "ours":
                r[f"wall_speedup_vs_{key}"] = p["wall_s"] / r["wall_s"]
                r[f"per_call_speedup_vs_{key}"] = p["ms_per_call"] / r["ms_per_call"]
                if r.get("cpu_s") and p.get("cpu_s"):
                    r[f"cpu_speedup_vs_{key}"] = p["cpu_s"] / r["cpu_s"]
    payload["variants"] = list(dict.fromkeys(labels))
    payload["machine"]["load_average_end"] = rp.load_average()
    return payload


def to_markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        *rp.report_header("Relaxations: this project vs mace-torch", payload),
        (f"- {s['optimizer']}, fmax {s['fmax']} eV/Å, at most {s['steps']} steps" if s["fmax"] > 0 else
         f"- {s['optimizer']}, a fixed {s['steps']} steps (fmax 0: untrained models have no meaningful minimum, so "
         "both sides do the same number of optimiser steps and the wall times compare directly)")
        + f", {s['dtype']}; models: {s['models']}",
        "- wall time of `opt.run` only (model built, structure read before); ms/call = wall ÷ calculator calls; "
        "speed-ups = mace-torch ÷ this project (> 1 is faster). "
        + ("The two models' energy landscapes differ, so step counts may differ: the per-call speed-up is the "
           "like-for-like number, the wall speed-up what a user sees" if s["fmax"] > 0 else
           "Both sides take the same number of steps, so the wall and per-call speed-ups agree; the final fmax only "
           "shows where each untrained landscape led (no convergence is expected)"),
        f"- each relaxation {s.get('repeat', 1)}× in its own process; wall s and CPU s are medians (CPU s = process "
        "time of `opt.run`); the wall/CPU speed-ups divide mace-torch's (or our MACE's) median by the row's; val "
        "RMSEs recomputed from the relaxed model files on the validation frames (energy per atom, force components, "
        "stress components of the 3×3 tensor)",
        "",
        rp.markdown_table(
            ["system", "atoms", "backend", "val F meV/Å", "val E meV/at", "val S meV/Å³", "steps", "calls", "converged",
             "wall s", "CPU s", "ms/call", "CPU ms/call", "final fmax eV/Å", "wall ×mace-torch", "CPU ×mace-torch",
             "wall ×our MACE", "CPU ×our MACE", "status"],
            [[r["system"], r.get("num_atoms"), r["backend"], r.get("val_forces_rmse"), r.get("val_energy_rmse"),
              r.get("val_stress_rmse"), r.get("steps"), r.get("calls"), r.get("converged"), r.get("wall_s"), r.get("cpu_s"),
              r.get("ms_per_call"), r.get("cpu_ms_per_call"), r.get("final_fmax"),
              *[(f"{r[k]:.2f}×" if k in r else "–") for k in
                ("wall_speedup_vs_peer", "cpu_speedup_vs_peer", "wall_speedup_vs_mace", "cpu_speedup_vs_mace")],
              r["status"] + (f": {r['reason']}" if r.get("reason") else "")] for r in payload["rows"]],
        ),
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report as JSON here (and Markdown beside it)")
    p.add_argument("--quick", action="store_true", help="32-atom cell, fewer steps")
    p.add_argument("--systems", default="3bpa,bulk", help="comma-separated: 3bpa, bulk, cuau")
    p.add_argument("--cell", action=argparse.BooleanOptionalAction, default=True,
                   help="relax the periodic cell too (FrechetCellFilter); default on")
    p.add_argument("--optimizer", default="FIRE", choices=["FIRE", "BFGS", "LBFGS"])
    p.add_argument("--fmax", type=float, default=None,
                   help="force threshold (eV/Å); default 0.05 with trained models, 0 (= exactly --steps steps) untrained")
    p.add_argument("--steps", type=int, default=None,
                   help="at most this many steps (default: trained 300, untrained 100; --quick 30 / 10)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--ckpt", nargs="+", default=None,
                   help="[SYSTEM:][LABEL=]PATH: this project's checkpoint(s) (instead of untrained models); one row each")
    p.add_argument("--peer-model", nargs="+", default=None,
                   help="[SYSTEM:][LABEL=]PATH: mace-torch .model file(s) (instead of an untrained model)")
    p.add_argument("--val", nargs="+", default=[], help="SYSTEM:FILE: recompute the trained models' validation RMSEs")
    p.add_argument("--repeat", type=int, default=1, help="relax each structure this many times (median reported)")
    p.add_argument("--write-cuau-data", metavar="DIR", default=None,
                   help="write the Cu–Au EMT train/valid split (demo generator) to DIR and exit")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--threads", type=int, default=rp.available_cores())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated variant labels of this project to run")
    p.add_argument("--hp", nargs="*", default=[], help="KEY=VALUE overrides of the reference hyper-parameters (both sides)")
    p.add_argument("--data-3bpa", default=str(bc.DEFAULT_3BPA))
    p.add_argument("--timeout-s", type=float, default=1800.0, help="kill one relaxation's process after this")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.systems = [s for s in args.systems.split(",") if s]
    known = ("3bpa", "bulk", "cuau")
    bad = [s for s in args.systems if s not in known]
    if bad:
        p.error(f"unknown system(s) {bad}; available: {list(known)}")
    args.ckpt = [split_spec(c, known) for c in args.ckpt] if args.ckpt else None
    args.peer_model = [split_spec(c, known) for c in args.peer_model] if args.peer_model else None
    val = {}
    for v in args.val:
        system, _, path = split_spec(v, known)
        if system is None:
            p.error(f"--val {v!r}: expected SYSTEM:FILE with SYSTEM one of {list(known)}")
        val[system] = path
    args.val = val
    trained = args.trained = bool(args.ckpt or args.peer_model)
    if args.fmax is None:
        args.fmax = 0.05 if trained else 0.0
    if args.steps is None:
        args.steps = (30 if args.quick else 300) if trained else (10 if args.quick else 100)
    args.only = args.only.split(",") if args.only else None
    args.hp_values = bc.hyperparameters(bc.parse_hp_overrides(args.hp))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return bc.worker_main(worker)
    if args.write_cuau_data:
        from potentials.data.demo import write_demo_split

        print(write_demo_split(args.write_cuau_data, args.n_train, args.n_val, seed=args.seed))
        return 0
    payload = run(args)
    rp.write_report(payload, args.json, to_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
