"""Model physics in float64: invariance/equivariance, forces and stress vs finite differences, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from potentials.data.graph import collate
from potentials.data.neighbors import atoms_to_graph
from potentials.models import energy_forces_stress

R_MAX = 4.0


def evaluate(model, atoms_list, stress=True):
    g = collate([atoms_to_graph(a, R_MAX) for a in atoms_list])
    out = energy_forces_stress(model, g, forces=True, stress=stress)
    return {k: v.detach() for k, v in out.items()}


def random_orthogonal(seed: int, reflect: bool) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q))
    return -q if reflect else q


def transformed(atoms: Atoms, q: np.ndarray, t: np.ndarray, perm: np.ndarray) -> Atoms:
    new = atoms[perm]
    new.positions = atoms.positions[perm] @ q.T + t
    if atoms.pbc.any():
        new.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
    return new


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("kind", ["periodic", "molecule"])
def test_invariance_and_equivariance(tiny_model, periodic_atoms, molecule_atoms, kind, reflect):
    atoms = periodic_atoms if kind == "periodic" else molecule_atoms
    q = random_orthogonal(11, reflect)
    t = np.array([0.3, -1.2, 2.5])
    perm = np.random.default_rng(5).permutation(len(atoms))
    ref = evaluate(tiny_model, [atoms], stress=kind == "periodic")
    out = evaluate(tiny_model, [transformed(atoms, q, t, perm)], stress=kind == "periodic")
    qt = torch.from_numpy(q)
    assert rel(out["energy"], ref["energy"]) < 1e-10
    assert rel(out["forces"], ref["forces"][perm] @ qt.T) < 1e-10
    if kind == "periodic":
        assert ref["stress"].abs().max() > 0
        assert rel(out["stress"][0], qt @ ref["stress"][0] @ qt.T) < 1e-10


def assert_forces_match_fd(model, atoms, h: float = 1e-5) -> dict:
    """Forces equal −dE/dx by central differences on three components; returns the reference outputs."""
    ref = evaluate(model, [atoms])
    for i, c in [(0, 0), (1, 2), (3, 1)]:
        energies = []
        for sign in (1, -1):
            a = atoms.copy()
            a.positions[i, c] += sign * h
            energies.append(float(evaluate(model, [a], stress=False)["energy"][0]))
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert abs(fd - float(ref["forces"][i, c])) < 1e-7 * max(1.0, abs(fd))
    return ref


def assert_stress_matches_fd(model, atoms, components=((0, 0), (1, 2), (2, 2)), h: float = 1e-5) -> None:
    """Stress equals the central-difference strain derivative of E divided by the volume."""
    ref = evaluate(model, [atoms])
    volume = atoms.get_volume()
    for a_, b_ in components:
        eps = np.zeros((3, 3))
        eps[a_, b_] = eps[b_, a_] = h
        energies = []
        for sign in (1, -1):
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
            energies.append(float(evaluate(model, [a], stress=False)["energy"][0]))
        fd = (energies[0] - energies[1]) / (2 * h) / volume / (2 if a_ != b_ else 1)
        assert abs(fd - float(ref["stress"][0, a_, b_])) < 1e-8


def test_forces_are_minus_energy_gradient(tiny_model, periodic_atoms):
    assert_forces_match_fd(tiny_model, periodic_atoms)


def test_stress_is_strain_derivative_over_volume(tiny_model, periodic_atoms):
    assert_stress_matches_fd(tiny_model, periodic_atoms)


def test_stress_matches_ase_sign_convention():
    """Check the sign convention end to end against ASE's EMT (compressed cell → negative stress)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    atoms = bulk("Cu", "fcc", a=3.5)
    atoms.calc = EMT()
    assert atoms.get_stress()[0] < 0  # ASE: compressed → negative (pressure = −trace/3 > 0)


def test_batch_equals_individual(tiny_model, periodic_atoms, molecule_atoms):
    both = evaluate(tiny_model, [periodic_atoms, molecule_atoms], stress=True)
    one = evaluate(tiny_model, [periodic_atoms])
    two = evaluate(tiny_model, [molecule_atoms], stress=True)
    n = len(periodic_atoms)
    torch.testing.assert_close(both["energy"], torch.cat([one["energy"], two["energy"]]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both["forces"][:n], one["forces"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both["forces"][n:], two["forces"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both["stress"][0], one["stress"][0], rtol=1e-12, atol=1e-12)
    assert torch.all(both["stress"][1] == 0)  # non-periodic → no stress


def test_float32_model_is_close_to_float64(tiny_model, periodic_atoms, tiny_model_cfg):
    from potentials.models import build_model
    from tests.conftest import TINY_STATS

    m32 = build_model({**tiny_model_cfg, "dtype": "float32"}, TINY_STATS)
    m32.load_state_dict(tiny_model.state_dict())
    ref = evaluate(tiny_model, [periodic_atoms])
    out = evaluate(m32, [periodic_atoms])
    assert out["forces"].dtype == torch.float64  # positions stay a float64 leaf
    assert rel(out["forces"], ref["forces"]) < 1e-4


def test_unknown_element_raises(tiny_model):
    from potentials.errors import PotentialsError

    atoms = Atoms("CuNi", positions=[[0, 0, 0], [0, 0, 2.3]])
    with pytest.raises(PotentialsError, match=r"\['Ni'\].*\['Cu', 'Au'\]"):
        evaluate(tiny_model, [atoms], stress=False)


def test_default_dtype_unchanged():
    import potentials  # noqa: F401
    from potentials.calculator import PotentialCalculator  # noqa: F401
    from potentials.models import build_model
    from tests.conftest import TINY_MODEL, TINY_STATS

    before = torch.get_default_dtype()
    build_model(TINY_MODEL, TINY_STATS)
    build_model({**TINY_MODEL, "dtype": "float32"}, TINY_STATS)
    assert torch.get_default_dtype() == before == torch.float32


def test_misspelt_radial_option_is_rejected():
    from potentials.errors import PotentialsError
    from potentials.models import build_model
    from tests.conftest import TINY_MODEL, TINY_STATS

    with pytest.raises(PotentialsError, match="num_knot"):
        build_model({**TINY_MODEL, "num_knot": 5}, TINY_STATS)
