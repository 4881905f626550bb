"""Facet-style model (Miklaucic et al., arXiv 2509.08418): MACE's message passing with the two Facet changes —
spline radial weights instead of radial MLPs, and a sphere-grid MLP mixer instead of the symmetric
contraction (product basis).

Per layer t (node features h, natural-parity irreps C x (0e + 1o + … + max_L); scalars only in the last):

    m_i  = Linear( Σ_{j∈N(i)} TP_uvu( Linear(h_j), Y(r̂_ij); R(r_ij) ) / avg_num_neighbors )   → C x (0e..max_ell)
    h_i ← S2MLPMixer(m_i) + Linear_t(h_i)                                                    (residual)

then E_i = NonLinearReadout(h_i) of the last block only, scale/shift, + E0, summed per structure.
``TP_uvu`` is the engine's channel-wise edge product (``tp=cg`` now; any registered engine, e.g.
``gaunt_grid``), ``R`` the radial network (``radial=spline`` by default, ``mlp`` also works), ``Y`` edge
harmonics 0e..max_ell ('component'). Forces/stress come from the energy by autograd
(:mod:`potentials.models.derivatives`) like every model.

The mixer is only approximately rotation-equivariant (see :mod:`potentials.nn.s2_mixer`); it is exactly
inversion-equivariant, so the model is O(3)-equivariant up to the grid error.
"""

from __future__ import annotations

import torch
from e3nn import o3

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.models.base import PotentialModel
from potentials.models.mace import natural_irreps
from potentials.nn.ops import node_checkpointed
from potentials.nn.precision import backbone_autocast, outside_autocast
from potentials.nn.blocks import EdgeConvolution, LinearNodeEmbedding, NonLinearReadout, ScaleShift
from potentials.nn.radial import RadialEmbedding
from potentials.nn.radials import make_radial_factory
from potentials.nn.s2_mixer import S2MLPMixer
from potentials.nn.tp import get_engine


class Facet(PotentialModel):
    """Facet-style potential with a swappable edge-product engine (``tp``) and radial (``radial``).

    Args:
        atomic_numbers, e0s: element table and isolated-atom energies (eV).
        r_max: cutoff (Å). num_interactions: layers. channels: C. max_L: hidden degree. max_ell: edge harmonics
            and message degree.
        hidden_irreps: optional hidden features with their own multiplicity per degree, natural parity, one irrep
            per degree 0..L (e.g. ``"128x0e + 64x1o + 32x2e"``, Facet-S); overrides ``channels`` and ``max_L``.
            The messages get the hidden multiplicity of each degree (degrees above L: the smallest one); the
            last layer keeps the hidden scalars. Needs an engine with unequal multiplicities (``tp=cg``).
        radial: ``spline`` (default; ``num_knots`` knots), ``bessel`` (Facet: linear map of ``num_bessel`` Bessel
            functions with trainable frequencies, no hidden layer) or ``mlp`` (``num_bessel`` Bessel functions,
            ``radial_hidden``). cutoff_p: polynomial cutoff exponent.
        grid_res: (res_beta, res_alpha) of the mixer grid, or null for the measured default of
            :func:`potentials.nn.s2_mixer.default_resolution` at the grid degree.
        grid_lmax: degree of the grid functions (default max_ell). grid_channels: channels on the grid (default C;
            with ``hidden_irreps``: the largest multiplicity of the non-scalar messages, as Facet's ``up_mul``).
        mixer_heads, mixer_hidden, mixer_act, mixer_final_act: the pointwise MLP.
        readout_hidden: width of the last-block readout.
        avg_num_neighbors, scale, shift: dataset statistics.
        heads: multi-head models: ``{name: {e0s, scale, shift}}``; one readout MLP block per head. None: one head.
    """

    def __init__(
        self,
        atomic_numbers: list[int],
        e0s: dict[int, float] | None = None,
        *,
        r_max: float = 5.0,
        num_interactions: int = 2,
        channels: int = 16,
        max_L: int = 2,
        max_ell: int = 2,
        tp: str = "cg",
        radial: str = "spline",
        num_knots: int = 8,
        num_bessel: int = 8,
        cutoff_p: int = 5,
        radial_hidden: list[int] = (32, 32),
        grid_res: list[int] | None = None,
        grid_lmax: int | None = None,
        grid_channels: int | None = None,
        mixer_heads: int = 2,
        mixer_hidden: list[int] = (16,),
        mixer_act: str = "silu",
        mixer_final_act: bool = True,
        readout_hidden: int = 16,
        hidden_irreps: str | None = None,
        avg_num_neighbors: float = 1.0,
        scale: float = 1.0,
        shift: float = 0.0,
        heads: dict | None = None,
    ):
        super().__init__(atomic_numbers, e0s, heads)
        if int(num_interactions) < 1:
            raise PotentialsError(f"model.num_interactions must be ≥ 1, got {num_interactions}")
        if grid_res is not None and len(grid_res) != 2:
            raise PotentialsError(f"model.grid_res must be [res_beta, res_alpha] or null, got {grid_res}")
        self.r_max = float(r_max)
        engine = get_engine(tp)
        n_el = self.num_elements
        self.sh = o3.SphericalHarmonics(
            o3.Irreps.spherical_harmonics(max_ell), normalize=True, normalization="component"
        )
        self.radial_embedding = RadialEmbedding(r_max, num_bessel, cutoff_p) if radial not in ("spline", "bessel") else None
        make_radial = make_radial_factory(
            radial, num_bessel, list(radial_hidden), r_max=r_max, cutoff_p=cutoff_p,
            **({"num_knots": num_knots} if radial == "spline" else {}),
        )
        if hidden_irreps is None:
            irreps_hidden, irreps_target = natural_irreps(channels, max_L), natural_irreps(channels, max_ell)
        else:
            irreps_hidden, irreps_target = facet_irreps(hidden_irreps, max_ell)
            if len({mul for mul, _ in irreps_hidden + irreps_target}) > 1 and not engine.unequal_multiplicities:
                raise PotentialsError(
                    f"model.tp={tp!r} needs one common multiplicity, but model.hidden_irreps={hidden_irreps!r} has "
                    "unequal ones; use model.tp=cg"
                )
            if grid_channels is None:
                grid_channels = max([mul for mul, ir in irreps_target if ir.l > 0] or [irreps_target[0].mul])
        self.hidden_irreps = irreps_hidden
        irreps_scalars = o3.Irreps([irreps_hidden[0]])
        self.embedding = LinearNodeEmbedding(n_el, irreps_scalars)
        self.convolutions = torch.nn.ModuleList()
        self.mixers = torch.nn.ModuleList()
        self.residuals = torch.nn.ModuleList()
        irreps_node = irreps_scalars
        for layer in range(num_interactions):
            irreps_out = irreps_scalars if layer == num_interactions - 1 else irreps_hidden
            self.convolutions.append(
                EdgeConvolution(engine, irreps_node, self.sh.irreps_out, irreps_target, make_radial, avg_num_neighbors)
            )
            self.mixers.append(
                S2MLPMixer(
                    irreps_target, irreps_out, grid_channels=grid_channels or irreps_hidden[0].mul,
                    lmax=max_ell if grid_lmax is None else grid_lmax,
                    res=None if grid_res is None else tuple(grid_res), heads=mixer_heads, hidden=list(mixer_hidden),
                    act=mixer_act, final_act=mixer_final_act,
                )
            )
            self.residuals.append(o3.Linear(irreps_node, irreps_out))
            irreps_node = irreps_out
        self.readout = NonLinearReadout(irreps_node, readout_hidden, self.num_heads)
        self.scale_shift = ScaleShift(n_el, *self.head_scale_shift(scale, shift, heads), num_heads=self.num_heads)

    def forward(self, graph: AtomicGraph) -> torch.Tensor:
        """``graph`` → total energy per structure [B] (eV)."""
        dtype = self.embedding.linear.weight.dtype
        species, one_hot, vectors, lengths = self.node_and_edge_inputs(graph, dtype)
        edge_attrs = self.sh(vectors)
        edge_feats = None if self.radial_embedding is None else self.radial_embedding(lengths)
        edge_index = graph["edge_index"]
        h = self.embedding(one_hot)
        with backbone_autocast():  # bf16/fp16 autocast (if the caller asked) covers only the backbone
            for conv, mixer, residual in zip(self.convolutions, self.mixers, self.residuals):
                m = conv(h, edge_attrs, edge_feats, lengths, edge_index)
                h = node_checkpointed(mixer, mixer, m) + outside_autocast(residual, h)  # inference: recompute, not store
        node_head = self.node_heads(graph, species)  # [n] or None (one head)
        node_energy = self.readout(h.to(dtype), node_head)  # [n, H]; the energy head runs in the model dtype
        return self.total_energy(self.pick_head(node_energy, node_head), species, graph, node_head)


def facet_irreps(hidden_irreps: str, max_ell: int) -> tuple[o3.Irreps, o3.Irreps]:
    """``model.hidden_irreps`` → (hidden irreps, message irreps 0..max_ell with the hidden multiplicity of each
    degree; degrees above the hidden L get the smallest hidden multiplicity). Natural parity, one irrep per
    degree 0..L, in order; anything else raises :class:`PotentialsError`."""
    try:
        irreps = o3.Irreps(hidden_irreps)
    except (ValueError, AssertionError) as exc:
        raise PotentialsError(f"model.hidden_irreps={hidden_irreps!r} is not an irreps string: {exc}") from None
    degrees = [ir.l for _, ir in irreps]
    bad = [str(ir) for _, ir in irreps if ir.p != (-1) ** ir.l]
    if degrees != list(range(len(degrees))) or bad or any(mul < 1 for mul, _ in irreps):
        raise PotentialsError(
            f"model.hidden_irreps={hidden_irreps!r} must list each degree 0..L once, in order, with natural parity "
            f"(0e, 1o, 2e, 3o, ...) and positive multiplicities, e.g. '128x0e + 64x1o + 32x2e'"
            + (f"; got {sorted(set(bad))}" if bad else "")
        )
    smallest = min(mul for mul, _ in irreps)
    target = o3.Irreps([(irreps[l].mul if l < len(irreps) else smallest, (l, (-1) ** l)) for l in range(max_ell + 1)])
    return irreps, target
