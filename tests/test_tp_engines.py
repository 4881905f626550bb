"""Tensor-product engines (float64): exactness of the Gaunt engines, parity, audit, whole-model symmetry and
forces, weight transfer between gaunt_fft and gaunt_grid (also through a checkpoint), resolution errors, auto."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.models import build_model
from potentials.nn.tp import available_engines, get_engine
from potentials.nn.tp import gaunt_fft as fft_mod
from potentials.nn.tp.audit import path_audit, product_basis_audit, symmetric_coupling_count
from potentials.nn.tp.gaunt import (
    GauntEdgeTensorProduct,
    GauntProductBasis,
    gaunt_coefficients,
    gaunt_tensor,
)
from potentials.nn.tp.rings import legendre_table
from potentials.nn.tp.gaunt_reference import gaunt_power_dense, gaunt_product_dense
from potentials.nn.tp.gaunt_grid import GridPowerKernel, GridProductKernel
from tests.conftest import REPO, TINY_MODEL, TINY_STATS
from tests.test_model import assert_forces_match_fd, evaluate, random_orthogonal, rel, transformed

GAUNT = ["gaunt_grid", "gaunt_fft"]
TOL = 1e-10


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kernels(l1, l2, lout):
    return {"gaunt_grid": GridProductKernel(l1, l2, lout), "gaunt_fft": fft_mod.product_kernel(l1, l2, lout)}


# --------------------------------------------------------------------------------------------------------------
# Bare products
# --------------------------------------------------------------------------------------------------------------


def test_closed_form_gaunt_matches_quadrature():
    """§1 closed form vs a 12×24 Gauss–Legendre quadrature of ∫ Y Y Y (l ≤ 3, exact at that size)."""
    t, w = np.polynomial.legendre.leggauss(12)
    beta = torch.from_numpy(np.arccos(t))
    alpha = 2 * math.pi * torch.arange(24, dtype=torch.float64) / 24
    b, a = torch.meshgrid(beta, alpha, indexing="ij")
    pts = torch.stack([b.sin() * a.sin(), b.cos(), b.sin() * a.cos()], -1).reshape(-1, 3)
    wq = (torch.from_numpy(w)[:, None] * torch.full((24,), 2 * math.pi / 24)).reshape(-1)
    y = o3.spherical_harmonics(list(range(4)), pts, normalize=False, normalization="integral")
    for l1, l2, l3 in itertools.product(range(4), repeat=3):
        s = [slice(l * l, (l + 1) ** 2) for l in (l1, l2, l3)]
        quad = torch.einsum("p,pa,pb,pc->abc", wq, y[:, s[0]], y[:, s[1]], y[:, s[2]])
        assert (quad - gaunt_coefficients(l1, l2, l3)).abs().max() < 1e-12


def test_engines_equal_dense_gaunt_all_degrees_up_to_6():
    """Every (L1, L2, Lout) with L ≤ 6 (incl. Lout < L1+L2 and L = 0), default mode/strategy of each engine."""
    worst = {name: 0.0 for name in GAUNT}
    for l1, l2, lout in itertools.product(range(7), repeat=3):
        x, y = _rand(3, (l1 + 1) ** 2, seed=l1), _rand(3, (l2 + 1) ** 2, seed=10 + l2)
        ref = gaunt_product_dense(x, y, lout)
        for name, kernel in _kernels(l1, l2, lout).items():
            worst[name] = max(worst[name], float((kernel(x, y) - ref).abs().max() / ref.abs().max().clamp(min=1)))
    assert max(worst.values()) < TOL, worst


@pytest.mark.parametrize("l1,l2,lout", [(1, 1, 2), (2, 3, 1), (3, 3, 3), (4, 2, 6), (6, 6, 4), (5, 6, 11)])
def test_all_fft_modes_and_grid_strategies_are_exact(l1, l2, lout):
    x, y = _rand(4, (l1 + 1) ** 2, seed=1), _rand(4, (l2 + 1) ** 2, seed=2)
    ref = gaunt_product_dense(x, y, lout)
    kernels = [fft_mod.product_kernel(l1, l2, lout, mode=m) for m in ("dft", "fft", "direct")]
    kernels += [fft_mod.product_kernel(l1, l2, lout, mode="dft", strategy=s) for s in ("dense", "separable")]
    kernels += [GridProductKernel(l1, l2, lout, strategy=s) for s in ("dense", "separable")]
    d = l1 + l2 + lout
    kernels += [GridProductKernel(l1, l2, lout, resolution=((d + 2) // 2 + 3, d + 4))]  # larger than needed: exact
    for k in kernels:
        assert (k(x, y) - ref).abs().max() < TOL


@pytest.mark.parametrize("lmax_in,nu,lout", [(1, 3, 1), (2, 3, 0), (2, 2, 4), (3, 3, 1), (3, 3, 3)])
def test_powers_are_exact_without_truncation(lmax_in, nu, lout):
    x = _rand(5, (lmax_in + 1) ** 2, seed=3)
    refs = [gaunt_power_dense(x, k, lout) for k in range(1, nu + 1)]
    kernels = [get_engine(n).power_kernel(lmax_in, nu, lout) for n in GAUNT]
    kernels += [fft_mod.power_kernel(lmax_in, nu, lout, mode=m) for m in ("fft", "direct")]
    kernels += [GridPowerKernel(lmax_in, nu, lout, strategy=s) for s in ("dense", "separable")]
    for k in kernels:
        out = k(x)
        for i, ref in enumerate(refs):
            assert (out[:, i] - ref).abs().max() < TOL * max(1.0, float(ref.abs().max()))
    # truncating the intermediate degrees gives a different (wrong) answer
    if nu == 3 and lout < 2 * lmax_in:
        truncated = gaunt_product_dense(gaunt_product_dense(x, x, lout), x, lout)
        assert (truncated - refs[2]).abs().max() > 1e-3


@pytest.mark.parametrize("l1,l2,lout", [(1, 1, 2), (2, 2, 4), (3, 2, 3), (2, 3, 5)])
def test_engines_agree_with_e3nn_tensor_product_oracle(l1, l2, lout):
    """Design note §1: e3nn TensorProduct, no normalisation, path weight c(l1,l2,l3)² per even-sum path."""
    ir1, ir2, ir3 = (o3.Irreps([(1, (l, (-1) ** l)) for l in range(lm + 1)]) for lm in (l1, l2, lout))
    instr = []
    for (i, (_, a)), (j, (_, b)), (k, (_, c)) in itertools.product(enumerate(ir1), enumerate(ir2), enumerate(ir3)):
        if c in a * b:
            w = o3.wigner_3j(a.l, b.l, c.l)
            cc = math.sqrt((2 * a.l + 1) * (2 * b.l + 1) * (2 * c.l + 1) / (4 * math.pi)) * float(w[a.l, b.l, c.l])
            assert cc > 0  # even sum, natural parity: positive centre entry
            instr.append((i, j, k, "uuu", False, cc * cc))
    tp = o3.TensorProduct(ir1, ir2, ir3, instr, irrep_normalization="none", path_normalization="none")
    x, y = _rand(6, ir1.dim, seed=4), _rand(6, ir2.dim, seed=5)
    ref = tp(x, y)
    for kernel in _kernels(l1, l2, lout).values():
        assert (kernel(x, y) - ref).abs().max() < TOL


def test_odd_l_sum_couplings_vanish_and_audit_reports_them():
    for l1, l2, l3 in [(1, 1, 1), (1, 2, 2), (2, 2, 1), (2, 2, 3), (3, 2, 4), (3, 3, 5)]:
        x = torch.zeros(4, (l1 + 1) ** 2)
        y = torch.zeros(4, (l2 + 1) ** 2)
        x[:, l1 * l1:(l1 + 1) ** 2] = _rand(4, 2 * l1 + 1, seed=6)
        y[:, l2 * l2:(l2 + 1) ** 2] = _rand(4, 2 * l2 + 1, seed=7)
        for kernel in _kernels(l1, l2, l3).values():
            z = kernel(x, y)
            assert z[:, l3 * l3:].abs().max() < 1e-13  # only degrees of even l1+l2+l3 are produced
            assert z.abs().max() > 1e-3
    rows = {(r.ir1.l, r.ir2.l, r.ir3.l): r for r in path_audit("gaunt_grid", "1o+2e", "1o+2e", "0e+1e+2e+1o+2o+3o")}
    assert rows[(1, 1, 1)].cg and not rows[(1, 1, 1)].engine and "odd l-sum" in rows[(1, 1, 1)].note
    assert rows[(2, 2, 1)].cg and not rows[(2, 2, 1)].engine
    assert rows[(1, 1, 2)].cg and rows[(1, 1, 2)].engine
    assert all(r.engine == ((r.ir1.l + r.ir2.l + r.ir3.l) % 2 == 0 and r.cg) for r in rows.values())
    cg_rows = path_audit("cg", "1o+2e", "1o+2e", "0e+1e+2e+1o+2o+3o")
    assert all(r.engine == r.cg for r in cg_rows)


def test_product_basis_audit_counts_symmetric_couplings():
    v = "0e+1o+2e+3o"  # design note: Sym² → 4/3/5, Sym³ → 8/12/14 for (0e, 1o, 2e)
    assert [symmetric_coupling_count(v, 2, ir) for ir in ("0e", "1o", "2e")] == [4, 3, 5]
    assert [symmetric_coupling_count(v, 3, ir) for ir in ("0e", "1o", "2e")] == [8, 12, 14]
    rows = product_basis_audit("gaunt_fft", "4x0e+4x1o+4x2e+4x3o", "4x0e+4x1o", 3)
    assert all(n_eng == 1 for _, _, _, n_eng in rows)
    assert sum(r[2] for r in rows) > sum(r[3] for r in rows)


def test_tables_come_from_e3nn_sh():
    """Y_lm(β, α) = Λ_{l|m|}(β) φ_m(α) and the torus Fourier tables reproduce Λ."""
    thetas = torch.tensor([0.3, 1.7, 4.0])
    lam = legendre_table(3, thetas)
    u = torch.arange(-3, 4, dtype=torch.float64)
    from_fourier = torch.einsum("bu,kul->bkl", torch.exp(1j * thetas[:, None] * u), fft_mod.theta_fourier(3)).real
    assert (from_fourier - lam).abs().max() < 1e-13


# --------------------------------------------------------------------------------------------------------------
# Engine interface, irreps checks, resolution, registry
# --------------------------------------------------------------------------------------------------------------


def test_registry_and_aliases():
    names = available_engines()
    assert {"cg", "gaunt_grid", "gaunt_fft", "auto"} <= set(names)
    assert not {"grid", "fft"} & set(names)  # aliases resolve but are not listed (no double benchmarking)
    assert get_engine("grid").name == "gaunt_grid" and get_engine("fft").name == "gaunt_fft"


@pytest.mark.parametrize("engine", GAUNT)
def test_unsupported_irreps_raise(engine):
    eng = get_engine(engine)
    with pytest.raises(PotentialsError, match="natural-parity"):
        eng.edge_tp(o3.Irreps("4x0e+4x1e"), o3.Irreps("0e+1o"), o3.Irreps("4x0e+4x1o"))
    with pytest.raises(PotentialsError, match="natural-parity"):
        eng.edge_tp(o3.Irreps("4x0e"), o3.Irreps("0e+1o"), o3.Irreps("4x0e+4x1e"))
    with pytest.raises(PotentialsError, match="natural-parity"):
        eng.product_basis(o3.Irreps("4x0e+4x1o"), o3.Irreps("4x0o"), 2, 2)
    with pytest.raises(PotentialsError, match="multiplicity"):
        eng.edge_tp(o3.Irreps("4x0e+2x1o"), o3.Irreps("0e+1o"), o3.Irreps("4x0e"))


def test_edge_tp_and_product_basis_modules_equal_for_both_engines():
    irreps_node, irreps_sh, target = o3.Irreps("3x0e+3x1o+3x2e"), o3.Irreps("0e+1o+2e+3o"), o3.Irreps("3x0e+3x1o+3x2e+3x3o")
    torch.manual_seed(0)
    tps = [get_engine(n).edge_tp(irreps_node, irreps_sh, target) for n in GAUNT]
    assert all(isinstance(t, GauntEdgeTensorProduct) for t in tps)
    assert tps[0].weight_numel == tps[1].weight_numel == 3 * (3 + 4 + 4)
    x, y, w = _rand(7, irreps_node.dim, seed=8), _rand(7, irreps_sh.dim, seed=9), _rand(7, tps[0].weight_numel, seed=10)
    out = [t(x, y, w) for t in tps]
    assert out[0].shape == (7, tps[0].irreps_out.dim) and (out[0] - out[1]).abs().max() < TOL
    pbs = [get_engine(n).product_basis(target, o3.Irreps("3x0e+3x1o"), 3, 2) for n in GAUNT]
    assert all(isinstance(p, GauntProductBasis) for p in pbs)
    pbs[1].load_state_dict(pbs[0].state_dict())
    assert list(pbs[0].state_dict()) == ["weight"]  # kernels hold only non-persistent buffers
    a, species = _rand(5, target.dim, seed=11), torch.tensor([0, 1, 1, 0, 1])
    assert (pbs[0](a, species) - pbs[1](a, species)).abs().max() < TOL


def test_edge_tp_matches_explicit_factorised_gaunt_formula():
    """m_{c,l3} = (1+d_{c,l3}) √4π/n_{l3} Σ G a_{c,l1} h_{c,l1} (1+b_{c,l2}) Y_{l2}: dense reference."""
    c, irreps_node, irreps_sh, target = 2, o3.Irreps("2x0e+2x1o"), o3.Irreps("0e+1o+2e"), o3.Irreps("2x0e+2x1o+2x2e")
    tp = get_engine("gaunt_grid").edge_tp(irreps_node, irreps_sh, target)
    x, y, w = _rand(3, irreps_node.dim, seed=12), _rand(3, irreps_sh.dim, seed=13), _rand(3, tp.weight_numel, seed=14)
    w3 = w.reshape(3, c, 3 + 2 + 3)
    h = torch.cat([x[:, :2].reshape(3, c, 1), x[:, 2:].reshape(3, c, 3)], -1)  # channels-last, degrees 0..1
    a = torch.cat([w3[..., :1], w3[..., 1:2].expand(3, c, 3)], -1)
    b = 1 + torch.cat([w3[..., 2:3], w3[..., 3:4].expand(3, c, 3), w3[..., 4:5].expand(3, c, 5)], -1)
    d = 1 + torch.cat([w3[..., 5:6], w3[..., 6:7].expand(3, c, 3), w3[..., 7:8].expand(3, c, 5)], -1)
    gt = gaunt_tensor(1, 2, 2)
    norm = (4 * math.pi * (gt * gt).sum((0, 1))).sqrt()
    z = gaunt_product_dense(h * a, y[:, None, :] * b, 2) * d * math.sqrt(4 * math.pi) / norm
    ref = torch.cat([z[..., :1].reshape(3, -1), z[..., 1:4].reshape(3, -1), z[..., 4:9].reshape(3, -1)], -1)
    assert (tp(x, y, w) - ref).abs().max() < TOL


@pytest.mark.parametrize("engine,minimum", [("gaunt_grid", "(4, 7)"), ("gaunt_fft", "(9, 7)")])
def test_too_small_resolution_raises_with_minimum(engine, minimum):
    cls = type(get_engine(engine))
    with pytest.raises(PotentialsError, match=re.escape(f"minimum resolution {minimum}")):
        cls(resolution=(3, 6)).product_kernel(2, 2, 2)
    with pytest.raises(PotentialsError, match="too small"):
        cls(resolution=(3, 6)).power_kernel(2, 3, 1)
    exact = cls(resolution=tuple(int(v) for v in minimum.strip("()").split(","))).product_kernel(2, 2, 2)
    x, y = _rand(2, 9, seed=15), _rand(2, 9, seed=16)
    assert (exact(x, y) - gaunt_product_dense(x, y, 2)).abs().max() < TOL


# --------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------


def _model(tp, seed=0):
    torch.manual_seed(seed)
    return build_model(dict(TINY_MODEL, tp=tp), TINY_STATS)


@pytest.mark.parametrize("engine", GAUNT)
def test_model_invariance_equivariance_and_forces(engine, periodic_atoms):
    model, atoms = _model(engine), periodic_atoms
    ref = evaluate(model, [atoms], stress=True)
    assert ref["forces"].abs().max() > 1e-6
    perm = np.random.default_rng(5).permutation(len(atoms))
    for seed, reflect in [(11, False), (12, True)]:
        q = random_orthogonal(seed, reflect)
        out = evaluate(model, [transformed(atoms, q, np.array([0.3, -1.2, 2.5]), perm)], stress=True)
        qt = torch.from_numpy(q)
        assert rel(out["energy"], ref["energy"]) < 1e-10
        assert rel(out["forces"], ref["forces"][perm] @ qt.T) < 1e-10
        assert rel(out["stress"][0], qt @ ref["stress"][0] @ qt.T) < 1e-10
    assert_forces_match_fd(model, atoms)


def test_weights_transfer_between_gaunt_engines(tmp_path, periodic_atoms):
    from potentials.calculator import model_from_checkpoint

    fft_model = _model("gaunt_fft", seed=3)
    grid_model = _model("gaunt_grid", seed=4)
    state = fft_model.state_dict()
    assert list(state) == list(grid_model.state_dict())
    assert all(state[k].shape == v.shape for k, v in grid_model.state_dict().items())
    grid_model.load_state_dict(state)
    atoms = periodic_atoms
    a, b = evaluate(fft_model, [atoms], stress=True), evaluate(grid_model, [atoms], stress=True)
    for key in ("energy", "forces", "stress"):
        assert (a[key] - b[key]).abs().max() < 1e-9

    # the same through a checkpoint laid out like Lightning's, loaded with a tp override
    cfg = dict(TINY_MODEL, tp="gaunt_fft")
    path = tmp_path / "fft.ckpt"
    torch.save({"hyper_parameters": {"model_cfg": cfg, "stats": TINY_STATS},
                "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    for tp in ("gaunt_grid", "grid", "auto"):
        loaded = model_from_checkpoint(path, tp=tp)
        c = evaluate(loaded, [atoms], stress=True)
        for key in ("energy", "forces", "stress"):
            assert (a[key] - c[key]).abs().max() < 1e-9, (tp, key)

    # a CG checkpoint has a different parameterisation: a clear error, not silent nonsense
    cg_path = tmp_path / "cg.ckpt"
    cg_state = _model("cg").state_dict()
    torch.save({"hyper_parameters": {"model_cfg": dict(TINY_MODEL), "stats": TINY_STATS},
                "state_dict": {f"model.{k}": v for k, v in cg_state.items()}}, cg_path)
    with pytest.raises(PotentialsError, match="do not fit"):
        model_from_checkpoint(cg_path, tp="gaunt_grid")


def test_auto_builds_and_picks_an_exact_engine(caplog, periodic_atoms):
    from potentials.nn.tp.auto import CANDIDATES, auto_choices, clear_cache

    assert set(CANDIDATES) == {"gaunt_grid", "gaunt_fft", "cg"}  # every exact kernel for the Gaunt weights

    clear_cache()
    with caplog.at_level("INFO", logger="potentials.nn.tp"):
        model = _model("auto", seed=5)
    kernels = [m for m in model.modules() if hasattr(m, "engine_choice")]
    assert kernels and all(k.engine_choice in CANDIDATES for k in kernels)
    timed = [v for v in auto_choices().values() if v["ms"]]
    assert timed and all(set(v["ms"]) == set(CANDIDATES) and v["choice"] in CANDIDATES for v in timed)
    assert "tp=auto" in caplog.text and "edge product" in caplog.text  # timing table and path audit logged
    grid = _model("gaunt_grid", seed=6)
    grid.load_state_dict(model.state_dict())
    atoms = periodic_atoms
    a, b = evaluate(model, [atoms], stress=False), evaluate(grid, [atoms], stress=False)
    assert (a["energy"] - b["energy"]).abs().max() < 1e-9 and (a["forces"] - b["forces"]).abs().max() < 1e-9


def test_gaunt_preset_config_matches_cg_preset():
    import yaml

    cg = yaml.safe_load((REPO / "configs/model/mace.yaml").read_text())
    gaunt = yaml.safe_load((REPO / "configs/model/mace_gaunt.yaml").read_text())
    assert list(gaunt) == list(cg) and gaunt["tp"] == "gaunt_grid"
    assert {k: v for k, v in gaunt.items() if k != "tp"} == {k: v for k, v in cg.items() if k != "tp"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_times_in_the_model_dtype_and_each_candidate_is_exact(dtype, periodic_atoms, monkeypatch):
    """auto's timing runs in the dtype of the model being built (not torch's default, float64 in this file), and
    every candidate, the dense coupling-tensor one ('cg') included, gives the gaunt_grid model's energy/forces."""
    import potentials.nn.tp.base as base
    from potentials.nn.tp.auto import CANDIDATES, AutoEngine, auto_choices, clear_cache

    clear_cache()
    torch.manual_seed(5)
    build_model(dict(TINY_MODEL, tp="auto", dtype=dtype), TINY_STATS)
    keys = [k for k, v in auto_choices().items() if v["ms"]]
    assert keys and {k[2] for k in keys} == {dtype}
    if dtype == "float32":
        return
    grid = _model("gaunt_grid", seed=6)
    ref = evaluate(grid, [periodic_atoms], stress=False)
    for name in CANDIDATES:  # force each candidate in turn
        clear_cache()
        monkeypatch.setitem(base._ENGINES, "auto", lambda name=name: AutoEngine(candidates=(name,), rows=8, repeats=1))
        model = _model("auto", seed=5)
        assert {m.engine_choice for m in model.modules() if hasattr(m, "engine_choice")} == {name}
        model.load_state_dict(grid.state_dict())
        out = evaluate(model, [periodic_atoms], stress=False)
        assert (out["energy"] - ref["energy"]).abs().max() < 1e-9, name
        assert (out["forces"] - ref["forces"]).abs().max() < 1e-9, name
