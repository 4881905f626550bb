"""Facet at its own design point: unequal multiplicities per degree (``model.hidden_irreps``) through the ``cg``
edge product, the sphere-grid mixer and the readout; the ``bessel`` radial (trainable frequencies, no hidden
layer); the closed-form SiLU and the channels-last grid transforms of the mixer. All float64, tiny sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.models import build_model
from potentials.nn.activations import silu
from potentials.nn.radials import make_radial_factory
from potentials.nn.s2_mixer import S2MLPMixer
from potentials.nn.tp import get_engine
from tests.conftest import TINY_STATS
from tests.test_facet import float64_default
from tests.test_model import assert_forces_match_fd, assert_stress_matches_fd, evaluate, random_orthogonal, rel, transformed

# Facet-S's shape (128x0e + 64x1o + 32x2e, l ≤ 2 edges, bessel radial, 2 heads) at toy multiplicities.
TINY_FACET_S = dict(
    name="facet", tp="cg", radial="bessel", dtype="float64", r_max=4.0, num_interactions=2,
    hidden_irreps="6x0e + 4x1o + 2x2e", max_ell=2, num_bessel=6, cutoff_p=5, mixer_heads=2, mixer_hidden=[8],
    readout_hidden=4,
)


@pytest.fixture
def facet_s():
    torch.manual_seed(0)
    return build_model(TINY_FACET_S, TINY_STATS)


# --------------------------------------------------------------------------------------- edge product (cg)


def test_grouped_cg_edge_product_equals_e3nn_tensor_product():
    """Unequal multiplicities: the per-multiplicity dense kernels give e3nn's 'uvu' TensorProduct, and the
    grouped neighbour sum equals the interface's default (gather → messages → scatter)."""
    from potentials.nn.tp.base import EdgeTensorProduct

    irreps = o3.Irreps("6x0e + 4x1o + 2x2e")
    sh = o3.Irreps.spherical_harmonics(2)
    with float64_default():  # e3nn's own TensorProduct (the reference) builds its constants in the default dtype
        tp = get_engine("cg").edge_tp(irreps, sh, o3.Irreps("5x0e + 3x1o + 2x2e"))
    assert not tp.uniform and len(tp.kernels) == 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, irreps.dim, generator=g, dtype=torch.float64)
    y = torch.randn(9, sh.dim, generator=g, dtype=torch.float64)
    w = torch.randn(9, tp.weight_numel, generator=g, dtype=torch.float64)
    torch.testing.assert_close(tp(x, y, w), tp.tp(x, y, w), rtol=0, atol=1e-13)
    edge_index = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 4, 1], [1, 2, 0, 0, 3, 4, 2, 1, 4]])
    radial = torch.nn.Linear(3, tp.weight_numel).double()
    r = torch.randn(9, 3, generator=g, dtype=torch.float64)
    h = x[:5]
    torch.testing.assert_close(tp.aggregate(h, y, radial, r, edge_index, 5),
                               EdgeTensorProduct.aggregate(tp, h, y, radial, r, edge_index, 5), rtol=0, atol=1e-13)


def test_engines_without_unequal_multiplicities_refuse_in_one_line():
    for name in ("gaunt_grid", "gaunt_fft"):
        with pytest.raises(PotentialsError, match=r"needs one common multiplicity.*use model.tp=cg") as info:
            build_model({**TINY_FACET_S, "tp": name}, TINY_STATS)
        assert "\n" not in str(info.value)
    assert get_engine("cg").unequal_multiplicities
    assert not get_engine("gaunt_grid").unequal_multiplicities and not get_engine("gaunt_fft").unequal_multiplicities


@pytest.mark.parametrize("bad", ["4x0e + 2x1e", "4x1o", "4x0e + 2x2e", "nonsense"])
def test_bad_hidden_irreps_are_rejected(bad):
    with pytest.raises(PotentialsError, match="hidden_irreps"):
        build_model({**TINY_FACET_S, "hidden_irreps": bad}, TINY_STATS)


# --------------------------------------------------------------------------------------------- the model


def test_unequal_multiplicities_reach_convolution_mixer_and_readout(facet_s):
    assert str(facet_s.hidden_irreps) == "6x0e+4x1o+2x2e"
    assert str(facet_s.convolutions[1].irreps_node) == "6x0e+4x1o+2x2e"
    assert str(facet_s.mixers[0].irreps_out) == "6x0e+4x1o+2x2e"
    assert str(facet_s.mixers[1].irreps_out) == "6x0e"  # last layer: the hidden scalars feed the readout
    assert facet_s.mixers[0].grid_channels == 4  # Facet's up_mul: the largest non-scalar multiplicity
    assert str(facet_s.readout.linear_1.irreps_in) == "6x0e"


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("kind", ["periodic", "molecule"])
def test_unequal_multiplicities_rotation_and_inversion_equivariance(facet_s, periodic_atoms, molecule_atoms, kind, reflect):
    atoms = periodic_atoms if kind == "periodic" else molecule_atoms
    q = random_orthogonal(21, reflect)
    perm = np.random.default_rng(2).permutation(len(atoms))
    ref = evaluate(facet_s, [atoms], stress=kind == "periodic")
    out = evaluate(facet_s, [transformed(atoms, q, np.array([0.7, 0.1, -1.5]), perm)], stress=kind == "periodic")
    qt = torch.from_numpy(q)
    assert rel(out["energy"], ref["energy"]) < 1e-10
    assert rel(out["forces"], ref["forces"][perm] @ qt.T) < 1e-8
    if kind == "periodic":
        assert ref["stress"].abs().max() > 0
        assert rel(out["stress"][0], qt @ ref["stress"][0] @ qt.T) < 1e-8


def test_pure_inversion_is_exact_with_unequal_multiplicities(facet_s, molecule_atoms):
    """Even res_alpha: inversion permutes the grid points, so x → −x is exact to rounding (rotations are not)."""
    ref = evaluate(facet_s, [molecule_atoms], stress=False)
    out = evaluate(facet_s, [transformed(molecule_atoms, -np.eye(3), np.zeros(3), np.arange(len(molecule_atoms)))],
                   stress=False)
    assert rel(out["forces"], -ref["forces"]) < 1e-13


def test_unequal_multiplicities_forces_and_stress_are_energy_derivatives(facet_s, periodic_atoms):
    assert_forces_match_fd(facet_s, periodic_atoms)
    assert_stress_matches_fd(facet_s, periodic_atoms, components=((0, 0), (0, 2)))


def test_unequal_multiplicities_checkpoint_round_trip(facet_s, periodic_atoms, tmp_path):
    """Config + state dict → file → model: same energies, forces and stress (frequencies included)."""
    from potentials.calculator import model_from_checkpoint
    from potentials.train.checkpoint import atomic_torch_save

    with torch.no_grad():
        for conv in facet_s.convolutions:  # move the trainable frequencies away from their initial values
            conv.radial.basis.freqs.mul_(1.1)
    path = tmp_path / "facet_s.ckpt"
    atomic_torch_save({"hyper_parameters": {"model_cfg": TINY_FACET_S, "stats": TINY_STATS},
                       "state_dict": {"model." + k: v for k, v in facet_s.state_dict().items()}}, path)
    loaded = model_from_checkpoint(path)
    a, b = evaluate(facet_s, [periodic_atoms]), evaluate(loaded, [periodic_atoms])
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-12)
    torch.testing.assert_close(loaded.convolutions[0].radial.basis.freqs, facet_s.convolutions[0].radial.basis.freqs)


def test_facet_s_config_builds_with_the_stated_parameter_count():
    """configs/model/facet_s.yaml and mace_s.yaml state their parameter counts for 3BPA's 4 elements."""
    import re

    import yaml

    from tests.conftest import REPO

    for name in ("facet_s", "mace_s"):
        path = REPO / "configs" / "model" / f"{name}.yaml"
        text = path.read_text()
        stated = int(re.search(r"Parameters: ([\d,]+) with 4 elements", text).group(1).replace(",", ""))
        cfg = yaml.safe_load(text)
        model = build_model(cfg, {"atomic_numbers": [1, 6, 7, 8]})
        assert sum(p.numel() for p in model.parameters()) == stated, name
    cfg = yaml.safe_load((REPO / "configs" / "model" / "facet_s.yaml").read_text())
    assert cfg["grid_res"] == [18, 18] and cfg["hidden_irreps"].replace(" ", "") == "128x0e+64x1o+32x2e"


def test_trained_unequal_facet_stays_rotation_equivariant_at_the_default_grid(demo_file, periodic_atoms, capsys):
    """After 60 Adam steps on the Cu–Au demo data the relative force error under a rotation and a
    rotation-reflection stays below 1e-6 in float64 at the default grid for l = 2 (16 × 16); measured ~6e-15.
    The demo data barely grow the grid features: on 3BPA the error does grow past 1e-6 (tests below)."""
    from potentials.train.datamodule import PotentialDataModule
    from potentials.train.module import PotentialModule

    cfg = {**TINY_FACET_S, "hidden_irreps": "8x0e + 6x1o + 4x2e", "grid_res": None}
    torch.manual_seed(0)
    dm = PotentialDataModule([demo_file], r_max=cfg["r_max"], batch_size=8, seed=0)
    dm.setup()
    module = PotentialModule(cfg, dm.statistics(), loss={"energy": 1, "forces": 10, "stress": 100}, optim={"lr": 0.01})
    optimizer = module.configure_optimizers()["optimizer"]
    batches = list(dm.train_dataloader())
    losses = []
    for step in range(60):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = module.loss_fn(module(batch, training=True), batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]  # it did train
    model = module.model.eval()
    assert tuple(model.mixers[0].res) == (16, 16)
    ref = evaluate(model, [periodic_atoms])
    errors = []
    for reflect in (False, True):
        q = random_orthogonal(31, reflect)
        out = evaluate(model, [transformed(periodic_atoms, q, np.zeros(3), np.arange(len(periodic_atoms)))])
        errors.append(rel(out["forces"], ref["forces"] @ torch.from_numpy(q).T))
    with capsys.disabled():
        print(f"\n[trained Facet, unequal multiplicities, grid 16x16] relative force equivariance error: {errors}")
    assert max(errors) < 1e-6, errors


@pytest.fixture(scope="module")
def facet_trained_on_3bpa(tmp_path_factory):
    """A small unequal-multiplicity Facet (8x0e + 6x1o + 4x2e, default grid 16 × 16) after 120 Adam steps (lr 0.01,
    loss 1·E + 1000·F) on 10 3BPA frames: its grid features grow as in real training (the demo data's do not)."""
    import ase.io

    from potentials.train.datamodule import PotentialDataModule
    from potentials.train.module import PotentialModule
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "3BPA" / "train_300K.xyz"
    if not source.is_file():
        pytest.skip(f"3BPA sample not found at {source} (../shared/data absent)")
    path = tmp_path_factory.mktemp("3bpa") / "ten.extxyz"
    ase.io.write(str(path), ase.io.read(str(source), index=":10"))
    cfg = {**TINY_FACET_S, "hidden_irreps": "8x0e + 6x1o + 4x2e", "grid_res": None, "r_max": 5.0}
    torch.manual_seed(0)
    dm = PotentialDataModule([str(path)], r_max=5.0, batch_size=5, seed=0, stress_key=None)
    dm.setup()
    module = PotentialModule(cfg, dm.statistics(), loss={"energy": 1, "forces": 1000, "stress": 0}, optim={"lr": 0.01})
    optimizer = module.configure_optimizers()["optimizer"]
    batches = list(dm.train_dataloader())
    for step in range(120):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        module.loss_fn(module(batch, training=True), batch).backward()
        optimizer.step()
    return module.model.eval(), cfg, dm.statistics(), ase.io.read(str(path), index=0)


def _rotation_error(model, atoms) -> float:
    q = random_orthogonal(31, False)
    ref = evaluate(model, [atoms], stress=False)["forces"]
    out = evaluate(model, [transformed(atoms, q, np.zeros(3), np.arange(len(atoms)))], stress=False)["forces"]
    return rel(out, ref @ torch.from_numpy(q).T)


def _at_grid(model, cfg, stats, res):
    other = build_model({**cfg, "grid_res": list(res)}, stats)
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_trained_on_3bpa_equivariance_error_falls_with_the_grid(facet_trained_on_3bpa, capsys):
    """Measured and reported: the rotation error of the 3BPA-trained model at the default 16 × 16, facet_s's 18 × 18
    and finer grids; below 1e-6 from 32 × 32 (same weights; the grid is not a parameter)."""
    model, cfg, stats, atoms = facet_trained_on_3bpa
    assert tuple(model.mixers[0].res) == (16, 16)
    errors = {res: _rotation_error(_at_grid(model, cfg, stats, res), atoms) for res in [(16, 16), (18, 18), (32, 32)]}
    with capsys.disabled():
        print(f"\n[Facet 8x0e+6x1o+4x2e after 120 steps on 3BPA] relative force rotation error by grid: {errors}")
    assert errors[(32, 32)] < 1e-6 and errors[(32, 32)] < errors[(16, 16)]


@pytest.mark.xfail(strict=True, reason="issue 13 target missed: after training on 3BPA the rotation error at the "
                   "default 16x16 grid grows past 1e-6 (measured 2.6e-4 here; facet_s at 18x18 after 6 epochs on 3BPA: 5.3e-6)")
def test_trained_on_3bpa_equivariance_below_1e_6_at_the_default_grid(facet_trained_on_3bpa):
    model, _, _, atoms = facet_trained_on_3bpa
    assert _rotation_error(model, atoms) < 1e-6


# ------------------------------------------------------------------------------------------- bessel radial


def _bessel(weight_numel=5, r_max=4.0):
    torch.manual_seed(3)
    return make_radial_factory("bessel", 6, [], r_max=r_max, cutoff_p=5)(weight_numel).double()


def test_bessel_radial_is_smooth_to_zero_at_the_cutoff_with_trained_frequencies():
    radial = _bessel()
    with torch.no_grad():
        radial.basis.freqs.mul_(torch.linspace(0.7, 1.6, 6, dtype=torch.float64))  # as after training
    assert radial.basis.freqs.requires_grad and sum(p.numel() for p in radial.parameters()) == 6 + 6 * 5
    r = torch.tensor([3.999999, 4.0, 4.3], dtype=torch.float64, requires_grad=True)
    out = radial(r[:, None])  # [3, 5]
    d1 = torch.stack([torch.autograd.grad(out[:, w].sum(), r, create_graph=True)[0] for w in range(5)], 1)
    d2 = torch.stack([torch.autograd.grad(d1[:, w].sum(), r, retain_graph=True)[0] for w in range(5)], 1)
    inside = radial(torch.tensor([[2.0]], dtype=torch.float64))
    assert inside.abs().max() > 1e-2  # not trivially zero
    assert out[1:].abs().max() == 0 and d1[1:].abs().max() == 0 and d2[1:].abs().max() == 0
    assert out[0].abs().max() < 1e-12 and d1[0].abs().max() < 1e-8 and d2[0].abs().max() < 1e-3  # O(ε³), O(ε²), O(ε)


def test_bessel_radial_is_linear_in_the_basis_and_frequencies_train():
    """R(r) = basis(r)·cutoff(r) @ W/√K with no hidden layer: R is linear in W; frequencies receive gradients."""
    radial = _bessel()
    r = torch.linspace(0.5, 3.9, 7, dtype=torch.float64)[:, None]
    expected = radial.basis(r) * radial.cutoff(r) @ radial.weight / np.sqrt(6)
    torch.testing.assert_close(radial(r), expected)
    radial(r).pow(2).sum().backward()
    assert radial.basis.freqs.grad is not None and radial.basis.freqs.grad.abs().min() > 0
    with pytest.raises(PotentialsError, match="cutoff_p"):
        make_radial_factory("bessel", 6, [], r_max=4.0, cutoff_p=2)(5)


# ------------------------------------------------------------------------------ step-cost fixes (issue 13)


def test_closed_form_silu_matches_autograd_to_third_order():
    x = torch.linspace(-6, 6, 41, dtype=torch.float64, requires_grad=True)
    ref, ours = torch.nn.functional.silu, silu
    derivs = []
    for f in (ref, ours):
        y = f(x)
        d1 = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), x, create_graph=True)[0]
        d3 = torch.autograd.grad(d2.sum(), x)[0]
        derivs.append((y, d1, d2, d3))
    for a, b in zip(*derivs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # the mixed second derivative through the gradient path (what force training differentiates)
    g = torch.randn(41, dtype=torch.float64, requires_grad=True)
    for f in (ref, ours):
        d1 = torch.autograd.grad(f(x), x, grad_outputs=g, create_graph=True)[0]
        derivs.append(torch.autograd.grad((d1 * d1).sum(), (x, g)))
    torch.testing.assert_close(derivs[-1], derivs[-2], rtol=1e-12, atol=1e-12)


def test_mixer_channels_last_grid_matrices_equal_e3nn_transforms():
    """The dense grid matrices are e3nn's ToS2Grid / FromS2Grid (the mixer's forward uses the matrices)."""
    torch.manual_seed(0)
    mixer = S2MLPMixer(o3.Irreps("6x0e + 4x1o + 2x2e"), o3.Irreps("6x0e + 4x1o"), res=(10, 12)).double()
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    grid = mixer.to_grid(x)  # [3, 4, 10, 12]
    torch.testing.assert_close(torch.einsum("pi,nci->ncp", mixer.y_grid, x), grid.reshape(3, 4, -1), rtol=0, atol=1e-13)
    f = torch.randn(3, 4, 10, 12, dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("ip,ncp->nci", mixer.w_grid, f.reshape(3, 4, -1)), mixer.from_grid(f),
                               rtol=0, atol=1e-13)
    assert not any("grid" in k for k in mixer.state_dict())  # constants rebuilt from the config, not checkpointed


def test_unequal_multiplicity_facet_traces_and_equals_eager_at_untraced_sizes():
    """Trace-friendly (make_fx, as tests/test_compile.py): the grouped cg product, the bessel radial and the
    closed-form SiLU give a graph traced on batch A equal to eager on batch B, gradients included."""
    from potentials.models.compiled import graph_inputs, parameters_and_buffers, trace
    from tests.test_compile import assert_matches_eager, batch_a, batch_b

    torch.manual_seed(0)
    model = build_model({**TINY_FACET_S, "grid_res": [8, 10]}, TINY_STATS)
    gm = trace(model, batch_a(), forces=True, stress=True)
    params = list(model.parameters())
    graph = batch_b()
    got = dict(zip(("energy", "forces", "stress"), gm(*graph_inputs(model, graph), *parameters_and_buffers(model)[1])))
    assert_matches_eager(got, model, graph, params)
