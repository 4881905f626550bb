#!/usr/bin/env python
"""Training precision benchmark: fp32 vs TF32 vs bf16-mixed vs fp16-mixed, for the CG and grid engines.

    python scripts/bench_precision.py [--json OUT.json] [--device cuda] [--steps 20] [--quick]

For each engine and precision: training steps/s (forward + forces/stress + backward + optimizer step) on the same
demo batch, and the force RMSE against the float64 model with the same weights (eV/Å), and the ratios to fp32.
TF32 and fp16-mixed need a CUDA GPU and are skipped (with the reason) elsewhere; bf16-mixed runs on the CPU too.
Autocast covers only the backbone (see ``potentials.nn.precision``). Goal on a GPU: bf16 ≥ 1.5× fp32 with
≤ 5 % force-error increase.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed")


def precision_context(name: str, device: str):
    import torch

    if name in ("fp32", "tf32"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if name == "bf16-mixed" else torch.float16
    return torch.autocast(device, dtype=dtype)


def run(args) -> dict:
    import torch

    from potentials.data.dataset import GraphDataset
    from potentials.data.demo import ensure_demo_data
    from potentials.data.graph import collate
    from potentials.models import build_model, energy_forces_stress

    rp.set_threads(args.threads)
    demo = ensure_demo_data(args.demo_path, n_structures=max(args.batch_size, 8) if args.quick else 300)
    ds = GraphDataset.from_files([demo], 4.5)
    batch = collate([ds[i] for i in range(args.batch_size)]).to(args.device)
    stats = bc.make_stats([29, 79], avg_num_neighbors=30.0)
    hp = dict(name="mace", r_max=4.5, channels=args.channels, max_L=1, max_ell=args.max_ell, correlation=3,
              radial_hidden=[32, 32])
    rows = []
    for engine in args.engines:
        torch.manual_seed(0)
        ref_model = build_model({**hp, "tp": engine, "dtype": "float64"}, stats).to(args.device)
        ref = energy_forces_stress(ref_model, batch, forces=True, stress=True)["forces"].detach()
        for prec in PRECISIONS:
            row = {"engine": engine, "precision": prec, "device": args.device}
            if prec in ("tf32", "fp16-mixed") and args.device != "cuda":
                row["skipped"] = f"{prec} needs a CUDA GPU"
                rows.append(row)
                continue
            model = build_model({**hp, "tp": engine, "dtype": "float32"}, stats).to(args.device)
            model.load_state_dict(ref_model.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler(args.device, enabled=prec == "fp16-mixed")
            if args.device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                torch.backends.cudnn.allow_tf32 = prec == "tf32"
            with precision_context(prec, args.device):
                forces = energy_forces_stress(model, batch, forces=True, stress=True)["forces"].detach()
            row["force_rmse_vs_f64"] = float((forces - ref).pow(2).mean().sqrt())

            def step():
                with precision_context(prec, args.device):
                    out = energy_forces_stress(model, batch, forces=True, stress=True, training=True)
                    loss = ((out["forces"] - batch["forces"]) ** 2).mean() + ((out["energy"] - batch["energy"]) ** 2).mean()
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if args.device == "cuda":
                    torch.cuda.synchronize()

            times = rp.time_calls(step, warmup=2, repeat=args.steps)
            row.update(rp.timing_stats(times))
            row["steps_per_s"] = 1.0 / row["median_s"]
            rows.append(row)
        base = {r["engine"]: r for r in rows if r["precision"] == "fp32" and "steps_per_s" in r}
        for r in rows:
            if "steps_per_s" in r and r["engine"] in base:
                r["speedup_vs_fp32"] = r["steps_per_s"] / base[r["engine"]]["steps_per_s"]
                r["force_err_ratio_vs_fp32"] = r["force_rmse_vs_f64"] / max(base[r["engine"]]["force_rmse_vs_f64"], 1e-30)
    return {"schema_version": rp.SCHEMA_VERSION, "benchmark": "precision", "machine": rp.machine_info(args.threads),
            "command": " ".join(sys.argv), "batch_structures": args.batch_size, "hyperparameters": hp, "rows": rows}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Training precision: fp32 vs TF32 vs bf16-mixed vs fp16-mixed", "",
        f"Command: `{payload['command']}`", "",
        f"Machine: {m['cpu_model']}, {m['cores_available']} cores, torch {m['torch']}, threads {m['torch_threads']}, "
        f"{m['date']}. Hyper-parameters: {payload['hyperparameters']}, batch of {payload['batch_structures']} demo "
        "structures. Force RMSE is against the float64 model with the same weights.", "",
    ]
    table = []
    for r in payload["rows"]:
        if "skipped" in r:
            table.append([r["engine"], r["precision"], "–", "–", "–", "–", r["skipped"]])
        else:
            table.append([r["engine"], r["precision"], rp.fmt(r["steps_per_s"]), rp.fmt(r.get("speedup_vs_fp32")),
                          rp.fmt(r["force_rmse_vs_f64"]), rp.fmt(r.get("force_err_ratio_vs_fp32")), ""])
    lines.append(rp.markdown_table(
        ["engine", "precision", "steps/s", "× fp32", "force RMSE vs f64 (eV/Å)", "error × fp32", "note"], table))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--engines", nargs="+", default=["cg", "gaunt_grid"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--max-ell", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--demo-path", default=str(bc.DEFAULT_DEMO), help="demo extxyz (generated if missing)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.channels, args.max_ell = 1, 2, 4, 1
    t0 = time.time()
    payload = run(args)
    payload["wall_s"] = time.time() - t0
    md = markdown(payload)
    print(md)
    rp.write_report(payload, args.json, md)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
