"""Irreps helpers shared by every block: natural-parity irreps and the e3nn ↔ channels-last layouts.

e3nn layout of ``C x (ir_1 + ir_2 + …)``: [n, Σ C·(2l+1)], irrep blocks one after another, each channel-major.
Channels-last layout: [n, C, Σ(2l+1)], for each channel its irreps concatenated.
"""

from __future__ import annotations

import torch
from e3nn import o3

from potentials.errors import PotentialsError


def natural_irreps(channels: int, lmax: int) -> o3.Irreps:
    """``C x 0e + C x 1o + C x 2e + …`` up to ``lmax``."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def channels_of(irreps: o3.Irreps) -> int:
    """The common multiplicity of ``irreps`` (raises if the multiplicities differ)."""
    muls = {mul for mul, _ in o3.Irreps(irreps)}
    if len(muls) != 1:
        raise PotentialsError(f"irreps {irreps} must have one common multiplicity, got {sorted(muls)}")
    return muls.pop()


def to_channels_last(x: torch.Tensor, irreps: o3.Irreps) -> torch.Tensor:
    """e3nn layout ``C x (ir_1 + ir_2 + ...)`` [n, dim] → [n, C, Σ(2l+1)] (split/cat: a cheap backward)."""
    c = channels_of(irreps)
    if len(irreps) == 1:
        return x.reshape(x.shape[0], c, -1)
    parts = x.split([mul * ir.dim for mul, ir in irreps], dim=-1)
    return torch.cat([p.reshape(x.shape[0], c, ir.dim) for p, (_, ir) in zip(parts, irreps)], dim=-1)


def from_channels_last(x: torch.Tensor, irreps: o3.Irreps) -> torch.Tensor:
    """Inverse of :func:`to_channels_last`: [n, C, Σ(2l+1)] → e3nn layout [n, dim]."""
    parts = x.split([ir.dim for _, ir in irreps], dim=-1)
    return torch.cat([p.reshape(x.shape[0], -1) for p in parts], dim=-1)
