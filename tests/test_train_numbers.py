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
