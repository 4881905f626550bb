"""The tensor-product engine interface.

The model code never builds a tensor product itself: it asks an *engine* (chosen by name with
``model.tp=<name>``) for the two equivariant products a MACE-style layer needs:

* :meth:`Engine.edge_tp` — the interaction's edge product
  ``m_ij = h_j ⊗ Y(r̂_ij)`` with per-edge weights produced by the radial network
  (``weight_numel`` numbers per edge); its output irreps are the engine's choice and are mixed to the
  target irreps by a ``Linear`` in the interaction block.
* :meth:`Engine.product_basis` — the many-body product ``B = Σ_ν W_z^{(ν)} · (A ⊗ … ⊗ A)_ν``
  (correlation order ν ≤ ``correlation``), with element-dependent weights.

An engine is registered with :func:`register_engine` and looked up with :func:`get_engine`; adding a
back end is one file plus the decorator — no model code changes.
"""

from __future__ import annotations

from typing import Callable

import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.nn.irreps import channels_of, from_channels_last, to_channels_last  # noqa: F401 (re-exported)
from potentials.nn.ops import chunked_aggregate, scatter_sum
from potentials.nn.precision import outside_autocast


class EdgeTensorProduct(torch.nn.Module):
    """Weighted product of node features with edge spherical harmonics.

    Shapes: ``x`` [E, irreps_in1.dim], ``y`` [E, irreps_in2.dim], ``weight`` [E, weight_numel]
    → [E, irreps_out.dim]. Subclasses set ``irreps_in1``, ``irreps_in2``, ``irreps_out`` and
    ``weight_numel``.
    """

    irreps_in1: o3.Irreps
    irreps_in2: o3.Irreps
    irreps_out: o3.Irreps
    weight_numel: int

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # The per-edge product split into node-level preparation, the edge step and node-level finishing, so that an
    # engine can keep its own internal layout across the neighbour sum. Defaults: e3nn layout throughout.
    def prepare_nodes(self, h: torch.Tensor) -> torch.Tensor:
        """[n, irreps_in1.dim] → the engine's node layout (before the gather at the neighbours)."""
        return h

    def edge_messages(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gathered prepared node features, y [E, irreps_in2.dim], weight [E, weight_numel] → messages in the
        engine's layout (summed over neighbours, then :meth:`finish_nodes`)."""
        return self(x, y, weight)

    def finish_nodes(self, a: torch.Tensor) -> torch.Tensor:
        """Summed messages in the engine's layout → [n, irreps_out.dim] (e3nn layout)."""
        return a

    def aggregate(
        self, h: torch.Tensor, y: torch.Tensor, radial, radial_in: torch.Tensor, edge_index: torch.Tensor,
        num_nodes: int, fused: bool = False,
    ) -> torch.Tensor:
        """Messages summed per centre: ``Σ_{j ∈ N(i)} forward(h_j, y_ij, radial(radial_in_ij))`` → [num_nodes, irreps_out.dim].

        ``h`` [n, irreps_in1.dim] node features, ``edge_index`` [2, E] (centre i, neighbour j), ``radial`` the
        radial network (edge basis [E, ·] → weights [E, weight_numel]). With ``fused`` (inference inside
        :func:`~potentials.nn.ops.fused_inference`) the edges are walked in chunks and nothing per edge — messages,
        radial weights — is stored for the backward pass (:func:`~potentials.nn.ops.chunked_aggregate`), and the
        product runs in full precision."""

        def run(h, y, radial_in):
            x = self.prepare_nodes(h)
            message = lambda xe, ye, re: self.edge_messages(xe, ye, radial(re))  # noqa: E731
            if fused:
                return self.finish_nodes(chunked_aggregate(message, x, y, radial_in, edge_index, owner=(self, radial)))
            return self.finish_nodes(scatter_sum(message(x.index_select(0, edge_index[1]), y, radial_in), edge_index[0], num_nodes))

        return outside_autocast(run, h, y, radial_in) if fused else run(h, y, radial_in)


class ProductBasis(torch.nn.Module):
    """Many-body product basis.

    Shapes: ``a`` [n, irreps_in.dim] with ``irreps_in = C x (l=0..L_A irreps)`` (all multiplicities equal),
    ``species`` [n] long element indices in ``[0, num_elements)`` → [n, irreps_out.dim].
    The products are channel-wise: channel c of the output only sees channel c of the input.
    """

    irreps_in: o3.Irreps
    irreps_out: o3.Irreps

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Engine:
    """A named tensor-product back end: a factory of the two products above."""

    name: str = ""
    # whether edge_tp accepts node irreps of unequal multiplicities (e.g. 128x0e + 64x1o + 32x2e)
    unequal_multiplicities: bool = False

    def edge_tp(self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, irreps_target: o3.Irreps) -> EdgeTensorProduct:
        raise NotImplementedError

    def product_basis(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> ProductBasis:
        raise NotImplementedError


_ENGINES: dict[str, Callable[[], Engine]] = {}
_ALIASES: dict[str, str] = {}


def register_engine(name: str):
    """Class decorator: make an :class:`Engine` subclass available as ``model.tp=<name>``."""

    def deco(cls):
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return deco


def register_alias(alias: str, target: str) -> None:
    """``model.tp=<alias>`` builds the engine ``target`` (aliases are not listed by :func:`available_engines`)."""
    _ALIASES[alias] = target


def available_engines() -> list[str]:
    """Registered engine names (without aliases)."""
    return sorted(_ENGINES)


def get_engine(name: str) -> Engine:
    name = _ALIASES.get(name, name)
    if name not in _ENGINES:
        raise PotentialsError(
            f"unknown tensor-product engine model.tp={name!r}; available: {available_engines()} "
            f"(aliases: {sorted(_ALIASES)})"
        )
    return _ENGINES[name]()
