#!/usr/bin/env python
"""Training runs under a CPU-time budget, for the 3BPA benchmarks (``bench_accuracy.py``, ``bench_time_to_accuracy.py``).

1. :func:`write_split`: a seeded train/validation split of ``train_300K.xyz`` written to a work directory as
   ``train.xyz`` and ``valid.xyz`` (extxyz, keys ``REF_energy``/``REF_forces``); E0s from ``iso_atoms.xyz`` beside it.
   Every side reads these files.
2. A side is one training command line run as a subprocess (:class:`Side`): ours is ``scripts/train.py
   +experiment=3bpa_mace_cpu_budget`` (:func:`ours_command`, with :func:`ours_env`); mace-torch's is
   ``peer-venv/bin/mace_run_train`` with flags derived from that same experiment file (:func:`recipe`,
   :func:`peer_command`, :func:`peer_side`), each with its own torch/OpenMP thread count and optionally pinned to
   cores with ``taskset``. :func:`run_sides` runs them at once or one after the other.
3. The budget is CPU time: user + system over the side's process tree, read from ``/proc`` every ``poll_s``
   seconds, not wall time, so that other load on the machine favours no side. A side that reaches the budget is
   stopped (SIGTERM, SIGKILL after ``grace_s``), as is one past ``max_wall_s`` of wall time.
4. How a side is stamped with CPU time: every validation result is read back with its wall-clock time (ours from
   the JSON lines of :mod:`potentials.train.budget`, a Lightning callback loaded through Lightning's external-callback
   entry point: :func:`ours_events`; mace-torch's from its log lines ``Epoch N: head: ..., RMSE_E_per_atom= X meV,
   RMSE_F= Y meV / A``: :func:`peer_events`) and given the side's CPU time at that moment, interpolated between the
   CPU samples (:meth:`Side.cpu_at`). :func:`summarise`: a side's result is its last validation within the budget;
   the whole curve is kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from potentials.io import atomic_path  # noqa: E402

EXPERIMENT = "3bpa_mace_cpu_budget"
EXPERIMENT_FILE = bc.REPO / "configs" / "experiment" / f"{EXPERIMENT}.yaml"
TRAINER_FILE = bc.REPO / "configs" / "trainer" / "cpu.yaml"
TRAIN_FILE = bc.REPO / "configs" / "train.yaml"
PEER_TRAIN = bc.PEER_VENV / "bin" / "mace_run_train"
MACE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) \w+: (Initial|Epoch (\d+)): head: ([^,]*), loss=\s*(\S+), "
    r"RMSE_E_per_atom=\s*(\S+) meV, RMSE_F=\s*(\S+) meV / A"
)
MACE_STAGE_TWO = "Changing loss based on Stage Two Weights"  # logged once, before mace's first stage-two epoch
MACE_PARAMS = re.compile(r"(?:Total number of parameters|Number of parameters)\D*(\d+)", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ recipe
def recipe() -> dict[str, Any]:
    """The training recipe of ``configs/experiment/3bpa_mace_cpu_budget.yaml`` (+ trainer/cpu.yaml), checked
    against the issue's reference model size (``bench_common.REFERENCE_HP``)."""
    import yaml

    exp = yaml.safe_load(EXPERIMENT_FILE.read_text())
    trainer = yaml.safe_load(TRAINER_FILE.read_text())
    try:
        r = {
            "model": {k: exp["model"][k] for k in bc.REFERENCE_HP}, "dtype": exp["model"]["dtype"],
            "batch_size": exp["data"]["batch_size"], "val_batch_size": exp["data"]["val_batch_size"],
            "loss": exp["loss"], "optim": exp["optim"], "scheduler": exp["scheduler"],
            "ema": {**yaml.safe_load(TRAIN_FILE.read_text()).get("ema", {}), **exp.get("ema", {})},
            "clip": exp.get("trainer", {}).get("gradient_clip_val", trainer.get("gradient_clip_val")),
            "stage_two": stage_two_recipe(yaml.safe_load(TRAIN_FILE.read_text()).get("stage_two", {}), exp.get("stage_two")),
        }
    except KeyError as exc:
        raise SystemExit(f"{EXPERIMENT_FILE}: missing key {exc}") from None
    diff = {k: (r["model"][k], v) for k, v in bc.REFERENCE_HP.items() if r["model"][k] != v}
    if diff:
        raise SystemExit(f"{EXPERIMENT_FILE}: model differs from the issue-8 reference size (ours, reference): {diff}")
    if r["optim"]["name"] not in ("adam", "adamw") or not r["optim"].get("amsgrad", False):
        raise SystemExit(f"{EXPERIMENT_FILE}: optim must be adam/adamw with amsgrad (mace_run_train cannot turn it off)")
    if r["scheduler"]["name"] != "plateau":
        raise SystemExit(f"{EXPERIMENT_FILE}: scheduler.name={r['scheduler']['name']!r}; only 'plateau' maps to mace-torch")
    return r


def stage_two_recipe(default: dict[str, Any], exp: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment's effective ``stage_two`` block (configs/train.yaml's, updated by the experiment's; the
    loss weights merged key by key): lr and loss weights of MACE's second stage, used by both sides with
    ``--stage-two`` (the start epoch and ``enabled`` come from the command line)."""
    st = {**default, **(exp or {})}
    st["loss"] = {**(default.get("loss") or {}), **((exp or {}).get("loss") or {})}
    if st.get("lr") is None or not {"energy", "forces"} <= set(st["loss"]):
        raise SystemExit(f"{TRAIN_FILE} / {EXPERIMENT_FILE}: stage_two needs lr and loss.energy/loss.forces, got {st}")
    return st


def stage_two_overrides(stage_two: dict[str, Any] | None) -> list[str]:
    """Hydra overrides turning on MACE's second stage (``stage_two`` = {start_epoch, lr, loss}) for our side."""
    if not stage_two:
        return ["stage_two.enabled=false"]
    return ["stage_two.enabled=true", f"stage_two.start_epoch={int(stage_two['start_epoch'])}",
            f"stage_two.lr={float(stage_two['lr'])!r}",
            *[f"stage_two.loss.{k}={float(v)!r}" for k, v in stage_two["loss"].items()]]


def peer_stage_two_flags(stage_two: dict[str, Any] | None) -> list[str]:
    """mace_run_train 0.3.16 flags of the same second stage (``--swa`` is its old name for it)."""
    if not stage_two:
        return []
    loss = stage_two["loss"]
    unsupported = {k: v for k, v in loss.items() if k not in ("energy", "forces") and float(v) != 0.0}
    if unsupported:
        raise SystemExit(f"stage_two.loss {unsupported}: only energy/forces weights map to mace_run_train's --loss weighted")
    return ["--swa", "--start_swa", str(int(stage_two["start_epoch"])), "--swa_lr", str(float(stage_two["lr"])),
            "--swa_energy_weight", str(float(loss["energy"])), "--swa_forces_weight", str(float(loss["forces"]))]


# -------------------------------------------------------------------------------------------------- data
def write_split(data: Path, work: Path, n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """Seeded split of ``data`` into ``work/train.xyz`` and ``work/valid.xyz`` (REF_* keys), written atomically;
    E0s from ``iso_atoms.xyz`` beside ``data``."""
    import ase.io
    import numpy as np
    from peer_mace import with_ref_keys

    if not data.is_file():
        raise SystemExit(f"3BPA training file not found: {data} (pass --data PATH/train_300K.xyz)")
    frames = ase.io.read(str(data), index=":")
    if n_train + n_val > len(frames):
        raise SystemExit(f"{data}: {len(frames)} frames, fewer than --n-train {n_train} + --n-val {n_val}")
    e0s = bc.read_3bpa_e0s(data)
    zs = sorted({int(z) for a in frames for z in a.numbers})
    if any(z not in e0s for z in zs):
        raise SystemExit(f"{data.with_name('iso_atoms.xyz')}: missing isolated-atom energies for Z={[z for z in zs if z not in e0s]}")
    for i, a in enumerate(frames):
        a = with_ref_keys(a)
        if "REF_energy" not in a.info or "REF_forces" not in a.arrays:
            raise SystemExit(f"{data}, frame {i}: no energy/forces (keys 'energy'/'forces' expected)")
    order = np.random.default_rng(seed).permutation(len(frames))
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in (("train", order[:n_train]), ("valid", order[n_train:n_train + n_val])):
        path = work / f"{name}.xyz"
        with atomic_path(path) as tmp:
            ase.io.write(str(tmp), [frames[i] for i in idx], format="extxyz")
        files[name] = str(path)
    return {"source": str(data), "n_train": n_train, "n_val": n_val, "seed": seed, "e0s": {z: e0s[z] for z in zs},
            "files": files, "split_indices": {"valid": sorted(int(i) for i in order[n_train:n_train + n_val])}}


# ---------------------------------------------------------------------------------------------- commands
def hydra_str(path: str) -> str:
    if "'" in path:
        raise SystemExit(f"path {path!r} contains a quote; use another --work-dir")
    return f"'{path}'"


def ours_command(split: dict, r: dict, run_dir: Path, seed: int, max_epochs: int | None = None,
                 stage_two: dict[str, Any] | None = None) -> list[str]:
    """Our training command line at the recipe ``r``; ``max_epochs`` (default: unlimited, the budget stops it) and
    ``stage_two`` ({start_epoch, lr, loss}: MACE's second stage, off when None)."""
    from ase.data import chemical_symbols

    e0s = ",".join(f"{chemical_symbols[z]}:{e!r}" for z, e in split["e0s"].items())
    return [
        sys.executable, str(bc.REPO / "scripts" / "train.py"), f"+experiment={EXPERIMENT}",
        "data=files", "~data.train_set",  # the experiment's 3bpa-format key; the files format has none
        f"data.train_files=[{hydra_str(split['files']['train'])}]", f"data.val_files=[{hydra_str(split['files']['valid'])}]",
        "data.energy_key=REF_energy", "data.forces_key=REF_forces", "data.stress_key=null", f"data.e0s={{{e0s}}}",
        f"data.batch_size={r['batch_size']}", f"data.val_batch_size={r['val_batch_size']}",
        f"seed={seed}", "run_name=bench_accuracy_ours", f"hydra.run.dir={hydra_str(str(run_dir))}", "resume=false",
        "logger=csv", "trainer.max_time=null", f"trainer.max_epochs={max_epochs or 100000}", "parity_plot=false",
        *(stage_two_overrides(stage_two) if stage_two else []),
    ]


def peer_command(split: dict, r: dict, work: Path, seed: int, max_epochs: int | None = None,
                 stage_two: dict[str, Any] | None = None) -> list[str]:
    """mace_run_train's command line at the same recipe, ``max_epochs`` and ``stage_two`` as :func:`ours_command`."""
    m, o, s = r["model"], r["optim"], r["scheduler"]
    e0s = "{" + ", ".join(f"{z}: {e!r}" for z, e in split["e0s"].items()) + "}"
    cmd = [
        str(PEER_TRAIN), "--name", "peer", "--work_dir", str(work), "--seed", str(seed),
        "--train_file", split["files"]["train"], "--valid_file", split["files"]["valid"], "--E0s", e0s,
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--model", "ScaleShiftMACE", "--num_channels", str(m["channels"]), "--max_L", str(m["max_L"]),
        "--max_ell", str(m["max_ell"]), "--correlation", str(m["correlation"]),
        "--num_interactions", str(m["num_interactions"]), "--r_max", str(float(m["r_max"])),
        "--num_radial_basis", str(m["num_bessel"]), "--num_cutoff_basis", str(m["cutoff_p"]),
        "--radial_MLP", json.dumps(list(m["radial_hidden"])), "--MLP_irreps", f"{m['readout_hidden']}x0e",
        "--scaling", "rms_forces_scaling", "--default_dtype", r["dtype"], "--device", "cpu",
        "--batch_size", str(r["batch_size"]), "--valid_batch_size", str(r["val_batch_size"]),
        "--loss", "weighted", "--energy_weight", str(r["loss"]["energy"]), "--forces_weight", str(r["loss"]["forces"]),
        "--optimizer", o["name"], "--amsgrad", "--lr", str(o["lr"]), "--weight_decay", str(o.get("weight_decay", 0.0)),
        "--scheduler", "ReduceLROnPlateau", "--lr_factor", str(s["factor"]), "--scheduler_patience", str(s["patience"]),
        "--clip_grad", str(r["clip"]), "--eval_interval", "1", "--max_num_epochs", str(max_epochs or 100000),
        "--patience", "100000", "--error_table", "PerAtomRMSE", *peer_stage_two_flags(stage_two),
    ]
    if r["ema"].get("enabled"):
        cmd += ["--ema", "--ema_decay", str(r["ema"]["decay"])]
    return cmd


def budget_env(threads: int) -> dict[str, str]:
    """Environment of every budgeted training process: ``threads`` OpenMP/MKL threads, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def ours_env(work: Path, out_dir: Path, threads: int) -> dict[str, str]:
    """:func:`budget_env` plus the CPU-stamped validation log (:mod:`potentials.train.budget`) into ``out_dir``;
    clears ``out_dir`` (a fresh run: the budget counts from scratch)."""
    from potentials.train import budget

    shutil.rmtree(out_dir, ignore_errors=True)
    entry = budget.write_entry_point(work / "entry_points")
    env = dict(budget_env(threads), PYTHONPATH=os.pathsep.join(filter(None, [str(entry), os.environ.get("PYTHONPATH")])))
    env[budget.ENV_VAR] = str(out_dir / "budget_log.jsonl")
    return env


def peer_train_status() -> tuple[bool, str]:
    """(available, reason) for training mace-torch: peer-venv's Python and its ``mace_run_train``."""
    ok, reason = bc.peer_status()
    if ok and not PEER_TRAIN.exists():
        return False, f"{PEER_TRAIN} missing"
    return ok, reason


def peer_side(name: str, split: dict, r: dict, out_dir: Path, seed: int, threads: int, cores: list[int] | None,
              max_epochs: int | None = None, stage_two: dict[str, Any] | None = None) -> "Side":
    """mace-torch's budgeted training run (:func:`peer_command` into a fresh ``out_dir``), not started yet."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return Side(name, peer_command(split, r, out_dir, seed, max_epochs, stage_two), budget_env(threads), out_dir, cores)


def peer_result(side: "Side", split: dict, r: dict, args, label: str,
                stage_two_epoch: int | None = None) -> tuple[dict[str, Any], dict | None]:
    """(summarised row, per-module parameter counts) of a finished :func:`peer_side` run: validations parsed from
    mace's log and CPU-stamped, parameters counted by ``scripts/peer_mace.py`` after the run."""
    events, n = peer_events(side, args.n_train, r["batch_size"])
    counted, modules = peer_parameters(split, r, args.threads)
    return summarise(side, events, n or counted, args.budget_s, label, stage_two_epoch), modules


# ------------------------------------------------------------------------------------------- CPU budget
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (ppid, user+system+children ticks) of every readable process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))  # ppid; utime stime cutime cstime
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its descendants, live or waited for."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in table:
            total += table[p][1]
            todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


class Side:
    """One training subprocess, its CPU samples [(wall, cpu_s)] and how it ended."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], out_dir: Path, cores: list[int] | None):
        self.name, self.out_dir = name, out_dir
        self.cmd = (["taskset", "-c", ",".join(map(str, cores))] if cores else []) + cmd
        self.env, self.cores = env, cores
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[float, float]] = []
        self.stopped_by, self.stop_wall, self.killed = None, None, False

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.out_dir / "stdout.log", "w")
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(bc.REPO), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.samples.append((self.t0, 0.0))

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the session this script started for this side
        except ProcessLookupError:
            pass

    def poll(self, budget_s: float, grace_s: float, max_wall_s: float) -> bool:
        """Sample CPU time, enforce the budget; True while the process runs."""
        if self.proc.poll() is not None:
            return False
        now = time.time()
        cpu = tree_cpu_s(self.proc.pid)
        self.samples.append((now, max(cpu, self.samples[-1][1])))
        if self.stopped_by is None and (cpu >= budget_s or now - self.t0 > max_wall_s):
            self.stopped_by = "budget" if cpu >= budget_s else "wall-clock limit"
            self.stop_wall = now
            self.signal(signal.SIGTERM)
        elif self.stopped_by and not self.killed and now - self.stop_wall > grace_s:
            self.signal(signal.SIGKILL)
            self.killed = True
        return True

    def cpu_at(self, wall: float) -> float:
        """CPU seconds at wall-clock time ``wall``, interpolated between samples."""
        s = self.samples
        if wall <= s[0][0]:
            return 0.0
        for (w0, c0), (w1, c1) in zip(s, s[1:]):
            if w0 <= wall <= w1:
                return c0 + (c1 - c0) * ((wall - w0) / (w1 - w0) if w1 > w0 else 1.0)
        return s[-1][1]


def run_sides(sides: list[Side], args) -> None:
    """Run ``sides`` concurrently (or one after another with ``--sequential``) under the CPU budget."""
    groups = [[s] for s in sides] if args.sequential else [sides]
    try:
        for group in groups:
            for s in group:
                print(f"[{s.name}] {' '.join(s.cmd)}", flush=True)
                s.start()
            running = list(group)
            while running:
                time.sleep(args.poll_s)
                running = [s for s in running if s.poll(args.budget_s, args.grace_s, args.max_wall_s)]
            for s in group:
                print(f"[{s.name}] exit {s.proc.returncode}, stopped by {s.stopped_by or 'itself'}, "
                      f"CPU {s.samples[-1][1] / 60:.2f} min, wall {(s.samples[-1][0] - s.t0) / 60:.2f} min", flush=True)
    finally:
        for s in sides:
            if s.proc is not None and s.proc.poll() is None:
                s.signal(signal.SIGKILL)
                s.proc.wait()


# ----------------------------------------------------------------------------------------------- results
def ours_events(side: Side) -> tuple[list[dict], int | None]:
    path = side.out_dir / "budget_log.jsonl"
    events, nparams = [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("event") == "start":
                nparams = rec.get("num_parameters")
            elif rec.get("event") == "val":
                events.append({"epoch": rec["epoch"], "step": rec["step"], "wall": rec["wall"],
                               "cpu_s_self": rec["cpu_s"], "energy_rmse_mev_atom": rec["energy_rmse_mev_atom"],
                               "forces_rmse_mev_A": rec["forces_rmse_mev_A"], "val_loss": rec.get("val_loss"),
                               "stage": 2 if rec.get("stage_two") else 1, "lr": rec.get("lr"),
                               "averaged_weights": rec.get("averaged_weights")})
    return events, nparams


def peer_events(side: Side, n_train: int, batch: int) -> tuple[list[dict], int | None]:
    logs = sorted((side.out_dir / "logs").glob("peer_run-*.log")) if (side.out_dir / "logs").is_dir() else []
    path = logs[0] if logs else side.out_dir / "stdout.log"
    events, nparams, stage = [], None, 1
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if nparams is None and (mp := MACE_PARAMS.search(line)):
            nparams = int(mp.group(1))
        if MACE_STAGE_TWO in line:  # validations logged after this line used the stage-two loss and lr
            stage = 2
        m = MACE_LINE.match(line)
        if not m:
            continue
        wall = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
        epoch = int(m.group(4)) if m.group(4) is not None else -1
        events.append({"epoch": epoch, "step": (epoch + 1) * (n_train // batch), "wall": wall, "initial": epoch < 0,
                       "energy_rmse_mev_atom": float(m.group(7)), "forces_rmse_mev_A": float(m.group(8)),
                       "val_loss": float(m.group(6)), "stage": stage if epoch >= 0 else 1})
    return events, nparams


def peer_parameters(split: dict, r: dict, threads: int) -> tuple[int | None, dict | None]:
    """Parameter count (total, per top-level module) of mace-torch's model at these flags (mace_run_train 0.3.16
    does not log it): built by ``scripts/peer_mace.py`` exactly as ``mace_run_train`` builds it, after the run
    (outside the budget)."""
    res = bc.run_peer({"kind": "calc", "hp": dict(r["model"]), "atomic_numbers": list(split["e0s"]),
                       "e0s": split["e0s"], "structure": split["files"]["valid"], "warmup": 0, "repeat": 1,
                       "dtype": r["dtype"], "threads": threads}, timeout=300)
    return res.get("num_parameters"), res.get("parameters_by_module")


def our_parameters_by_module(split: dict, r: dict) -> dict[str, int]:
    """Per-module parameter counts of this project's model at the recipe (counts do not depend on the statistics)."""
    cfg, _ = bc.model_config({"cfg": {"name": "mace", "tp": "cg"}}, dict(r["model"]), r["dtype"])
    return bc.parameters_by_module(bc.build_our_model(cfg, bc.make_stats(list(split["e0s"]), 1.0)))


def stage_two_summary(within: list[dict], start_epoch: int) -> dict[str, Any]:
    """Where stage two began on one side (the first validation logged as stage two, from the side's own record) and
    its last stage-one validation within the budget, for comparison with the final one."""
    two = [e for e in within if e.get("stage") == 2]
    one = [e for e in within if e.get("stage", 1) == 1]
    first = two[0]["epoch"] if two else None
    last_one = one[-1] if one else None
    return {"configured_epoch": start_epoch, "first_stage_two_epoch": first, "stage_two_validations": len(two),
            "switch_as_configured": None if first is None else first == start_epoch,
            "last_stage_one": None if last_one is None else {
                k: last_one[k] for k in ("epoch", "cpu_s", "energy_rmse_mev_atom", "forces_rmse_mev_A")}}


def summarise(side: Side, events: list[dict], nparams: int | None, budget_s: float, label: str,
              stage_two_epoch: int | None = None) -> dict[str, Any]:
    for e in events:
        e["cpu_s"] = round(side.cpu_at(e["wall"]), 2)
        e["after_stop"] = side.stop_wall is not None and e["wall"] > side.stop_wall  # e.g. ours' partial epoch on SIGTERM
    trained = [e for e in events if not e.get("initial")]
    within = [e for e in trained if e["cpu_s"] <= budget_s and not e["after_stop"]]
    row: dict[str, Any] = {
        "side": side.name, "backend": label, "returncode": side.proc.returncode, "stopped_by": side.stopped_by or "itself",
        "cpu_min_total": side.samples[-1][1] / 60, "wall_min": (side.samples[-1][0] - side.t0) / 60,
        "num_parameters": nparams, "cores": side.cores, "curve": events, "log": str(side.out_dir / "stdout.log"),
    }
    if not within:
        tail = (side.out_dir / "stdout.log").read_text(errors="replace").strip().splitlines()[-3:]
        why = "no validation completed within the budget" if side.stopped_by == "budget" else \
            f"exited {side.proc.returncode} without a validation result: {' | '.join(tail)}"
        return {**row, "status": "error", "reason": why}
    last = within[-1]
    best = min(within, key=lambda e: e["forces_rmse_mev_A"])
    if stage_two_epoch is not None:
        row["stage_two"] = stage_two_summary(within, stage_two_epoch)
    return {**row, "status": "ok", "epochs": last["epoch"] + 1, "steps": last["step"], "cpu_min": last["cpu_s"] / 60,
            "energy_rmse_mev_atom": last["energy_rmse_mev_atom"], "forces_rmse_mev_A": last["forces_rmse_mev_A"],
            "best_forces_rmse_mev_A": best["forces_rmse_mev_A"], "best_epoch": best["epoch"] + 1,
            "validations_after_budget": len(trained) - len(within)}


