"""Fine-tuning (``init_from=``): the first validation equals evaluating the starting checkpoint; a grown element
table keeps the old elements' predictions; frozen modules stay put; replay keeps the old data's error while the
new data's error drops; bad input is refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potentials.errors import PotentialsError
from tests.test_train import make_cfg


def emt_frames(n, seed, swap=28, frac=0.3, size=(2, 2, 2)):
    """Rattled fcc Cu cells with a fraction of atoms replaced by ``swap`` (28 = Ni), EMT labels."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * (1 + 0.02 * rng.standard_normal())).repeat(size)
        k = max(1, int(frac * len(atoms) * rng.random()))
        atoms.numbers[rng.permutation(len(atoms))[:k]] = swap
        atoms.rattle(0.06, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        frames.append(atoms)
    return frames


def write(path, frames):
    import ase.io

    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def start(demo_file, tmp_path_factory):
    """A demo (Cu–Au) checkpoint trained for 3 epochs."""
    from potentials.train.run import train

    run = train(make_cfg(demo_file, "trainer.max_epochs=3", "parity_plot=false"), tmp_path_factory.mktemp("start"))
    return run["last"]


def rmse(model, graphs):
    from potentials.train.evaluation import predict

    preds = predict(model, graphs)
    return {k: float(np.sqrt(np.mean((p - r) ** 2))) for k, (r, p) in preds.items()}


def test_first_validation_equals_starting_checkpoint_and_freeze(start, tmp_path):
    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset
    from potentials.train.run import train

    train_f = write(tmp_path / "t.extxyz", emt_frames(12, 1, swap=79))  # same elements (Cu–Au), other structures
    val_f = write(tmp_path / "v.extxyz", emt_frames(6, 2, swap=79))
    run = train(make_cfg(train_f, f"data.val_files=[{val_f}]", f"init_from={start}", "trainer.max_epochs=1",
                         "finetune.freeze=[embedding,interactions.0]", "parity_plot=false"), tmp_path / "ft")
    init_model = model_from_checkpoint(start)
    ref = rmse(init_model, GraphDataset.from_files([val_f], init_model.r_max))
    got = run["initial_val"]
    assert got["val_energy_rmse"] == pytest.approx(ref["energy"], rel=2e-7, abs=0)  # Lightning logs float32
    assert got["val_forces_rmse"] == pytest.approx(ref["forces"], rel=2e-7, abs=0)  # Lightning logs float32
    assert got["val_stress_rmse"] == pytest.approx(ref["stress"], rel=2e-7, abs=0)  # Lightning logs float32
    after = torch.load(run["last"], weights_only=False)["current_model_state"]
    before = torch.load(start, weights_only=False)["state_dict"]
    assert torch.equal(after["model.embedding.linear.weight"], before["model.embedding.linear.weight"])
    assert torch.equal(after["model.interactions.0.linear.weight"], before["model.interactions.0.linear.weight"])
    assert not torch.equal(after["model.readouts.1.linear_2.weight"], before["model.readouts.1.linear_2.weight"])


def test_grown_element_table_keeps_old_predictions(start):
    from ase.build import bulk

    from potentials.calculator import load_checkpoint, model_from_checkpoint
    from potentials.models import build_model, energy_forces_stress
    from potentials.data.graph import collate
    from potentials.data.neighbors import atoms_to_graph
    from potentials.train.finetune import finetune_stats, grown_state

    ckpt = load_checkpoint(start)
    hp = ckpt["hyper_parameters"]
    old_model = model_from_checkpoint(start)
    data_stats = {"atomic_numbers": [28, 29], "e0s": {28: -0.3, 29: 123.0}}
    stats = finetune_stats(hp["stats"], data_stats, "keep")
    assert stats["atomic_numbers"] == hp["stats"]["atomic_numbers"] + [28]
    assert stats["e0s"][29] == hp["stats"]["e0s"][29] and stats["e0s"][28] == -0.3  # kept; new one fitted
    torch.manual_seed(5)
    new_model = build_model(hp["model_cfg"], stats)
    old_state = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    new_model.load_state_dict(grown_state(new_model, old_state, len(hp["stats"]["atomic_numbers"])))
    atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 1))
    atoms.numbers[::3] = 79
    atoms.rattle(0.05, seed=3)
    g = collate([atoms_to_graph(atoms, old_model.r_max)])
    a = energy_forces_stress(old_model.eval(), g, forces=True, stress=True)
    b = energy_forces_stress(new_model.eval(), g, forces=True, stress=True)
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(a[key], b[key], atol=1e-10, rtol=0), key
    atoms.numbers[1] = 28  # the new element runs
    energy_forces_stress(new_model, collate([atoms_to_graph(atoms, new_model.r_max)]), forces=True)
    assert finetune_stats(hp["stats"], data_stats, "fit")["e0s"][29] == 123.0
    assert finetune_stats(hp["stats"], data_stats, {"Cu": 1.5})["e0s"][29] == 1.5
    with pytest.raises(PotentialsError, match=r"element\(s\) \['Ni'\] missing from the checkpoint"):
        finetune_stats(hp["stats"], data_stats, "keep", new_elements=False, path="x.ckpt")


def test_replay_keeps_old_error_while_new_error_drops(start, demo_file, tmp_path):
    """Cu–Ni fine-tuning (Ni is new) with a replayed sample of the Cu–Au training file."""
    from potentials.calculator import model_from_checkpoint
    from potentials.data.dataset import GraphDataset, split_dataset
    from potentials.train.run import train

    train_f = write(tmp_path / "t.extxyz", emt_frames(24, 11))
    val_f = write(tmp_path / "v.extxyz", emt_frames(8, 12))
    run = train(make_cfg(train_f, f"data.val_files=[{val_f}]", f"init_from={start}", "trainer.max_epochs=4",
                         f"finetune.replay.files=[{demo_file}]", "finetune.replay.sample=24",
                         "finetune.replay.weight=1.0", "parity_plot=false"), tmp_path / "ft")
    init_model, tuned = model_from_checkpoint(start), model_from_checkpoint(run["last"])
    old_val = [g for g in split_dataset(GraphDataset.from_files([demo_file], init_model.r_max), 0.2, 0)[1]]
    new_val = GraphDataset.from_files([val_f], tuned.r_max)
    old_before, old_after = rmse(init_model, old_val), rmse(tuned, old_val)
    new_before, new_after = run["initial_val"], rmse(tuned, new_val)
    print("old data forces RMSE", old_before["forces"], "->", old_after["forces"],
          "new data forces RMSE", new_before["val_forces_rmse"], "->", new_after["forces"],
          "energy", new_before["val_energy_rmse"], "->", new_after["energy"])
    assert new_after["forces"] < new_before["val_forces_rmse"]
    assert new_after["energy"] < new_before["val_energy_rmse"]
    assert old_after["forces"] < 1.2 * old_before["forces"]


def test_bad_finetune_input(start, tmp_path):
    from potentials.train.finetune import apply_freeze, build_replay
    from potentials.calculator import model_from_checkpoint
    from potentials.train.run import train

    model = model_from_checkpoint(start)
    with pytest.raises(PotentialsError, match="no parameter under 'encoder'"):
        apply_freeze(model, ["encoder"])
    with pytest.raises(PotentialsError, match="r_max=6.0 differs from the model's r_max 4.0"):
        build_replay({"data": {"format": "ase", "train_files": ["x"], "r_max": 6.0}}, 4.0, 0, {}, [29, 79])
    ni = write(tmp_path / "ni.extxyz", emt_frames(4, 3))
    with pytest.raises(PotentialsError, match="outside the model's element table"):
        build_replay({"files": [str(ni)]}, 4.0, 0, {}, [29, 79])
    with pytest.raises(PotentialsError, match=r"\['Ni'\] missing from the checkpoint's element table"):
        train(make_cfg(ni, f"init_from={start}", "finetune.new_elements=false"), tmp_path / "bad")
    with pytest.raises(PotentialsError, match="does not exist"):
        train(make_cfg(ni, f"init_from={tmp_path / 'missing.ckpt'}"), tmp_path / "bad2")


def test_finetune_from_imported_mace_model(tmp_path):
    """A mace-torch model (fixture B: H/O, non-residual first block) imported, then fine-tuned on water-free
    Cu–Au data: the element table grows by Cu and Au and training runs."""
    import sys

    from tests.conftest import REPO
    from potentials.train.run import train

    sys.path.insert(0, str(REPO / "scripts"))
    from import_mace import import_mace

    ckpt = tmp_path / "b.ckpt"
    import_mace(str(REPO / "tests" / "fixtures" / "mace" / "B.model.gz"), str(ckpt))
    data = write(tmp_path / "t.extxyz", emt_frames(10, 4, swap=79, size=(1, 1, 2)))
    run = train(make_cfg(data, f"init_from={ckpt}", "trainer.max_epochs=1", "parity_plot=false", "loss.stress=0"),
                tmp_path / "ft")
    saved = torch.load(run["last"], weights_only=False)["hyper_parameters"]
    assert saved["stats"]["atomic_numbers"] == [1, 8, 29, 79]
    assert saved["model_cfg"]["first_interaction"] == "plain"
    assert np.isfinite(run["initial_val"]["val_forces_rmse"]) and run["global_step"] > 0
