#!/usr/bin/env python
"""3BPA validation accuracy at an equal CPU-time budget: this project's MACE vs mace-torch (issue 8).

    python scripts/bench_accuracy.py --json docs/benchmarks/accuracy.json [--budget-min 25] [--no-peer]
    python scripts/bench_accuracy.py --smoke --json /tmp/acc.json          # ~1 minute: 20/5 frames, 0.5 CPU-min

1. A seeded ``--n-train``/``--n-val`` split (default 450/50) of ``train_300K.xyz`` is written to
   ``--work-dir`` (default ``runs/bench_accuracy/``) as ``train.xyz`` and ``valid.xyz`` (extxyz, keys
   ``REF_energy``/``REF_forces``); E0s come from ``iso_atoms.xyz`` beside it. Both sides read these files.
2. Each side is its own training command line, started as a subprocess: ours is ``scripts/train.py
   +experiment=3bpa_mace_cpu_budget`` pointed at the files; the peer is ``peer-venv/bin/mace_run_train`` with
   flags derived from that same experiment file (model size, loss weights, optimiser, scheduler, EMA, batch
   sizes, clipping, dtype). By default both run at once, each with ``--threads`` (1) torch/OpenMP threads and
   pinned to its own core(s) with ``taskset``; ``--sequential`` runs them one after the other.
3. The budget is CPU time (user + system over the process tree, from ``/proc``, sampled every ``--poll-s``),
   not wall time, so that other load on the machine does not favour either side. A side that reaches
   ``--budget-min`` CPU minutes is stopped (SIGTERM, SIGKILL after ``--grace-s``).
4. Every validation result is stamped with the side's CPU time at the moment it was written (interpolated
   between samples, from the wall-clock time of the record: mace-torch's log lines ``Epoch N: head: ...,
   RMSE_E_per_atom= X meV, RMSE_F= Y meV / A``; ours from :mod:`potentials.train.budget`, a Lightning callback
   loaded through Lightning's external-callback entry point). A side's result is its last validation within
   the budget; the whole curve is kept.

5. ``--stage-two`` (issue 14): MACE's second stage on both sides, switching at the same 0-based epoch
   ``--stage-two-epoch`` (default ``max_epochs//4*3``, mace-torch's rule) with ``--max-epochs`` (default 16) set on
   both sides (``trainer.max_epochs`` / ``--max_num_epochs``): ours through the ``stage_two`` config block
   (``stage_two.enabled=true stage_two.start_epoch=N`` + lr and loss weights), mace-torch through ``--swa
   --start_swa N --swa_lr --swa_energy_weight --swa_forces_weight``; lr and weights are the experiment's effective
   ``stage_two`` block (configs/train.yaml: 1e-3, E 1000, F 100 = mace-torch's defaults). Each validation is
   marked stage one/two from the side's own record. Output defaults to ``docs/benchmarks/accuracy_stage_two.json``
   (work dir ``runs/bench_accuracy_stage_two``) so the committed stage-one report stays::

       python scripts/bench_accuracy.py --stage-two --budget-min 25 --max-wall-min 70
       python scripts/bench_accuracy.py --smoke --stage-two --max-epochs 3 --stage-two-epoch 2 --budget-min 1 --json /tmp/acc2.json

Writes ``--json OUT`` (alias ``--out``; the suffix is replaced by ``.json``), OUT ``.md`` and OUT ``.png``
(validation RMSE vs CPU minutes). Without ``peer-venv/`` (or with ``--no-peer``) the peer row is skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_budget as bb  # noqa: E402
import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402

DEFAULT_WORK = str(bc.REPO / "runs" / "bench_accuracy")
# --stage-two defaults: the committed stage-one run (docs/benchmarks/accuracy.json, 25 CPU min, Intel Xeon) did 18
# epochs (ours) and 16 (mace-torch); with max 16 epochs stage two starts at 16//4*3 = 12 (mace-torch's own default
# rule), ~18 CPU min into mace-torch's run: well inside the budget on both sides, with 4 stage-two epochs
DEFAULT_MAX_EPOCHS = 16
TARGET_RATIO = 1.0  # issue 8: lower validation force RMSE than mace-torch at the same budget


# ------------------------------------------------------------------------------------------------ recipe
def recipe_rows(r: dict[str, Any], stage_two: dict[str, Any] | None = None, max_epochs: int | None = None) -> list[list[str]]:
    """(setting, this project, mace-torch) rows for the report: every setting and how each side gets it."""
    m, o, s = r["model"], r["optim"], r["scheduler"]
    same = [
        ("model", f"MACE (model.tp cg, radial mlp), experiment {bb.EXPERIMENT}", "ScaleShiftMACE, residual interactions, SiLU gate"),
        ("channels × max_L", f"{m['channels']}, L ≤ {m['max_L']}", f"--num_channels {m['channels']} --max_L {m['max_L']}"),
        ("max_ell / correlation / interactions", f"{m['max_ell']} / {m['correlation']} / {m['num_interactions']}",
         f"--max_ell {m['max_ell']} --correlation {m['correlation']} --num_interactions {m['num_interactions']}"),
        ("r_max, radial basis, cutoff p", f"{m['r_max']} Å, {m['num_bessel']} Bessel, p={m['cutoff_p']}",
         f"--r_max {m['r_max']} --num_radial_basis {m['num_bessel']} --num_cutoff_basis {m['cutoff_p']}"),
        ("radial MLP / readout MLP", f"{m['radial_hidden']} / {m['readout_hidden']}",
         f"--radial_MLP '{m['radial_hidden']}' --MLP_irreps {m['readout_hidden']}x0e"),
        ("dtype", r["dtype"], f"--default_dtype {r['dtype']}"),
        ("E0s", "iso_atoms.xyz (data.e0s)", "iso_atoms.xyz (--E0s)"),
        ("scale / shift", "force RMS / mean interaction energy per atom of the training set",
         "--scaling rms_forces_scaling (same statistics)"),
        ("avg. neighbours", "computed from the training set", "computed from the training set (default)"),
        ("loss", f"{r['loss']['energy']:g}·MSE(E/N) + {r['loss']['forces']:g}·MSE(F)",
         f"--loss weighted --energy_weight {r['loss']['energy']:g} --forces_weight {r['loss']['forces']:g} (same form)"),
        ("optimiser", f"{o['name']} amsgrad, lr {o['lr']:g}, weight decay {o['weight_decay']:g}",
         f"--optimizer {o['name']} --amsgrad --lr {o['lr']:g} --weight_decay {o['weight_decay']:g}"),
        ("scheduler", f"ReduceLROnPlateau(val_loss) factor {s['factor']:g}, patience {s['patience']}",
         f"--scheduler ReduceLROnPlateau --lr_factor {s['factor']:g} --scheduler_patience {s['patience']}"),
        ("batch size (train / valid)", f"{r['batch_size']} / {r['val_batch_size']}",
         f"--batch_size {r['batch_size']} --valid_batch_size {r['val_batch_size']}"),
        ("gradient clipping", f"norm {r['clip']:g}", f"--clip_grad {r['clip']:g}"),
        ("validation", "every epoch, EMA weights", "--eval_interval 1, EMA weights"),
    ]
    if max_epochs is not None:
        same.append(("max epochs", f"trainer.max_epochs={max_epochs}", f"--max_num_epochs {max_epochs}"))
    if stage_two:
        n, lr, loss = stage_two["start_epoch"], stage_two["lr"], stage_two["loss"]
        same += [
            ("stage two: switch", f"stage_two.start_epoch={n}: epochs 0..{n - 1} (0-based) stage one, epoch {n} on "
             "stage two", f"--swa --start_swa {n}: same epoch index (mace's 'Epoch N' log lines are 0-based too)"),
            ("stage two: loss", f"{loss['energy']:g}·MSE(E/N) + {loss['forces']:g}·MSE(F)",
             f"--swa_energy_weight {loss['energy']:g} --swa_forces_weight {loss['forces']:g}"),
            ("stage two: learning rate", f"{lr:g} from the first stage-two step; plateau scheduler no longer steps",
             f"--swa_lr {lr:g}: SWALR (anneal_epochs 1) sets it at the first stage-two epoch; plateau no longer steps"),
        ]
    diffs_two = [
        ("stage two: validated weights", "uniform average of the weights after every stage-two step (restarted at "
         "the switch; replaces the EMA)", "the EMA weights (decay 0.99, continuing across the switch): mace's "
         "AveragedModel (swa.model) is updated once per epoch but neither validated nor checkpointed while training"),
    ] if stage_two else []
    peer_ema = f"--ema --ema_decay {r['ema']['decay']:g}; torch_ema warm-up: min(decay, (1+n)/(10+n))"
    if r["ema"].get("warmup", True):  # configs/train.yaml default: MACE's warm-up
        same.append(("EMA", f"decay {r['ema']['decay']:g} with warm-up min(decay, (1+n)/(10+n)) (ema.warmup)", peer_ema))
    diffs = [] if r["ema"].get("warmup", True) else [
        ("EMA", f"decay {r['ema']['decay']:g} from the first step (ema.warmup=false)", peer_ema)]
    diffs += [
        ("weight decay groups", "all parameters (decay 0 here, so no effect)",
         "only interaction/product weights (decay 0 here, so no effect)"),
        ("initialisation, shuffling", "this project's init; torch RNG seeded with --seed",
         "mace-torch's init; its own seeded RNG (--seed): same seed, different streams"),
        ("extra evaluations in the budget", "Lightning sanity check (2 validation batches)",
         "'Initial' validation over the whole validation set before training"),
        ("checkpoints in the budget", "best + last every epoch, step checkpoint every 200 steps",
         "checkpoint when the validation loss improves"),
        ("batches per epoch", "ceil(n_train / batch)", "floor(n_train / batch) (drop_last)"),
    ]
    diffs += diffs_two
    return [[k, a, b, "same"] for k, a, b in same] + [[k, a, b, "differs"] for k, a, b in diffs]


def compare(rows: list[dict]) -> dict[str, Any] | None:
    ours = next((r for r in rows if r["side"] == "ours" and r["status"] == "ok"), None)
    peer = next((r for r in rows if r["side"] == "peer" and r["status"] == "ok"), None)
    if not (ours and peer):
        return None
    ratio = ours["forces_rmse_mev_A"] / peer["forces_rmse_mev_A"]
    ours["ratio_vs_peer"] = ratio
    ours["energy_ratio_vs_peer"] = ours["energy_rmse_mev_atom"] / peer["energy_rmse_mev_atom"]
    return {"forces_ratio": ratio, "energy_ratio": ours["energy_ratio_vs_peer"], "target_ratio": TARGET_RATIO,
            "target_met": ratio < TARGET_RATIO, "forces_diff_mev_A": ours["forces_rmse_mev_A"] - peer["forces_rmse_mev_A"],
            "forces_diff_pct": (ratio - 1.0) * 100.0}


# ------------------------------------------------------------------------------------------------ report
def plot(payload: dict, png: Path) -> None:
    fig, axes = rp.new_figure(2, (11, 4.2))
    for r in payload["rows"]:
        pts = [e for e in r.get("curve", []) if not e.get("initial") and not e.get("after_stop")]
        if not pts:
            continue
        x = [e["cpu_s"] / 60 for e in pts]
        style = "--" if r["side"] == "peer" else "-"
        axes[0].semilogy(x, [e["forces_rmse_mev_A"] for e in pts], style, marker=".", label=r["backend"])
        axes[1].semilogy(x, [e["energy_rmse_mev_atom"] for e in pts], style, marker=".", label=r["backend"])
        two = [e for e in pts if e.get("stage") == 2]
        if two:  # stage-two validations: open circles over the curve
            for ax, key in ((axes[0], "forces_rmse_mev_A"), (axes[1], "energy_rmse_mev_atom")):
                ax.semilogy([e["cpu_s"] / 60 for e in two], [e[key] for e in two], "o", mfc="none", ms=7,
                            color=ax.lines[-1].get_color(), label=f"{r['backend']}: stage two")
    budget = payload["settings"]["budget_min"]
    for ax in axes:
        ax.axvline(budget, color="grey", lw=0.8, ls=":", label=f"budget {budget:g} CPU min")
    axes[0].set(xlabel="CPU minutes (user + system)", ylabel="validation force RMSE (meV/Å)", title="forces")
    axes[1].set(xlabel="CPU minutes (user + system)", ylabel="validation energy RMSE (meV/atom)", title="energy")
    st = payload["settings"]
    two = st.get("stage_two")
    rp.save_figure(fig, axes, png, f"3BPA {st['n_train']}/{st['n_val']}, {st['threads']} thread(s) per side, "
                   + (f"stage two from epoch {two['start_epoch']} of {st['max_epochs']}, " if two else "")
                   + f"{payload['machine']['cpu_model']}, {payload['machine']['date'][:10]} UTC")


def stage_two_lines(payload: dict) -> list[str]:
    """The report's stage-two section: the switch on each side, stage one's last result vs the final one, and every
    validation marked stage one / stage two."""
    st, two = payload["settings"], payload["settings"].get("stage_two")
    if not two:
        return []
    ok = [r for r in payload["rows"] if r.get("status") == "ok"]
    lines = ["", "## Stage two", "",
             f"Both sides: stage two from epoch {two['start_epoch']} (0-based; {two['start_epoch']} stage-one epochs) of "
             f"max {st['max_epochs']} epochs, lr {two['lr']:g}, loss {two['loss']['energy']:g}·E + {two['loss']['forces']:g}·F. "
             "Observed switch = first validation that the side itself logged as stage two (ours: the training "
             "module's stage-two flag in the budget log; mace-torch: validations after its 'Changing loss based on "
             "Stage Two Weights' line).", "",
             rp.markdown_table(
                 ["side", "configured switch epoch", "observed first stage-two epoch", "stage-two validations",
                  "last stage-one epoch", "E / F there (meV/atom, meV/Å)", "final epoch", "final E / F"],
                 [[r["backend"], r["stage_two"]["configured_epoch"], r["stage_two"]["first_stage_two_epoch"]
                   if r["stage_two"]["first_stage_two_epoch"] is not None else "not reached",
                   r["stage_two"]["stage_two_validations"],
                   (r["stage_two"]["last_stage_one"] or {}).get("epoch"),
                   (f"{r['stage_two']['last_stage_one']['energy_rmse_mev_atom']:.2f} / "
                    f"{r['stage_two']['last_stage_one']['forces_rmse_mev_A']:.1f}") if r["stage_two"]["last_stage_one"] else "–",
                   r["epochs"] - 1, f"{r['energy_rmse_mev_atom']:.2f} / {r['forces_rmse_mev_A']:.1f}"]
                  for r in ok if "stage_two" in r]),
             "", "Every validation (epoch 0-based; CPU min when written; stage 1/2; † = after the budget stop):", ""]
    curves = {r["backend"]: {e["epoch"]: e for e in r.get("curve", []) if not e.get("initial")} for r in ok}
    epochs = sorted({ep for c in curves.values() for ep in c})
    headers = ["epoch"] + [f"{b}: {h}" for b in curves for h in ("CPU min", "stage", "E", "F")]
    rows = []
    for ep in epochs:
        row: list[Any] = [ep]
        for c in curves.values():
            e = c.get(ep)
            row += ["–"] * 4 if e is None else [
                f"{e['cpu_s'] / 60:.2f}" + ("†" if e.get("after_stop") or e["cpu_s"] > st["budget_min"] * 60 else ""),
                str(e.get("stage", 1)), f"{e['energy_rmse_mev_atom']:.2f}", f"{e['forces_rmse_mev_A']:.1f}"]
        rows.append(row)
    lines.append(rp.markdown_table(headers, rows))
    return lines


def to_markdown(payload: dict, png_name: str | None) -> str:
    st, cmp_ = payload["settings"], payload.get("comparison")
    if cmp_:
        word = "lower" if cmp_["forces_diff_pct"] < 0 else "higher"
        verdict = (f"**{'met' if cmp_['target_met'] else 'MISSED'}**: this project's validation force RMSE is "
                   f"{cmp_['forces_ratio']:.2f}× mace-torch's ({abs(cmp_['forces_diff_pct']):.1f} % {word}, "
                   f"{cmp_['forces_diff_mev_A']:+.1f} meV/Å)")
    else:
        verdict = "not evaluated (a side has no result: see the status column)"
    two = st.get("stage_two")
    lines = [
        *rp.report_header("3BPA accuracy at an equal CPU budget: this project vs mace-torch"
                          + (" (two-stage recipe)" if two else ""), payload),
        f"- data: {Path(st['data']).name}, seeded split (seed {st['seed']}) {st['n_train']} train / {st['n_val']} "
        f"validation, written once and read by both sides (`REF_energy`/`REF_forces`); E0s from iso_atoms.xyz",
        f"- budget: {st['budget_min']:g} CPU minutes (user + system of the process tree, start-up and data "
        f"loading included) per side; {st['threads']} torch/OpenMP thread(s) per side; "
        + ("run one after the other" if st["sequential"] else "both run at once")
        + (", pinned with taskset" if st["pinned"] else ", not pinned")
        + "; each validation is stamped with the side's CPU time when it was written; result = last validation "
        "within the budget (EMA weights on both sides" + ("; in stage two, ours the stage-two average)" if two else ")"),
        (f"- **stage two ON** (MACE's second stage; mace-torch `--swa`): switch at epoch {two['start_epoch']} (0-based) "
         f"on both sides, max epochs {st['max_epochs']} on both sides (`trainer.max_epochs` / `--max_num_epochs`); "
         f"stage-two lr {two['lr']:g}, loss weights E {two['loss']['energy']:g} / F {two['loss']['forces']:g}; "
         "see 'Stage two' below" if two else
         "- stage two: off (stage one only" + (f"; max epochs {st['max_epochs']} on both sides)" if st.get("max_epochs") else ")")),
        "",
        "## Result",
        "",
        rp.markdown_table(
            ["side", "epochs", "steps", "CPU min at result", "val E RMSE (meV/atom)", "val F RMSE (meV/Å)",
             "best F within budget", "ratio F ours/peer", "parameters", "status"],
            [[r["backend"], r.get("epochs"), r.get("steps"), r.get("cpu_min"), r.get("energy_rmse_mev_atom"),
              r.get("forces_rmse_mev_A"), r.get("best_forces_rmse_mev_A"),
              f"{r['ratio_vs_peer']:.2f}×" if "ratio_vs_peer" in r else "–", r.get("num_parameters"),
              r["status"] + (f": {r['reason']}" if r.get("reason") else "")] for r in payload["rows"]],
        ),
        "",
        f"Issue-8 target (lower validation force RMSE than mace-torch at the same budget): {verdict}. "
        "The reference is mace-torch's row of this very run (same data, budget and machine), not a number "
        "remembered from another run.",
        *stage_two_lines(payload),
        "",
        "Parameters: ours counted in the training process; mace-torch's counted on the same architecture built by "
        "`scripts/peer_mace.py` (mace_run_train 0.3.16 does not log it). "
        + (payload.get("parameter_comparison") or "(per-module counts not available for both sides)"),
        "",
        "## Recipe (both sides)",
        "",
        rp.markdown_table(["setting", "this project", "mace-torch 0.3.16", ""], payload["recipe"]),
    ]
    if png_name:
        lines += ["", f"![validation RMSE vs CPU minutes]({png_name})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", "--out", dest="json", help="report path (suffix replaced by .json; .md and .png beside)")
    p.add_argument("--budget-min", type=float, default=None, help="CPU minutes per side (default 25; --smoke 0.5)")
    p.add_argument("--n-train", type=int, default=None, help="training frames (default 450; --smoke 20)")
    p.add_argument("--n-val", type=int, default=None, help="validation frames (default 50; --smoke 5)")
    p.add_argument("--data", default=str(bc.DEFAULT_3BPA), help="3BPA train_300K.xyz (iso_atoms.xyz beside it)")
    p.add_argument("--work-dir", default=DEFAULT_WORK)
    p.add_argument("--seed", type=int, default=0, help="split seed and both sides' training seed")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per side")
    p.add_argument("--sequential", action="store_true", help="run the sides one after the other")
    p.add_argument("--no-pin", action="store_true", help="do not pin the sides to cores with taskset")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--poll-s", type=float, default=None, help="CPU sampling interval (default 2; --smoke 1)")
    p.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM → SIGKILL delay")
    p.add_argument("--max-wall-min", type=float, default=None, help="stop a side after this wall time (default 4×budget+5)")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 20/5 frames, 0.5 CPU minutes")
    p.add_argument("--stage-two", action="store_true", help="MACE's second stage on both sides (ours: stage_two config "
                   "block; mace-torch: --swa --start_swa N ...), lr and loss weights from the experiment's stage_two")
    p.add_argument("--max-epochs", type=int, default=None, help="max epochs on both sides (default: 16 with --stage-two, "
                   "else unlimited: the budget stops the runs)")
    p.add_argument("--stage-two-epoch", type=int, default=None,
                   help="0-based epoch at which stage two starts on both sides (default max_epochs//4*3, mace-torch's rule)")
    args = p.parse_args(argv)
    args.budget_min = args.budget_min if args.budget_min is not None else (0.5 if args.smoke else 25.0)
    args.n_train = args.n_train if args.n_train is not None else (20 if args.smoke else 450)
    args.n_val = args.n_val if args.n_val is not None else (5 if args.smoke else 50)
    args.poll_s = args.poll_s if args.poll_s is not None else (1.0 if args.smoke else 2.0)
    args.budget_s = args.budget_min * 60.0
    args.max_wall_s = 60.0 * (args.max_wall_min if args.max_wall_min is not None else 4 * args.budget_min + 5)
    if args.stage_two_epoch is not None and not args.stage_two:
        p.error("--stage-two-epoch needs --stage-two")
    if args.stage_two:
        args.max_epochs = args.max_epochs if args.max_epochs is not None else DEFAULT_MAX_EPOCHS
        if args.stage_two_epoch is None:
            args.stage_two_epoch = max(1, args.max_epochs // 4 * 3)
        if not 1 <= args.stage_two_epoch < args.max_epochs:
            p.error(f"--stage-two-epoch must be in [1, --max-epochs) = [1, {args.max_epochs}), got {args.stage_two_epoch}")
        if args.json is None and not args.smoke:  # never overwrite the committed stage-one report
            args.json = str(bc.DOCS / "accuracy_stage_two.json")
        if args.work_dir == DEFAULT_WORK:
            args.work_dir = DEFAULT_WORK + "_stage_two"
    if args.max_epochs is not None and args.max_epochs < 1:
        p.error("--max-epochs must be positive")
    if args.budget_min <= 0 or args.n_train <= 0 or args.n_val <= 0 or args.threads <= 0:
        p.error("--budget-min, --n-train, --n-val and --threads must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    r = bb.recipe()
    work = Path(args.work_dir).resolve()
    split = bb.write_split(Path(args.data), work, args.n_train, args.n_val, args.seed)
    peer_ok, peer_reason = bb.peer_train_status()
    want_peer = peer_ok and not args.no_peer
    peer = bc.peer_info(args.threads) if want_peer else {"error": "--no-peer" if args.no_peer else peer_reason}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = not args.no_pin and shutil.which("taskset") is not None
    need = args.threads * (1 if args.sequential or not want_peer else 2)
    pin = pin and len(cores) >= need
    if not args.no_pin and not pin:
        print(f"not pinning: taskset {'missing' if not shutil.which('taskset') else f'needs {need} cores, {len(cores)} available'}")

    sides = []
    ours_dir = work / "ours"
    two = {"start_epoch": args.stage_two_epoch, "lr": float(r["stage_two"]["lr"]),
           "loss": {k: float(v) for k, v in r["stage_two"]["loss"].items()}} if args.stage_two else None
    sides.append(bb.Side("ours", bb.ours_command(split, r, ours_dir, args.seed, args.max_epochs, two),
                         bb.ours_env(work, ours_dir, args.threads), ours_dir, cores[:args.threads] if pin else None))
    if want_peer:
        offset = 0 if args.sequential else args.threads
        sides.append(bb.peer_side("peer", split, r, work / "peer", args.seed, args.threads,
                                  cores[offset:offset + args.threads] if pin else None, args.max_epochs, two))
    hp_desc = bc.hp_description(dict(r["model"]), r["batch_size"])
    payload = rp.base_payload("accuracy", args.threads, hp_desc, peer)
    bb.run_sides(sides, args)

    rows, peer_modules = [], None
    for s in sides:
        if s.name == "ours":
            events, n = bb.ours_events(s)
            rows.append(bb.summarise(s, events, n, args.budget_s, "mace/cg (this project)", args.stage_two_epoch))
        else:
            row, peer_modules = bb.peer_result(s, split, r, args, "mace-torch", args.stage_two_epoch)
            rows.append(row)
    payload["parameter_comparison"] = bc.parameter_comparison(bb.our_parameters_by_module(split, r), peer_modules)
    if not want_peer:
        rows.append({"side": "peer", "backend": "mace-torch", "status": "skipped", "reason": peer["error"]})
    payload["machine"]["load_average_end"] = rp.load_average()
    payload.update(
        rows=rows, comparison=compare(rows), recipe=recipe_rows(r, two, args.max_epochs), commands={s.name: s.cmd for s in sides},
        settings={"budget_min": args.budget_min, "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed,
                  "threads": args.threads, "sequential": args.sequential, "pinned": pin, "poll_s": args.poll_s,
                  "data": split["source"], "e0s": split["e0s"], "valid_indices": split["split_indices"]["valid"],
                  "work_dir": str(work), "smoke": args.smoke, "max_epochs": args.max_epochs, "stage_two": two},
    )
    for row in rows:
        if row["status"] == "ok":
            print(f"[{row['side']}] {row['epochs']} epochs, {row['cpu_min']:.2f} CPU min: val E {row['energy_rmse_mev_atom']:.2f} "
                  f"meV/atom, F {row['forces_rmse_mev_A']:.2f} meV/Å"
                  + (f"; stage two {row['stage_two']}" if "stage_two" in row else ""))
        else:
            print(f"[{row['side']}] {row['status']}: {row.get('reason')}")
    json_path = Path(args.json).with_suffix(".json") if args.json else None
    rp.write_report_with_plot(payload, json_path, plot, to_markdown)
    return 0 if any(r["side"] == "ours" and r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
