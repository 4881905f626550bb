"""Smoke tests of the benchmark scripts (tiny model, tiny sizes, one repetition): they run, and their JSON
reports have the documented schema with finite positive numbers. Benchmarks are not tests — these only keep
the scripts from rotting. The mace-torch rows run when ``peer-venv/`` exists and must be skipped otherwise."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

SCRIPTS = REPO / "scripts"
PEER = (REPO / "peer-venv" / "bin" / "python").exists()
TINY_HP = ["channels=4", "max_ell=1", "correlation=2", "radial_hidden=[8]", "readout_hidden=4", "num_bessel=4"]
HAS_3BPA = (SHARED_DATA / "3BPA" / "train_300K.xyz").is_file()

sys.path.insert(0, str(SCRIPTS))
import bench_common as bc  # noqa: E402
import bench_report as rp  # noqa: E402


def run_script(name: str, out_json, *args: str, timeout: float = 900) -> dict:
    cmd = [sys.executable, str(SCRIPTS / name), "--json", str(out_json), "--threads", "1", *args, "--hp", *TINY_HP]
    if not PEER:
        cmd.append("--no-peer")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out_json.is_file() and out_json.with_suffix(".md").is_file()
    return json.loads(out_json.read_text())


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert rp.is_pos_finite(row.get(key)), (key, row.get(key), row)


def check_common(payload: dict, benchmark: str) -> list[dict]:
    assert payload["schema_version"] == rp.SCHEMA_VERSION
    assert payload["benchmark"] == benchmark
    assert payload["command"].startswith(f"python scripts/bench_{benchmark}.py")
    m = payload["machine"]
    for key in ("date", "cpu_model", "cores_available", "torch", "torch_threads", "load_average_end"):
        assert key in m, key
    hp = payload["hyperparameters"]
    assert hp["values"]["channels"] == 4 and hp["is_reference"] is False
    assert hp["mace_torch_names"]["num_channels"] == 4
    rows = payload["rows"]
    assert rows, "no rows"
    for r in rows:
        assert r["status"] in ("ok", "skipped", "error"), r
        assert "backend" in r and "side" in r
        if r["status"] != "ok":
            assert r.get("reason"), r
    ours = [r for r in rows if r["side"] == "ours"]
    assert ours and all(r["status"] == "ok" for r in ours), ours
    peer = [r for r in rows if r["side"] == "peer"]
    if PEER:
        assert peer and all(r["status"] == "ok" for r in peer), peer
        assert "error" not in payload["peer"] and payload["peer"]["mace_torch"] == "0.3.16"
    else:
        assert all(r["status"] == "skipped" for r in peer)
    return rows


def test_helpers():
    fit = rp.fit_loglog([10, 100, 1000], [2 * 10**1.5, 2 * 100**1.5, 2 * 1000**1.5])
    assert math.isclose(fit["exponent"], 1.5, rel_tol=1e-9) and math.isclose(fit["prefactor"], 2.0, rel_tol=1e-9)
    assert rp.fit_loglog([10], [1.0]) is None
    assert math.isclose(rp.extrapolate([1, 2], [1.0, 4.0], 4), 16.0)  # quadratic stays quadratic
    assert math.isclose(rp.extrapolate([1, 2], [1.0, 1.0], 4), 2.0)  # never predicted below linear
    assert rp.extrapolate([1], [1.0], 4) is None
    st = rp.timing_stats([3.0, 1.0, 2.0, 10.0])
    assert st["median_s"] == 2.5 and st["min_s"] == 1.0 and st["n"] == 4
    assert bc.cells_for_sizes([108, 500, 2048, 10976]) == [3, 5, 8, 14]
    table = rp.markdown_table(["a", "b"], [["x", 1.23456], ["y", None]])
    assert table.splitlines()[2] == "| x | 1.23 |" and "–" in table
    assert bc.parse_hp_overrides(["channels=8", "radial_hidden=[16,16]"]) == {"channels": 8, "radial_hidden": [16, 16]}
    with pytest.raises(SystemExit):
        bc.parse_hp_overrides(["not_a_key=1"])
    labels = [v["label"] for v in bc.our_variants()]
    assert "mace/cg" in labels and not any(lbl.endswith("/auto") for lbl in labels)


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train.json"
    payload = run_script(
        "bench_train.py", out, "--quick", "--only", "mace/cg", "--datasets", "3bpa,demo", "--dtypes", "float64",
        "--steps", "1", "--warmup", "0", "--n-structures", "5", "--demo-path", str(tmp_path / "demo.extxyz"),
        "--demo-structures", "6",
    )
    rows = check_common(payload, "train")
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["dataset"] for r in ok} == ({"3bpa", "demo"} if HAS_3BPA else {"demo"})
    for r in ok:
        positive(r, "structures_per_s", "atoms_per_s", "ms_per_step", "ms_per_step_min", "num_parameters")
        assert r["batch_size"] == 5
        if r["side"] == "ours" and PEER:
            positive(r, "ratio_vs_peer")
            assert r["target_ratio"] == 2.0 and isinstance(r["target_met"], bool)
    if not HAS_3BPA:
        assert any(r["dataset"] == "3bpa" and r["status"] == "skipped" for r in rows)
    assert "| dataset | dtype | backend |" in out.with_suffix(".md").read_text()


def test_bench_md_smoke(tmp_path):
    out = tmp_path / "md.json"
    payload = run_script(
        "bench_md.py", out, "--quick", "--only", "mace/cg", "--sizes", "32,108", "--repeat", "1", "--warmup", "0",
        "--profile", "32",
    )
    rows = check_common(payload, "md")
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["num_atoms"] for r in ok if r["periodic"]} == {32, 108}
    assert any(not r["periodic"] for r in ok) == HAS_3BPA
    for r in ok:
        positive(r, "ms_per_call", "ms_per_call_min", "us_per_atom", "ms_per_atom", "peak_rss_mb", "rss_before_mb")
        assert r["working_mb"] >= 0
        if r["side"] == "ours" and PEER:
            positive(r, "speedup_vs_peer", "memory_ratio_vs_peer")
    scal = {(s["backend"], s["dtype"]): s for s in payload["scaling"]}
    assert math.isfinite(scal[("mace/cg", "float32")]["time_exponent"])
    assert scal[("mace/cg", "float32")]["sizes"] == [32, 108]
    assert payload["profiles"] and "aten::" in payload["profiles"][0]["table"]
    assert out.with_suffix(".png").is_file() and out.with_suffix(".png").stat().st_size > 1000
    assert payload["plot"] == "md.png"


def test_bench_relax_smoke(tmp_path):
    out = tmp_path / "relax.json"
    payload = run_script("bench_relax.py", out, "--quick", "--only", "mace/cg", "--steps", "2")
    rows = check_common(payload, "relax")
    ok = [r for r in rows if r["status"] == "ok"]
    assert any("Cu fcc" in r["system"] for r in ok)
    assert payload["settings"]["fmax"] == 0.0  # untrained: a fixed number of steps on both sides
    for r in ok:
        positive(r, "wall_s", "ms_per_step", "ms_per_call", "calls", "peak_rss_mb")
        assert r["steps"] == 2 and r["converged"] is False
        if r["side"] == "ours" and PEER:
            positive(r, "wall_speedup_vs_peer", "per_call_speedup_vs_peer")


def test_bench_precision_smoke(tmp_path):
    out = tmp_path / "precision.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_precision.py"), "--quick", "--threads", "1", "--json", str(out),
           "--demo-path", str(tmp_path / "demo.extxyz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["schema_version"] == rp.SCHEMA_VERSION and payload["benchmark"] == "precision"
    rows = payload["rows"]
    assert {r["engine"] for r in rows} == {"cg", "gaunt_grid"}
    measured = [r for r in rows if "skipped" not in r]
    assert {r["precision"] for r in measured} >= {"fp32", "bf16-mixed"}
    for r in measured:
        positive(r, "steps_per_s", "force_rmse_vs_f64", "speedup_vs_fp32")
    bf16 = [r for r in measured if r["precision"] == "bf16-mixed"]
    assert all(r["force_err_ratio_vs_fp32"] > 1 for r in bf16)  # reduced precision must show up in the forces


@pytest.mark.skipif(not HAS_3BPA, reason=f"3BPA data absent ({SHARED_DATA / '3BPA' / 'train_300K.xyz'})")
def test_bench_accuracy_smoke(tmp_path):
    out = tmp_path / "accuracy.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_accuracy.py"), "--smoke", "--json", str(out),
           "--work-dir", str(tmp_path / "work"), "--data", str(SHARED_DATA / "3BPA" / "train_300K.xyz")]
    if not PEER:
        cmd.append("--no-peer")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["schema_version"] == rp.SCHEMA_VERSION and payload["benchmark"] == "accuracy"
    assert payload["command"].startswith("python scripts/bench_accuracy.py")
    assert payload["hyperparameters"]["is_reference"] is True
    st = payload["settings"]
    assert (st["n_train"], st["n_val"], st["budget_min"]) == (20, 5, 0.5)
    rows = {r["side"]: r for r in payload["rows"]}
    ours = rows["ours"]
    assert ours["status"] == "ok", ours
    positive(ours, "forces_rmse_mev_A", "energy_rmse_mev_atom", "cpu_min", "epochs", "steps", "num_parameters")
    assert ours["cpu_min"] <= st["budget_min"] and ours["stopped_by"] == "budget"
    curve = [e for e in ours["curve"] if not e.get("initial")]
    assert curve and all(rp.is_pos_finite(e["cpu_s"]) for e in curve)
    assert [e["cpu_s"] for e in curve] == sorted(e["cpu_s"] for e in curve)
    if PEER:
        assert rows["peer"]["status"] == "ok", rows["peer"]
        positive(rows["peer"], "forces_rmse_mev_A", "energy_rmse_mev_atom", "cpu_min", "epochs")
        positive(ours, "ratio_vs_peer")
        assert isinstance(payload["comparison"]["target_met"], bool)
    else:
        assert rows["peer"]["status"] == "skipped" and payload["comparison"] is None
    assert "| side | epochs |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").is_file()


def test_report_numbers_are_computed_not_remembered():
    """Every training-throughput target names a row label that exists; the parameter sentence is computed from
    both models' per-module counts (our model counted here); no fixed 'reference' value is left in the reports."""
    import bench_train

    from potentials.models import build_model
    from tests.conftest import TINY_MODEL, TINY_STATS

    labels = {v["label"] for v in bc.our_variants()}
    assert set(bench_train.TARGETS) <= labels, set(bench_train.TARGETS) - labels
    ours = bc.parameters_by_module(build_model(TINY_MODEL, TINY_STATS))
    assert {"embedding", "interactions", "products", "readouts"} <= set(ours)
    peer = {("node_embedding" if k == "embedding" else k): v for k, v in ours.items()}
    assert "every top-level module has the same count" in bc.parameter_comparison(ours, peer)
    peer["products"] += 7
    sentence = bc.parameter_comparison(ours, peer)
    assert f"`products` {ours['products']:,} vs {ours['products'] + 7:,}" in sentence and "`embedding`" in sentence
    assert bc.parameter_comparison(ours, None) == ""
    for script in ("bench_accuracy.py", "bench_train.py"):
        text = (REPO / "scripts" / script).read_text()
        assert "37.0" not in text and "70,544" not in text and "72,848" not in text


def test_time_to_accuracy_targets_and_marks():
    """CPU time to a target = first validation at or below it within the budget; RMSE at a mark = last one before."""
    import bench_time_to_accuracy as tta

    curve = [{"cpu_s": 60.0, "forces_rmse_mev_A": 120.0}, {"cpu_s": 120.0, "forces_rmse_mev_A": 79.0},
             {"cpu_s": 180.0, "forces_rmse_mev_A": 55.0}, {"cpu_s": 240.0, "forces_rmse_mev_A": 49.0, "after_stop": True}]
    assert tta.time_to_targets(curve, [80.0, 60.0, 50.0]) == {"80": 2.0, "60": 3.0, "50": None}
    assert [tta.rmse_at(curve, m) for m in (0.5, 1.0, 2.5, 10.0)] == ["–", 120.0, 79.0, 55.0]
    cmd = tta.train_command("facet_s", {"files": {"train": "/t/train.xyz", "valid": "/t/valid.xyz"}, "e0s": {1: -1.0}},
                            REPO / "runs" / "x", 0)
    assert "+experiment=3bpa_facet_s_cpu_budget" in cmd and "run_name=tta_facet_s" in cmd
    # mace-torch's untrained 'Initial' validation never counts; mace-torch is in by default (skipped without peer-venv)
    assert tta.time_to_targets([{"cpu_s": 6.0, "forces_rmse_mev_A": 1.0, "initial": True}], [80.0]) == {"80": None}
    assert tta.parse_args(["--smoke"]).models == ["facet_s", "mace", "mace_torch"]


def test_accuracy_stage_two_wiring(tmp_path):
    """--stage-two: both sides get the same max epochs and the same 0-based switch epoch (default max_epochs//4*3),
    the experiment's stage-two lr and loss weights, and a report file other than the committed accuracy.json; the
    peer's validations after mace's switch line are marked stage two."""
    import bench_accuracy as ba
    import bench_budget as bb

    args = ba.parse_args(["--stage-two"])
    assert (args.max_epochs, args.stage_two_epoch) == (16, 12)
    assert args.json.endswith("accuracy_stage_two.json") and args.work_dir.endswith("bench_accuracy_stage_two")
    assert ba.parse_args(["--smoke", "--stage-two"]).json is None
    with pytest.raises(SystemExit):
        ba.parse_args(["--stage-two", "--max-epochs", "3", "--stage-two-epoch", "3"])
    r = bb.recipe()
    two = {"start_epoch": 12, "lr": float(r["stage_two"]["lr"]), "loss": r["stage_two"]["loss"]}
    split = {"files": {"train": "/t/train.xyz", "valid": "/t/valid.xyz"}, "e0s": {1: -1.0}}
    ours = bb.ours_command(split, r, tmp_path / "ours", 0, 16, two)
    assert {"trainer.max_epochs=16", "stage_two.enabled=true", "stage_two.start_epoch=12", "stage_two.lr=0.001",
            "stage_two.loss.energy=1000.0", "stage_two.loss.forces=100.0"} <= set(ours)
    peer = bb.peer_command(split, r, tmp_path / "peer", 0, 16, two)
    flags = dict(zip(peer, peer[1:]))
    assert "--swa" in peer and flags["--start_swa"] == "12" and flags["--max_num_epochs"] == "16"
    assert (float(flags["--swa_lr"]), float(flags["--swa_energy_weight"]), float(flags["--swa_forces_weight"])) == (1e-3, 1e3, 1e2)
    assert "--swa" not in bb.peer_command(split, r, tmp_path / "peer", 0)
    log = tmp_path / "peer" / "logs" / "peer_run-0.log"
    log.parent.mkdir(parents=True)
    line = "2026-01-01 00:00:0{s}.000 INFO: {what}: head: Default, loss=1.0, RMSE_E_per_atom= 5.00 meV, RMSE_F= 50.00 meV / A"
    log.write_text("\n".join([line.format(s=0, what="Initial"), line.format(s=1, what="Epoch 0"),
                              "2026-01-01 00:00:02.000 INFO: " + bb.MACE_STAGE_TWO, line.format(s=3, what="Epoch 1")]))
    side = bb.Side("peer", ["true"], {}, tmp_path / "peer", None)
    events, _ = bb.peer_events(side, 20, 5)
    assert [(e["epoch"], e["stage"]) for e in events] == [(-1, 1), (0, 1), (1, 2)]
    summary = bb.stage_two_summary([dict(e, cpu_s=1.0) for e in events if not e["initial"]], 1)
    assert summary["first_stage_two_epoch"] == 1 and summary["switch_as_configured"] and summary["last_stage_one"]["epoch"] == 0


@pytest.mark.skipif(not PEER, reason="needs peer-venv/ with mace-torch (make peer-venv)")
def test_same_architecture_as_mace_torch_per_module(tmp_path):
    """The fairness premise of bench_train/bench_md: at identical hyper-parameters this project's MACE has the same
    parameter count as mace-torch's ScaleShiftMACE in the embedding, interactions and readouts; in the product basis
    ours has at most as many (mace-torch's symmetric-contraction basis carries linearly dependent paths: its weights
    project exactly onto ours, which tests/test_import_mace.py checks through energies equal to 1e-8 eV)."""
    import ase.io
    from ase.build import bulk

    hp = dict(bc.REFERENCE_HP, channels=8, radial_hidden=[16, 16])
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, bulk("Cu", "fcc", a=3.6, cubic=True))
    peer = bc.run_peer({"kind": "calc", "hp": hp, "dtype": "float64", "structure": str(path), "atomic_numbers": [29, 79],
                        "e0s": {}, "avg_num_neighbors": 40.0, "warmup": 0, "repeat": 1, "threads": 1, "seed": 0},
                       timeout=600)
    assert "error" not in peer, peer
    cfg, _ = bc.model_config({"label": "mace/cg", "cfg": {"name": "mace", "tp": "cg"}}, hp, "float64")
    ours = bc.parameters_by_module(bc.build_our_model(cfg, bc.make_stats([29, 79], 40.0)))
    theirs = {bc.PEER_MODULE_NAMES.get(k, k): v for k, v in peer["parameters_by_module"].items()}
    assert set(ours) == set(theirs)
    for module in ("embedding", "interactions", "readouts"):
        assert ours[module] == theirs[module], module
    assert 0 < ours["products"] <= theirs["products"]


def test_bench_relax_cuau_cell(tmp_path):
    """The Cu–Au cell system builds and relaxes (cell too) a few steps with an untrained tiny model, repeated."""
    out = tmp_path / "relax_cuau.json"
    payload = run_script("bench_relax.py", out, "--systems", "cuau", "--only", "mace/cg", "--steps", "2", "--repeat", "2")
    rows = check_common(payload, "relax")
    assert payload["settings"]["cell"] is True and payload["settings"]["repeat"] == 2
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all("Cu16Au16" in r["system"] and r["num_atoms"] == 32 for r in ok)
    for r in ok:
        assert r["steps"] == 2 and len(r["wall_s_runs"]) == 2
        positive(r, "wall_s", "cpu_s", "ms_per_call")


def test_cuau_data_and_rmse_helpers(tmp_path):
    """The Cu–Au split writer (REF_* keys, stress) and the validation-RMSE helpers of bench_relax."""
    import ase.io
    import numpy as np

    import bench_relax as br
    from potentials.data.demo import cuau_start_cell, write_demo_split

    start = cuau_start_cell()
    assert len(start) == 32 and start.pbc.all() and sorted(set(start.get_chemical_symbols())) == ["Au", "Cu"]
    files = write_demo_split(tmp_path, n_train=2, n_val=1)
    frames = ase.io.read(files["train"], index=":")
    assert len(frames) == 2 and np.shape(frames[0].info["REF_stress"]) == (6,)
    assert frames[0].arrays["REF_forces"].shape == (len(frames[0]), 3)
    ref = br.reference_frames(files["valid"])
    assert np.shape(ref["stress"][0]) == (3, 3)
    assert br.rmse_row(ref, ref) == {"val_frames": 1, "val_energy_rmse": 0.0, "val_forces_rmse": 0.0, "val_stress_rmse": 0.0}
    assert br.split_spec("cuau:Facet=a/b.ckpt", ("cuau", "3bpa")) == ("cuau", "Facet", "a/b.ckpt")
    assert br.split_spec("/x/y.model", ("cuau",)) == (None, None, "/x/y.model")
