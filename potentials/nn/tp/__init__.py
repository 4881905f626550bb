"""Tensor-product engines behind one interface (see :mod:`potentials.nn.tp.base`).

Importing this package registers the built-in engines; select one with ``model.tp=<name>``.
"""

from potentials.nn.tp.base import (  # noqa: F401
    EdgeTensorProduct,
    Engine,
    ProductBasis,
    available_engines,
    get_engine,
    register_engine,
)
from potentials.nn.tp import cg  # noqa: F401,E402  (registers "cg")
