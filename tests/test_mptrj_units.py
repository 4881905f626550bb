"""MPtrj units: the kBar (VASP sign) → eV/Å³ (ASE sign) factor, pinned, and one published-format JSON frame
checked against a conversion written out here by hand (not the reader's helper, not its inverse)."""

from __future__ import annotations

import json

import numpy as np
import pytest

# CODATA 2014 elementary charge (the one ASE's units use): 1 eV/Å³ = 1.6021766208e-19 J / 1e-30 m³.
EV_PER_A3_IN_PA = 1.6021766208e-19 / 1e-30
KBAR_IN_PA = 1e8


def test_kbar_factor_is_pinned():
    from potentials.data.formats.mptrj import kbar_to_ase

    assert KBAR_IN_PA / EV_PER_A3_IN_PA == pytest.approx(1 / 1602.1766208, rel=1e-14)
    # VASP reports compression as positive; ASE's stress is (1/V) dE/dε, tension positive → the sign flips.
    assert kbar_to_ase() == pytest.approx(-1 / 1602.1766208, rel=1e-12)


# One frame in the published MPtrj_2022.9_full.json schema ({mp_id: {frame_id: frame}}, see
# /work/shared/design/dataset-formats.md §2): pymatgen Structure.as_dict(), energies in eV, "force" in eV/Å,
# "stress" 3×3 in kBar with VASP's sign. Site 1 has only fractional coordinates ("abc").
LATTICE = [[4.0, 0.0, 0.0], [0.5, 3.8, 0.0], [0.0, 0.3, 5.2]]
STRESS_KBAR = [[12.0, -3.0, 1.5], [-3.0, -7.5, 0.25], [1.5, 0.25, 40.0]]  # xx=12 (compressive in VASP), yy=-7.5
FRAME = {
    "structure": {
        "@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
        "lattice": {"matrix": LATTICE, "pbc": [True, True, True], "a": 4.0, "b": 3.83, "c": 5.21,
                    "alpha": 90.0, "beta": 90.0, "gamma": 82.5, "volume": 79.04},
        "sites": [
            {"species": [{"element": "Li", "occu": 1}], "abc": [0.0, 0.0, 0.0], "xyz": [0.0, 0.0, 0.0],
             "label": "Li", "properties": {"magmom": 0.0}},
            {"species": [{"element": "O", "occu": 1}], "abc": [0.5, 0.25, 0.5],
             "label": "O", "properties": {"magmom": 0.01}},
        ],
    },
    "uncorrected_total_energy": -10.25, "corrected_total_energy": -11.75, "energy_per_atom": -5.125,
    "ef_per_atom": -1.5, "e_per_atom_relaxed": -5.2, "ef_per_atom_relaxed": -1.6,
    "force": [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]], "stress": STRESS_KBAR,
    "magmom": [0.0, 0.01], "bandgap": 0.0, "mp_id": "mp-1234",
}


def _expected_ase_stress():
    """By hand: σ_ASE = −σ_VASP[kBar] × 1e8 Pa / (1.6021766208e11 Pa per eV/Å³), component by component."""
    out = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            out[i, j] = -STRESS_KBAR[i][j] * KBAR_IN_PA / EV_PER_A3_IN_PA
    return out


def test_published_json_frame_against_independent_conversion(tmp_path):
    from potentials.data.formats import load_dataset

    path = tmp_path / "MPtrj_2022.9_full.json"
    path.write_text(json.dumps({"mp-1234": {"mp-1234-0-1": FRAME}}))
    ds = load_dataset("mptrj", root=str(path), cutoff=4.5, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 1
    g = ds[0]
    stress = g["stress"][0].numpy()
    np.testing.assert_allclose(stress, _expected_ase_stress(), rtol=1e-14, atol=0)
    # spot values written out: xx = −12 kBar/1602.1766208 (tensile in ASE means positive: VASP's +12 is compressive)
    assert stress[0, 0] == pytest.approx(-12.0 / 1602.1766208, rel=1e-13) and stress[0, 0] < 0
    assert stress[1, 1] == pytest.approx(7.5 / 1602.1766208, rel=1e-13) and stress[1, 1] > 0
    assert stress[1, 2] == pytest.approx(-0.25 / 1602.1766208, rel=1e-13)  # yz stays yz (no transposed Voigt)
    assert stress[0, 2] == pytest.approx(-1.5 / 1602.1766208, rel=1e-13)
    # forces pass through in eV/Å, energy is the uncorrected total energy by default
    np.testing.assert_array_equal(g["forces"].numpy(), np.array(FRAME["force"]))
    assert float(g["energy"][0]) == -10.25
    # positions: site 0 from "xyz", site 1 = abc · lattice rows = 0.5·a + 0.25·b + 0.5·c
    np.testing.assert_allclose(g["positions"].numpy(), [[0.0, 0.0, 0.0], [2.125, 1.1, 2.6]], atol=1e-12)
    np.testing.assert_array_equal(g["numbers"].numpy(), [3, 8])
    np.testing.assert_allclose(g["cell"][0].numpy(), LATTICE, atol=0)
    corrected = load_dataset("mptrj", root=str(path), cutoff=4.5, cache_dir=str(tmp_path / "cache"),
                             energy="corrected")
    assert float(corrected[0]["energy"][0]) == -11.75
    # the ASE Voigt view of the same stress (what a calculator comparison uses): xx yy zz yz xz xy
    from ase.stress import full_3x3_to_voigt_6_stress

    voigt = full_3x3_to_voigt_6_stress(stress)
    np.testing.assert_allclose(voigt, -np.array([12.0, -7.5, 40.0, 0.25, 1.5, -3.0]) / 1602.1766208, rtol=1e-13)
