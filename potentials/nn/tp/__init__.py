"""Tensor-product engines behind one interface (see :mod:`potentials.nn.tp.base`).

Importing this package registers the built-in engines; select one with ``model.tp=<name>``:

* ``cg`` — e3nn Clebsch–Gordan products, MACE's symmetric contraction (per-path weights);
* ``gaunt_grid`` (alias ``grid``) — exact Gaunt products on a Gauss–Legendre S² grid;
* ``gaunt_fft`` (alias ``fft``) — exact Gaunt products through the 2D Fourier basis;
* ``auto`` — the faster of the two Gaunt engines per product shape, timed at build.

The Gaunt engines share parameters (checkpoints transfer between them); :mod:`potentials.nn.tp.audit`
reports which couplings each engine represents.
"""

from potentials.nn.tp.base import (  # noqa: F401
    EdgeTensorProduct,
    Engine,
    ProductBasis,
    available_engines,
    get_engine,
    register_alias,
    register_engine,
)
from potentials.nn.tp import cg  # noqa: F401,E402  (registers "cg")
from potentials.nn.tp import gaunt_grid, gaunt_fft, auto  # noqa: F401,E402  (registers "gaunt_grid", "gaunt_fft", "auto")


register_alias("grid", "gaunt_grid")  # external tools pass tp=grid / tp=fft
register_alias("fft", "gaunt_fft")
