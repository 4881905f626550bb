#!/usr/bin/env python
"""Training throughput of every model/back end of this project against mace-torch, in one run.

    python scripts/bench_train.py [--json OUT] [--quick] [--dtypes float32,float64] [--datasets 3bpa,demo]
                                  [--steps N] [--warmup N] [--modes eager,compile] [--batch-size 5] [--threads N] [--no-peer]
                                  [--only mace/cg,facet] [--hp channels=32 ...]

One training step = forward (energy), forces (and stress on periodic data) by autograd with the graph kept,
weighted loss, backward, Adam (amsgrad, lr 0.01) step. Batches are collated before timing on both sides
(data loading is not timed); no EMA, no gradient clipping, no logging on either side. Reported per row:
structures/s and atoms/s (all timed steps ÷ their total time), ms/step (median and min), and the ratio of this
project's structures/s to mace-torch's at the same dataset, dtype and hyper-parameters.

Datasets: ``3bpa`` — the first structures of ``train_300K.xyz`` (27-atom molecule, energy + forces;
skipped with a reason when the file is absent); ``demo`` — the project's periodic Cu–Au EMT demo cells
(8–32 atoms, energy + forces + stress), generated on first use into ``data/demo/``.

Variants: MACE with every registered tensor-product engine (``auto`` excluded), Facet and the spline radial
when registered; mace-torch (``ScaleShiftMACE``) runs in ``peer-venv/`` as a subprocess
(``scripts/peer_mace.py``). ``--json OUT`` writes OUT (JSON) and OUT with ``.md`` (Markdown table).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

# Issue 15's training-throughput targets (ratio of structures/s vs mace-torch, same dtype and hyper-parameters),
# keyed by the row labels of bench_common.our_variants() (tests/test_benchmarks.py checks every key is one); they
# apply to every execution mode of a back end (``+compile`` rows too). Compiled ÷ eager of the same back end:
TARGETS = {"mace/cg": 2.0, "mace/gaunt_fft": 3.0, "mace/gaunt_grid": 3.0, "facet": 4.0}
TARGET_COMPILED_VS_EAGER = 1.5
LOSS = {"energy": 1.0, "forces": 10.0, "stress": 100.0}


def target_for(label: str) -> float | None:
    return TARGETS.get(label.split("+")[0])


def load_dataset(name: str, args) -> dict:
    """Graphs (float64, cutoff r_max) of the benchmark dataset, the indices used, and its statistics."""
    from potentials.data.dataset import GraphDataset
    from potentials.data.stats import average_num_neighbors, elements_in

    r_max = float(args.hp_values["r_max"])
    if name == "3bpa":
        path = Path(args.data_3bpa)
        if not path.is_file():
            return {"skip": f"3BPA file {path} not found (put train_300K.xyz there or pass --data-3bpa)"}
        ds = GraphDataset.from_files(path, r_max, stress_key=None)
        e0s = bc.read_3bpa_e0s(path)
        stress = False
    elif name == "demo":
        from potentials.data.demo import ensure_demo_data

        path = ensure_demo_data(args.demo_path, n_structures=args.demo_structures)
        ds = GraphDataset.from_files(path, r_max)
        e0s = {}
        stress = True
    else:
        raise SystemExit(f"unknown dataset {name!r}; known: 3bpa, demo")
    n = min(len(ds), args.n_structures)
    indices = list(range(n))
    ds = ds.subset(indices)
    zs = elements_in(ds)
    if name == "3bpa":
        zs = sorted(set(zs) | set(e0s))
    return {
        "path": str(path), "graphs": ds.graphs, "indices": indices, "stress": stress,
        "atomic_numbers": zs, "e0s": {z: e0s.get(z, 0.0) for z in zs},
        "avg_num_neighbors": average_num_neighbors(ds), "num_atoms_mean": sum(len(g["numbers"]) for g in ds) / n,
    }


def batches_of(graphs, batch_size: int):
    from potentials.data.graph import collate

    out = [collate(graphs[i:i + batch_size]) for i in range(0, len(graphs) - batch_size + 1, batch_size)]
    if not out:
        raise SystemExit(f"fewer structures ({len(graphs)}) than one batch ({batch_size}): raise --n-structures")
    return out


def time_ours(variant: dict, dtype: str, data: dict, args, profile: bool = False) -> dict:
    import torch

    from potentials.train.module import PotentialModule

    cfg, dropped = bc.model_config(variant, args.hp_values, dtype)
    if variant.get("mode") == "compile":
        cfg["compile"] = True  # model.compile=true: the traced + compiled energy/forces/stress graph
    elif variant.get("mode") == "export":
        raise ValueError("an exported package is for inference only (no training)")
    stats = bc.make_stats(data["atomic_numbers"], data["avg_num_neighbors"], data["e0s"])
    torch.manual_seed(args.seed)
    module = PotentialModule(cfg, stats, loss={**LOSS, "stress": LOSS["stress"] if data["stress"] else 0.0})
    module.to(args.device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01, amsgrad=True)
    batches = [b.to(args.device) for b in batches_of(data["graphs"], args.batch_size)]

    def step(graph):
        optimizer.zero_grad(set_to_none=True)
        pred = module(graph, training=True)
        loss = module.loss_fn(pred, graph)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # .item(): waits for the device

    t0, first_step_s = time.perf_counter(), None
    for i in range(args.warmup):
        step(batches[i % len(batches)])
        if i == 0:
            first_step_s = time.perf_counter() - t0  # compile mode: tracing + compiling included
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(batches[0])
        return {"profile_table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)}
    times, atoms, structures = [], [], []
    for i in range(args.steps):
        b = batches[(args.warmup + i) % len(batches)]
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
        atoms.append(int(b["numbers"].shape[0]))
        structures.append(b.num_graphs)
    return {
        "step_times_s": times, "atoms_per_step": atoms, "structures_per_step": structures,
        "num_parameters": bc.num_parameters(module.model), "hp_not_taken": dropped, "first_step_s": first_step_s,
        "parameters_by_module": bc.parameters_by_module(module.model),
    }


def time_peer(dtype: str, data: dict, args) -> dict:
    task = {
        "kind": "train", "hp": args.hp_values, "dtype": dtype, "data": data["path"], "indices": data["indices"],
        "batch_size": args.batch_size, "stress": data["stress"], "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "seed": args.seed, "atomic_numbers": data["atomic_numbers"],
        "e0s": {str(k): v for k, v in data["e0s"].items()}, "avg_num_neighbors": data["avg_num_neighbors"],
    }
    return bc.run_peer(task, timeout=args.peer_timeout)


def summarise(raw: dict) -> dict:
    """Throughput = structures (atoms) of all timed steps ÷ their total time: batches differ in size (demo
    cells have 8–32 atoms), and both sides time the very same batches in the same order."""
    st = rp.timing_stats(raw["step_times_s"])
    total = sum(raw["step_times_s"])
    return {
        "ms_per_step": 1e3 * st["median_s"], "ms_per_step_min": 1e3 * st["min_s"], "ms_per_step_mean": 1e3 * st["mean_s"],
        "steps_timed": st["n"], "timed_s": total,
        "structures_per_step": sum(raw["structures_per_step"]) / st["n"], "atoms_per_step": sum(raw["atoms_per_step"]) / st["n"],
        "structures_per_s": sum(raw["structures_per_step"]) / total, "atoms_per_s": sum(raw["atoms_per_step"]) / total,
        "num_parameters": raw.get("num_parameters"), "first_step_s": raw.get("first_step_s"),
        "parameters_by_module": raw.get("parameters_by_module"),
    }


def run(args) -> dict:
    rp.set_threads(args.threads)
    peer = bc.peer_info(args.threads) if not args.no_peer else {"error": "disabled with --no-peer"}
    hp_desc = bc.hp_description(args.hp_values, args.batch_size)
    payload = rp.base_payload("train", args.threads, hp_desc, peer)
    payload["settings"] = {
        "datasets": args.datasets, "dtypes": args.dtypes, "steps": args.steps, "warmup": args.warmup,
        "n_structures": args.n_structures, "batch_size": args.batch_size, "loss_weights": LOSS,
        "optimizer": "Adam(lr=0.01, amsgrad=True)", "quick": args.quick,
        "statistic": "throughput = structures (atoms) of the timed steps ÷ their total time; median and min step time also given",
    }
    variants = bc.with_modes(bc.our_variants(args.only), args.modes)
    payload["variants"] = [v["label"] for v in variants]
    rows = payload["rows"]
    for ds_name in args.datasets:
        data = load_dataset(ds_name, args)
        if "skip" in data:
            rows.append({"dataset": ds_name, "dtype": None, "backend": "*", "side": "both", "status": "skipped", "reason": data["skip"]})
            print(f"[{ds_name}] skipped: {data['skip']}", flush=True)
            continue
        for dtype in args.dtypes:
            common = {
                "dataset": ds_name, "dtype": dtype, "batch_size": args.batch_size,
                "avg_num_neighbors": data["avg_num_neighbors"], "stress_in_loss": data["stress"],
            }
            peer_row = {**common, "backend": "mace-torch", "side": "peer"}
            if args.no_peer or "error" in peer:
                peer_row.update(status="skipped", reason=peer.get("error", "disabled"))
            else:
                load0 = rp.load_average()
                raw = time_peer(dtype, data, args)
                if "error" in raw:
                    peer_row.update(status="error", reason=raw["error"])
                else:
                    peer_row.update(status="ok", **summarise(raw))
                peer_row["load_average"] = [load0, rp.load_average()]
            rows.append(peer_row)
            print(f"[{ds_name} {dtype}] mace-torch: {peer_row.get('structures_per_s', peer_row.get('reason'))}", flush=True)
            for variant in variants:
                row = {**common, "backend": variant["label"], "side": "ours", "model_cfg": dict(variant["cfg"])}
                load0 = rp.load_average()
                try:
                    raw = time_ours(variant, dtype, data, args)
                    row.update(status="ok", **summarise(raw))
                    if raw["hp_not_taken"]:
                        row["hp_not_taken"] = raw["hp_not_taken"]
                except Exception as exc:  # one broken back end must not stop the benchmark
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                row["load_average"] = [load0, rp.load_average()]
                if row["status"] == "ok" and peer_row.get("status") == "ok":
                    row["ratio_vs_peer"] = row["structures_per_s"] / peer_row["structures_per_s"]
                    target = target_for(variant["label"])
                    if target is not None:
                        row["target_ratio"] = target
                        row["target_met"] = row["ratio_vs_peer"] >= target
                        row["target_shortfall"] = None if row["target_met"] else target / row["ratio_vs_peer"]
                rows.append(row)
                print(f"[{ds_name} {dtype}] {variant['label']}: {row.get('structures_per_s', row.get('reason'))}", flush=True)
    for r in rows:  # compiled ÷ eager of the same back end, dataset and dtype
        if r.get("status") == "ok" and r["backend"].endswith("+compile"):
            base = next((e for e in rows if e.get("status") == "ok" and e["backend"] == r["backend"][: -len("+compile")]
                         and e["dataset"] == r["dataset"] and e["dtype"] == r["dtype"]), None)
            if base:
                r["speedup_vs_eager"] = r["structures_per_s"] / base["structures_per_s"]
                r["speedup_vs_eager_min"] = base["ms_per_step_min"] / r["ms_per_step_min"]
    if args.profile:
        payload["profiles"] = []
        for variant in [v for v in variants if v["label"] in args.profile]:
            for ds_name in args.datasets[:1]:
                data = load_dataset(ds_name, args)
                if "skip" in data:
                    continue
                dtype = args.dtypes[-1]
                try:
                    table = time_ours(variant, dtype, data, args, profile=True)["profile_table"]
                except Exception as exc:
                    table = f"profile failed: {type(exc).__name__}: {exc}"
                payload["profiles"].append({"backend": variant["label"], "dataset": ds_name, "dtype": dtype, "table": table})
    payload["machine"]["load_average_end"] = rp.load_average()
    return payload


def to_markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        *rp.report_header("Training throughput: this project vs mace-torch", payload),
        "- step: forward + forces (+ stress on periodic data) by autograd + weighted loss "
        f"(energy/atom {LOSS['energy']}, forces {LOSS['forces']}, stress {LOSS['stress']}) + backward + "
        f"{s['optimizer']}; batches pre-collated; {s['warmup']} warm-up step(s), {s['steps']} timed step(s) per row; "
        f"{s['n_structures']} structures per dataset cycled in batches of {s['batch_size']}",
        "- throughput = structures (atoms) of all timed steps ÷ their total time (the same batches, in the same order, "
        "on both sides); ratio = this project's structures/s ÷ mace-torch's (same dataset, dtype, hyper-parameters; "
        "> 1 is faster)",
        "",
        rp.markdown_table(
            ["dataset", "dtype", "backend", "structures/s", "atoms/s", "ms/step (median)", "ms/step (min)",
             "params", "ratio vs mace-torch", "target", "compiled ÷ eager (throughput / min step)", "first step s",
             "status"],
            [
                [
                    r["dataset"], r.get("dtype") or "–", r["backend"], r.get("structures_per_s"), r.get("atoms_per_s"),
                    r.get("ms_per_step"), r.get("ms_per_step_min"), r.get("num_parameters"),
                    (f"{r['ratio_vs_peer']:.2f}×" if "ratio_vs_peer" in r else "–"),
                    _target_cell(r),
                    (f"{r['speedup_vs_eager']:.2f}× / {r['speedup_vs_eager_min']:.2f}× "
                     f"({'met' if r['speedup_vs_eager'] >= TARGET_COMPILED_VS_EAGER else 'MISSED'} ≥{TARGET_COMPILED_VS_EAGER}×)"
                     if "speedup_vs_eager" in r else "–"),
                    r.get("first_step_s"),
                    r["status"] + (f": {r['reason']}" if r.get("reason") else ""),
                ]
                for r in payload["rows"]
            ],
        ),
    ]
    notes = _notes(payload)
    if notes:
        lines += ["", *notes]
    for p in payload.get("profiles", []):
        lines += ["", f"## Profile: {p['backend']}, one training step, {p['dataset']}, {p['dtype']} "
                  "(top operators by self CPU time)", "", "```", p["table"].rstrip(), "```"]
    return "\n".join(lines)


def _target_cell(r: dict) -> str:
    if "target_ratio" not in r:
        return "–"
    if r["target_met"]:
        return f"≥{r['target_ratio']:g}× met"
    return f"≥{r['target_ratio']:g}× MISSED (needs {r['target_shortfall']:.2f}× faster)"


def _notes(payload: dict) -> list[str]:
    notes = []
    for r in payload["rows"]:
        if r.get("hp_not_taken"):
            notes.append(f"- {r['backend']} does not take {r['hp_not_taken']} (built with its own defaults for those).")
    hp = payload["hyperparameters"]
    if not hp["is_reference"]:
        notes.append("- hyper-parameters were overridden: the ratios are not those of the issue's reference model.")
    labels = {r["backend"] for r in payload["rows"]}
    unmatched = sorted(k for k in TARGETS if k not in labels)
    if unmatched:
        notes.append(f"- no row for the target(s) of {unmatched} in this run (not selected or not available).")
    for r in payload["rows"]:  # computed from the two models of this run, at its hyper-parameters and data
        if r["backend"] != "mace/cg" or r.get("status") != "ok":
            continue
        peer = next((q for q in payload["rows"] if q["side"] == "peer" and q["dataset"] == r["dataset"]
                     and q.get("dtype") == r.get("dtype") and q.get("status") == "ok"), None)
        sentence = bc.parameter_comparison(r.get("parameters_by_module"), (peer or {}).get("parameters_by_module"))
        if sentence:
            notes.append(f"- mace/cg vs mace-torch on {r['dataset']} at this run's hyper-parameters: {sentence}")
            break
    return sorted(set(notes), key=notes.index)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report as JSON here (and Markdown beside it)")
    p.add_argument("--quick", action="store_true", help="few steps, one dtype (float64): a fast look")
    p.add_argument("--dtypes", default=None, help="comma-separated (default float32,float64; --quick: float64)")
    p.add_argument("--datasets", default="3bpa,demo")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 1)")
    p.add_argument("--device", default="cpu", help="this project's rows only (mace-torch runs on the CPU)")
    p.add_argument("--modes", default="eager", help="comma-separated: eager, compile (model.compile=true)")
    p.add_argument("--batch-size", type=int, default=bc.REFERENCE_BATCH_SIZE)
    p.add_argument("--n-structures", type=int, default=None, help="structures per dataset (default 50; --quick 20)")
    p.add_argument("--threads", type=int, default=rp.available_cores())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="skip mace-torch")
    p.add_argument("--only", default=None, help="comma-separated variant labels of this project to run")
    p.add_argument("--hp", nargs="*", default=[], help="KEY=VALUE overrides of the reference hyper-parameters (both sides)")
    p.add_argument("--data-3bpa", default=str(bc.DEFAULT_3BPA))
    p.add_argument("--demo-path", default=str(bc.DEFAULT_DEMO))
    p.add_argument("--demo-structures", type=int, default=300, help="size of the demo set if it must be generated")
    p.add_argument("--peer-timeout", type=float, default=1800.0)
    p.add_argument("--profile", default=None, help="comma-separated back ends: add a torch.profiler table of one "
                   "training step (first dataset, last dtype)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtypes = (args.dtypes or ("float64" if args.quick else "float32,float64")).split(",")
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.modes = [m for m in args.modes.split(",") if m]
    args.n_structures = args.n_structures if args.n_structures is not None else (20 if args.quick else 50)
    args.only = args.only.split(",") if args.only else None
    args.profile = args.profile.split(",") if args.profile else []
    args.hp_values = bc.hyperparameters(bc.parse_hp_overrides(args.hp))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    rp.write_report(payload, args.json, to_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
