"""MACE building blocks, one physical step each: embedding, interaction (edge product + aggregation),
product basis (many-body), readouts, per-element scale/shift.

The tensor products are supplied by an :class:`~potentials.nn.tp.base.Engine`; nothing here depends on
which back end is used.
"""

from __future__ import annotations

from typing import Callable

import torch
from e3nn import nn as enn
from e3nn import o3

from potentials.nn.ops import node_checkpointed, use_fused
from potentials.nn.precision import outside_autocast
from potentials.nn.tp.base import Engine


class LinearNodeEmbedding(torch.nn.Module):
    """One-hot species [n, num_elements] → C x 0e node features."""

    def __init__(self, num_elements: int, irreps_out: o3.Irreps):
        super().__init__()
        self.linear = o3.Linear(o3.Irreps(f"{num_elements}x0e"), irreps_out)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self.linear(one_hot)


class EdgeConvolution(torch.nn.Module):
    """Channel-wise edge convolution: ``A_i = Linear( Σ_{j∈N(i)} TP(Linear(h_j), Y(r̂_ij); R(r_ij)) ) / avg_num_neighbors``.

    The edge product ``TP`` comes from the engine; ``R`` is the radial network built by ``make_radial``
    (a radial with ``uses_lengths = True``, e.g. the spline, reads the lengths, otherwise the radial embedding).
    Inputs: node_feats [n, irreps_node.dim], edge_attrs [E, irreps_sh.dim], edge_feats [E, num_basis] or None,
    edge_lengths [E, 1] (Å), edge_index [2, E] (centre i, neighbour j) → A [n, irreps_target.dim].
    """

    def __init__(self, engine: Engine, irreps_node, irreps_sh, irreps_target, make_radial, avg_num_neighbors: float):
        super().__init__()
        self.irreps_node, self.irreps_target = o3.Irreps(irreps_node), o3.Irreps(irreps_target)
        self.linear_up = o3.Linear(self.irreps_node, self.irreps_node)
        self.tp = engine.edge_tp(self.irreps_node, o3.Irreps(irreps_sh), self.irreps_target)
        self.radial = make_radial(self.tp.weight_numel)
        self.linear = o3.Linear(self.tp.irreps_out, self.irreps_target)
        self.avg_num_neighbors = float(avg_num_neighbors)

    def convolve(self, node_feats, edge_attrs, edge_feats, edge_lengths, edge_index) -> torch.Tensor:
        h = outside_autocast(self.linear_up, node_feats)
        radial_in = edge_lengths if getattr(self.radial, "uses_lengths", False) else edge_feats
        a = self.tp.aggregate(h, edge_attrs, self.radial, radial_in, edge_index, node_feats.shape[0], fused=use_fused(self))
        a = a / self.avg_num_neighbors
        return outside_autocast(self.linear, a)

    def forward(self, node_feats, edge_attrs, edge_feats, edge_lengths, edge_index) -> torch.Tensor:
        return self.convolve(node_feats, edge_attrs, edge_feats, edge_lengths, edge_index)


class InteractionBlock(EdgeConvolution):
    """MACE interaction (``RealAgnosticResidualInteractionBlock``): the :class:`EdgeConvolution` to
    ``irreps_target`` (= C x edge-SH irreps) plus a residual ``sc = h_i ⊗ onehot(z_i)`` → ``irreps_hidden``.

    Returns (A [n, target.dim], sc [n, hidden.dim]).
    """

    def __init__(
        self,
        engine: Engine,
        irreps_node: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_target: o3.Irreps,
        irreps_hidden: o3.Irreps,
        num_elements: int,
        make_radial: Callable[[int], torch.nn.Module],
        avg_num_neighbors: float,
    ):
        super().__init__(engine, irreps_node, irreps_sh, irreps_target, make_radial, avg_num_neighbors)
        self.skip = o3.FullyConnectedTensorProduct(
            self.irreps_node, o3.Irreps(f"{num_elements}x0e"), o3.Irreps(irreps_hidden)
        )

    def forward(self, node_feats, one_hot, edge_attrs, edge_feats, edge_index, edge_lengths=None):
        sc = outside_autocast(self.skip, node_feats, one_hot)
        return self.convolve(node_feats, edge_attrs, edge_feats, edge_lengths, edge_index), sc


class PlainInteractionBlock(EdgeConvolution):
    """mace-torch's non-residual ``RealAgnosticInteractionBlock`` (its default first block under ``--model MACE``):
    the :class:`EdgeConvolution` to ``irreps_target``, then ``A ← FCTP(A ⊗ onehot(z_i)) → irreps_target``; no
    residual.

    Returns (A [n, target.dim], None).
    """

    def __init__(self, engine: Engine, irreps_node, irreps_sh, irreps_target, irreps_hidden, num_elements: int,
                 make_radial: Callable[[int], torch.nn.Module], avg_num_neighbors: float):
        super().__init__(engine, irreps_node, irreps_sh, irreps_target, make_radial, avg_num_neighbors)
        self.skip = o3.FullyConnectedTensorProduct(
            self.irreps_target, o3.Irreps(f"{num_elements}x0e"), self.irreps_target
        )

    def forward(self, node_feats, one_hot, edge_attrs, edge_feats, edge_index, edge_lengths=None):
        a = self.convolve(node_feats, edge_attrs, edge_feats, edge_lengths, edge_index)
        return outside_autocast(self.skip, a, one_hot), None


class ProductBlock(torch.nn.Module):
    """Many-body product basis through the engine, then a Linear, plus the interaction's residual."""

    def __init__(self, engine: Engine, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int):
        super().__init__()
        self.product = engine.product_basis(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation, num_elements)
        self.linear = o3.Linear(o3.Irreps(irreps_out), o3.Irreps(irreps_out))

    def forward(self, a: torch.Tensor, species: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
        # inference: per-node intermediates recomputed in the backward pass, not stored
        product = node_checkpointed(self, lambda a, s: outside_autocast(self.product, a, s), a, species)
        out = self.linear(product)
        return out if sc is None else out + sc


class LinearReadout(torch.nn.Module):
    """Scalars of the node features → one energy per atom and head [n, num_heads]."""

    def __init__(self, irreps_in: o3.Irreps, num_heads: int = 1):
        super().__init__()
        self.linear = o3.Linear(o3.Irreps(irreps_in), o3.Irreps(f"{int(num_heads)}x0e"))

    def forward(self, x: torch.Tensor, node_head: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


class NonLinearReadout(torch.nn.Module):
    """Last-layer readout: Linear → gated scalars (SiLU) → Linear → energy per atom and head [n, num_heads].

    With ``num_heads`` H > 1 (multi-head models; mace-torch's layout): H blocks of ``hidden`` gated scalars, and
    each atom keeps only the block of its head (``node_head`` [n]) before the last Linear, so every head has its
    own MLP; column h of the output is head h's energy.
    """

    def __init__(self, irreps_in: o3.Irreps, hidden: int = 16, num_heads: int = 1):
        super().__init__()
        self.num_heads = int(num_heads)
        mid = o3.Irreps(f"{hidden * self.num_heads}x0e")
        self.linear_1 = o3.Linear(o3.Irreps(irreps_in), mid)
        self.act = enn.Activation(mid, [torch.nn.functional.silu])
        self.linear_2 = o3.Linear(mid, o3.Irreps(f"{self.num_heads}x0e"))
        if self.num_heads > 1:
            self.register_buffer("block_head", torch.arange(hidden * self.num_heads) // hidden, persistent=False)

    def forward(self, x: torch.Tensor, node_head: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.linear_1(x))
        if self.num_heads > 1 and node_head is not None:
            h = h * (self.block_head[None, :] == node_head[:, None]).to(h.dtype)
        return self.linear_2(h)


class ScaleShift(torch.nn.Module):
    """Per-element affine map of atomic energies: E_i ← scale[z_i] · E_i + shift[z_i] (eV); multi-head models
    (``num_heads`` H > 1) keep one row per head, [H, n_el], and use row ``node_head[i]``.

    Initialised from dataset statistics (force RMS, mean interaction energy per atom); stored and applied in
    float64 (output [n] float64; a model keeps ``float64_buffers`` float64 under dtype casts).

    ``trainable_shift=True`` makes ``shift`` a parameter (same state-dict key, initialised from the same
    statistic): only the energy loss reaches it, so it follows the energy level that force-dominated fitting
    moves (issue 16: with loss 1·E + 1000·F the level of every MACE, mace-torch's too, drifts by ~1 eV/atom in
    the first epochs and recovers over tens of epochs). MACE keeps it a fixed buffer (the default). The parameter
    is float64 in a float64 model and takes the model dtype under casts (float32: ~1e-7 relative).
    """

    float64_buffers = ("scale", "shift")

    def __init__(self, num_elements: int, scale=1.0, shift=0.0, trainable_shift: bool = False, num_heads: int = 1):
        super().__init__()
        shape = (num_elements,) if int(num_heads) == 1 else (int(num_heads), num_elements)
        self.register_buffer("scale", _per_head(scale, shape))
        shift_t = _per_head(shift, shape)
        if trainable_shift:
            self.shift = torch.nn.Parameter(shift_t)
        else:
            self.register_buffer("shift", shift_t)

    def forward(self, energy: torch.Tensor, species: torch.Tensor, node_head: torch.Tensor | None = None) -> torch.Tensor:
        """energy [n], species [n], node_head [n] (multi-head models: [H, n_el] tables) → [n] float64 (eV)."""
        if node_head is None:
            return self.scale[species] * energy.to(torch.float64) + self.shift[species].to(torch.float64)
        return self.scale[node_head, species] * energy.to(torch.float64) + self.shift[node_head, species].to(torch.float64)


def _per_head(value, shape: tuple[int, ...]) -> torch.Tensor:
    """A float, or one float per head ([H] for an (H, n_el) table), broadcast to ``shape`` (float64)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if len(shape) == 2 and t.dim() == 1:
        t = t[:, None]
    return t.expand(shape).clone()
