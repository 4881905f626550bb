#!/usr/bin/env python
"""Inference cost of the ASE calculator (what MD and relaxations pay per step), this project vs mace-torch.

    python scripts/bench_md.py [--json OUT] [--quick] [--sizes 108,500,2048,4000,10976] [--dtypes float32]
                               [--repeat 5] [--warmup 3] [--modes eager,compile,export] [--threads N] [--no-peer] [--only mace/cg]
                               [--budget-s 3000] [--profile 2048] [--hp channels=32 ...]

One call = ``calc.calculate(atoms, [energy, forces(, stress)], all_changes)``: neighbour list, graph,
energy and its derivatives — the cost of one MD step at new positions. Systems: the 27-atom 3BPA
molecule (first frame of ``train_300K.xyz``; skipped when absent) and rattled periodic fcc Cu cells of
~100 to ~10,000 atoms (4 n³ atoms). Stress is computed for periodic cells (mace-torch's calculator also
computes it for the molecule; it always does). Each (back end, system) runs in a fresh process, so the peak
resident memory (``ru_maxrss``) is that cell's alone; ``working`` memory is that peak minus the resident
memory just before the first call (model built, structure read).

Guards (a shared 2-core machine): before each size the time and memory of the next size are extrapolated
from the two previous ones of the same back end; a size predicted to need more than ``--mem-fraction`` of
the available memory or more than ``--cell-budget-s`` is skipped with the reason, and so is everything
after ``--budget-s`` seconds. Every timed row gets the same protocol (``--warmup`` untimed calls, then
``--repeat`` timed calls: 3 and 5 by default); a size that would not fit the cell budget with it is skipped,
never timed with fewer calls. ``--modes eager,compile,graph,export`` adds this project's compiled calculator
(``graph``: always one compiled graph, no memory-lean switch) and its AOTInductor export as extra rows (first-call and export times reported). Per back end the fitted exponent of time per call vs atoms (log-log, periodic
cells) is reported, and a log-log plot is written beside the JSON (``.png``).

``--profile N`` adds a ``torch.profiler`` table of the top operators of one call on the periodic cell nearest
to N atoms, for the back ends in ``--profile-backends`` (default ``mace/cg``; the issue asks for it where a
target is missed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

SCRIPT = Path(__file__).resolve()
# Issue 15's inference targets (float32, reference model size): ratios in one run, plus the absolute ones.
TARGET_EXPONENT = 1.05
TARGET_MS_PER_ATOM_2048 = 0.5
TARGET_PEAK_MB_2048 = 700.0
TARGET_SPEEDUP_2048 = 5.0   # vs mace-torch, fcc Cu 2,048 atoms
TARGET_SPEEDUP_3BPA = 3.0   # vs mace-torch, the 27-atom molecule


# ---------------------------------------------------------------------------------------------- worker
def worker(task: dict) -> dict:
    """This project's side of one cell (runs in its own process)."""
    import ase.io
    from ase.calculators.calculator import all_changes

    from potentials.calculator import PotentialCalculator

    rp.set_threads(task["threads"])
    cfg = task["model_cfg"]
    stats = bc.make_stats(task["atomic_numbers"], task["avg_num_neighbors"], task.get("e0s"))
    model = bc.build_our_model(cfg, stats, seed=task.get("seed", 0))
    atoms = ase.io.read(task["structure"], index=-1)
    atoms.calc = None
    mode = task.get("mode", "eager")
    device = task.get("device", "cpu")
    export_s = None
    if mode == "export":  # AOTInductor package of this model, then run through it alone
        from potentials.models.export import export_model

        import hashlib
        import json as _json

        # one package per model (config, elements, seed, device), reused by every size of the same system kind
        key = _json.dumps([cfg, task["atomic_numbers"], task.get("e0s"), task.get("seed", 0), device], sort_keys=True)
        cache = Path(tempfile.gettempdir()) / "potentials-bench-exports"
        cache.mkdir(exist_ok=True)
        path = cache / f"export-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt2"
        if not path.is_file():
            t0 = time.perf_counter()
            export_model(model, path, device=device)
            export_s = time.perf_counter() - t0
        calc = PotentialCalculator.from_exported(path, device=device)
    else:
        # graph: the one compiled graph at every size (no switch to the memory-lean path above LEAN_EDGES edges)
        calc = PotentialCalculator(model, device=device, compile=mode in ("compile", "graph"),
                                   lean_edges=10**12 if mode == "graph" else None)
    props = ["energy", "forces"] + (["stress"] if atoms.pbc.any() else [])
    rss_before = rp.rss_mb()

    def call():
        calc.calculate(atoms, props, all_changes)  # results are copied to numpy: the device is synchronised

    t0 = time.perf_counter()
    call()  # first call: includes tracing and compiling in compile mode
    first_call_s = time.perf_counter() - t0
    times = rp.time_calls(call, max(task.get("warmup", 3) - 1, 0), task.get("repeat", 5))
    out = {
        "call_times_s": times, "num_atoms": len(atoms), "energy": float(calc.results["energy"]),
        "rss_before_mb": rss_before, "peak_rss_mb": rp.peak_rss_mb(), "num_parameters": bc.num_parameters(model),
        "first_call_s": first_call_s, "export_s": export_s,
    }
    if task.get("profile"):
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        out["profile_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    return out


# ----------------------------------------------------------------------------------------------- driver
def prepare_systems(args, tmp: Path) -> list[dict]:
    """Structures written to extxyz files (both sides read the very same file)."""
    import ase.io

    from potentials.data.neighbors import atoms_to_graph

    r_max = float(args.hp_values["r_max"])
    systems = []
    path3 = Path(args.data_3bpa)
    if "3bpa" in args.systems:
        if path3.is_file():
            atoms = ase.io.read(str(path3), index=0)
            atoms.calc = None
            atoms.pbc = False
            f = tmp / "3bpa.extxyz"
            ase.io.write(str(f), atoms)
            g = atoms_to_graph(atoms, r_max)
            e0s = bc.read_3bpa_e0s(path3)
            zs = sorted(set(int(z) for z in atoms.numbers) | set(e0s))
            systems.append({
                "system": "3bpa", "periodic": False, "num_atoms": len(atoms), "structure": str(f),
                "atomic_numbers": zs, "e0s": {str(z): e0s.get(z, 0.0) for z in zs},
                "avg_num_neighbors": g["edge_index"].shape[1] / len(atoms),
            })
        else:
            systems.append({"system": "3bpa", "skip": f"3BPA file {path3} not found (pass --data-3bpa)"})
    if "cu" in args.systems:
        small = bc.cu_bulk(2)
        cu_neighbours = atoms_to_graph(small, r_max)["edge_index"].shape[1] / len(small)
        for n in bc.cells_for_sizes(args.sizes):
            atoms = bc.cu_bulk(n)
            f = tmp / f"cu_{len(atoms)}.extxyz"
            ase.io.write(str(f), atoms)
            systems.append({
                "system": f"Cu fcc {n}x{n}x{n}", "periodic": True, "num_atoms": len(atoms), "structure": str(f),
                "atomic_numbers": [29], "e0s": {}, "avg_num_neighbors": cu_neighbours,
            })
    return systems


def run_cell(backend: dict, system: dict, dtype: str, args, repeat: int, warmup: int, profile: bool = False) -> dict:
    common = {
        "threads": args.threads, "dtype": dtype, "structure": system["structure"],
        "atomic_numbers": system["atomic_numbers"], "e0s": system["e0s"],
        "avg_num_neighbors": system["avg_num_neighbors"], "warmup": warmup, "repeat": repeat, "seed": args.seed,
    }
    if backend["side"] == "peer":
        return bc.run_peer({"kind": "calc", "hp": args.hp_values, **common}, timeout=args.cell_timeout_s)
    cfg, dropped = bc.model_config(backend["variant"], args.hp_values, dtype)
    task = {"model_cfg": cfg, "profile": profile, "mode": backend["variant"].get("mode", "eager"), "device": args.device,
            **common}
    out = bc.run_self_worker(SCRIPT, task, timeout=args.cell_timeout_s)
    if dropped:
        out["hp_not_taken"] = dropped
    return out


def run(args) -> dict:
    rp.set_threads(args.threads)
    peer = bc.peer_info(args.threads) if not args.no_peer else {"error": "disabled with --no-peer"}
    hp_desc = bc.hp_description(args.hp_values)
    payload = rp.base_payload("md", args.threads, hp_desc, peer)
    payload["settings"] = {
        "sizes_requested": args.sizes, "dtypes": args.dtypes, "repeat": args.repeat, "warmup": args.warmup,
        "systems": args.systems, "budget_s": args.budget_s, "cell_budget_s": args.cell_budget_s,
        "mem_fraction": args.mem_fraction, "modes": args.modes, "quick": args.quick, "statistic": "median call time (min also given)",
    }
    backends = []
    if not args.no_peer:
        backends.append({"label": "mace-torch", "side": "peer"})
    for v in bc.with_modes(bc.our_variants(args.only), args.modes):
        if v["mode"] == "export" and args.export_only and v["label"].rsplit("+", 1)[0] not in args.export_only:
            continue
        backends.append({"label": v["label"], "side": "ours", "variant": v})
    payload["variants"] = [b["label"] for b in backends]
    tmp = bc.temp_dir()
    systems = prepare_systems(args, tmp)
    rows = payload["rows"]
    t_start = time.perf_counter()
    # (backend, dtype) → [(atoms, s per call, working MB, resident MB before the first call)]
    history: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    stopped: dict[tuple[str, str], str] = {}
    for system in systems:
        if "skip" in system:
            rows.append({"system": system["system"], "backend": "*", "side": "both", "status": "skipped", "reason": system["skip"]})
            continue
        for dtype in args.dtypes:
            # one timing protocol for every size and back end: --warmup untimed, then --repeat timed calls
            for backend in backends:
                key = (backend["label"], dtype)
                row = {
                    "system": system["system"], "periodic": system["periodic"], "num_atoms": system["num_atoms"],
                    "dtype": dtype, "backend": backend["label"], "side": backend["side"],
                    "avg_num_neighbors": system["avg_num_neighbors"],
                }
                rows.append(row)
                if backend["side"] == "peer" and "error" in peer:
                    row.update(status="skipped", reason=peer["error"])
                    continue
                if key in stopped and system["periodic"]:
                    row.update(status="skipped", reason=stopped[key])
                    continue
                elapsed = time.perf_counter() - t_start
                if elapsed > args.budget_s:
                    row.update(status="skipped", reason=f"time budget --budget-s {args.budget_s:.0f} s spent")
                    continue
                repeat, warmup = args.repeat, args.warmup
                hist = history.get(key, []) if system["periodic"] else []
                if len(hist) >= 2:
                    ns = [h[0] for h in hist]
                    t_pred = rp.extrapolate(ns, [h[1] for h in hist], system["num_atoms"])
                    w_pred = rp.extrapolate(ns, [max(h[2], 1.0) for h in hist], system["num_atoms"])
                    m_pred = None if w_pred is None else hist[-1][3] + w_pred
                    avail = rp.mem_available_mb()
                    if m_pred is not None and m_pred > args.mem_fraction * avail:
                        reason = (f"predicted peak memory {m_pred:,.0f} MB > {args.mem_fraction:g} × available "
                                  f"{avail:,.0f} MB (extrapolated from {ns[-2]} and {ns[-1]} atoms)")
                        row.update(status="skipped", reason=reason, predicted_peak_rss_mb=m_pred)
                        stopped[key] = f"larger than a skipped size ({reason})"
                        continue
                    if t_pred is not None:
                        row["predicted_s_per_call"] = t_pred
                        if t_pred * (repeat + warmup) > args.cell_budget_s:
                            reason = (f"predicted {t_pred:,.0f} s per call × {repeat + warmup} calls > cell budget "
                                      f"{args.cell_budget_s:.0f} s (extrapolated from {ns[-2]} and {ns[-1]} atoms)")
                            row.update(status="skipped", reason=reason)
                            stopped[key] = f"larger than a skipped size ({reason})"
                            continue
                load0 = rp.load_average()
                raw = run_cell(backend, system, dtype, args, repeat, warmup)
                row["load_average"] = [load0, rp.load_average()]
                if "error" in raw:
                    row.update(status="error", reason=raw["error"])
                    if system["periodic"]:
                        stopped[key] = f"a smaller size failed: {raw['error']}"
                    continue
                st = rp.timing_stats(raw["call_times_s"])
                n = raw["num_atoms"]
                row.update(
                    status="ok", calls_timed=st["n"], ms_per_call=1e3 * st["median_s"], ms_per_call_min=1e3 * st["min_s"],
                    us_per_atom=1e6 * st["median_s"] / n, ms_per_atom=1e3 * st["median_s"] / n,
                    peak_rss_mb=raw["peak_rss_mb"], rss_before_mb=raw["rss_before_mb"],
                    working_mb=max(raw["peak_rss_mb"] - raw["rss_before_mb"], 0.0),
                    num_parameters=raw.get("num_parameters"), first_call_s=raw.get("first_call_s"),
                    export_s=raw.get("export_s"),
                )
                if raw.get("hp_not_taken"):
                    row["hp_not_taken"] = raw["hp_not_taken"]
                if system["periodic"]:
                    history.setdefault(key, []).append((n, st["median_s"], row["working_mb"], raw["rss_before_mb"]))
                print(f"[{system['system']} {n} atoms {dtype}] {backend['label']}: {row['ms_per_call']:.1f} ms/call, "
                      f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    # ratios vs the peer at the same system and dtype
    peer_rows = {(r["system"], r["dtype"]): r for r in rows if r.get("side") == "peer" and r.get("status") == "ok"}
    for r in rows:
        p = peer_rows.get((r.get("system"), r.get("dtype")))
        if r.get("side") == "ours" and r.get("status") == "ok" and p:
            r["speedup_vs_peer"] = p["ms_per_call"] / r["ms_per_call"]
            r["speedup_vs_peer_min"] = p["ms_per_call_min"] / r["ms_per_call_min"]
            r["memory_ratio_vs_peer"] = r["peak_rss_mb"] / p["peak_rss_mb"]
    for r in rows:  # compiled / exported ÷ eager of the same back end, system and dtype
        if r.get("status") == "ok" and "+" in r["backend"] and r["backend"].split("+")[-1] in ("compile", "graph", "export"):
            base = next((e for e in rows if e.get("status") == "ok" and e["backend"] == r["backend"].rsplit("+", 1)[0]
                         and e["system"] == r["system"] and e["dtype"] == r["dtype"]), None)
            if base:
                r["speedup_vs_eager"] = base["ms_per_call"] / r["ms_per_call"]
    payload["scaling"] = scaling(rows, backends, args.dtypes)
    payload["targets"] = targets(rows, payload["scaling"], backends)
    if args.profile:
        payload["profiles"] = profiles(args, systems, backends)
    payload["machine"]["load_average_end"] = rp.load_average()
    return payload


def scaling(rows: list[dict], backends: list[dict], dtypes: list[str]) -> list[dict]:
    out = []
    for b in backends:
        for dtype in dtypes:
            pts = [r for r in rows if r["backend"] == b["label"] and r.get("dtype") == dtype and r.get("periodic")
                   and r.get("status") == "ok"]
            pts.sort(key=lambda r: r["num_atoms"])
            fit_t = rp.fit_loglog([r["num_atoms"] for r in pts], [r["ms_per_call"] for r in pts])
            fit_m = rp.fit_loglog([r["num_atoms"] for r in pts], [r["working_mb"] for r in pts])
            out.append({
                "backend": b["label"], "dtype": dtype, "sizes": [r["num_atoms"] for r in pts],
                "time_exponent": fit_t["exponent"] if fit_t else None,
                "working_memory_exponent": fit_m["exponent"] if fit_m else None,
            })
    return out


def targets(rows: list[dict], scal: list[dict], backends: list[dict]) -> list[dict]:
    """Issue 15's inference targets (float32) for each back end: met, or missed by how much."""
    out = []
    for b in backends:
        t = {"backend": b["label"], "dtype": "float32"}
        s = next((s for s in scal if s["backend"] == b["label"] and s["dtype"] == "float32"), None)
        if s and s["time_exponent"] is not None:
            e = s["time_exponent"]
            t["exponent"] = {"value": e, "target": TARGET_EXPONENT, "met": e <= TARGET_EXPONENT,
                             "sizes": f"{min(s['sizes'])}–{max(s['sizes'])}"}
        r = next((r for r in rows if r["backend"] == b["label"] and r.get("dtype") == "float32"
                  and r.get("periodic") and r.get("num_atoms") == 2048 and r.get("status") == "ok"), None)
        if r:
            t["ms_per_atom_2048"] = {"value": r["ms_per_atom"], "target": TARGET_MS_PER_ATOM_2048,
                                     "met": r["ms_per_atom"] <= TARGET_MS_PER_ATOM_2048,
                                     "factor_over": r["ms_per_atom"] / TARGET_MS_PER_ATOM_2048}
            t["peak_mb_2048"] = {"value": r["peak_rss_mb"], "target": TARGET_PEAK_MB_2048,
                                 "met": r["peak_rss_mb"] <= TARGET_PEAK_MB_2048,
                                 "factor_over": r["peak_rss_mb"] / TARGET_PEAK_MB_2048}
            if "speedup_vs_peer" in r:
                t["speedup_2048"] = {"value": r["speedup_vs_peer"], "target": TARGET_SPEEDUP_2048,
                                     "met": r["speedup_vs_peer"] >= TARGET_SPEEDUP_2048}
        m = next((r for r in rows if r["backend"] == b["label"] and r.get("dtype") == "float32"
                  and r.get("system") == "3bpa" and r.get("status") == "ok" and "speedup_vs_peer" in r), None)
        if m:
            t["speedup_3bpa"] = {"value": m["speedup_vs_peer"], "target": TARGET_SPEEDUP_3BPA,
                                 "met": m["speedup_vs_peer"] >= TARGET_SPEEDUP_3BPA}
        out.append(t)
    return out


def profiles(args, systems: list[dict], backends: list[dict]) -> list[dict]:
    sys_ = min((s for s in systems if s.get("periodic")), key=lambda s: abs(s["num_atoms"] - args.profile), default=None)
    if sys_ is None:
        return []
    out = []
    for b in backends:
        if b["side"] != "ours" or (args.profile_backends and b["label"] not in args.profile_backends):
            continue
        raw = run_cell(b, sys_, args.dtypes[0], args, repeat=0, warmup=1, profile=True)
        out.append({"backend": b["label"], "num_atoms": sys_["num_atoms"], "dtype": args.dtypes[0],
                    "table": raw.get("profile_table"), "error": raw.get("error")})
    return out


def plot(payload: dict, png: Path) -> None:
    fig, axes = rp.new_figure(3, (15, 4.5))
    for b in payload["variants"]:
        for dtype in payload["settings"]["dtypes"]:
            pts = sorted((r for r in payload["rows"] if r["backend"] == b and r.get("dtype") == dtype
                          and r.get("periodic") and r.get("status") == "ok"), key=lambda r: r["num_atoms"])
            if not pts:
                continue
            ns = [r["num_atoms"] for r in pts]
            s = next((s for s in payload["scaling"] if s["backend"] == b and s["dtype"] == dtype), {})
            exp = s.get("time_exponent")
            label = f"{b} {dtype}" + (f" (N^{exp:.2f})" if exp is not None else "")
            style = "--" if b == "mace-torch" else "-"
            axes[0].loglog(ns, [r["ms_per_call"] for r in pts], style, marker="o", label=label)
            axes[1].semilogx(ns, [r["ms_per_atom"] for r in pts], style, marker="o", label=f"{b} {dtype}")
            axes[2].loglog(ns, [r["peak_rss_mb"] for r in pts], style, marker="o", label=f"{b} {dtype}")
    all_n = [r["num_atoms"] for r in payload["rows"] if r.get("periodic") and r.get("status") == "ok"]
    if all_n:
        axes[1].axhline(TARGET_MS_PER_ATOM_2048, color="grey", lw=0.8, ls=":", label="target 0.5 ms/atom (float32)")
        axes[2].axhline(TARGET_PEAK_MB_2048, color="grey", lw=0.8, ls=":", label="target 1 GB at 2,048 atoms")
    axes[0].set(xlabel="atoms", ylabel="ms per call (energy+forces+stress)", title="time per calculator call")
    axes[1].set(xlabel="atoms", ylabel="ms per atom", title="cost per atom (flat = linear scaling)")
    axes[2].set(xlabel="atoms", ylabel="peak RSS of the process (MB)", title="peak memory")
    m = payload["machine"]
    rp.save_figure(fig, axes, png, f"ASE calculator on fcc Cu: {m['cpu_model']}, torch threads: {m['torch_threads']}, "
                   f"load average at start {m.get('load_average_start', ['?'])[0]} (shared machine), {m['date'][:10]} UTC",
                   fontsize=10)


def to_markdown(payload: dict, png_name: str | None) -> str:
    s = payload["settings"]
    lines = [
        *rp.report_header("Inference (ASE calculator): this project vs mace-torch", payload),
        "- one call = neighbour list + graph + energy + forces (+ stress for periodic cells only, on both sides); "
        f"{s['warmup']} warm-up call(s) and {s['repeat']} timed call(s) per row on both sides at every size (a size "
        "predicted to exceed the cell budget is skipped, never timed with fewer calls); untrained models, random "
        "weights, same architecture on both sides",
        "- `+compile`: the calculator's compiled path (`PotentialCalculator(model, compile=True)`, inductor): one traced "
        "+ compiled graph up to `LEAN_EDGES` edges (potentials/calculator.py), above it the memory-lean chunk loops "
        "with compiled chunk kernels (potentials/models/compiled_chunks.py); `+graph`: the one compiled graph at "
        "every size; `+export`: the AOTInductor package (`scripts/export.py`, `from_exported`). first call = the first call of the "
        "row's process (tracing + compiling included; inductor's on-disk cache may shorten it for later rows); export = "
        "time to trace, export and compile the package",
        "- each row runs in a fresh process: peak = peak resident memory of that process (Python, torch and the "
        "model included); working = peak − resident memory just before the first call",
        "- speed-up = mace-torch ms/call ÷ this project's ms/call (same system and dtype; > 1 is faster)",
        "",
        rp.markdown_table(
            ["system", "atoms", "dtype", "backend", "ms/call (median)", "ms/call (min)", "µs/atom", "calls",
             "peak MB", "working MB", "vs mace-torch (medians)", "vs mace-torch (minima)", "÷ eager", "first call s",
             "export s", "status"],
            [
                [r["system"], r.get("num_atoms"), r.get("dtype") or "–", r["backend"], r.get("ms_per_call"),
                 r.get("ms_per_call_min"), r.get("us_per_atom"), r.get("calls_timed"), r.get("peak_rss_mb"),
                 r.get("working_mb"),
                 (f"{r['speedup_vs_peer']:.2f}×" if "speedup_vs_peer" in r else "–"),
                 (f"{r['speedup_vs_peer_min']:.2f}×" if "speedup_vs_peer_min" in r else "–"),
                 (f"{r['speedup_vs_eager']:.2f}×" if "speedup_vs_eager" in r else "–"),
                 r.get("first_call_s"), r.get("export_s"),
                 r["status"] + (f": {r['reason']}" if r.get("reason") else "")]
                for r in payload["rows"]
            ],
        ),
        "",
        "## Scaling (fit of ms/call ∝ atoms^k over the periodic cells)",
        "",
        rp.markdown_table(
            ["backend", "dtype", "sizes", "time exponent k", "working-memory exponent"],
            [[x["backend"], x["dtype"], ", ".join(str(n) for n in x["sizes"]) or "–", x["time_exponent"],
              x["working_memory_exponent"]] for x in payload["scaling"]],
        ),
        "",
        "## Targets of issue 15 (float32)",
        "",
        rp.markdown_table(
            ["backend", f"≥ {TARGET_SPEEDUP_2048:g}× mace-torch at 2,048", f"≥ {TARGET_SPEEDUP_3BPA:g}× on 3BPA",
             f"exponent ≤ {TARGET_EXPONENT}", f"≤ {TARGET_MS_PER_ATOM_2048} ms/atom at 2,048",
             f"peak ≤ {TARGET_PEAK_MB_2048:g} MB at 2,048"],
            [[t["backend"], _target(t.get("speedup_2048"), "{:.2f}×"), _target(t.get("speedup_3bpa"), "{:.2f}×"),
              _target(t.get("exponent"), "{:.2f}"), _target(t.get("ms_per_atom_2048"), "{:.2f} ms"),
              _target(t.get("peak_mb_2048"), "{:,.0f} MB")] for t in payload["targets"]],
        ),
    ]
    if png_name:
        lines += ["", f"![scaling]({png_name})"]
    for p in payload.get("profiles", []):
        lines += ["", f"## Profile: {p['backend']}, {p['num_atoms']} atoms, {p['dtype']} (one call, top operators by self CPU time)", ""]
        lines += ["```", (p.get("table") or f"profile failed: {p.get('error')}").rstrip(), "```"]
    return "\n".join(lines)


def _target(t: dict | None, f: str) -> str:
    if not t:
        return "not measured"
    v = f.format(t["value"])
    if t["met"]:
        return f"{v}: met"
    if "factor_over" in t:
        return f"{v}: MISSED ({t['factor_over']:.1f}× over)"
    return f"{v}: MISSED (target {t['target']})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report as JSON here (Markdown and PNG beside it)")
    p.add_argument("--quick", action="store_true", help="small cells only (108, 256, 500 atoms), fewer calls")
    p.add_argument("--sizes", default=None, help="comma-separated target atom counts (default 108,500,2048,4000,10976)")
    p.add_argument("--systems", default="3bpa,cu", help="3bpa and/or cu")
    p.add_argument("--dtypes", default="float32", help="comma-separated (float32 is the issue's target)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per row (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--device", default="cpu", help="this project's rows only (mace-torch runs on the CPU)")
    p.add_argument("--export-only", default=None, help="comma-separated back ends that get an export row (default: all)")
    p.add_argument("--modes", default="eager", help="comma-separated: eager, compile, graph, export (see bench_common.with_modes)")
    p.add_argument("--threads", type=int, default=rp.available_cores())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated variant labels of this project to run")
    p.add_argument("--hp", nargs="*", default=[], help="KEY=VALUE overrides of the reference hyper-parameters (both sides)")
    p.add_argument("--data-3bpa", default=str(bc.DEFAULT_3BPA))
    p.add_argument("--budget-s", type=float, default=3000.0, help="skip what is left after this many seconds")
    p.add_argument("--cell-budget-s", type=float, default=240.0, help="skip a size predicted to exceed this per row")
    p.add_argument("--cell-timeout-s", type=float, default=1200.0, help="kill a row's process after this")
    p.add_argument("--mem-fraction", type=float, default=0.6, help="skip a size predicted to exceed this × MemAvailable")
    p.add_argument("--profile", type=int, default=None, metavar="N_ATOMS", help="profile one call of ours at ~N atoms")
    p.add_argument("--profile-backends", default="mace/cg", help="comma-separated back ends to profile ('' = all of ours)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    default_sizes = "108,256,500" if args.quick else "108,500,2048,4000,10976"
    args.sizes = [int(s) for s in (args.sizes or default_sizes).split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.repeat < 5 or args.warmup < 3:
        print("note: fewer than 3 warm-up / 5 timed calls: not the committed protocol", file=sys.stderr)
    args.modes = [m for m in args.modes.split(",") if m]
    args.export_only = [b for b in args.export_only.split(",") if b] if args.export_only else None
    args.only = args.only.split(",") if args.only else None
    args.profile_backends = [b for b in args.profile_backends.split(",") if b]
    args.hp_values = bc.hyperparameters(bc.parse_hp_overrides(args.hp))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return bc.worker_main(worker)
    payload = run(args)
    rp.write_report_with_plot(payload, args.json, plot, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
