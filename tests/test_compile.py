"""Compiled execution (potentials.models.compiled / export): the traced energy→forces/stress graph equals eager
execution for every engine and Facet at sizes it was not traced at; compiled graphs do not recompile per size;
compiled training follows eager training; a resumed compiled run continues exactly; an exported package runs in a
fresh process without the model code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from potentials.data.graph import collate
from potentials.data.neighbors import atoms_to_graph
from potentials.errors import PotentialsError
from potentials.models import build_model, energy_forces_stress
from potentials.models.compiled import CompiledPotential, graph_inputs, parameters_and_buffers, trace
from tests.conftest import REPO, TINY_MODEL, TINY_STATS

FACET = dict(name="facet", tp="cg", radial="spline", dtype="float64", r_max=4.0, num_interactions=2, channels=4,
             max_L=1, max_ell=2, num_knots=6, readout_hidden=4, grid_res=[8, 10])
VARIANTS = {
    "mace/cg": TINY_MODEL,
    "mace/gaunt_grid": dict(TINY_MODEL, tp="gaunt_grid"),
    "mace/gaunt_fft": dict(TINY_MODEL, tp="gaunt_fft"),
    "facet/cg": FACET,
}


def structure(rep, seed, periodic=True, gold=3):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.7).repeat(rep)
    atoms.numbers[::gold] = 79
    atoms.rattle(0.08, seed=seed)
    if not periodic:
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
    return atoms_to_graph(atoms, 4.0)


def batch_a():  # what the graphs are traced at: 2 periodic structures
    return collate([structure((2, 2, 1), 1), structure((1, 2, 2), 2)])


def batch_b():  # other sizes, other B, a molecule among them
    return collate([structure((2, 2, 2), 3), structure((1, 1, 3), 4, periodic=False), structure((3, 1, 1), 5)])


def loss_of(out: dict) -> torch.Tensor:
    return (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum() + 10 * (out["stress"] ** 2).sum()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) / max(float(b.detach().abs().max()), 1e-300)


def assert_matches_eager(got: dict, model, graph, params: list) -> None:
    """``got`` (energy, forces, stress) and the parameter gradients of a force/stress loss through it equal eager
    execution with its double backward to 1e-10."""
    ref = energy_forces_stress(model, graph, forces=True, stress=True, training=True)
    for key in ref:
        assert max_rel(got[key], ref[key]) < 1e-10, key
    g_got = torch.autograd.grad(loss_of(got), params)
    g_ref = torch.autograd.grad(loss_of(ref), params)
    assert max(max_rel(a, b) for a, b in zip(g_got, g_ref)) < 1e-10


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_traced_graph_equals_eager_at_untraced_sizes(variant):
    """One graph traced on batch A gives energy, forces, stress and the parameter gradients of a force/stress loss
    equal to eager execution (double backward) on batch B (other n, E, B; molecule + cells) to 1e-10."""
    torch.manual_seed(0)
    model = build_model(VARIANTS[variant], TINY_STATS)
    gm = trace(model, batch_a(), forces=True, stress=True)
    params = list(model.parameters())
    for graph in (batch_b(), batch_a()):
        outs = gm(*graph_inputs(model, graph), *parameters_and_buffers(model)[1])
        assert_matches_eager(dict(zip(("energy", "forces", "stress"), outs)), model, graph, params)


def test_traced_float32_model_is_close_to_eager():
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, dtype="float32"), TINY_STATS)
    gm = trace(model, batch_a(), forces=True, stress=True)
    graph = batch_b()
    got = dict(zip(("energy", "forces", "stress"), gm(*graph_inputs(model, graph), *parameters_and_buffers(model)[1])))
    ref = energy_forces_stress(model, graph, forces=True, stress=True)
    for key in ref:
        assert max_rel(got[key], ref[key]) < 1e-5, key


def test_unknown_element_raises_before_the_graph():
    model = build_model(TINY_MODEL, TINY_STATS)
    graph = batch_a()
    graph["numbers"][0] = 26  # Fe: not in the table
    with pytest.raises(PotentialsError, match="Fe"):
        CompiledPotential(model, backend=None)(graph, forces=True)


def test_compiled_gradients_equal_eager_without_recompiling_per_size():
    """torch.compile (aot_eager: AOTAutograd without C++) of the traced graph: energies, forces, stress and parameter
    gradients equal eager at three batch shapes; exactly one graph is compiled for all of them."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(TINY_MODEL, TINY_STATS)
    compiled = CompiledPotential(model, backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    params = list(model.parameters())
    third = collate([structure((2, 1, 1), 6, gold=2), structure((2, 2, 1), 7), structure((1, 2, 1), 8, gold=2)])
    for graph in (batch_a(), batch_b(), third):
        assert_matches_eager(compiled(graph, forces=True, stress=True, training=True), model, graph, params)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_compiled_training_follows_eager_loss_curve(demo_file):
    """20 Adam steps through the compiled graph (aot_eager) and eagerly, from the same weights, on the demo data:
    the loss curves agree to 1e-8 relative (float64)."""
    import copy

    from potentials.data.dataset import GraphDataset

    ds = GraphDataset.from_files([demo_file], 4.0)
    batches = [collate([ds[(2 * i + k) % len(ds)] for k in range(2)]) for i in range(20)]
    torch.manual_seed(0)
    eager_model = build_model(TINY_MODEL, TINY_STATS)
    compiled_model = copy.deepcopy(eager_model)
    curves = []
    for model, run in ((eager_model, None), (compiled_model, CompiledPotential(compiled_model, backend="aot_eager"))):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for graph in batches:
            out = (run or (lambda g, **kw: energy_forces_stress(model, g, **kw)))(graph, forces=True, stress=False,
                                                                                 training=True)
            loss = ((out["energy"] - graph["energy"]) ** 2).mean() + 10 * ((out["forces"] - graph["forces"]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        curves.append(np.array(losses))
    assert curves[0][-1] < curves[0][0]  # it trains
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-8, atol=0)


def test_inductor_calculator_equals_eager_for_new_atom_counts(periodic_atoms):
    """The calculator's compiled path (inductor, C++): energy, forces and stress equal the eager calculator to 1e-10
    (float64) for cells of 8 and 12 atoms, with one compiled graph."""
    from torch._dynamo.utils import counters

    from potentials.calculator import PotentialCalculator

    torch.manual_seed(0)
    cfg = dict(TINY_MODEL, num_interactions=1, correlation=2)
    eager = PotentialCalculator(build_model(cfg, TINY_STATS))
    torch.manual_seed(0)
    compiled = PotentialCalculator(build_model(cfg, TINY_STATS), compile=True)
    before = counters["stats"]["unique_graphs"]
    assert_calculators_agree(compiled, eager)
    assert counters["stats"]["unique_graphs"] - before == 1


def assert_calculators_agree(calc, eager, after_each=lambda: None) -> None:
    """``calc`` gives the energy, forces and stress of ``eager`` to 1e-10 on Cu–Au cells of 8 and 12 atoms;
    ``after_each()`` runs after each cell."""
    from ase.build import bulk

    for rep, seed in (((2, 2, 2), 1), ((3, 2, 2), 2)):
        atoms = bulk("Cu", "fcc", a=3.7).repeat(rep)
        atoms.numbers[::3] = 79
        atoms.rattle(0.08, seed=seed)
        e = eager.get_potential_energy(atoms), eager.get_forces(atoms), eager.get_stress(atoms)
        c = calc.get_potential_energy(atoms), calc.get_forces(atoms), calc.get_stress(atoms)
        assert abs(c[0] - e[0]) < 1e-10 * abs(e[0])
        np.testing.assert_allclose(c[1], e[1], rtol=0, atol=1e-10 * np.abs(e[1]).max())
        np.testing.assert_allclose(c[2], e[2], rtol=0, atol=1e-10 * np.abs(e[2]).max())
        after_each()


def test_export_runs_in_a_fresh_process_without_model_code(tmp_path):
    """scripts/export.py → .pt2; a new interpreter loads it through PotentialCalculator.from_exported with no
    potentials.models / e3nn module imported, and reproduces the eager calculator (1e-10, float64) on two sizes."""
    import ase.io
    from ase.build import bulk

    from potentials.calculator import PotentialCalculator
    from potentials.train.module import PotentialModule

    torch.manual_seed(0)
    cfg = dict(TINY_MODEL, num_interactions=1, correlation=2, max_ell=1, max_L=0)
    module = PotentialModule(cfg, TINY_STATS)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    out = tmp_path / "tiny.pt2"
    r = subprocess.run([sys.executable, str(REPO / "scripts/export.py"), str(ckpt), str(out)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    frames = []
    for rep, seed in (((2, 2, 1), 1), ((2, 2, 2), 2)):
        atoms = bulk("Cu", "fcc", a=3.7).repeat(rep)
        atoms.numbers[::2] = 79
        atoms.rattle(0.08, seed=seed)
        frames.append(atoms)
    ase.io.write(tmp_path / "frames.extxyz", frames)
    code = f"""
import sys, json, ase.io
from potentials.calculator import PotentialCalculator
calc = PotentialCalculator.from_exported({str(out)!r})
res = []
for atoms in ase.io.read({str(tmp_path / 'frames.extxyz')!r}, ":"):
    atoms.calc = calc
    res.append([atoms.get_potential_energy(), atoms.get_forces().tolist(), atoms.get_stress().tolist()])
loaded = [m for m in sys.modules if m.startswith(("potentials.models", "potentials.nn", "e3nn"))]
print(json.dumps({{"res": res, "loaded": loaded}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["loaded"] == []
    eager = PotentialCalculator.from_checkpoint(ckpt)
    frames = ase.io.read(tmp_path / "frames.extxyz", ":")  # the positions the other process saw (extxyz rounds them)
    for atoms, (energy, forces, stress) in zip(frames, data["res"]):
        atoms.calc = eager
        assert abs(energy - atoms.get_potential_energy()) < 1e-10 * abs(energy)
        np.testing.assert_allclose(forces, atoms.get_forces(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(stress, atoms.get_stress(), rtol=0, atol=1e-10)


def test_compiled_training_run_resumes_exactly(demo_file, tmp_path):
    """model.compile through the real training run (Lightning, EMA, step checkpoints): a run resumed from a mid-epoch
    step checkpoint ends with the same raw and EMA weights as the uninterrupted run (``trace``: the traced graph
    without a compiler — the executor of ``model.compile=true`` minus the C++ step, to keep the test fast)."""
    import shutil

    from potentials.train.run import train
    from tests.test_train import make_cfg

    opts = ("model.channels=2", "model.correlation=2", os.environ.get("COMPILE_OPT", "model.compile=trace"),
            "trainer.deterministic=true", "trainer.max_epochs=2", "checkpoint.every_n_train_steps=3",
            "checkpoint.keep_step_checkpoints=20", "parity_plot=false")
    straight = train(make_cfg(demo_file, *opts), tmp_path / "straight")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    steps = sorted((resumed_dir / "checkpoints").glob("step-*.ckpt"))
    keep = steps[len(steps) // 2]  # a step checkpoint in the middle of the run
    for f in (resumed_dir / "checkpoints").glob("*.ckpt"):
        if f != keep:
            f.unlink()
    assert 0 < torch.load(keep, weights_only=False)["global_step"] < torch.load(straight["last"], weights_only=False)["global_step"]
    resumed = train(make_cfg(demo_file, *opts), resumed_dir)
    a = torch.load(straight["last"], weights_only=False)
    b = torch.load(resumed["last"], weights_only=False)
    assert a["global_step"] == b["global_step"] > 0
    for key in ("state_dict", "current_model_state"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}:{name}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it there)")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_compiled_calculator_equals_eager(dtype):
    """On CUDA: the compiled calculator (inductor → Triton) equals the eager one on two cell sizes, one graph."""
    from ase.build import bulk
    from torch._dynamo.utils import counters

    from potentials.calculator import PotentialCalculator

    cfg = dict(TINY_MODEL, dtype=dtype)
    torch.manual_seed(0)
    eager = PotentialCalculator(build_model(cfg, TINY_STATS), device="cuda")
    torch.manual_seed(0)
    compiled = PotentialCalculator(build_model(cfg, TINY_STATS), device="cuda", compile=True)
    before = counters["stats"]["unique_graphs"]
    tol = 1e-10 if dtype == "float64" else 1e-5
    for rep in ((2, 2, 2), (3, 3, 2)):
        atoms = bulk("Cu", "fcc", a=3.7).repeat(rep)
        atoms.numbers[::3] = 79
        atoms.rattle(0.08, seed=1)
        f_e, f_c = eager.get_forces(atoms), compiled.get_forces(atoms)
        np.testing.assert_allclose(f_c, f_e, rtol=0, atol=tol * np.abs(f_e).max())
        np.testing.assert_allclose(compiled.get_stress(atoms), eager.get_stress(atoms), rtol=0,
                                   atol=tol * np.abs(eager.get_stress(atoms)).max())
    assert counters["stats"]["unique_graphs"] - before == 1


def test_traced_graph_keeps_bf16_autocast_to_the_backbone():
    """Traced under bf16 autocast (as Lightning's bf16-mixed runs a step), the graph equals the eager step under the
    same autocast — the backbone casts are recorded, the energy head and derivatives stay in the model dtype — and
    differs from the full-precision graph (so autocast did reach the backbone)."""
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, dtype="float32"), TINY_STATS)
    graph = batch_b()
    compiled = CompiledPotential(model, backend=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(graph, forces=True, stress=True, training=True)
        ref = energy_forces_stress(model, graph, forces=True, stress=True, training=True)
    full = energy_forces_stress(model, graph, forces=True, stress=True)
    for key in ref:
        assert got[key].dtype == ref[key].dtype
        assert max_rel(got[key], ref[key]) < 1e-6, key
    assert max_rel(got["forces"], full["forces"]) > 1e-4  # bf16 did change the backbone


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_lean_chunk_kernels_equal_eager(variant):
    """The memory-lean compiled path (eager chunk loops, traced static-shape chunk bodies, padded last chunk) gives
    energy, forces and stress equal to eager execution to 1e-10 (float64), for a cell and a molecule of other
    sizes, without a new kernel per size; with per-node kernels too."""
    from potentials.models.compiled_chunks import ChunkKernels
    from potentials.nn.ops import compiled_chunks, fused_inference

    torch.manual_seed(0)
    model = build_model(VARIANTS[variant], TINY_STATS).eval()
    for node_chunk in (None, 5):
        kernels = ChunkKernels(backend=None, edge_chunk=64, node_chunk=node_chunk)
        sizes = []
        for graph in (structure((2, 2, 2), 1), structure((3, 1, 2), 2, periodic=False), structure((2, 3, 2), 3)):
            graph["batch"] = torch.zeros(graph["positions"].shape[0], dtype=torch.long)
            ref = energy_forces_stress(model, graph, forces=True, stress=True)
            with fused_inference(), compiled_chunks(kernels):
                got = energy_forces_stress(model, graph, forces=True, stress=True)
            assert graph["edge_index"].shape[1] % 64 != 0  # a padded last chunk
            for key in ref:
                assert max_rel(got[key], ref[key]) < 1e-10, (key, node_chunk)
            sizes.append(len(kernels._cache))
        assert sizes[0] >= 2 and sizes[-1] == sizes[0], sizes  # kernels of the first size serve the others


def test_inductor_memory_lean_calculator_equals_eager():
    """The calculator's memory-lean compiled path (inductor C++ chunk kernels, ``lean_edges=0``) equals the eager
    calculator to 1e-10 (float64) for cells of 8 and 12 atoms, with the kernels compiled once."""
    from potentials.calculator import PotentialCalculator

    torch.manual_seed(0)
    cfg = dict(TINY_MODEL, num_interactions=1, correlation=2)
    eager = PotentialCalculator(build_model(cfg, TINY_STATS))
    torch.manual_seed(0)
    lean = PotentialCalculator(build_model(cfg, TINY_STATS), compile=True, lean_edges=0)
    counts = []
    assert_calculators_agree(lean, eager, lambda: counts.append(len(lean.compiled._chunk_kernels._cache)))
    # forward and backward kernels of the edge messages and of the product basis, compiled once
    assert counts[0] == 4 and counts[1] == 4, counts
    assert not lean.compiled._cache  # the one-graph path was never used
