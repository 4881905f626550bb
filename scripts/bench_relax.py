#!/usr/bin/env python
"""Wall time and step count of the same relaxations with this project and with mace-torch.

    python scripts/bench_relax.py [--json OUT] [--quick] [--systems 3bpa,bulk] [--cell | --no-cell]
                                  [--optimizer FIRE] [--fmax 0.05] [--steps 300] [--dtype float64]
                                  [--ckpt OURS.ckpt ...] [--peer-model PEER.model] [--threads N] [--no-peer]
                                  [--only mace/cg] [--hp channels=32 ...]

Relaxations (identical starting structures on both sides, written once to extxyz):
* ``3bpa``: the first geometry of 3BPA ``train_300K.xyz`` (a 300 K MD snapshot), positions only;
* ``bulk``: fcc Cu (3×3×3 cubic cells, 108 atoms; 2×2×2 with ``--quick``), cell deformed by up to 3 %
  and positions rattled by 0.1 Å; with ``--cell`` (the default) the cell relaxes too (``FrechetCellFilter``).

Models: by default untrained models of identical architecture (the reference hyper-parameters) from random
initialisation. Their energy landscapes differ and have no meaningful minimum, so by default both sides run
a fixed number of optimiser steps (``--fmax 0``): the wall times then compare directly. ``--ckpt`` (this
project's checkpoint) and ``--peer-model`` (a mace-torch ``.model`` file) use trained models instead, and
then the relaxation runs to ``--fmax`` (default 0.05 eV/Å) and the step counts mean something. Each relaxation runs in its own process. ``--json OUT`` writes OUT and OUT with ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

SCRIPT = Path(__file__).resolve()


def worker(task: dict) -> dict:
    """This project's side of one relaxation (own process)."""
    import ase.io

    from potentials.calculator import PotentialCalculator, model_from_checkpoint

    bc.set_threads(task["threads"])
    if task.get("checkpoint"):
        model = model_from_checkpoint(task["checkpoint"], dtype=task["dtype"])
    else:
        stats = bc.make_stats(task["atomic_numbers"], task["avg_num_neighbors"], task.get("e0s"))
        model = bc.build_our_model(task["model_cfg"], stats, seed=task.get("seed", 0))
    atoms = ase.io.read(task["structure"], index=-1)
    atoms.calc = PotentialCalculator(model)
    return bc.timed_relaxation(atoms, task)


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
    return out


def run(args) -> dict:
    bc.set_threads(args.threads)
    peer = bc.peer_info(args.threads) if not args.no_peer else {"error": "disabled with --no-peer"}
    payload = bc.base_payload("relax", args.threads, bc.hp_description(args.hp_values), peer)
    payload["settings"] = {
        "systems": args.systems, "cell": args.cell, "optimizer": args.optimizer, "fmax": args.fmax,
        "steps": args.steps, "dtype": args.dtype, "checkpoint": args.ckpt, "peer_model": args.peer_model,
        "models": "trained checkpoints" if (args.ckpt or args.peer_model) else "untrained, identical architecture",
        "quick": args.quick,
    }
    backends = [] if args.no_peer else [{"label": "mace-torch", "side": "peer"}]
    if args.ckpt:  # each checkpoint's own model (its config decides model and engine)
        for ckpt in args.ckpt:
            label = f"checkpoint {Path(ckpt).parent.parent.name}/{Path(ckpt).name}" if len(args.ckpt) > 1 else \
                f"checkpoint {Path(ckpt).name}"
            backends.append({"label": label, "side": "ours", "variant": None, "ckpt": ckpt})
    else:
        backends += [{"label": v["label"], "side": "ours", "variant": v} for v in bc.our_variants(args.only)]
    payload["variants"] = [b["label"] for b in backends]
    rows = payload["rows"]
    for system in prepare(args, bc.temp_dir()):
        if "skip" in system:
            rows.append({"system": system["system"], "backend": "*", "side": "both", "status": "skipped", "reason": system["skip"]})
            continue
        task = {
            "threads": args.threads, "dtype": args.dtype, "structure": system["structure"], "cell": system["cell"],
            "atomic_numbers": system["atomic_numbers"], "e0s": system["e0s"], "avg_num_neighbors": system["avg_num_neighbors"],
            "optimizer": args.optimizer, "fmax": args.fmax, "steps": args.steps, "seed": args.seed,
        }
        for b in backends:
            row = {"system": system["system"], "num_atoms": system["num_atoms"], "backend": b["label"], "side": b["side"],
                   "dtype": args.dtype}
            rows.append(row)
            if b["side"] == "peer":
                if "error" in peer:
                    row.update(status="skipped", reason=peer["error"])
                    continue
                t = {"kind": "relax", "hp": args.hp_values, **task}
                if args.peer_model:
                    t["model_path"] = args.peer_model
                raw = bc.run_peer(t, timeout=args.timeout_s)
            else:
                cfg, dropped = bc.model_config(b["variant"], args.hp_values, args.dtype) if b["variant"] else (None, [])
                raw = bc.run_self_worker(SCRIPT, {**task, "model_cfg": cfg, "checkpoint": b.get("ckpt")}, timeout=args.timeout_s)
                if dropped:
                    row["hp_not_taken"] = dropped
            if "error" in raw:
                row.update(status="error", reason=raw["error"])
                continue
            row.update(
                status="ok", wall_s=raw["wall_s"], cpu_s=raw.get("cpu_s"), steps=raw["steps"], calls=raw["calls"], converged=raw["converged"],
                ms_per_step=1e3 * raw["wall_s"] / max(raw["steps"], 1), ms_per_call=1e3 * raw["wall_s"] / max(raw["calls"], 1),
                final_energy=raw["final_energy"], final_fmax=raw["final_fmax"], peak_rss_mb=raw["peak_rss_mb"],
            )
            print(f"[{system['system']}] {b['label']}: {row['wall_s']:.1f} s, {row['steps']} steps, "
                  f"converged {row['converged']}", flush=True)
    peer_rows = {r["system"]: r for r in rows if r.get("side") == "peer" and r.get("status") == "ok"}
    for r in rows:
        p = peer_rows.get(r["system"])
        if r.get("side") == "ours" and r.get("status") == "ok" and p:
            r["wall_speedup_vs_peer"] = p["wall_s"] / r["wall_s"]
            r["per_call_speedup_vs_peer"] = p["ms_per_call"] / r["ms_per_call"]
    payload["machine"]["load_average_end"] = bc.load_average()
    return payload


def to_markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        *bc.report_header("Relaxations: this project vs mace-torch", payload),
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
        "",
        bc.markdown_table(
            ["system", "atoms", "backend", "wall s", "CPU s", "steps", "calls", "converged", "ms/call", "final fmax eV/Å",
             "wall speed-up", "per-call speed-up", "status"],
            [[r["system"], r.get("num_atoms"), r["backend"], r.get("wall_s"), r.get("cpu_s"), r.get("steps"), r.get("calls"),
              r.get("converged"), r.get("ms_per_call"), r.get("final_fmax"),
              (f"{r['wall_speedup_vs_peer']:.2f}×" if "wall_speedup_vs_peer" in r else "–"),
              (f"{r['per_call_speedup_vs_peer']:.2f}×" if "per_call_speedup_vs_peer" in r else "–"),
              r["status"] + (f": {r['reason']}" if r.get("reason") else "")] for r in payload["rows"]],
        ),
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report as JSON here (and Markdown beside it)")
    p.add_argument("--quick", action="store_true", help="32-atom cell, fewer steps")
    p.add_argument("--systems", default="3bpa,bulk", help="3bpa and/or bulk")
    p.add_argument("--cell", action=argparse.BooleanOptionalAction, default=True,
                   help="relax the periodic cell too (FrechetCellFilter); default on")
    p.add_argument("--optimizer", default="FIRE", choices=["FIRE", "BFGS", "LBFGS"])
    p.add_argument("--fmax", type=float, default=None,
                   help="force threshold (eV/Å); default 0.05 with trained models, 0 (= exactly --steps steps) untrained")
    p.add_argument("--steps", type=int, default=None,
                   help="at most this many steps (default: trained 300, untrained 100; --quick 30 / 10)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--ckpt", nargs="+", default=None,
                   help="this project's checkpoint(s) (instead of untrained models); several: one row each")
    p.add_argument("--peer-model", default=None, help="mace-torch .model file (instead of an untrained model)")
    p.add_argument("--threads", type=int, default=bc.available_cores())
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
    trained = bool(args.ckpt or args.peer_model)
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
    payload = run(args)
    bc.write_report(payload, args.json, to_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
