"""Multi-head training (``data=multi``): two demo EMT datasets on energy references 0.5 eV/atom apart train one
backbone with two heads, each head learns its own level; the calculator picks a head; unknown heads and datasets
mapped to no head are refused in one line; a checkpoint round-trips; single-head models keep their layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from potentials.errors import PotentialsError
from tests.conftest import TINY_MODEL, TINY_STATS

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
OFFSET = 0.5  # eV/atom added to the second head's energies


def make_cfg(heads: dict, *overrides):
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k not in ("name", "radial_hidden")]
    head_args = [f"+data.heads.{name}={{weight: 1.0, data: {{train_files: [{f}], val_fraction: 0.2}}}}"
                 for name, f in heads.items()]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=[
            "data=multi", "~data.heads.demo", *head_args, "data.batch_size=4", "model.radial_hidden=[8]",
            "trainer.enable_model_summary=false", "logger=csv", "parity_plot=false", "ema.enabled=false",
            "checkpoint.every_n_train_steps=null", *model, *overrides,
        ])


def cu_frames(frames):
    """The demo generator's cells and MD positions as pure Cu, relabelled with EMT (energy and forces)."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.numbers[:] = 29
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """Demo frames as Cu (head ``ref``) and other demo frames + 0.5 eV/atom (head ``shifted``), trained together
    (tiny float64 MACE, 30 epochs)."""
    import ase.io

    from potentials.data.demo import generate_demo_frames
    from potentials.train.run import train

    d = tmp_path_factory.mktemp("mh")
    a, b = cu_frames(generate_demo_frames(30, seed=1)), cu_frames(generate_demo_frames(30, seed=2))
    for atoms in b:
        r = atoms.calc.results
        r["energy"] = r["energy"] + OFFSET * len(atoms)
    fa, fb = d / "ref.extxyz", d / "shifted.extxyz"
    ase.io.write(fa, a, format="extxyz")
    ase.io.write(fb, b, format="extxyz")
    cfg = make_cfg({"ref": fa, "shifted": fb}, "trainer.max_epochs=30", "loss.energy=100.0", "loss.forces=1.0", "loss.stress=0.0",
                   "ema.enabled=true", "scheduler.name=none", "model.channels=8", "model.readout_hidden=8")
    run = train(cfg, d / "run")
    return run, fa, fb


def energy_mae(calc, frames) -> float:
    errs = []
    for atoms in frames:
        ref = atoms.get_potential_energy() / len(atoms)
        atoms = atoms.copy()
        atoms.calc = calc
        errs.append(abs(atoms.get_potential_energy() / len(atoms) - ref))
    return float(np.mean(errs))


def test_two_heads_learn_both_offsets_and_calculator_picks_head(two_heads):
    import ase.io

    from potentials.calculator import PotentialCalculator, load_checkpoint

    run, fa, fb = two_heads
    ckpt = load_checkpoint(run["last"])
    heads = ckpt["hyper_parameters"]["stats"]["heads"]
    assert list(heads) == ["ref", "shifted"]
    assert heads["shifted"]["e0s"][29] - heads["ref"]["e0s"][29] == pytest.approx(OFFSET, abs=0.05)
    assert ckpt["state_dict"]["model.e0s"].shape == (2, 1)  # [heads, elements]
    frames = {"ref": ase.io.read(fa, ":"), "shifted": ase.io.read(fb, ":")}
    mae = {}
    for head in ("ref", "shifted"):
        calc = PotentialCalculator.from_checkpoint(run["last"], head=head)
        assert calc.model.heads == ["ref", "shifted"]
        mae[head] = energy_mae(calc, frames[head])
    print("per-head energy MAE (meV/atom):", {k: round(v * 1000, 3) for k, v in mae.items()})
    assert mae["ref"] < 5e-3 and mae["shifted"] < 5e-3
    wrong = energy_mae(PotentialCalculator.from_checkpoint(run["last"], head="ref"), frames["shifted"])
    assert wrong > 0.4  # the other head is 0.5 eV/atom off: the head really selects the level
    metrics = Path(run["metrics"]).read_text()
    assert "val_ref_energy_mae" in metrics and "val_shifted_energy_mae" in metrics


def test_unknown_head_and_unmapped_dataset_are_refused(two_heads, tmp_path):
    from potentials.calculator import PotentialCalculator
    from potentials.train.run import train

    run, fa, _ = two_heads
    with pytest.raises(PotentialsError, match=r"has no head 'mptrj' \(heads: \['ref', 'shifted'\]\)") as exc:
        PotentialCalculator.from_checkpoint(run["last"], head="mptrj")
    assert "\n" not in str(exc.value) and str(run["last"]) in str(exc.value)
    with pytest.raises(PotentialsError, match=r"key\(s\) \['train_files'\] are mapped to no head"):
        train(make_cfg({"ref": fa}, f"+data.train_files=[{fa}]"), tmp_path / "a")
    with pytest.raises(PotentialsError, match=r"data.heads.ref: needs a dataset config under data.heads.ref.data"):
        train(make_cfg({}, "+data.heads.ref={weight: 1.0}"), tmp_path / "b")
    with pytest.raises(PotentialsError, match=r"data.heads.ref.weight must be > 0"):
        train(make_cfg({"ref": fa}, "data.heads.ref.weight=0"), tmp_path / "c")
    with pytest.raises(PotentialsError, match=r"data.heads: give at least one head"):
        train(make_cfg({}), tmp_path / "d")


def test_checkpoint_round_trip_batch_and_single_head_layout(two_heads, periodic_atoms):
    from potentials.calculator import PotentialCalculator, model_from_checkpoint
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import build_model, energy_forces_stress

    run, _, _ = two_heads
    model = model_from_checkpoint(run["last"])
    periodic_atoms.numbers[:] = 29  # the heads were trained on Cu
    # a batch mixing heads = each structure on its own head alone
    g = [atoms_to_graph(periodic_atoms, model.r_max) for _ in range(2)]
    batch = collate([x.replace(head=torch.tensor([i])) for i, x in enumerate(g)])
    both = energy_forces_stress(model, batch, forces=True, stress=True)
    for i, name in enumerate(model.heads):
        calc = PotentialCalculator.from_checkpoint(run["last"], head=name)
        atoms = periodic_atoms.copy()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(both["energy"][i]), abs=1e-10)
        n = len(atoms)
        assert np.allclose(atoms.get_forces(), both["forces"][i * n:(i + 1) * n].detach().numpy(), atol=1e-10)
    # single-head models: the layout of before (state-dict keys and shapes) and no head index needed
    torch.manual_seed(0)
    single = build_model(TINY_MODEL, TINY_STATS)
    shapes = {k: tuple(v.shape) for k, v in single.state_dict().items()}
    assert single.heads == ["default"] and shapes["e0s"] == (2,) and shapes["scale_shift.scale"] == (2,)
    assert shapes["readouts.0.linear.weight"] == (4,) and shapes["readouts.1.linear_2.weight"] == (4,)
    assert set(shapes) == set(model.state_dict())


def test_replay_head_starts_as_the_checkpoint(two_heads, tmp_path):
    """Fine-tuning a single-head checkpoint with finetune.replay_head: both heads start as the old function."""
    import ase.io

    from potentials.calculator import PotentialCalculator, load_checkpoint
    from potentials.train.run import train

    run, fa, fb = two_heads
    single = train(make_cfg({"only": fa}, "trainer.max_epochs=1"), tmp_path / "single")
    ft = train(make_cfg({"new": fb}, "trainer.max_epochs=1", f"init_from={single['last']}",
                        "finetune.replay_head=pt_head", f"finetune.replay.files=[{fa}]", "finetune.replay.sample=8",
                        "finetune.e0s=fit"), tmp_path / "ft")
    stats = load_checkpoint(ft["last"])["hyper_parameters"]["stats"]
    assert list(stats["heads"]) == ["new", "pt_head"]
    old = load_checkpoint(single["last"])["hyper_parameters"]["stats"]
    assert stats["heads"]["pt_head"]["e0s"] == {int(k): v for k, v in old["e0s"].items()}  # the checkpoint's level
    a = ase.io.read(fa, 0)
    a.calc = PotentialCalculator.from_checkpoint(ft["last"], head="pt_head")
    assert np.isfinite(a.get_potential_energy())


def test_traced_graph_of_a_chosen_head_equals_eager(two_heads, periodic_atoms):
    """The compiled calculator's graph (traced with the weights as constants) of a multi-head model evaluates the head
    chosen at load time: energy, forces and stress equal eager execution of that head to 1e-10, and differ from the
    other head's energy."""
    from potentials.calculator import model_from_checkpoint
    from potentials.data.neighbors import atoms_to_graph
    from potentials.models import energy_forces_stress
    from potentials.models.compiled import CompiledPotential

    run, _, _ = two_heads
    periodic_atoms.numbers[:] = 29
    graph = atoms_to_graph(periodic_atoms, 4.0)
    graph["batch"] = torch.zeros(len(periodic_atoms), dtype=torch.long)
    energies = {}
    for head in ("ref", "shifted"):
        model = model_from_checkpoint(run["last"], head=head)
        for p in model.parameters():
            p.requires_grad_(False)
        ref = energy_forces_stress(model, graph, forces=True, stress=True)
        got = CompiledPotential(model, backend=None, params_as_inputs=False)(graph, forces=True, stress=True)
        for key in ref:
            err = float((got[key] - ref[key]).abs().max()) / float(ref[key].abs().max())
            assert err < 1e-10, (head, key, err)
        energies[head] = float(got["energy"][0])
    assert energies["shifted"] - energies["ref"] == pytest.approx(OFFSET * len(periodic_atoms), rel=0.1)
