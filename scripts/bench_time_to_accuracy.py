#!/usr/bin/env python
"""Time to accuracy on 3BPA: CPU time each model needs to reach given validation force RMSEs (issue 13).

    python scripts/bench_time_to_accuracy.py --json docs/benchmarks/time_to_accuracy.json \\
        [--budget-min 25] [--targets 80,60,50] [--models facet_s,mace,mace_torch] [--cores 0,1]
    python scripts/bench_time_to_accuracy.py --smoke --json /tmp/tta.json     # tiny: 20/5 frames, 0.5 CPU-min

Each model is one ``scripts/train.py +experiment=<experiment>`` command pointed at the same seeded 450/50 split
of ``train_300K.xyz`` (written by :func:`bench_budget.write_split`): ``facet_s`` →
``3bpa_facet_s_cpu_budget`` (configs/model/facet_s.yaml), ``mace`` → ``3bpa_mace_cpu_budget`` (our MACE at the
issue-8 reference size = configs/model/mace_s.yaml). Both experiments share one recipe (loss 1/1000, AMSGrad
lr 0.01, batch 5, EMA 0.99, plateau 0.8/5, float64). ``mace_torch`` (the outside reference, at its usual size:
the issue-8 reference ScaleShiftMACE, 32x0e+32x1o) is exactly bench_accuracy.py's peer run
(:func:`bench_budget.peer_side`: ``peer-venv/bin/mace_run_train`` with the flags of the same
``3bpa_mace_cpu_budget`` recipe, same split files), its validations read from mace's log lines and stamped with
CPU time the same way, its parameter count from ``scripts/peer_mace.py``; included by default when ``peer-venv``
exists, a skipped row with the reason otherwise. The training processes run at the same time (``--sequential``:
one after the other) with ``--threads`` torch threads each, and are stopped at ``--budget-min`` CPU minutes
(:class:`bench_budget.Side`). Pinning: by default none (``--cores ''``): three single-thread processes on a
2-core machine are spread by the OS scheduler (~1.5× the budget in wall time); ``--cores 1`` pins every model
to core 1 (~3× the budget). The budget is *process CPU time* (user + system of the process tree), so sharing
cores changes wall time, not the result (up to cache contention, which hits every model alike). Every
validation (every epoch, EMA weights) is stamped with the CPU time it was written at (:mod:`potentials.train.budget`).

Reported per model: parameters, the validation energy/force RMSE curve against CPU minutes, the CPU minutes of
the first validation at or below each target force RMSE ("not reached" otherwise), and the final values.
For Facet, the relative rotation (and rotation-reflection) force-equivariance error of the trained model
(last checkpoint, float64, its configured grid) on validation frames is measured after the run.
Writes ``--json OUT``, OUT ``.md`` and OUT ``.png``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_budget as bb  # noqa: E402
import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

EXPERIMENTS = {"facet_s": "3bpa_facet_s_cpu_budget", "mace": "3bpa_mace_cpu_budget"}
PEER = "mace_torch"  # bench_accuracy.py's peer run: mace_run_train at the 3bpa_mace_cpu_budget recipe
MODELS = (*EXPERIMENTS, PEER)
EQUIVARIANCE_GRIDS = ("16,16", "18,18", "24,24", "32,32")  # the L=2 default, facet_s's, two finer
LABELS = {"facet_s": "Facet-S (this project, facet_s)", "mace": "MACE/cg (this project, mace_s size)",
          PEER: "mace-torch (outside reference, same size)"}


def train_command(name: str, split: dict, run_dir: Path, seed: int) -> list[str]:
    """``bench_budget.ours_command`` with the model's own experiment (same data overrides, same recipe keys)."""
    cmd = bb.ours_command(split, {"batch_size": 5, "val_batch_size": 10}, run_dir, seed)
    cmd[2] = f"+experiment={EXPERIMENTS[name]}"
    return [c.replace("run_name=bench_accuracy_ours", f"run_name=tta_{name}") for c in cmd]


def time_to_targets(curve: list[dict], targets: list[float]) -> dict[str, float | None]:
    """CPU minutes of the first validation (within the budget) with force RMSE ≤ each target (meV/Å)."""
    out = {}
    for t in targets:
        hit = next((e for e in curve if not e.get("after_stop") and not e.get("initial")
                    and e["forces_rmse_mev_A"] <= t), None)
        out[f"{t:g}"] = None if hit is None else round(hit["cpu_s"] / 60.0, 3)
    return out


def per_call_cpu_ms(ckpt: Path, valid: str, warmup: int = 3, repeat: int = 10) -> dict[str, Any]:
    """Energy + forces through the ASE calculator on the first validation frame: process CPU ms per call
    (median, min; a new geometry each call), float64, the checkpoint's own model — the per-call cost of a relaxation."""
    import statistics
    import time

    import ase.io

    from potentials.calculator import PotentialCalculator, model_from_checkpoint

    if not ckpt.is_file():
        return {"error": f"{ckpt} not found"}
    atoms = ase.io.read(valid, index=0)
    atoms.calc = PotentialCalculator(model_from_checkpoint(ckpt, dtype="float64"))
    times = []
    for i in range(warmup + repeat):
        atoms.positions[0, 0] += 1e-4
        c0 = time.process_time()
        atoms.get_forces()
        times.append(time.process_time() - c0)
    times = times[warmup:]
    return {"num_atoms": len(atoms), "cpu_ms_median": round(1e3 * statistics.median(times), 1),
            "cpu_ms_min": round(1e3 * min(times), 1), "repeat": repeat}


def equivariance_after_training(ckpt: Path, valid: str, n_frames: int = 3, grid_res: str | None = None) -> dict[str, Any]:
    """Relative force error max|F(Qx) − Q F(x)| / max|F(x)| of a trained checkpoint on validation frames (float64),
    at the checkpoint's grid or at ``grid_res`` ("β,α")."""
    import ase.io
    import numpy as np
    import torch

    from potentials.calculator import model_from_checkpoint
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import energy_forces_stress

    if not ckpt.is_file():
        return {"error": f"{ckpt} not found"}
    model = model_from_checkpoint(ckpt, dtype="float64", **({"grid_res": grid_res} if grid_res else {}))
    frames = ase.io.read(valid, index=f":{n_frames}")

    def forces(atoms):
        g = collate([atoms_to_graph(atoms, model.r_max)])
        return energy_forces_stress(model, g, forces=True, stress=False)["forces"].detach()

    errors = {"rotation": [], "rotation_reflection": []}
    for i, atoms in enumerate(frames):
        ref = forces(atoms)
        for key, sign in (("rotation", 1.0), ("rotation_reflection", -1.0)):
            q, _ = np.linalg.qr(np.random.default_rng(100 + i).normal(size=(3, 3)))
            q = sign * q * np.sign(np.linalg.det(q))
            moved = atoms.copy()
            moved.positions = atoms.positions @ q.T
            out = forces(moved)
            errors[key].append(float((out - ref @ torch.from_numpy(q).T).abs().max() / ref.abs().max()))
    grid = [list(m.res) for m in model.mixers] if hasattr(model, "mixers") else None
    return {"checkpoint": str(ckpt), "frames": len(frames), "grid": grid, **{k: max(v) for k, v in errors.items()},
            "per_frame": errors}


def post_measurements(payload: dict, work: Path, valid: str) -> None:
    """After training: Facet's equivariance error at its grid and finer/coarser ones, and each model's per-call cost."""
    rows = {r["side"]: r for r in payload["rows"]}
    if "facet_s" in rows:
        ckpt = work / "facet_s" / "checkpoints" / "last.ckpt"
        payload["facet_equivariance"] = equivariance_after_training(ckpt, valid)
        payload["facet_equivariance_by_grid"] = {
            res: equivariance_after_training(ckpt, valid, grid_res=res).get("rotation") for res in EQUIVARIANCE_GRIDS}
    for name, row in rows.items():
        if name in EXPERIMENTS:
            row["per_call"] = per_call_cpu_ms(work / name / "checkpoints" / "last.ckpt", valid)


def rmse_at(curve: list[dict], cpu_min: float) -> float | str:
    """Force RMSE of the last validation written at or before ``cpu_min`` CPU minutes ('–' if none yet)."""
    pts = [e for e in curve if not e.get("after_stop") and not e.get("initial") and e["cpu_s"] <= cpu_min * 60.0]
    return round(pts[-1]["forces_rmse_mev_A"], 1) if pts else "–"


def plot(payload: dict, png: Path) -> None:
    fig, axes = rp.new_figure(2, (11, 4.2))
    for r in payload["rows"]:
        pts = [e for e in r.get("curve", []) if not e.get("after_stop") and not e.get("initial")]
        if not pts:
            continue
        x = [e["cpu_s"] / 60 for e in pts]
        style = "--" if r["side"] == PEER else "-"
        axes[0].semilogy(x, [e["forces_rmse_mev_A"] for e in pts], style, marker=".", label=r["label"])
        axes[1].semilogy(x, [e["energy_rmse_mev_atom"] for e in pts], style, marker=".", label=r["label"])
    for t in payload["settings"]["targets"]:
        axes[0].axhline(t, color="grey", lw=0.7, ls=":")
    axes[0].set(xlabel="CPU minutes (user + system)", ylabel="validation force RMSE (meV/Å)", title="forces")
    axes[1].set(xlabel="CPU minutes (user + system)", ylabel="validation energy RMSE (meV/atom)", title="energy")
    st = payload["settings"]
    rp.save_figure(fig, axes, png, f"3BPA {st['n_train']}/{st['n_val']}, {st['budget_min']:g} CPU min per model, "
                   f"{st['threads']} thread(s), {payload['machine']['date'][:10]} UTC")


def to_markdown(payload: dict, png_name: str | None) -> str:
    st = payload["settings"]
    targets = [f"{t:g}" for t in st["targets"]]
    rows = []
    for r in payload["rows"]:
        tt = r.get("time_to_target_cpu_min", {})
        rows.append([r["label"], r.get("num_parameters"), r.get("epochs"), r.get("cpu_min"),
                     r.get("energy_rmse_mev_atom"), r.get("forces_rmse_mev_A"), r.get("best_forces_rmse_mev_A"),
                     *[("–" if r["status"] == "skipped" else "not reached" if tt.get(t) is None else tt[t])
                       for t in targets],
                     r["status"] + (f": {r['reason']}" if r.get("reason") else "")])
    lines = [
        "# 3BPA time to accuracy: Facet-S vs our MACE vs mace-torch (CPU time to reach a validation force RMSE)", "",
        f"Command: `{payload['command']}`", "", rp.machine_markdown(payload["machine"], payload["peer"]),
        "- models: " + "; ".join(f"{m} = `+experiment={e}`" for m, e in payload["hyperparameters"]["experiments"].items())
        + " (one recipe: loss 1·E + 1000·F, AMSGrad lr 0.01, batch 5, EMA 0.99, plateau 0.8/5, float64)"
        + ("; mace_torch = `mace_run_train` with the flags of the same `3bpa_mace_cpu_budget` recipe, built by "
           "bench_accuracy.py (its peer command, below), validations from its log lines, 'Initial' (untrained) "
           "validation excluded" if PEER in payload["hyperparameters"].get("peer_command", {}) else ""),
        f"- data: {Path(st['data']).name}, seeded split (seed {st['seed']}) {st['n_train']} train / {st['n_val']} validation",
        f"- budget: {st['budget_min']:g} CPU minutes per model (user + system of the training process tree, start-up, "
        f"data loading and every validation included); {st['threads']} torch thread(s); "
        + ("every model pinned to core(s) " + ",".join(map(str, st["cores"])) if st["cores"] else
           f"not pinned ({len(st.get('models', [])) or '?'} single-thread processes share the machine's "
           f"{payload['machine']['cores_available']} cores through the OS scheduler; CPU time, not wall time, is the "
           "budget, so sharing changes wall time, not the result)")
        + ("; models run at the same time" if not st["sequential"] else "; models run one after the other"),
        "",
        "## Result",
        "",
        rp.markdown_table(["model", "parameters", "epochs", "CPU min at result", "val E RMSE (meV/atom)",
                           "val F RMSE (meV/Å)", "best F"] + [f"CPU min to F ≤ {t}" for t in targets] + ["status"], rows),
    ]
    marks = [round(st["budget_min"] * k / 4, 2) for k in (1, 2, 3, 4)]
    lines += ["", "Validation force RMSE (meV/Å) at equal CPU time (last validation at or before the mark):", "",
              rp.markdown_table(["model"] + [f"{m:g} CPU min" for m in marks],
                                [[r["label"], *[rmse_at(r.get("curve", []), m) for m in marks]]
                                 for r in payload["rows"] if r.get("curve")])]
    if payload.get("parameter_comparison"):
        lines += ["", "MACE/cg vs mace-torch, " + payload["parameter_comparison"][0].lower() + payload["parameter_comparison"][1:]
                  + " mace-torch's counted on the same architecture built by `scripts/peer_mace.py`."]
    peer_cmd = payload["hyperparameters"].get("peer_command", {}).get(PEER)
    if peer_cmd:
        lines += ["", f"mace-torch command: `{' '.join(peer_cmd)}`"]
    eq = payload.get("facet_equivariance")
    if eq:
        lines += ["", "Facet-S rotation-equivariance after training (last checkpoint, float64, grid "
                  f"{eq.get('grid')}, {eq.get('frames')} validation frames, max relative force error): "
                  + (f"rotation {eq['rotation']:.2e}, rotation-reflection {eq['rotation_reflection']:.2e}"
                     if "rotation" in eq else eq.get("error", "?"))]
    by_grid = payload.get("facet_equivariance_by_grid")
    if by_grid:
        lines += ["", "Same checkpoint evaluated at other grids (grid_res override; rotation error, max over the frames): "
                  + ", ".join(f"{k.replace(',', '×')}: {v:.1e}" if v is not None else f"{k}: ?" for k, v in by_grid.items())]
    calls = [(r["label"], r["per_call"]) for r in payload["rows"] if "per_call" in r]
    if calls:
        lines += ["", "Per-call cost of the trained models (ASE calculator, energy + forces, first validation frame, "
                  "process CPU ms, median / min of 10 after 3 warm-up calls): "
                  + "; ".join(f"{lab}: {c['cpu_ms_median']} / {c['cpu_ms_min']}" if "error" not in c else f"{lab}: {c['error']}"
                              for lab, c in calls)]
    if png_name:
        lines += ["", f"![validation RMSE vs CPU minutes]({png_name})"]
    if payload.get("notes"):  # added to the JSON by hand after a run, rendered with --report-only
        lines += ["", "## Notes", "", *[f"- {n}" for n in payload["notes"]]]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", "--out", dest="json", help="report path (.json; .md and .png beside)")
    p.add_argument("--budget-min", type=float, default=None, help="CPU minutes per model (default 25; --smoke 0.5)")
    p.add_argument("--targets", default="80,60,50", help="force RMSE targets (meV/Å), comma-separated")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)} ({PEER} is "
                   "skipped with the reason when peer-venv is absent)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--data", default=str(bc.DEFAULT_3BPA), help="3BPA train_300K.xyz (iso_atoms.xyz beside it)")
    p.add_argument("--work-dir", default=str(bc.REPO / "runs" / "bench_time_to_accuracy"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cores", default="", help="cores every model is pinned to with taskset (default '': not pinned, "
                   "the OS spreads the models over the cores; e.g. '1' = all on core 1)")
    p.add_argument("--sequential", action="store_true", help="run the models one after the other")
    p.add_argument("--poll-s", type=float, default=None)
    p.add_argument("--grace-s", type=float, default=30.0)
    p.add_argument("--max-wall-min", type=float, default=None, help="stop a model after this wall time (default 6×budget+5)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--post-only", metavar="JSON", help="redo the after-training measurements (equivariance at "
                   "several grids, per-call CPU time) of an existing report from its work dir; no training")
    p.add_argument("--report-only", metavar="JSON", help="re-render the .md and .png of an existing report; no training")
    args = p.parse_args(argv)
    if args.report_only or args.post_only:
        return args
    args.budget_min = args.budget_min if args.budget_min is not None else (0.5 if args.smoke else 25.0)
    args.n_train = args.n_train if args.n_train is not None else (20 if args.smoke else 450)
    args.n_val = args.n_val if args.n_val is not None else (5 if args.smoke else 50)
    args.poll_s = args.poll_s if args.poll_s is not None else (1.0 if args.smoke else 2.0)
    args.budget_s = args.budget_min * 60.0
    args.max_wall_s = 60.0 * (args.max_wall_min if args.max_wall_min is not None else 6 * args.budget_min + 5)
    try:
        args.targets = sorted((float(t) for t in args.targets.split(",") if t.strip()), reverse=True)
        args.cores = [int(c) for c in args.cores.split(",") if c.strip()]
    except ValueError as exc:
        p.error(f"--targets / --cores must be comma-separated numbers: {exc}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; known {list(MODELS)}")
    if args.budget_min <= 0 or args.n_train <= 0 or args.n_val <= 0 or args.threads <= 0 or not args.targets:
        p.error("--budget-min, --n-train, --n-val, --threads must be positive and --targets non-empty")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.post_only:
        import json

        path = Path(args.post_only)
        if not path.is_file():
            raise SystemExit(f"--post-only: {path} not found")
        payload = json.loads(path.read_text())
        post_measurements(payload, Path(payload["settings"]["work_dir"]), str(Path(payload["settings"]["work_dir"]) / "valid.xyz"))
        rp.write_report_with_plot(payload, path.with_suffix(".json"), plot, to_markdown)
        return 0
    if args.report_only:
        import json

        path = Path(args.report_only)
        if not path.is_file():
            raise SystemExit(f"--report-only: {path} not found")
        rp.write_report_with_plot(json.loads(path.read_text()), path.with_suffix(".json"), plot, to_markdown)
        return 0
    work = Path(args.work_dir).resolve()
    split = bb.write_split(Path(args.data), work, args.n_train, args.n_val, args.seed)
    pin = bool(args.cores) and shutil.which("taskset") is not None
    cores = args.cores if pin else None
    peer_ok, peer_reason = bb.peer_train_status()
    want_peer = PEER in args.models and peer_ok
    r = bb.recipe()  # mace-torch's flags: the same recipe bench_accuracy.py gives it
    sides = []
    for name in args.models:
        out_dir = work / name
        if name == PEER:
            if want_peer:
                sides.append(bb.peer_side(name, split, r, out_dir, args.seed, args.threads, cores))
            continue
        sides.append(bb.Side(name, train_command(name, split, out_dir, args.seed), bb.ours_env(work, out_dir, args.threads),
                             out_dir, cores))
    hp = {"experiments": {m: EXPERIMENTS[m] for m in args.models if m in EXPERIMENTS},
          "peer_command": {s.name: s.cmd for s in sides if s.name == PEER}}
    payload = rp.base_payload("time_to_accuracy", args.threads, hp,
                              bc.peer_info(args.threads) if want_peer else {"error": peer_reason if peer_ok is False
                                                                            else f"{PEER} not in --models"})
    bb.run_sides(sides, args)
    rows, peer_modules = [], None
    for s in sides:
        if s.name == PEER:
            row, peer_modules = bb.peer_result(s, split, r, args, s.name)
        else:
            events, n = bb.ours_events(s)
            row = bb.summarise(s, events, n, args.budget_s, s.name)
        row["label"] = LABELS[s.name]
        row["time_to_target_cpu_min"] = time_to_targets(row.get("curve", []), args.targets)
        rows.append(row)
    if not want_peer:
        rows.append({"side": PEER, "label": LABELS[PEER], "status": "skipped",
                     "reason": peer_reason if PEER in args.models else f"not in --models ({','.join(args.models)})"})
    if peer_modules and "mace" in args.models:
        payload["parameter_comparison"] = bc.parameter_comparison(bb.our_parameters_by_module(split, r), peer_modules)
    payload["machine"]["load_average_end"] = rp.load_average()
    payload.update(rows=rows)
    post_measurements(payload, work, split["files"]["valid"])
    payload.update(commands={s.name: s.cmd for s in sides}, settings={
        "budget_min": args.budget_min, "targets": args.targets, "n_train": args.n_train, "n_val": args.n_val,
        "seed": args.seed, "threads": args.threads, "cores": args.cores if pin else [], "sequential": args.sequential,
        "models": args.models,
        "data": split["source"], "work_dir": str(work), "smoke": args.smoke})
    for r in rows:
        print(f"[{r['label']}] {r['status']}: F {r.get('forces_rmse_mev_A')} meV/Å at {r.get('cpu_min')} CPU min; "
              f"time to targets {r.get('time_to_target_cpu_min')}; params {r.get('num_parameters')}")
    if payload.get("facet_equivariance"):
        print(f"[facet equivariance after training] {payload['facet_equivariance']}")
    rp.write_report_with_plot(payload, Path(args.json).with_suffix(".json") if args.json else None, plot, to_markdown)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
