"""Cluster behaviour through real subprocesses of scripts/train.py: exact mid-epoch resume after a real
signal, fake SLURM requeue, kill -9 + corrupt checkpoint, 2-process DDP (gloo), precision, wandb id."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL

MODEL_ARGS = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k not in ("name", "radial_hidden")] + [
    "model.radial_hidden=[8]", "model.channels=2", "model.correlation=2",
]


def write_emt_frames(path: Path, structures) -> Path:
    """Label ``structures`` (ASE Atoms) with EMT energy, forces and stress and write them as extxyz to ``path``."""
    import ase.io
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for atoms in structures:
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def uniform_data(tmp_path_factory):
    """24 eight-atom Cu–Au structures (equal sizes make per-rank means equal global means under DDP)."""
    from ase.build import bulk
    import numpy as np

    rng = np.random.default_rng(0)

    def structure(i):
        atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 2))
        atoms.numbers[rng.permutation(8)[: 1 + i % 4]] = 79
        atoms.rattle(0.08, seed=i)
        return atoms

    return write_emt_frames(tmp_path_factory.mktemp("uniform") / "uniform.extxyz", (structure(i) for i in range(24)))


def train_cmd(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "scripts/train.py"), "data=files", f"data.train_files=[{data}]",
        "data.batch_size=2", "data.val_fraction=0.25", f"hydra.run.dir={run_dir}", "trainer.deterministic=true",
        "trainer.log_every_n_steps=1", "parity_plot=false", "ema.decay=0.9", "loss.stress=10", *MODEL_ARGS, *extra,
    ]


def run_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra})
    return env


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}:{name}"


def wait_for(path_glob, run_dir: Path, proc: subprocess.Popen, timeout=240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((run_dir / "checkpoints").glob(path_glob)) if (run_dir / "checkpoints").exists() else []:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path_glob} appeared:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timeout waiting for {path_glob}")


@pytest.fixture(scope="module")
def reference_run(uniform_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    r = subprocess.run(train_cmd(uniform_data, run_dir, "trainer.max_epochs=4"), env=run_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_signal_mid_epoch_under_fake_slurm_then_exact_resume(uniform_data, reference_run, tmp_path):
    """SIGUSR1 mid-epoch → preempt.ckpt + `scontrol requeue 4242`; rerunning the same command ends with
    bit-identical raw and EMA weights; the wandb run id is kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    stub = bin_dir / "scontrol"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="1",
                 SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NAME="potentials",
                 PATH=f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    cmd = train_cmd(uniform_data, run_dir, "trainer.max_epochs=4", "checkpoint.every_n_train_steps=1",
                    "checkpoint.keep_step_checkpoints=1", "logger=wandb")
    proc = subprocess.Popen(cmd, env=run_env(**slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for("step-0000001[0-9].ckpt", run_dir, proc)  # inside epoch 2 (9 steps per epoch)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    preempt = torch.load(run_dir / "checkpoints" / "preempt.ckpt", weights_only=False)
    assert 10 <= preempt["global_step"] < 36  # signalled inside epoch 2 (9 steps per epoch)
    assert calls.read_text().split() == ["requeue", "4242"]
    meta1 = json.loads((run_dir / "run_meta.json").read_text())

    r = subprocess.run(cmd, env=run_env(**slurm), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_state(run_dir), final_state(reference_run))
    meta2 = json.loads((run_dir / "run_meta.json").read_text())
    assert meta2["wandb_id"] == meta1["wandb_id"] and meta2["restarts"] == 1
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{meta1['wandb_id']}"))
    assert len(runs) == 2  # two offline segments of the same wandb run, synced together by `wandb sync`


def test_kill9_then_resume_skips_a_corrupt_checkpoint(uniform_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(uniform_data, run_dir, "trainer.max_epochs=4", "checkpoint.every_n_train_steps=3",
                    "checkpoint.keep_step_checkpoints=3")
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for("step-00000012.ckpt", run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file must be skipped, never picked
    r = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping unreadable checkpoint" in r.stdout + r.stderr
    final = final_state(run_dir)
    assert final["global_step"] == final_state(reference_run)["global_step"] == 36
    assert not list(run_dir.rglob("*.tmp"))


def test_ddp_two_processes_matches_one_process(uniform_data, tmp_path):
    """Global batch 4 = 2 ranks × 2 vs 1 process × 4, no shuffling: same loss curve and weights. The DDP run
    trains through the traced graph (``model.compile=trace``, the executor of ``model.compile=true`` without the
    C++ step): compiled execution under DDP equals eager single-process training. (DDP eager resume:
    test_ddp_interrupted_shuffled_run_resumes_bit_identical.)"""
    single = tmp_path / "single"
    common = ["data.shuffle=false", "trainer.max_epochs=2", "ema.enabled=false", "preemption.enabled=false"]
    r = subprocess.run(train_cmd(uniform_data, single, *common, "data.batch_size=4"), env=run_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = tmp_path / "ddp"
    ddp_args = [*common, "data.batch_size=2", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                "model.compile=trace"]
    r = subprocess.run(train_cmd(uniform_data, ddp, *ddp_args), env=run_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def curve(run_dir):
        import csv

        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        return [float(x["train_loss"]) for x in rows if x.get("train_loss")], [
            float(x["val_loss"]) for x in rows if x.get("val_loss")]

    (t1, v1), (t2, v2) = curve(single), curve(ddp)
    assert len(t1) == len(t2) == 2 and len(v1) == len(v2) == 2
    for a, b in zip(t1 + v1, t2 + v2):
        assert abs(a - b) <= 1e-6 * max(abs(a), 1e-12), (t1, v1, t2, v2)
    a, b = final_state(single), final_state(ddp)
    assert a["global_step"] == b["global_step"]
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-6, atol=1e-9)
    # resuming DDP runs: test_ddp_interrupted_shuffled_run_resumes_bit_identical


@pytest.fixture(scope="module")
def unequal_data(tmp_path_factory):
    """22 Cu–Au structures of 4, 8 or 12 atoms (unequal sizes: per-rank batches differ in atoms and edges)."""
    import numpy as np
    from ase.build import bulk

    rng = np.random.default_rng(1)

    def structure(i):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((1, 1, 1 + i % 3))
        atoms.numbers[rng.permutation(len(atoms))[: 1 + i % 3]] = 79
        atoms.rattle(0.08, seed=100 + i)
        return atoms

    return write_emt_frames(tmp_path_factory.mktemp("unequal") / "unequal.extxyz", (structure(i) for i in range(22)))


def test_ddp_interrupted_shuffled_run_resumes_bit_identical(unequal_data, tmp_path):
    """2 processes (gloo), shuffled unequal-size data, and a callback that draws from every rank's global RNG
    each step (tests/rng_probe.py): SIGUSR1 mid-epoch, rerun → bit-identical raw and EMA weights to an
    uninterrupted run. Needs each rank's own RNG state in the checkpoint, not only rank 0's."""
    from tests.rng_probe import ENV_VAR, SIGNAL_VAR, write_entry_point

    entry = write_entry_point(tmp_path / "entry_points")
    env = run_env(**{ENV_VAR: "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(entry)])})
    args = ["data.shuffle=true", "trainer.max_epochs=3", "trainer.strategy=ddp", "trainer.devices=2",
            "trainer.accelerator=cpu", "checkpoint.every_n_train_steps=1", "checkpoint.keep_step_checkpoints=1"]
    reference = tmp_path / "reference"
    r = subprocess.run(train_cmd(unequal_data, reference, *args), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = final_state(reference)
    assert sorted(ckpt["rng_states"]) == [0, 1]  # both ranks' states reach the file
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])

    run_dir = tmp_path / "interrupted"
    # rank 0 signals itself after step 6, inside epoch 2 (4 steps per epoch: 16 frames / 2 ranks / 2): a signal
    # sent by polling for step files could land on an epoch's last step, a different resume path
    proc = subprocess.run(train_cmd(unequal_data, run_dir, *args), env=dict(env, **{SIGNAL_VAR: "6"}),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    preempt = torch.load(run_dir / "checkpoints" / "preempt.ckpt", weights_only=False)
    assert 6 <= preempt["global_step"] < 8, preempt["global_step"]
    r = subprocess.run(train_cmd(unequal_data, run_dir, *args), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_state(run_dir), ckpt)


def test_precisions_agree(tiny_model, periodic_atoms, tiny_model_cfg, capsys):
    """32-true and 64-true forces agree; bf16 autocast covers only the backbone; its error is reported."""
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import build_model, energy_forces_stress
    from tests.conftest import TINY_STATS

    g = collate([atoms_to_graph(periodic_atoms, tiny_model.r_max)])
    ref = energy_forces_stress(tiny_model, g, stress=True)
    m32 = build_model({**tiny_model_cfg, "dtype": "float32"}, TINY_STATS)
    m32.load_state_dict(tiny_model.state_dict())
    out32 = energy_forces_stress(m32, g, stress=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outbf = energy_forces_stress(m32, g, stress=True)
    scale = ref["forces"].abs().max()
    err32 = float((out32["forces"] - ref["forces"]).abs().max() / scale)
    errbf = float((outbf["forces"] - ref["forces"]).abs().max() / scale)
    for out in (out32, outbf):
        assert out["energy"].dtype == out["forces"].dtype == out["stress"].dtype == torch.float64
    assert err32 < 1e-5
    assert 0 < errbf < 0.2  # bf16 has ~3 significant digits; it must differ from float64, and not wildly
    with capsys.disabled():
        print(f"\nforce error vs float64 (max rel): float32 {err32:.2e}, bf16-mixed backbone {errbf:.2e}")


def test_bf16_mixed_training_runs(demo_file, tmp_path):
    from hydra import compose, initialize_config_dir

    from potentials.train.run import train

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data=files", f"data.train_files=[{demo_file}]", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
            "trainer.limit_val_batches=1", "parity_plot=false", *MODEL_ARGS])
    result = train(cfg, tmp_path / "bf16")
    ckpt = torch.load(result["last"], weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["model_cfg"]["dtype"] == "float32"
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_resolver_prefers_newest_step_and_skips_corrupt(tmp_path):
    from potentials.train.checkpoint import atomic_torch_save
    from potentials.train.cluster import resolve_latest

    ck = tmp_path / "checkpoints"
    atomic_torch_save({"global_step": 10}, ck / "last.ckpt")
    atomic_torch_save({"global_step": 12}, ck / "step-00000012.ckpt")
    atomic_torch_save({"global_step": 14}, tmp_path / "hpc_ckpt_1.ckpt")
    (ck / "step-00000016.ckpt").write_bytes(b"\x80\x02truncated")
    assert resolve_latest(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    atomic_torch_save({"global_step": 14}, ck / "preempt.ckpt")
    assert resolve_latest(tmp_path) == ck / "preempt.ckpt"  # same step: the preemption checkpoint wins
    assert resolve_latest(tmp_path / "empty") is None


def test_slurm_validation(monkeypatch):
    from potentials.errors import PotentialsError
    from potentials.train.cluster import rendezvous_port, validate_slurm

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    with pytest.raises(PotentialsError, match="num_nodes=1"):
        validate_slurm(4, 1)
    with pytest.raises(PotentialsError, match="devices=2"):
        validate_slurm(2, 2)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    validate_slurm(4, 2)
    assert os.environ["MASTER_PORT"] == str(rendezvous_port("777"))
    assert rendezvous_port("777") == rendezvous_port("777") != rendezvous_port("778")
