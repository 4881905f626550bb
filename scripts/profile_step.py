#!/usr/bin/env python
"""Profile and time one training step of a model config on 3BPA-sized batches (27 atoms, batch 5).

    taskset -c 1 python scripts/profile_step.py --model facet_s [--warmup 3] [--repeat 7] [--profile] [--json OUT]

One step = energy, forces by autograd with the graph kept, loss (1·E + 1000·F, the 3BPA recipe), backward,
Adam (amsgrad) step — as in training. Batches are collated before timing. Reports per-step process CPU time
(``time.process_time``) and wall time, median and minimum over ``--repeat`` steps after ``--warmup`` steps;
``--profile`` adds torch.profiler's operator table (self CPU time) of one further step. 1 torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facet_s", help="configs/model/<name>.yaml")
    p.add_argument("--set", nargs="*", default=[], help="model overrides key=value (YAML values)")
    p.add_argument("--data", default=str(bc.DEFAULT_3BPA))
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.warmup < 0 or args.repeat < 1 or args.batch_size < 1:
        p.error("--warmup ≥ 0, --repeat ≥ 1 and --batch-size ≥ 1 required")
    import torch
    import yaml

    from potentials.data.dataset import GraphDataset
    from potentials.data.graph import collate
    from potentials.data.stats import average_num_neighbors
    from potentials.train.module import PotentialModule

    torch.set_num_threads(1)
    cfg_path = bc.REPO / "configs" / "model" / f"{args.model}.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"model config {cfg_path} not found")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.pop("compile", None)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set {item}: no key {key!r} in {cfg_path.name}")
        cfg[key] = yaml.safe_load(value)
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"3BPA file {data} not found (pass --data PATH/train_300K.xyz)")
    ds = GraphDataset.from_files(data, float(cfg["r_max"]), stress_key=None).subset(list(range(4 * args.batch_size)))
    e0s = bc.read_3bpa_e0s(data)
    stats = bc.make_stats(sorted(e0s), average_num_neighbors(ds), e0s)
    torch.manual_seed(0)
    module = PotentialModule(cfg, stats, loss={"energy": 1.0, "forces": 1000.0, "stress": 0.0})
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=0.01, amsgrad=True)
    batches = [collate(ds.graphs[i:i + args.batch_size]) for i in range(0, len(ds.graphs), args.batch_size)]

    def step(graph):
        opt.zero_grad(set_to_none=True)
        loss = module.loss_fn(module(graph, training=True), graph)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    cpu, wall = [], []
    for i in range(args.repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        step(batches[(args.warmup + i) % len(batches)])
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    out = {"model": args.model, "overrides": args.set, "num_parameters": bc.num_parameters(module.model),
           "atoms_per_batch": int(batches[0]["numbers"].shape[0]), "warmup": args.warmup, "repeat": args.repeat,
           "cpu_ms_median": 1e3 * statistics.median(cpu), "cpu_ms_min": 1e3 * min(cpu),
           "wall_ms_median": 1e3 * statistics.median(wall), "wall_ms_min": 1e3 * min(wall),
           "cpu_ms": [1e3 * t for t in cpu]}
    print(json.dumps({k: v for k, v in out.items() if k != "cpu_ms"}))
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
            step(batches[0])
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50)
        print(table)
        out["profile_table"] = table
    if args.json:
        from potentials.io import atomic_path

        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
