"""Bad-input sweep of the ASE calculator (property-based, hypothesis): NaN/inf positions or cells, atoms on top of
each other, zero-volume cells, unknown elements, empty structures. Every case gives finite energy, forces and
stress, or a one-line PotentialsError naming what is wrong — never a NaN result or a traceback from deep inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potentials.calculator import PotentialCalculator
from potentials.errors import PotentialsError
from potentials.models import build_model
from tests.conftest import TINY_MODEL, TINY_STATS

OUTCOMES: dict[str, int] = {}


@pytest.fixture(scope="module")
def calc():
    torch.manual_seed(0)
    return PotentialCalculator(build_model(TINY_MODEL, TINY_STATS))


@st.composite
def structures(draw):
    n = draw(st.integers(0, 6))
    pos = np.array(draw(st.lists(st.tuples(*[st.floats(-4.0, 4.0)] * 3), min_size=n, max_size=n)), float).reshape(n, 3)
    numbers = draw(st.lists(st.sampled_from([29, 79, 26, 1]), min_size=n, max_size=n))
    fault = draw(st.sampled_from(["none", "nan", "inf", "overlap", "zero_volume", "inf_cell", "none"]))
    pbc = draw(st.booleans())
    cell = np.diag(draw(st.tuples(*[st.floats(2.5, 8.0)] * 3)))
    if fault in ("nan", "inf") and n:
        pos[draw(st.integers(0, n - 1)), draw(st.integers(0, 2))] = np.nan if fault == "nan" else np.inf
    if fault == "overlap" and n >= 2:
        pos[1] = pos[0]
    if fault == "zero_volume":
        cell[2] = cell[0]
        pbc = True
    if fault == "inf_cell":
        cell[0, 0] = np.inf
        pbc = True
    return Atoms(numbers=numbers, positions=pos, cell=cell, pbc=pbc), fault


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=structures())
def test_calculator_gives_finite_results_or_one_line_error(calc, case):
    atoms, fault = case
    atoms.calc = calc
    try:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress() if atoms.pbc.any() else np.zeros(6)
    except PotentialsError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg
        OUTCOMES[f"{fault}: error"] = OUTCOMES.get(f"{fault}: error", 0) + 1
        return
    assert np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(stress).all(), fault
    assert fault in ("none", "overlap", "nan", "inf") or not atoms.pbc.any(), fault  # faults that need no check
    OUTCOMES[f"{fault}: finite"] = OUTCOMES.get(f"{fault}: finite", 0) + 1


def test_report_calculator_sweep_counts():
    """Prints the outcome counts of the sweep above (run in the same session); at least one case per fault kind."""
    print("calculator bad-input sweep:", sum(OUTCOMES.values()), "cases:", dict(sorted(OUTCOMES.items())))
    if OUTCOMES:
        assert any(k.startswith("overlap") for k in OUTCOMES) or sum(OUTCOMES.values()) < 20
