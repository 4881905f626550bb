"""MACE-style model (Batatia et al. 2022): graph → radial basis + edge harmonics → [interaction →
product basis → readout] × num_interactions → per-atom energies → total energy.

Irreps: hidden features ``C x (0e + 1o + … + max_L)`` (natural parity; scalars only after the last
layer), edge harmonics ``0e + 1o + … + max_ell`` ('component' normalisation), interaction target
``C x (edge-harmonic irreps)``.
"""

from __future__ import annotations

import torch
from e3nn import o3

from potentials.data.graph import AtomicGraph
from potentials.models.base import PotentialModel
from potentials.nn.irreps import natural_irreps  # noqa: F401 (also imported from here by older code)
from potentials.nn.precision import backbone_autocast
from potentials.nn.blocks import (
    InteractionBlock,
    PlainInteractionBlock,
    LinearNodeEmbedding,
    LinearReadout,
    NonLinearReadout,
    ProductBlock,
    ScaleShift,
)
from potentials.nn.radial import RadialEmbedding
from potentials.nn.radials import make_radial_factory
from potentials.nn.tp import get_engine


class MACE(PotentialModel):
    """MACE with a swappable tensor-product engine (``tp``) and radial network (``radial``).

    Args:
        atomic_numbers: element table (Z of each species index).
        e0s: isolated-atom energies per Z (eV).
        r_max: cutoff (Å). num_interactions: message-passing layers. channels: C.
        max_L: max degree of hidden features. max_ell: max degree of edge harmonics.
        correlation: body order of the product basis minus one (1–3).
        avg_num_neighbors, scale, shift: dataset statistics for normalisation.
        first_interaction: ``residual`` (default; mace-torch's ``RealAgnosticResidualInteractionBlock``) or
            ``plain`` (its non-residual ``RealAgnosticInteractionBlock``, the first block of ``--model MACE`` and
            of several foundation models; used by imported models).
        trainable_shift: learn the per-element shift (initialised from ``shift``) instead of fixing it
            (MACE fixes it: the default); see :class:`~potentials.nn.blocks.ScaleShift`.
        heads: multi-head models: ``{name: {e0s, scale, shift}}`` (dataset statistics of each head); every readout
            gets one output column (last layer: one MLP block) per head. None: one head.
    """

    def __init__(
        self,
        atomic_numbers: list[int],
        e0s: dict[int, float] | None = None,
        *,
        r_max: float = 5.0,
        num_interactions: int = 2,
        channels: int = 32,
        max_L: int = 1,
        max_ell: int = 3,
        correlation: int = 3,
        num_bessel: int = 8,
        cutoff_p: int = 5,
        tp: str = "cg",
        radial: str = "mlp",
        radial_hidden: list[int] = (64, 64, 64),
        readout_hidden: int = 16,
        avg_num_neighbors: float = 1.0,
        scale: float = 1.0,
        shift: float = 0.0,
        first_interaction: str = "residual",
        trainable_shift: bool = False,
        heads: dict | None = None,
        **radial_options,
    ):
        super().__init__(atomic_numbers, e0s, heads)
        if not 1 <= int(correlation) <= 3:
            from potentials.errors import PotentialsError

            raise PotentialsError(f"model.correlation must be 1, 2 or 3, got {correlation}")
        if first_interaction not in ("residual", "plain"):
            from potentials.errors import PotentialsError

            raise PotentialsError(f"model.first_interaction must be 'residual' or 'plain', got {first_interaction!r}")
        self.r_max = float(r_max)
        engine = get_engine(tp)
        n_el = self.num_elements
        self.sh = o3.SphericalHarmonics(
            o3.Irreps.spherical_harmonics(max_ell), normalize=True, normalization="component"
        )
        irreps_sh = self.sh.irreps_out
        self.radial_embedding = RadialEmbedding(r_max, num_bessel, cutoff_p)
        make_radial = make_radial_factory(
            radial, self.radial_embedding.out_dim, list(radial_hidden), r_max=r_max, cutoff_p=cutoff_p, **radial_options
        )
        irreps_target = o3.Irreps([(channels, ir) for _, ir in irreps_sh])
        hidden = natural_irreps(channels, max_L)
        self.embedding = LinearNodeEmbedding(n_el, natural_irreps(channels, 0))
        self.interactions = torch.nn.ModuleList()
        self.products = torch.nn.ModuleList()
        self.readouts = torch.nn.ModuleList()
        irreps_node = natural_irreps(channels, 0)
        for layer in range(num_interactions):
            last = layer == num_interactions - 1
            irreps_out = natural_irreps(channels, 0) if last else hidden
            block = PlainInteractionBlock if layer == 0 and first_interaction == "plain" else InteractionBlock
            self.interactions.append(
                block(
                    engine, irreps_node, irreps_sh, irreps_target, irreps_out, n_el, make_radial, avg_num_neighbors
                )
            )
            self.products.append(ProductBlock(engine, irreps_target, irreps_out, correlation, n_el))
            H = self.num_heads
            self.readouts.append(NonLinearReadout(irreps_out, readout_hidden, H) if last else LinearReadout(irreps_out, H))
            irreps_node = irreps_out
        self.scale_shift = ScaleShift(n_el, *self.head_scale_shift(scale, shift, heads), trainable_shift, self.num_heads)

    def forward(self, graph: AtomicGraph) -> torch.Tensor:
        """``graph`` → total energy per structure [B] (eV)."""
        dtype = self.embedding.linear.weight.dtype
        species, one_hot, vectors, lengths = self.node_and_edge_inputs(graph, dtype)
        edge_attrs = self.sh(vectors)
        edge_feats = self.radial_embedding(lengths)
        edge_index = graph["edge_index"]
        node_feats = self.embedding(one_hot)
        node_head = self.node_heads(graph, species)  # [n] or None (one head)
        node_energy = torch.zeros((species.shape[0], self.num_heads), dtype=dtype, device=species.device)
        for interaction, product, readout in zip(self.interactions, self.products, self.readouts):
            with backbone_autocast():
                a, sc = interaction(node_feats, one_hot, edge_attrs, edge_feats, edge_index, lengths)
                node_feats = product(a, species, sc)
            node_feats = node_feats.to(dtype)  # the energy head always runs in the model dtype
            node_energy = node_energy + readout(node_feats, node_head)
        return self.total_energy(self.pick_head(node_energy, node_head), species, graph, node_head)
