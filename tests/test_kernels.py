"""Fast kernels equal the reference maths: the CG edge product's dense coupling tensor vs e3nn's TensorProduct,
the fused chunked aggregation vs plain gather/scatter (values, gradients; higher derivatives refused), the chunked
symmetric contraction vs one pass, and the EMA warm-up rule."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

import potentials.nn.symmetric_contraction as sc_mod
import potentials.nn.ops as ops
from potentials.nn.ops import scatter_sum
from potentials.nn.tp.cg import CGEdgeTensorProduct
from potentials.train.ema import warmup_ema_avg_fn

NODE = o3.Irreps("3x0e+3x1o")
SH = o3.Irreps.spherical_harmonics(3)
TARGET = o3.Irreps("3x0e+3x1o+3x2e+3x3o")


def _inputs(tp, e=40, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, NODE.dim, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(e, SH.dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, tp.weight_numel, generator=g, dtype=torch.float64, requires_grad=True)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    return h, y, w, edge_index


def test_cg_coupling_tensor_equals_e3nn_tensor_product_built_in_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn bakes its Wigner 3j in the default dtype at build time
    try:
        tp = CGEdgeTensorProduct(NODE, SH, TARGET)
    finally:
        torch.set_default_dtype(old)
    h, y, w, _ = _inputs(tp)
    x = h.detach()[torch.arange(40) % 7]
    ref = tp.tp(x, y.detach(), w.detach())
    got = tp(x, y.detach(), w.detach())
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_fused_aggregate_equals_gather_scatter_with_gradients(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_EDGES", 9)  # several chunks, the last one partial
    tp = CGEdgeTensorProduct(NODE, SH, TARGET).double()
    radial = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, tp.weight_numel)).double()
    h, y, _, edge_index = _inputs(tp)
    f = torch.randn(y.shape[0], 4, dtype=torch.float64, requires_grad=True)

    def reference(h, y, f):
        return scatter_sum(tp(h[edge_index[1]], y, radial(f)), edge_index[0], h.shape[0])

    fused = tp.aggregate(h, y, radial, f, edge_index, h.shape[0], fused=True)
    plain = tp.aggregate(h, y, radial, f, edge_index, h.shape[0], fused=False)
    ref = reference(h, y, f)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-12)
    probe = torch.randn_like(ref)
    g_fused = torch.autograd.grad((fused * probe).sum(), (h, y, f))
    g_ref = torch.autograd.grad((ref * probe).sum(), (h, y, f))
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    radial.requires_grad_(False)  # the fused kernel differentiates with respect to its inputs only
    few = edge_index[:, :5]
    fn = lambda h, y, f: tp.aggregate(h, y, radial, f, few, h.shape[0], fused=True)  # noqa: E731
    inputs = (h, y[:5].detach().requires_grad_(True), f[:5].detach().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    out = fn(*inputs)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.sum(), inputs[0], create_graph=True)


@pytest.mark.parametrize("name, options", [
    ("mace", {"tp": "cg"}), ("mace", {"tp": "gaunt_grid"}), ("mace", {"tp": "gaunt_fft"}), ("facet", {}),
])
def test_fused_inference_model_matches_plain_model(monkeypatch, name, options):
    """Whole models: energy, forces and stress inside fused_inference equal the plain path (float64)."""
    from ase.build import bulk

    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import MODELS, energy_forces_stress
    from potentials.nn.ops import fused_inference

    monkeypatch.setattr(ops, "CHUNK_EDGES", 100)
    monkeypatch.setattr(ops, "CHUNK_NODES", 8)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=3)
    graph = atoms_to_graph(atoms, 4.0)
    graph["batch"] = torch.zeros(len(atoms), dtype=torch.long)
    torch.manual_seed(0)
    sizes = {"mace": dict(channels=4, max_L=1, max_ell=2, correlation=3, radial_hidden=[8], readout_hidden=4),
             "facet": dict(channels=4, max_L=1, max_ell=2, radial_hidden=[8], readout_hidden=4)}[name]
    model = MODELS[name]([29], {29: -1.0}, r_max=4.0, **sizes, **options).double().eval()
    plain = energy_forces_stress(model, graph, forces=True, stress=True)
    with fused_inference():
        fused = energy_forces_stress(model, graph, forces=True, stress=True)
    for key in ("energy", "forces", "stress"):
        assert plain[key].abs().max() > 0
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-10, atol=1e-12)


def test_symmetric_contraction_in_chunks_equals_one_pass(monkeypatch):
    contraction = sc_mod.SymmetricContraction("4x0e+4x1o+4x2e", "4x0e+4x1o", 3, 2).double()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(13, contraction.irreps_in.dim, generator=g, dtype=torch.float64, requires_grad=True)
    species = torch.randint(0, 2, (13,), generator=g)
    whole = contraction(a, species)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), a)
    monkeypatch.setattr(sc_mod, "ROWS_PER_CHUNK", 12)  # 3 nodes x 4 channels per chunk
    chunked = contraction(a, species)
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), a)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_whole, rtol=0, atol=1e-11)


@pytest.mark.parametrize("n, expected", [(1, 2 / 11), (10, 11 / 20), (10_000, 0.99)])
def test_ema_warmup_decay(n, expected):
    avg = warmup_ema_avg_fn(0.99)(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(n))
    assert float(avg) == pytest.approx(expected)
