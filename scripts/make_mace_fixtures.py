#!/usr/bin/env python
"""Build tiny mace-torch models and their reference energies/forces/stress (run ONLY by ``peer-venv/bin/python``;
never imports ``potentials``). Used by ``tests/test_import_mace.py`` (and to regenerate the committed fixtures).

    peer-venv/bin/python scripts/make_mace_fixtures.py OUT_DIR [--models A,B,C] [--gzip]

Writes ``OUT_DIR/{name}.model[.gz]`` (``torch.save`` of the module, as ``mace_run_train`` writes it) and
``OUT_DIR/{name}.json``: the structures, mace's ``MACECalculator`` (float64) energy/forces/stress per head, and the
versions. Models (float64, 2-3 elements, C=4, correlation 3, 2 layers, weights + 0.3·randn so
that every block contributes; small max_ell for B and C keeps the committed files small):

* ``A``: ``ScaleShiftMACE``, residual first block (``--model ScaleShiftMACE``), max_L 1, max_ell 3;
* ``B``: ``ScaleShiftMACE`` with the non-residual first block (as ``--model MACE`` builds it), max_L 2, max_ell 2;
* ``C``: ``ScaleShiftMACE``, two heads (``mp``, ``user``) with their own E0s, scale and shift, max_L 1, max_ell 2.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata as md
import json
import os
import shutil
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

SPECS = {
    "A": dict(z=[1, 6, 8], max_L=1, max_ell=3, first="RealAgnosticResidualInteractionBlock", heads=None, scale=1.3, shift=-0.4),
    "B": dict(z=[1, 8], max_L=2, max_ell=2, first="RealAgnosticInteractionBlock", heads=None, scale=0.9, shift=0.0),
    "C": dict(z=[1, 8], max_L=1, max_ell=2, first="RealAgnosticResidualInteractionBlock", heads=["mp", "user"],
              scale=[1.1, 0.7], shift=[0.2, -0.3]),
}


def build(spec: dict, seed: int):
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    z = spec["z"]
    heads = spec["heads"]
    n_h = len(heads) if heads else 1
    e0 = np.array([[-1.5 - 0.7 * i - 0.25 * h for i in range(len(z))] for h in range(n_h)])
    hidden = " + ".join(f"4x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(spec["max_L"] + 1))
    kwargs = dict(
        r_max=3.2, num_bessel=6, num_polynomial_cutoff=5, max_ell=spec["max_ell"],
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes[spec["first"]],
        num_interactions=2, num_elements=len(z), hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=e0 if heads else e0[0], avg_num_neighbors=3.7, atomic_numbers=z, correlation=3,
        gate=torch.nn.functional.silu, radial_MLP=[8, 8], radial_type="bessel", use_reduced_cg=False,
        atomic_inter_scale=spec["scale"], atomic_inter_shift=spec["shift"],
    )
    if heads:
        kwargs["heads"] = heads
    model = modules.ScaleShiftMACE(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def structures(z: list[int]):
    import numpy as np
    from ase import Atoms

    rng = np.random.default_rng(7)
    out = []
    # triclinic periodic cell
    cell = np.array([[4.1, 0.0, 0.0], [0.7, 3.9, 0.0], [-0.5, 0.4, 4.3]])
    n = 6
    frac = rng.random((n, 3))
    out.append(Atoms(numbers=[z[i % len(z)] for i in range(n)], scaled_positions=frac, cell=cell, pbc=True))
    # small cell (smaller than r_max: self-images)
    cell2 = np.array([[2.6, 0.0, 0.0], [0.3, 2.8, 0.0], [0.2, -0.3, 2.7]])
    out.append(Atoms(numbers=[z[0], z[-1]], scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.55, 0.7]], cell=cell2, pbc=True))
    # molecule
    pos = np.array([[0.0, 0.0, 0.0], [0.95, 0.1, 0.0], [-0.3, 0.9, 0.2], [0.2, -0.4, 1.1], [1.5, 1.2, 0.6]])
    out.append(Atoms(numbers=[z[(i + 1) % len(z)] for i in range(len(pos))], positions=pos + 0.05 * rng.standard_normal(pos.shape)))
    # isolated atom
    out.append(Atoms(numbers=[z[-1]], positions=[[0.0, 0.0, 0.0]]))
    return out


def reference(model_path: str, atoms_list, head: str | None):
    from mace.calculators import MACECalculator

    kw = {"head": head} if head else {}
    calc = MACECalculator(model_paths=model_path, device="cpu", default_dtype="float64", **kw)
    refs = []
    for atoms in atoms_list:
        a = atoms.copy()
        a.calc = calc
        ref = {"energy": float(a.get_potential_energy()), "forces": a.get_forces().tolist()}
        if a.pbc.all():
            ref["stress"] = a.get_stress().tolist()
        refs.append(ref)
    return refs


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--models", default="A,B,C")
    ap.add_argument("--gzip", action="store_true")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(args.models.split(",")):
        spec = SPECS[name]
        model = build(spec, seed=10 + i)
        path = os.path.join(args.out, f"{name}.model")
        torch.save(model, path)
        atoms_list = structures(spec["z"])
        heads = spec["heads"] or [None]
        doc = {
            "versions": {"mace_torch": md.version("mace-torch"), "e3nn": md.version("e3nn"), "torch": torch.__version__},
            "structures": [
                {"numbers": a.numbers.tolist(), "positions": a.positions.tolist(), "cell": a.cell.array.tolist(),
                 "pbc": a.pbc.tolist()} for a in atoms_list
            ],
            "reference": {str(h): reference(path, atoms_list, h) for h in heads},
        }
        if args.gzip:
            with open(path, "rb") as src, gzip.open(path + ".gz", "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            os.remove(path)
        with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
            json.dump(doc, fh)
        print(name, "ok", os.path.getsize(path + ".gz" if args.gzip else path))


if __name__ == "__main__":
    main()
