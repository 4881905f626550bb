"""Trustworthy numbers (issue 16): energy constants stay float64, a constant energy offset is absorbed exactly,
stress work only where there is a stress label, non-finite losses, ``tp=auto``'s choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_STATS

# Not representable in float32 (float32 would store -1029.48901 / -13.6000004).
BIG_E0S = {29: -1029.489, 79: -13.6}


def _graph(atoms, r_max):
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph

    return collate([atoms_to_graph(atoms, r_max)])


def test_energy_constants_stay_float64_in_float32_models(periodic_atoms):
    from potentials.models import build_model

    stats = {**TINY_STATS, "e0s": BIG_E0S, "shift": -4.1234567891}
    m32 = build_model({**TINY_MODEL, "dtype": "float32"}, stats)
    constants = {"e0s": m32.e0s, "shift": m32.scale_shift.shift, "scale": m32.scale_shift.scale}
    assert all(t.dtype == torch.float64 for t in constants.values())
    assert m32.e0s.tolist() == [-1029.489, -13.6] and m32.scale_shift.shift[0].item() == -4.1234567891
    assert m32.embedding.linear.weight.dtype == torch.float32  # parameters are cast
    # casts applied later (Lightning precision plugins call .to(dtype) on the LightningModule) keep them too
    wrapper = torch.nn.ModuleDict({"model": m32})
    for cast in (lambda m: m.float(), lambda m: m.to(torch.float32), lambda m: m.double()):
        cast(wrapper)
        assert m32.e0s.dtype == m32.scale_shift.shift.dtype == torch.float64
        assert m32.e0s.tolist() == [-1029.489, -13.6]
    m32.float()
    # the constants reach the energy exactly: E(E0s) − E(0) = Σ E0 and the shift enters in float64
    zero = build_model({**TINY_MODEL, "dtype": "float32"}, {**stats, "e0s": {29: 0.0, 79: 0.0}})
    zero.load_state_dict({k: v for k, v in m32.state_dict().items() if k != "e0s"}, strict=False)
    g = _graph(periodic_atoms, m32.r_max)
    e_big, e_zero = m32(g), zero(g)
    assert e_big.dtype == torch.float64
    expected = sum(BIG_E0S[int(z)] for z in periodic_atoms.numbers)
    assert abs(float(e_big - e_zero) - expected) < 1e-9, float(e_big - e_zero) - expected


def _with_offset(src, dst, per_atom_offset: float):
    """Copy of the extxyz ``src`` with ``per_atom_offset`` · N added to every energy (forces, stress unchanged)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = ase.io.read(src, ":")
    for a in frames:
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e + per_atom_offset * len(a), forces=f, stress=s)
    ase.io.write(dst, frames, format="extxyz")
    return dst


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_constant_energy_offset_is_carried_exactly_by_the_shift(demo_file, tmp_path, dtype):
    """Energies + c·N (c = −7.3 eV/atom, E0s given, not fitted): the per-atom shift takes c, the learned part
    of the model never sees it. Through the whole pipeline (Lightning, EMA of weights *and* buffers, checkpoint,
    rebuilt model) the trained model's energy errors equal those of the same run without the offset.
    A float32 model that applied E0s/shift in float32 would train differently (its loss sees the rounding)."""
    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.evaluation import predict
    from potentials.train.run import train
    from tests.test_train import make_cfg

    e0s = "data.e0s={Cu:-1029.489,Au:-13.6}"
    errors, shifts = [], []
    for c in (0.0, -7.3):
        data = _with_offset(demo_file, tmp_path / f"offset{c}.extxyz", c)
        cfg = make_cfg(data, "trainer.max_epochs=2", "loss.forces=1000", "loss.stress=0", e0s, f"model.dtype={dtype}",
                       "parity_plot=false", "checkpoint.every_n_train_steps=null")
        result = train(cfg, tmp_path / f"run{c}")
        model = model_from_checkpoint(result["last"])
        shifts.append(float(model.scale_shift.shift[0]))
        ds = GraphDataset.from_files([str(data)], model.r_max)
        ref, pred = predict(model, [ds[i] for i in range(len(ds))])["energy"]
        errors.append(pred - ref)
    assert abs(shifts[1] - shifts[0] - (-7.3)) < 1e-9
    spread = float(np.std(errors[0]))
    assert spread > 0
    np.testing.assert_allclose(errors[1], errors[0], rtol=0, atol=1e-9 * max(1.0, spread))


def test_stress_derivative_only_for_batches_with_stress_labels(demo_file, monkeypatch):
    """Default loss.stress=100: a batch without stress labels (molecules, OC20) must not request the strain
    derivative (and its double backward); one with labels does; validation reports stress only where labelled."""
    import potentials.models.compiled as executors
    from potentials.data.dataset import GraphDataset
    from potentials.data.graph import AtomicGraph, collate
    from potentials.train.module import PotentialModule

    asked = []
    real = executors.energy_forces_stress

    def spy(model, graph, **kw):
        asked.append(kw["stress"])
        return real(model, graph, **kw)

    monkeypatch.setattr(executors, "energy_forces_stress", spy)  # what the module's (eager) executor calls
    with_stress = collate([GraphDataset.from_files([str(demo_file)], 4.0)[i] for i in range(2)])
    assert bool((with_stress["stress_weight"] > 0).all())
    without = AtomicGraph({k: v for k, v in with_stress.items() if not k.startswith("stress")})
    zero_weight = with_stress.replace(stress_weight=torch.zeros_like(with_stress["stress_weight"]))
    module = PotentialModule(TINY_MODEL, TINY_STATS, loss={"energy": 1, "forces": 10, "stress": 100})
    for graph in (without, zero_weight, with_stress):
        loss = module.loss_fn(module(graph, training=True), graph)
        loss.backward()
    assert asked == [False, False, True]
    no_stress_loss = PotentialModule(TINY_MODEL, TINY_STATS, loss={"energy": 1, "forces": 10, "stress": 0})
    asked.clear()
    no_stress_loss(with_stress, training=True)  # weight 0: not needed for the loss
    no_stress_loss(with_stress, training=False)  # validation: reported where labelled
    no_stress_loss(without, training=False)
    assert asked == [False, True, False]


def test_nonfinite_loss_stops_without_touching_the_last_checkpoint_or_skips(demo_file, tmp_path, monkeypatch):
    """A NaN training loss: ``nonfinite=stop`` raises a one-line PotentialsError and leaves last.ckpt as it was;
    ``nonfinite=skip`` drops that step (weights stay finite) and the run finishes."""
    import hashlib

    from potentials.errors import PotentialsError
    from potentials.train.module import PotentialModule
    from potentials.train.run import train
    from tests.test_train import make_cfg

    run_dir = tmp_path / "run"
    common = ["loss.stress=0", "parity_plot=false", "checkpoint.every_n_train_steps=1", "ema.enabled=false"]
    first = train(make_cfg(demo_file, "trainer.max_epochs=1", *common), run_dir)
    last = first["last"]
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    steps_per_epoch = first["global_step"]

    real, calls = PotentialModule._predict_and_loss, {"train": 0}

    def nan_on_third_training_batch(self, graph, stage):
        pred, loss = real(self, graph, stage)
        if stage == "train":
            calls["train"] += 1
            if calls["train"] == 3:
                return pred, loss * float("nan")
        return pred, loss

    monkeypatch.setattr(PotentialModule, "_predict_and_loss", nan_on_third_training_batch)
    with pytest.raises(PotentialsError, match=r"non-finite training loss at epoch 1, batch 2") as info:
        train(make_cfg(demo_file, "trainer.max_epochs=2", *common), run_dir)
    assert "\n" not in str(info.value)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest  # the last good checkpoint is untouched
    newest = max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert newest < steps_per_epoch + 3  # no step checkpoint at or after the bad step

    calls["train"] = 0
    result = train(make_cfg(demo_file, "trainer.max_epochs=2", "nonfinite=skip", *common), run_dir)
    ckpt = torch.load(result["last"], weights_only=False)
    assert calls["train"] >= 3 and ckpt["epoch"] == 1
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert all(np.isfinite(float(r["train_loss"])) for r in rows if r.get("train_loss"))  # the skipped loss not logged
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_calculator_stress_matches_numerical_stress_and_the_model_in_voigt_order(tiny_model, periodic_atoms):
    """ASE's ``calculate_numerical_stress`` (central differences of the calculator's energy under strain) and the
    model's own 3×3 stress, mapped to Voigt order xx yy zz yz xz xy, both equal ``atoms.get_stress()``."""
    from ase.calculators.fd import calculate_numerical_stress

    from potentials.calculator import PotentialCalculator
    from potentials.models import energy_forces_stress

    atoms = periodic_atoms.copy()
    atoms.calc = PotentialCalculator(tiny_model)
    voigt = atoms.get_stress()
    sigma = energy_forces_stress(tiny_model, _graph(atoms, tiny_model.r_max), stress=True)["stress"][0].detach().numpy()
    offdiag = [sigma[1, 2], sigma[0, 2], sigma[0, 1]]
    assert min(abs(a - b) for a, b in [(offdiag[0], offdiag[1]), (offdiag[1], offdiag[2]), (offdiag[0], offdiag[2])]) > 1e-5
    expected = [sigma[0, 0], sigma[1, 1], sigma[2, 2], sigma[1, 2], sigma[0, 2], sigma[0, 1]]
    np.testing.assert_allclose(voigt, expected, rtol=0, atol=1e-12)
    numerical = calculate_numerical_stress(atoms, eps=1e-5, voigt=True)
    scale = float(np.abs(voigt).max())
    assert scale > 1e-4
    np.testing.assert_allclose(voigt, numerical, rtol=0, atol=1e-6 * scale)


def test_bf16_autocast_stays_in_the_backbone(tiny_model, periodic_atoms):
    """Under an outer bf16 autocast (Lightning's bf16-mixed) the readouts, scale/shift + energy sum and the force
    autograd through them run in the model dtype (float32; energy in float64), checked with hooks. Forces equal,
    to float32 round-off, a reference in which autocast is applied by hand only around the backbone blocks
    (interactions, products) and never by the model's own precision helpers; both differ from float64 by bf16's
    error, which sets the scale of the tolerance."""
    from potentials.models import build_model, energy_forces_stress

    m32 = build_model({**TINY_MODEL, "dtype": "float32"}, TINY_STATS)
    m32.load_state_dict(tiny_model.state_dict())
    g = _graph(periodic_atoms, m32.r_max)
    seen: dict[str, list] = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes = {t.dtype for t in inputs if torch.is_tensor(t) and t.is_floating_point()}
            seen.setdefault(name, []).append((torch.is_autocast_enabled("cpu"), dtypes, output.dtype))
        return hook

    def record_backward(name):
        def hook(module, grad_input, grad_output):
            seen.setdefault(name, []).append({t.dtype for t in grad_output if t is not None})
        return hook

    handles = [m32.scale_shift.register_forward_hook(record("scale_shift"))]
    for i, (readout, product) in enumerate(zip(m32.readouts, m32.products)):
        handles += [readout.register_forward_hook(record(f"readout{i}")), product.register_forward_hook(record(f"product{i}")),
                    readout.register_full_backward_hook(record_backward(f"readout{i}_backward"))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = energy_forces_stress(m32, g, stress=False)
    for h in handles:
        h.remove()
    assert all(on for on, _, _ in seen["product0"] + seen["product1"])  # the backbone does run under autocast
    for i in range(2):
        assert seen[f"readout{i}"] == [(False, {torch.float32}, torch.float32)]
        assert seen[f"readout{i}_backward"] == [{torch.float32}]  # force autograd through the head: float32
    assert seen["scale_shift"] == [(False, {torch.float32}, torch.float64)]
    assert mixed["energy"].dtype == mixed["forces"].dtype == torch.float64

    # reference: no outer autocast; autocast entered by hand around each backbone block only
    originals = {}
    for block in [*m32.interactions, *m32.products]:
        originals[block] = block.forward

        def wrapped(*args, _fwd=block.forward, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _fwd(*args, **kwargs)

        block.forward = wrapped
    try:
        reference = energy_forces_stress(m32, g, stress=False)
    finally:
        for block, fwd in originals.items():
            block.forward = fwd
    exact = energy_forces_stress(tiny_model, g, stress=False)
    f_scale = float(exact["forces"].abs().max())
    bf16_error = float((reference["forces"] - exact["forces"]).abs().max()) / f_scale
    assert 1e-5 < bf16_error < 0.2  # bf16 round-off is visible (the reference is not accidentally exact)
    diff = float((mixed["forces"] - reference["forces"]).abs().max()) / f_scale
    assert diff <= 1e-2 * bf16_error, (diff, bf16_error)
    e_diff = float((mixed["energy"] - reference["energy"]).abs().max())
    assert e_diff <= 1e-2 * float((reference["energy"] - exact["energy"]).abs().max()) + 1e-6
