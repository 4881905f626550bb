"""scripts/import_mace.py: a mace-torch model file → our ``cg`` checkpoint, read without mace-torch, equal to mace's
own calculator (float64) on periodic cells, a small cell with self-images, a molecule and an isolated atom.

Fixtures ``tests/fixtures/mace/{A,B,C}.model.gz`` + ``.json`` (models and MACECalculator references) are made by
``peer-venv/bin/python scripts/make_mace_fixtures.py tests/fixtures/mace --gzip`` (mace-torch 0.3.16); when
``peer-venv/`` exists, one test rebuilds fresh models there and compares again.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms

from potentials.errors import PotentialsError
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from import_mace import import_mace, main as import_main  # noqa: E402

FIX = REPO / "tests" / "fixtures" / "mace"
PEER = REPO / "peer-venv" / "bin" / "python"
CASES = [("A", None), ("B", None), ("C", "mp"), ("C", "user")]
TOL = 1e-8


def structures(doc):
    return [Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"]) for s in doc["structures"]]


def check_against(ckpt, doc, head, **calc_kw):
    from potentials import PotentialCalculator

    calc = PotentialCalculator.from_checkpoint(ckpt, **calc_kw)
    worst = [0.0, 0.0, 0.0]
    for atoms, ref in zip(structures(doc), doc["reference"][str(head)]):
        atoms.calc = calc
        worst[0] = max(worst[0], abs(atoms.get_potential_energy() - ref["energy"]))
        worst[1] = max(worst[1], float(np.abs(atoms.get_forces() - np.array(ref["forces"], dtype=np.float64)).max()))
        if "stress" in ref:
            worst[2] = max(worst[2], float(np.abs(atoms.get_stress() - np.array(ref["stress"], dtype=np.float64)).max()))
    return worst


@pytest.mark.parametrize("name,head", CASES)
def test_import_equals_mace_calculator(tmp_path, name, head):
    """A: residual first block, max_ell 3; B: non-residual first block, max_L 2; C: two heads, each imported."""
    doc = json.loads((FIX / f"{name}.json").read_text())
    out = tmp_path / "m.ckpt"
    args = [str(FIX / f"{name}.model.gz"), str(out)] + (["--head", head] if head else [])
    import_main(args)
    ckpt = torch.load(out, weights_only=False)
    src = ckpt["hyper_parameters"]["source"]["mace_import"]
    assert src["projection_residual"] < 1e-12
    assert ckpt["hyper_parameters"]["model_cfg"]["first_interaction"] == ("plain" if name == "B" else "residual")
    de, df, ds = check_against(out, doc, head)
    assert de < TOL and df < TOL and ds < TOL, (de, df, ds)


def test_dump_writes_neutral_files(tmp_path):
    info = import_mace(str(FIX / "A.model.gz"), str(tmp_path / "a.ckpt"), dump=str(tmp_path / "dump"))
    tensors = torch.load(tmp_path / "dump" / "tensors.pt", weights_only=True)
    meta = json.loads((tmp_path / "dump" / "meta.json").read_text())
    assert meta["interaction_classes"] == ["RealAgnosticResidualInteractionBlock"] * 2
    assert tensors["products.0.symmetric_contractions.contractions.0.U_matrix_3"].dtype == torch.float64
    assert len(info["sha256"]) == 64


def test_reader_needs_no_mace_and_runs_no_pickled_code(tmp_path):
    from potentials.models.mace_reader import read_mace

    assert "mace" not in sys.modules
    tensors, meta = read_mace(FIX / "A.model.gz")
    assert "mace" not in sys.modules and "e3nn" not in {m.split(".")[0] for m in meta}  # meta is plain data
    json.dumps(meta)  # JSON-able
    assert meta["class"] == "ScaleShiftMACE" and meta["correlation"] == [3, 3] and meta["max_ell"] == 3
    assert tensors["atomic_numbers"].tolist() == [1, 6, 8]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.model"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(PotentialsError, match="refusing to load global"):
        read_mace(bad)
    assert not (tmp_path / "pwned").exists()


def test_unsupported_variants_and_bad_input_are_refused(tmp_path, capsys):
    from potentials.models.mace_convert import convert
    from potentials.models.mace_reader import read_mace

    tensors, meta = read_mace(FIX / "A.model.gz")
    for key, value, msg in [
        ("pair_repulsion", True, "ZBL"),
        ("distance_transform", True, "distance transform"),
        ("use_so3", True, "use_so3"),
        ("gate", "tanh", "readout gate tanh"),
        ("radial_class", "GaussianBasis", "radial basis"),
        ("correlation", [3, 2], "per-layer correlation"),
        ("interaction_classes", ["RealAgnosticDensityInteractionBlock"] * 2, "first interaction block"),
        ("class", "AtomicDipolesMACE", "model class"),
    ]:
        with pytest.raises(PotentialsError, match="unsupported mace-torch variant: " + msg):
            convert(tensors, dict(meta, **{key: value}))
    tensors_c, meta_c = read_mace(FIX / "C.model.gz")
    with pytest.raises(PotentialsError, match=r"heads \['mp', 'user'\]: choose one with --head"):
        convert(tensors_c, meta_c)
    with pytest.raises(PotentialsError, match="no head 'pbe'"):
        convert(tensors_c, meta_c, head="pbe")
    scripted = tmp_path / "m_compiled.model"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(PotentialsError, match="TorchScript"):
        read_mace(scripted)
    # CLI: one line, exit 2, no output file left behind
    (tmp_path / "junk.model").write_bytes(b"not a model")
    for args in ([str(tmp_path / "missing.model"), str(tmp_path / "o.ckpt")],
                 [str(tmp_path / "junk.model"), str(tmp_path / "o.ckpt")],
                 [str(FIX / "C.model.gz"), str(tmp_path / "o.ckpt"), "--head", "pbe"]):
        with pytest.raises(SystemExit) as exc:
            import_main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert not any(p.name.startswith("o.ckpt") for p in tmp_path.iterdir())


def test_imported_model_relaxes(tmp_path):
    """scripts/relax.py runs the imported checkpoint (3 FIRE steps lower the energy of the molecule)."""
    doc = json.loads((FIX / "A.json").read_text())
    out = tmp_path / "a.ckpt"
    import_mace(str(FIX / "A.model.gz"), str(out))
    xyz = tmp_path / "mol.xyz"
    structures(doc)[2].write(xyz)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "relax.py"), str(out), str(xyz), "--steps", "3",
                          "--out", str(tmp_path / "relaxed.xyz")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert res.returncode == 1 and "NOT converged in 3 steps" in res.stdout, res.stderr[-2000:]  # 1: not converged
    energies = [float(line.split()[3]) for line in res.stdout.splitlines() if line.startswith("step")]
    assert len(energies) == 4 and energies[-1] < energies[0]
    assert (tmp_path / "relaxed.xyz").exists()


@pytest.mark.skipif(not PEER.exists(), reason="peer-venv/ absent (make peer-venv installs mace-torch 0.3.16)")
def test_fresh_mace_models_from_peer_venv(tmp_path):
    """Build the fixture models anew with mace-torch (peer-venv) and compare again (every case)."""
    res = subprocess.run([str(PEER), str(REPO / "scripts" / "make_mace_fixtures.py"), str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    for name, head in CASES:
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        out = tmp_path / f"{name}_{head}.ckpt"
        import_mace(str(tmp_path / f"{name}.model"), str(out), head)
        de, df, ds = check_against(out, doc, head)
        assert de < TOL and df < TOL and ds < TOL, (name, head, de, df, ds)
