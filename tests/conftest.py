"""Shared fixtures: a tiny model config, small structures and a small demo dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real dataset samples: ../shared/data next to the checkout (override with POTENTIALS_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("POTENTIALS_SHARED_DATA") or REPO.parent / "shared" / "data")

# Small enough for CI, large enough to exercise every block (L=1 hidden, ell=2 edges, correlation 3).
TINY_MODEL = dict(
    name="mace", tp="cg", radial="mlp", dtype="float64", r_max=4.0, num_interactions=2, channels=4,
    max_L=1, max_ell=2, correlation=3, num_bessel=6, cutoff_p=5, radial_hidden=[8], readout_hidden=4,
)
TINY_STATS = dict(atomic_numbers=[29, 79], e0s={29: -0.5, 79: -0.7}, avg_num_neighbors=12.0, scale=0.8, shift=0.01)


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return dict(TINY_MODEL)


@pytest.fixture
def tiny_model():
    from potentials.models import build_model

    torch.manual_seed(0)
    return build_model(TINY_MODEL, TINY_STATS)


@pytest.fixture
def periodic_atoms():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 1))
    atoms.set_chemical_symbols(["Cu", "Au", "Cu", "Au"])
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, -0.03], [0.01, 0.0, 1.0]]), scale_atoms=True)
    atoms.rattle(0.1, seed=3)
    return atoms


@pytest.fixture
def molecule_atoms():
    from ase import Atoms

    rng = np.random.default_rng(7)
    pos = np.array([[0, 0, 0], [2.4, 0, 0], [0, 2.5, 0], [0, 0, 2.6], [1.9, 1.8, 1.2]], float) + rng.normal(0, 0.1, (5, 3))
    return Atoms("CuAuCuCuAu", positions=pos)


@pytest.fixture(scope="session")
def demo_file(tmp_path_factory):
    from potentials.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo.extxyz", n_structures=40, seed=1)
