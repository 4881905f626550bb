#!/usr/bin/env python
"""Peer side of the benchmarks: mace-torch, run by ``peer-venv/bin/python`` (never by the project's venv).

mace-torch pins e3nn 0.4.x, so it lives in its own venv (``make peer-venv``) and the benchmark scripts
(``scripts/bench_*.py``) run this file there as a subprocess. It must not import ``potentials``.

    peer-venv/bin/python scripts/peer_mace.py < task.json

The task (JSON on stdin) names ``kind`` — ``info``, ``train``, ``calc`` or ``relax`` — and the model's
hyper-parameters ``hp`` (see ``REFERENCE_HP`` in ``scripts/bench_common.py``). The answer is one line
``PEER_JSON {...}`` on stdout; everything else (mace's logging, warnings) is noise to the caller.

The model is ``mace.modules.ScaleShiftMACE`` built exactly as ``mace_run_train`` builds it from its
command line (``--model ScaleShiftMACE --num_channels C --max_L L --max_ell l --correlation ν
--num_interactions T --r_max r --num_radial_basis n --num_cutoff_basis p --radial_MLP [...]
--MLP_irreps Kx0e``, residual interaction blocks first and later, SiLU gate, ``use_reduced_cg`` off —
all ``mace_run_train`` defaults), from random initialisation (untrained): timing needs no training.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
# e3nn 0.4.4 reads its own constants file with a bare torch.load, which torch ≥ 2.6 refuses (weights_only);
# mace-torch sets this same variable in its package __init__ — set it before anything imports e3nn.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (stdlib-only at import time, so it loads in the peer venv too)
import bench_report as rp  # noqa: E402


rss_mb, peak_rss_mb = rp.rss_mb, rp.peak_rss_mb  # stdlib-only helpers shared with our side


def build_model(hp: dict, atomic_numbers: list[int], e0s: dict, avg_num_neighbors: float, scale: float, shift: float):
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    channels, max_L = int(hp["channels"]), int(hp["max_L"])
    hidden = " + ".join(f"{channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(max_L + 1))
    residual = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    z = [int(v) for v in atomic_numbers]
    model = modules.ScaleShiftMACE(
        r_max=float(hp["r_max"]),
        num_bessel=int(hp["num_bessel"]),
        num_polynomial_cutoff=int(hp["cutoff_p"]),
        max_ell=int(hp["max_ell"]),
        interaction_cls=residual,
        interaction_cls_first=residual,
        num_interactions=int(hp["num_interactions"]),
        num_elements=len(z),
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps(f"{int(hp['readout_hidden'])}x0e"),
        atomic_energies=np.array([float(e0s.get(str(k), e0s.get(k, 0.0))) for k in z]),
        avg_num_neighbors=float(avg_num_neighbors),
        atomic_numbers=z,
        correlation=int(hp["correlation"]),
        gate=torch.nn.functional.silu,
        radial_MLP=[int(v) for v in hp["radial_hidden"]],
        radial_type="bessel",
        use_reduced_cg=bool(hp.get("peer_use_reduced_cg", False)),
        atomic_inter_scale=float(scale),
        atomic_inter_shift=float(shift),
    )
    return model


def setup(task: dict):
    import torch

    torch.set_num_threads(int(task.get("threads", 1)))
    dtype = {"float32": torch.float32, "float64": torch.float64}[task.get("dtype", "float64")]
    torch.set_default_dtype(dtype)
    torch.manual_seed(int(task.get("seed", 0)))
    if task.get("model_path"):  # a trained mace-torch model file instead of an untrained one
        model = torch.load(task["model_path"], map_location="cpu", weights_only=False)
        return model.to(dtype), dtype
    model = build_model(
        task["hp"], task["atomic_numbers"], task.get("e0s", {}), task.get("avg_num_neighbors", 1.0),
        task.get("scale", 1.0), task.get("shift", 0.0),
    )
    return model.to(dtype), dtype


def with_ref_keys(atoms):
    """Copy ASE calculator results (where ASE's extxyz reader puts energy/forces/stress) into mace's
    default ``REF_*`` keys."""
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {})
    for key in ("energy", "stress"):
        if key in results:
            atoms.info[f"REF_{key}"] = results[key]
        elif key in atoms.info:
            atoms.info[f"REF_{key}"] = atoms.info[key]
    if "forces" in results:
        atoms.arrays["REF_forces"] = results["forces"]
    elif "forces" in atoms.arrays:
        atoms.arrays["REF_forces"] = atoms.arrays["forces"]
    atoms.calc = None
    return atoms


def task_info(task: dict) -> dict:
    import importlib.metadata as md

    import e3nn
    import torch

    return {"mace_torch": md.version("mace-torch"), "e3nn": e3nn.__version__, "torch": torch.__version__}


def task_train(task: dict) -> dict:
    """Time fwd + bwd (energy, forces by autograd, optionally stress) + Adam step on fixed batches."""
    import ase.io
    import torch
    from mace import data as mdata
    from mace import modules
    from mace.tools import torch_geometric, utils

    model, dtype = setup(task)
    model.train()
    frames = [with_ref_keys(a) for a in ase.io.read(task["data"], index=":")]
    idx = task.get("indices")
    if idx is not None:
        frames = [frames[i] for i in idx]
    keyspec = mdata.KeySpecification(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"}, arrays_keys={"forces": "REF_forces"}
    )
    z_table = utils.AtomicNumberTable([int(z) for z in task["atomic_numbers"]])
    r_max = float(task["hp"]["r_max"])
    configs = [mdata.config_from_atoms(a, key_specification=keyspec) for a in frames]
    dataset = [mdata.AtomicData.from_config(c, z_table=z_table, cutoff=r_max) for c in configs]
    loader = torch_geometric.dataloader.DataLoader(dataset, batch_size=int(task["batch_size"]), shuffle=False, drop_last=True)
    batches = [b.to("cpu") for b in loader]
    stress = bool(task.get("stress", False))
    if stress:
        loss_fn = modules.WeightedEnergyForcesStressLoss(energy_weight=1.0, forces_weight=10.0, stress_weight=100.0)
    else:
        loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)

    def step(batch):
        batch_dict = batch.to_dict()
        optimizer.zero_grad(set_to_none=True)
        out = model(batch_dict, training=True, compute_force=True, compute_virials=False, compute_stress=stress)
        loss = loss_fn(pred=out, ref=batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    warmup, steps = int(task.get("warmup", 1)), int(task.get("steps", 5))
    for i in range(warmup):
        step(batches[i % len(batches)])
    times, atoms, structures = [], [], []
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        t0 = time.perf_counter()
        loss = step(b)
        times.append(time.perf_counter() - t0)
        atoms.append(int(b.num_nodes))
        structures.append(int(b.num_graphs))
    return {
        "step_times_s": times, "atoms_per_step": atoms, "structures_per_step": structures,
        "last_loss": loss, "num_parameters": sum(p.numel() for p in model.parameters()), "peak_rss_mb": peak_rss_mb(),
        "parameters_by_module": parameters_by_module(model),
    }


def parameters_by_module(model) -> dict:
    """Parameter count per top-level submodule (mace-torch's names; bench_common maps them to ours)."""
    out = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        out[top] = out.get(top, 0) + int(p.numel())
    return out


def make_calculator(model, dtype_name: str):
    from mace.calculators import MACECalculator

    return MACECalculator(models=model, device="cpu", default_dtype=dtype_name)


def task_calc(task: dict) -> dict:
    """Time ASE-calculator calls on one structure: energy + forces (+ stress for periodic cells)."""
    import ase.io
    from ase.calculators.calculator import all_changes

    model, _ = setup(task)
    model.eval()
    atoms = ase.io.read(task["structure"], index=-1)
    atoms.calc = None
    calc = make_calculator(model, task.get("dtype", "float64"))
    periodic = bool(atoms.pbc.any())
    props = ["energy", "forces"] + (["stress"] if periodic else [])

    def call():
        # MACECalculator always computes stress; for a molecule (this project computes none) the model is called the
        # way the calculator calls it (same batch conversion) but with compute_stress=False: same properties both sides
        if periodic or not hasattr(calc, "_atoms_to_batch"):
            calc.calculate(atoms, props, all_changes)
            return
        batch = calc._atoms_to_batch(atoms)
        out = model(batch.to_dict(), compute_stress=False, training=False)
        calc.results = {"energy": float(out["energy"].detach().cpu()[0]), "forces": out["forces"].detach().cpu().numpy()}

    rss_before = rss_mb()
    times = []
    for i in range(int(task.get("warmup", 3)) + int(task.get("repeat", 5))):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        if i >= int(task.get("warmup", 3)):
            times.append(dt)
    energy = float(calc.results["energy"])
    return {
        "call_times_s": times, "num_atoms": len(atoms), "energy": energy,
        "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameters_by_module": parameters_by_module(model),
    }


def task_eval(task: dict) -> dict:
    """Predictions on every frame of ``val_file`` through mace-torch's own ASE calculator."""
    model, _ = setup(task)
    model.eval()
    return bc.predict_frames(make_calculator(model, task.get("dtype", "float64")), task["val_file"])


def task_relax(task: dict) -> dict:
    import ase.io

    model, _ = setup(task)
    model.eval()
    atoms = ase.io.read(task["structure"], index=-1)
    atoms.calc = make_calculator(model, task.get("dtype", "float64"))
    return bc.timed_relaxation(atoms, task)


TASKS = {"info": task_info, "train": task_train, "calc": task_calc, "relax": task_relax, "eval": task_eval}


def main() -> int:
    task = json.loads(sys.stdin.read())
    kind = task.get("kind")
    if kind not in TASKS:
        print("PEER_JSON " + json.dumps({"error": f"unknown task kind {kind!r}; available: {sorted(TASKS)}"}))
        return 2
    try:
        result = TASKS[kind](task)
    except Exception as exc:  # report to the caller, which records it as the row's reason
        import traceback

        traceback.print_exc(file=sys.stderr)
        print("PEER_JSON " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    result.update(task_info(task) if kind != "info" else {})
    print("PEER_JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
