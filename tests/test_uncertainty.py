"""Uncertainty: committee and LLPR results, calibration maths, MD guard and resume, frame selection."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, TINY_STATS


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save_ckpt(path, seed):
    from potentials.models import build_model

    torch.manual_seed(seed)
    model = build_model(dict(TINY_MODEL), TINY_STATS)
    torch.save({"hyper_parameters": {"model_cfg": dict(TINY_MODEL), "stats": TINY_STATS},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return [_save_ckpt(d / f"m{s}.ckpt", s) for s in range(3)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Six rattled Cu/Au cells with EMT labels."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for i in range(6):
        atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 1))
        atoms.set_chemical_symbols(["Cu", "Au", "Cu", "Au"] if i % 2 else ["Au", "Au", "Cu", "Cu"])
        atoms.rattle(0.05 + 0.02 * i, seed=i)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        frames.append(atoms)
    path = tmp_path_factory.mktemp("data") / "cuau.extxyz"
    write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def llpr_ckpt(ckpts, labelled):
    """m0.ckpt with an LLPR fit (training = calibration = the labelled frames)."""
    fit = _script("fit_uncertainty")
    assert fit.main([str(ckpts[0]), "--train", str(labelled), "--val", str(labelled)]) == 0
    return ckpts[0]


# ---------------------------------------------------------------- committee


def test_committee_results_match_members(ckpts, periodic_atoms):
    from potentials.calculator import PotentialCalculator

    singles = []
    for c in ckpts:
        a = periodic_atoms.copy()
        a.calc = PotentialCalculator.from_checkpoint(c)
        singles.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    e = np.array([s[0] for s in singles])
    f = np.stack([s[1] for s in singles])
    st = np.stack([s[2] for s in singles])
    atoms = periodic_atoms.copy()
    atoms.calc = calc = PotentialCalculator.from_checkpoints([str(c) for c in ckpts])
    n = len(atoms)
    assert atoms.get_potential_energy() == pytest.approx(e.mean(), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), f.mean(0), atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(), st.mean(0), atol=1e-10)
    r = calc.results
    assert np.shape(r["energy_std"]) == () and r["forces_std"].shape == (n,) and r["stress_std"].shape == (6,)
    assert r["forces_ensemble"].shape == (3, n, 3) and r["energy_ensemble"].shape == (3,)
    assert r["energy_std"] == pytest.approx(np.std(e, ddof=1), rel=1e-9)
    np.testing.assert_allclose(r["forces_std"], np.sqrt(np.var(f, axis=0, ddof=1).sum(-1)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r["stress_std"], np.std(st, axis=0, ddof=1), rtol=1e-9, atol=1e-12)
    assert calc.get_property("forces_std", atoms).shape == (n,)
    from ase.calculators.calculator import PropertyNotImplementedError

    plain = periodic_atoms.copy()
    plain.calc = PotentialCalculator.from_checkpoint(ckpts[0])
    with pytest.raises(PropertyNotImplementedError, match="no uncertainty"):
        plain.calc.get_property("forces_std", plain)


def _out_of_place_scatter(monkeypatch):
    """scatter_sum without the in-place index_add_ that torch.func.vmap rejects (same numbers)."""
    import potentials.models.base as mb
    import potentials.nn.tp.base as tb

    def scatter_sum(src, index, dim_size):
        return torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device).index_add(0, index, src)

    monkeypatch.setattr(tb, "scatter_sum", scatter_sum)
    monkeypatch.setattr(mb, "scatter_sum", scatter_sum)


def _committee_vs_singles(committee, atoms, calls=1):
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import energy_forces_stress
    from potentials.nn.ops import fused_inference

    g = atoms_to_graph(atoms, committee.r_max, where="test")
    g["batch"] = torch.zeros(len(atoms), dtype=torch.long)
    with fused_inference():
        singles = [energy_forces_stress(m, g, forces=True, stress=True) for m in committee.members]
    for _ in range(calls):
        out = committee.evaluate(g, stress=True)
        for key in ("energy", "forces", "stress"):
            ref = torch.stack([s[key].detach() for s in singles])
            assert out[f"{key}_ensemble"].shape == ref.shape
            torch.testing.assert_close(out[f"{key}_ensemble"], ref, atol=1e-10, rtol=0)
            torch.testing.assert_close(out[key], ref.mean(0), atol=1e-10, rtol=0)
        energies = torch.stack([s["energy"] for s in singles]).detach()
        torch.testing.assert_close(out["energy_std"], energies.std(0), atol=1e-10, rtol=0)
        assert float(out["forces_std"].max()) > 1e-6  # distinct seeds: a real spread


@pytest.mark.parametrize("strategy", ["fused", "stored", "vmap"])
def test_committee_strategies_equal_single_model_calls(ckpts, periodic_atoms, monkeypatch, strategy):
    """Every evaluation strategy — including the one batched vmap pass over stacked weights — gives each member
    exactly the energy/forces/stress of its own single-model call (float64, 1e-10); mean/std follow from them."""
    from potentials.uncertainty.committee import Committee

    if strategy == "vmap":
        _out_of_place_scatter(monkeypatch)
    committee = Committee.from_checkpoints(ckpts, strategy=strategy)
    _committee_vs_singles(committee, periodic_atoms)
    assert committee.last_strategy == strategy  # (for vmap: the batched pass really ran, no fallback)


def test_committee_vmap_falls_back_when_the_model_cannot_be_vmapped(ckpts, periodic_atoms, caplog, monkeypatch):
    """A model vmap rejects (here: an in-place scatter patched in) gives one warning, then members one by one."""
    import potentials.nn.ops as ops
    from potentials.uncertainty.committee import Committee

    def in_place_scatter_sum(src, index, dim_size):
        out = torch.zeros((dim_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
        return out.index_add_(0, index, src)

    for module in (ops, __import__("potentials.models.base", fromlist=["x"]), __import__("potentials.nn.tp.base", fromlist=["x"])):
        if hasattr(module, "scatter_sum"):
            monkeypatch.setattr(module, "scatter_sum", in_place_scatter_sum)
    committee = Committee.from_checkpoints(ckpts, strategy="vmap")
    with caplog.at_level("WARNING", logger="potentials.uncertainty.committee"):
        _committee_vs_singles(committee, periodic_atoms, calls=2)
    assert not committee._vmap_ok and committee.last_strategy == "stored"
    assert sum("one batched (vmap) pass not possible" in r.getMessage() for r in caplog.records) == 1


def test_facet_committee_is_exact_and_falls_back_from_vmap(periodic_atoms):
    """Facet members (whose custom autograd kernels vmap cannot batch): "auto" drops vmap and stays exact."""
    from potentials.models import build_model
    from potentials.uncertainty.committee import Committee
    from tests.test_facet import TINY_FACET

    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(build_model(dict(TINY_FACET), TINY_STATS).eval())
    committee = Committee(members)
    _committee_vs_singles(committee, periodic_atoms, calls=3)  # fused, stored, then vmap is tried
    assert not committee._vmap_ok


def test_committee_auto_picks_a_strategy_after_timing_each(ckpts, periodic_atoms, monkeypatch):
    from potentials.uncertainty import committee as cm

    _out_of_place_scatter(monkeypatch)
    committee = cm.Committee.from_checkpoints(ckpts)
    _committee_vs_singles(committee, periodic_atoms, calls=3 * cm.AUTO_TRIALS)
    assert len(committee.choice) == 1 and next(iter(committee.choice.values())) in ("fused", "stored", "vmap")
    (trials,) = committee._trials.values()
    assert sorted(trials) == ["fused", "stored", "vmap"] and all(len(t) == cm.AUTO_TRIALS for t in trials.values())


def test_committee_rejects_unknown_elements_once(ckpts, periodic_atoms):
    from potentials.data.neighbors import atoms_to_graph
    from potentials.errors import PotentialsError
    from potentials.uncertainty.committee import Committee

    atoms = periodic_atoms.copy()
    atoms.numbers[0] = 8
    g = atoms_to_graph(atoms, 4.0, where="test")
    g["batch"] = torch.zeros(len(atoms), dtype=torch.long)
    with pytest.raises(PotentialsError, match="not in the model's element table"):
        Committee.from_checkpoints(ckpts).evaluate(g)


def test_identical_committee_has_zero_spread(ckpts, periodic_atoms):
    from potentials.calculator import PotentialCalculator

    single = periodic_atoms.copy()
    single.calc = PotentialCalculator.from_checkpoint(ckpts[1])
    atoms = periodic_atoms.copy()
    atoms.calc = calc = PotentialCalculator.from_checkpoints([ckpts[1], ckpts[1], ckpts[1]])
    assert atoms.get_potential_energy() == pytest.approx(single.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), single.get_forces(), atol=1e-10)
    assert calc.results["energy_std"] <= 1e-9
    assert np.all(calc.results["forces_std"] <= 1e-9) and np.all(calc.results["stress_std"] <= 1e-9)


def test_committee_glob_and_errors(ckpts, tmp_path):
    from potentials.errors import PotentialsError
    from potentials.uncertainty.committee import Committee

    assert len(Committee.from_checkpoints(str(ckpts[0].parent / "m*.ckpt"))) == 3
    with pytest.raises(PotentialsError, match="no checkpoint matches"):
        Committee.from_checkpoints(str(tmp_path / "nothing*.ckpt"))
    other = dict(TINY_MODEL, r_max=3.5)
    from potentials.models import build_model

    path = tmp_path / "r35.ckpt"
    torch.save({"hyper_parameters": {"model_cfg": other, "stats": TINY_STATS},
                "state_dict": {f"model.{k}": v for k, v in build_model(other, TINY_STATS).state_dict().items()}}, path)
    with pytest.raises(PotentialsError, match="r_max"):
        Committee.from_checkpoints([ckpts[0], path])


# ---------------------------------------------------------------- LLPR


@pytest.mark.parametrize("kind", ["mace", "facet"])
def test_llpr_features_reconstruct_the_energy(kind, periodic_atoms):
    """Σ_i f_i·w + shift + E0 = model energy: the captured features are exactly the last linear layer's inputs."""
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import build_model
    from potentials.uncertainty.llpr import atom_features, capture_features, readout_weights
    from tests.test_facet import TINY_FACET

    cfg = TINY_MODEL if kind == "mace" else TINY_FACET
    torch.manual_seed(0)
    tiny_model = build_model(cfg, TINY_STATS).eval()

    g = atoms_to_graph(periodic_atoms, tiny_model.r_max, where="test")
    g["batch"] = torch.zeros(len(periodic_atoms), dtype=torch.long)
    with torch.no_grad(), capture_features(tiny_model) as store:
        energy = tiny_model(g)
    f = atom_features(tiny_model, store, g)
    species = tiny_model.species(g["numbers"])
    const = (tiny_model.scale_shift.shift[species] + tiny_model.e0s[species]).sum()
    d = (TINY_MODEL["channels"] if kind == "mace" else 0) + cfg["readout_hidden"]
    assert f.shape == (len(periodic_atoms), d)
    assert float((f @ readout_weights(tiny_model)).sum() + const) == pytest.approx(float(energy[0]), abs=1e-10)


def test_llpr_results_keys_and_calibration(llpr_ckpt, labelled, periodic_atoms):
    from ase.io import read

    from potentials.calculator import PotentialCalculator
    from potentials.uncertainty.calibration import zms

    calc = PotentialCalculator.from_checkpoint(llpr_ckpt, uncertainty="llpr")
    plain = PotentialCalculator.from_checkpoint(llpr_ckpt)
    atoms, ref = periodic_atoms.copy(), periodic_atoms.copy()
    atoms.calc, ref.calc = calc, plain
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-12)
    r = calc.results
    n = len(atoms)
    assert r["energy_std"] > 0 and r["forces_std"].shape == (n,) and np.all(r["forces_std"] > 0)
    assert r["stress_std"].shape == (6,)
    jac = periodic_atoms.copy()
    jac.calc = PotentialCalculator.from_checkpoint(llpr_ckpt, uncertainty="llpr-jacobian")
    np.testing.assert_allclose(jac.get_forces(), ref.get_forces(), atol=1e-10)
    assert jac.calc.results["forces_std"].shape == (n,) and jac.calc.results["energy_std"] == pytest.approx(r["energy_std"])
    # σ is invariant under rotation and permutes with the atoms
    rot = periodic_atoms.copy()
    rot.rotate(37, "z", rotate_cell=True)
    perm = np.array([2, 0, 3, 1])
    rot = rot[perm]
    rot.calc = PotentialCalculator.from_checkpoint(llpr_ckpt, uncertainty="llpr")
    rot.get_potential_energy()
    assert rot.calc.results["energy_std"] == pytest.approx(r["energy_std"], rel=1e-8)
    np.testing.assert_allclose(rot.calc.results["forces_std"], r["forces_std"][perm], rtol=1e-8)
    # α_E is NLL-optimal on the calibration frames: ZMS of the calibrated energy σ is exactly 1 there
    frames = read(labelled, ":")
    errs, sig = [], []
    for a in frames:
        e_ref = a.get_potential_energy()
        a.calc = calc
        errs.append(a.get_potential_energy() - e_ref)
        sig.append(calc.results["energy_std"])
    assert zms(sig, errs) == pytest.approx(1.0, rel=1e-5)  # FᵀF is rank-deficient here (6 frames, d = 8): ς² ~ 1e-12


def test_llpr_jacobian_force_sigma_matches_finite_differences(tiny_model, periodic_atoms):
    """forces_std (jacobian) = √(Σ_α J_iαᵀ C J_iα) with J = ∂f_s/∂x taken here by central differences."""
    from potentials.data.neighbors import atoms_to_graph
    from potentials.uncertainty.llpr import LLPR, atom_features, capture_features

    def graph_of(atoms):
        g = atoms_to_graph(atoms, tiny_model.r_max, where="test")
        g["batch"] = torch.zeros(len(atoms), dtype=torch.long)
        return g

    def fs(atoms):
        g = graph_of(atoms)
        with torch.no_grad(), capture_features(tiny_model) as store:
            tiny_model(g)
        return atom_features(tiny_model, store, g).sum(0).numpy()

    d = TINY_MODEL["channels"] + TINY_MODEL["readout_hidden"]
    rng = np.random.default_rng(0)
    m = rng.normal(size=(d, d))
    c = m @ m.T / d + 0.1 * np.eye(d)
    est = LLPR(tiny_model, torch.tensor(c), alpha_forces=2.0, forces="jacobian")
    out = est.evaluate(graph_of(periodic_atoms), stress=True)
    h, n = 1e-5, len(periodic_atoms)
    jac = np.zeros((d, n, 3))
    for i in range(n):
        for a in range(3):
            plus, minus = periodic_atoms.copy(), periodic_atoms.copy()
            plus.positions[i, a] += h
            minus.positions[i, a] -= h
            jac[:, i, a] = (fs(plus) - fs(minus)) / (2 * h)
    expected = 2.0 * np.sqrt(np.einsum("kia,kl,lia->i", jac, c, jac))
    np.testing.assert_allclose(out["forces_std"].numpy(), expected, rtol=1e-6)
    plain = LLPR(tiny_model, torch.tensor(c)).evaluate(graph_of(periodic_atoms), stress=True)
    np.testing.assert_allclose(out["forces"].numpy(), plain["forces"].numpy(), atol=1e-10)
    np.testing.assert_allclose(out["stress"].numpy(), plain["stress"].numpy(), atol=1e-10)
    assert float(out["energy_std"][0]) == pytest.approx(float(plain["energy_std"][0]), rel=1e-12)


def test_llpr_needs_a_fit_for_this_checkpoint(ckpts, tmp_path):
    import shutil

    from potentials.calculator import PotentialCalculator
    from potentials.errors import PotentialsError

    with pytest.raises(PotentialsError, match="no LLPR fit"):
        PotentialCalculator.from_checkpoint(ckpts[2], uncertainty="llpr")
    with pytest.raises(PotentialsError, match="unknown uncertainty method"):
        PotentialCalculator.from_checkpoint(ckpts[2], uncertainty="magic")
    # a fit stored for another checkpoint's bytes is refused
    shutil.copy(ckpts[1], tmp_path / "x.ckpt")
    torch.save({"inverse": torch.eye(8, dtype=torch.float64), "alpha_energy": 1.0, "alpha_forces": 1.0,
                "alpha_stress": 1.0, "checkpoint_sha256": "0" * 64}, tmp_path / "x.ckpt.llpr.pt")
    with pytest.raises(PotentialsError, match="another version"):
        PotentialCalculator.from_checkpoint(tmp_path / "x.ckpt", uncertainty="llpr")


# ---------------------------------------------------------------- calibration maths (hand-computed answers)


def test_spearman_hand_example():
    from potentials.uncertainty.calibration import spearman

    # ranks x = 1..5, ranks y = 1, 2, 3.5, 5, 3.5 → ρ = Σ dx·dy / √(Σdx² Σdy²) = 8 / √(10 · 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    # signed values keep their order: reversed ranks give ρ = −1
    assert spearman([-3, -1, 2], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)


def test_calibration_curve_zms_nll_hand_example():
    from potentials.uncertainty.calibration import calibration_curve, gaussian_nll, zms

    c = calibration_curve([2, 1, 2, 1], [0, 1, 4, -1], n_bins=2)
    np.testing.assert_allclose(c["rmv"], [1.0, 2.0])
    np.testing.assert_allclose(c["rmse"], [1.0, math.sqrt(8.0)])
    assert list(c["count"]) == [2, 2]
    assert zms([1, 2], [1, 4]) == pytest.approx(2.5)
    assert gaussian_nll([1.0], [0.0]) == pytest.approx(0.5 * math.log(2 * math.pi))


def test_miscalibration_area_hand_examples():
    from potentials.uncertainty.calibration import miscalibration_area

    # zero errors: every interval covers everything, ∫(1 − p) dp = 1/2
    assert miscalibration_area([1.0, 2.0], [0.0, 0.0]) == pytest.approx(0.5, abs=1e-3)
    # |e| = σ everywhere: covered iff z_p ≥ 1, i.e. p ≥ p_c = erf(1/√2) → area = p_c²/2 + (1 − p_c)²/2
    pc = math.erf(1 / math.sqrt(2))
    assert miscalibration_area([1.0, 3.0], [1.0, -3.0]) == pytest.approx(pc**2 / 2 + (1 - pc) ** 2 / 2, abs=2e-3)


# ---------------------------------------------------------------- MD guard and resume


def _md_start(tmp_path, scale):
    from ase.build import bulk
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.7 * scale, cubic=True)
    atoms.set_chemical_symbols(["Cu", "Au", "Cu", "Au"])
    atoms.rattle(0.02, seed=1)
    path = tmp_path / f"start{scale}.xyz"
    write(path, atoms)
    return path, atoms


def _max_spread(ckpts, atoms):
    from potentials.calculator import PotentialCalculator

    atoms = atoms.copy()
    atoms.calc = PotentialCalculator.from_checkpoints(ckpts[:2])
    atoms.get_forces()
    return float(atoms.calc.results["forces_std"].max())


def test_md_guard_stops_a_compressed_cell(ckpts, tmp_path):
    from ase.io import read

    md = _script("md")
    normal, normal_atoms = _md_start(tmp_path, 1.0)
    squeezed, squeezed_atoms = _md_start(tmp_path, 0.7)
    threshold = 2.0 * _max_spread(ckpts, normal_atoms)
    assert _max_spread(ckpts, squeezed_atoms) > threshold  # precondition: the compressed cell is out of domain
    common = ["--steps", "6", "--temperature", "300", "--interval", "2", "--committee", str(ckpts[1]),
              "--guard", str(threshold), "--no-progress", "--timestep", "0.5"]
    assert md.main([str(ckpts[0]), str(normal), "--out", str(tmp_path / "ok.traj"), *common]) == 0
    assert not (tmp_path / "ok-flagged.extxyz").exists()
    rc = md.main([str(ckpts[0]), str(squeezed), "--out", str(tmp_path / "bad.traj"), *common])
    assert rc == md.GUARD_STOP_EXIT
    flagged = read(tmp_path / "bad-flagged.extxyz", ":")
    assert len(flagged) == 1 and flagged[0].info["step"] == 1 and flagged[0].info["guard_value"] > threshold
    assert flagged[0].arrays["forces_std"].shape == (4,)


def test_md_resumes_from_its_trajectory(ckpts, tmp_path):
    from ase.io import read

    md = _script("md")
    start, _ = _md_start(tmp_path, 1.0)
    out = tmp_path / "run.traj"
    args = [str(ckpts[0]), str(start), "--out", str(out), "--interval", "5", "--no-progress", "--ensemble", "nve"]
    assert md.main([*args, "--steps", "10"]) == 0
    first = read(out, ":")
    assert len(first) == 3
    assert md.main([*args, "--steps", "20"]) == 0
    frames = read(out, ":")
    assert len(frames) == 5
    np.testing.assert_allclose(frames[2].positions, first[2].positions)
    steps = [int(line.split()[0]) for line in (tmp_path / "run.log").read_text().splitlines() if not line.startswith("#")]
    assert steps == [0, 5, 10, 15, 20]
    # NVE continues the same trajectory: energy is conserved across the restart
    etot = [a.get_potential_energy() + a.get_kinetic_energy() for a in frames]
    assert max(etot) - min(etot) < 0.05 * abs(frames[0].get_kinetic_energy()) + 1e-3
    assert md.main([*args, "--steps", "20"]) == 0 and len(read(out, ":")) == 5  # nothing left to do


def test_md_npt_moves_the_cell(ckpts, tmp_path):
    from ase.io import read

    md = _script("md")
    start, atoms = _md_start(tmp_path, 1.0)
    out = tmp_path / "npt.traj"
    assert md.main([str(ckpts[0]), str(start), "--out", str(out), "--steps", "4", "--interval", "2", "--ensemble", "npt",
                    "--taup", "50", "--no-progress"]) == 0
    frames = read(out, ":")
    assert len(frames) == 3 and abs(frames[-1].get_volume() - atoms.get_volume()) > 1e-6


# ---------------------------------------------------------------- selection


def test_select_diverse_prefers_distinct_frames():
    from potentials.uncertainty.selection import select_diverse

    desc = np.array([[0.0, 0.0]] * 4 + [[5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    scores = np.array([10, 10, 10, 10, 5, 4, 3], dtype=float)
    chosen = select_diverse(scores, desc, 3)
    assert len(set(chosen)) == 3 and sum(i < 4 for i in chosen) == 1 and chosen[0] == 0
    # only two distinct descriptors: never more than two frames
    assert len(select_diverse(np.ones(5), np.array([[1.0]] * 3 + [[2.0]] * 2), 4)) == 2


def test_select_frames_script_no_duplicates(ckpts, labelled, tmp_path):
    from ase.io import read, write

    frames = read(labelled, ":")
    candidates = tmp_path / "cand.extxyz"
    write(candidates, frames + frames[:3] + frames[:3])  # 12 frames, 6 distinct
    sel = _script("select_frames")
    out = tmp_path / "pick.extxyz"
    assert sel.main([str(ckpts[0]), str(candidates), "-k", "8", "--out", str(out), "--committee", str(ckpts[1])]) == 0
    picked = read(out, ":")
    assert len(picked) == 6
    keys = {tuple(np.round(a.positions.ravel(), 8)) for a in picked}
    assert len(keys) == 6 and all("forces_std" in a.arrays and a.calc is None for a in picked)


def test_evaluate_uncertainty_report(ckpts, labelled, tmp_path):
    ev = _script("evaluate")
    assert ev.main([str(ckpts[0]), str(labelled), "--uncertainty", "committee", "--members", str(ckpts[1]),
                    str(ckpts[2]), "--report", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "uncertainty.md").read_text()
    assert "forces per atom" in text and (tmp_path / "rep" / "calibration.png").stat().st_size > 0


def test_multirun_member_dirs_are_named_by_seed():
    """`train.py -m seed=0,1,2,3` members get distinct dirs that a later sweep over other seeds cannot reuse."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["seed=3"], return_hydra_config=True)
    raw = cfg.hydra.sweep._get_node("subdir")._value()
    assert "${seed}" in raw and "${hydra.job.num}" in raw
