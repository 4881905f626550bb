"""``cg``: exact Clebsch–Gordan products through e3nn (the MACE reference engine).

* edge product: e3nn's 'uvu' ``TensorProduct`` — one path per allowed (l1, l2 → l3) coupling and one radial
  weight per (path, channel): ``weight_numel = n_paths · C`` — evaluated as the dense coupling tensor of the same
  paths (e3nn's Wigner 3j × path weights, see :mod:`~potentials.nn.tp.bilinear`): identical numbers in a
  channels-last layout kept across the neighbour sum;
* product basis: MACE's symmetric contraction (all symmetric couplings up to the correlation order,
  one learnable weight per coupling, channel and element).
"""

from __future__ import annotations

import torch
from e3nn import o3

from potentials.nn.symmetric_contraction import SymmetricContraction
from potentials.nn.tp.base import EdgeTensorProduct, Engine, ProductBasis, from_channels_last, register_engine
from potentials.nn.tp.base import to_channels_last
from potentials.nn.tp.bilinear import BilinearEdgeKernel


class CGEdgeTensorProduct(EdgeTensorProduct):
    """uvu tensor product: channel u of ``x`` with the (single-channel) edge harmonics ``y``.

    ``irreps_out`` holds one ``C x l3`` block per path, sorted by irrep (MACE's ``irreps_mid``).
    """

    def __init__(self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, irreps_target: o3.Irreps):
        super().__init__()
        irreps_node, irreps_sh, irreps_target = o3.Irreps(irreps_node), o3.Irreps(irreps_sh), o3.Irreps(irreps_target)
        targets = {ir for _, ir in irreps_target}
        irreps_mid, instructions = [], []
        for i, (mul, ir1) in enumerate(irreps_node):
            for j, (_, ir2) in enumerate(irreps_sh):
                for ir_out in ir1 * ir2:
                    if ir_out in targets:
                        instructions.append((i, j, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(irreps_mid)
        irreps_sorted, perm, _ = irreps_mid.sort()
        instructions = [(i1, i2, perm[i_out], mode, train) for i1, i2, i_out, mode, train in instructions]
        self.tp = o3.TensorProduct(
            irreps_node, irreps_sh, irreps_sorted, instructions, shared_weights=False, internal_weights=False
        )
        self.irreps_in1, self.irreps_in2, self.irreps_out = irreps_node, irreps_sh, irreps_sorted
        self.weight_numel = self.tp.weight_numel
        self.kernel = BilinearEdgeKernel(*coupling_tensor(self.tp), num_paths=len(self.tp.instructions))

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.finish_nodes(self.edge_messages(self.prepare_nodes(x), y, weight))

    def prepare_nodes(self, h: torch.Tensor) -> torch.Tensor:  # [n, A, C], component-major
        return to_channels_last(h, self.irreps_in1).transpose(1, 2).contiguous()

    def edge_messages(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # [E, K, C]
        return self.kernel.messages(x, y, weight)

    def finish_nodes(self, a: torch.Tensor) -> torch.Tensor:
        return from_channels_last(a.transpose(1, 2), self.irreps_out)


def coupling_tensor(tp: o3.TensorProduct) -> tuple[torch.Tensor, torch.Tensor]:
    """e3nn 'uvu' TensorProduct (in1 = C x irreps, in2 = 1 x irreps) → (B [A, Y, K], path_of [K]) for
    :class:`~potentials.nn.tp.bilinear.BilinearEdgeKernel`: ``B = path_weight · wigner_3j(l1, l2, l3)`` placed at the
    components of each path; K runs over the output blocks in e3nn's order (one ``2l3+1`` block per output irrep)."""
    ir1 = [ir for _, ir in tp.irreps_in1]
    ir2 = [ir for _, ir in tp.irreps_in2]
    ir3 = [ir for _, ir in tp.irreps_out]
    off = lambda irs: [sum(ir.dim for ir in irs[:i]) for i in range(len(irs))]  # noqa: E731
    o1, o2, o3_ = off(ir1), off(ir2), off(ir3)
    b = torch.zeros(sum(i.dim for i in ir1), sum(i.dim for i in ir2), sum(i.dim for i in ir3), dtype=torch.float64)
    path_of = torch.full((b.shape[2],), -1, dtype=torch.long)
    for p, ins in enumerate(tp.instructions):
        if ins.connection_mode != "uvu" or tp.irreps_in2[ins.i_in2].mul != 1:
            raise ValueError(f"coupling_tensor: instruction {ins} is not a 'uvu' path with a single-channel in2")
        l1, l2, l3 = ir1[ins.i_in1].l, ir2[ins.i_in2].l, ir3[ins.i_out].l
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        b[o1[ins.i_in1]:o1[ins.i_in1] + 2 * l1 + 1, o2[ins.i_in2]:o2[ins.i_in2] + 2 * l2 + 1,
          o3_[ins.i_out]:o3_[ins.i_out] + 2 * l3 + 1] += ins.path_weight * w3j
        path_of[o3_[ins.i_out]:o3_[ins.i_out] + 2 * l3 + 1] = p
    if bool((path_of < 0).any()):
        raise ValueError("coupling_tensor: every output irrep must be produced by exactly one path")
    return b, path_of


class CGProductBasis(ProductBasis):
    """Symmetric contraction (MACE) of ``A`` with itself up to ``correlation`` factors."""

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int):
        super().__init__()
        self.contraction = SymmetricContraction(irreps_in, irreps_out, correlation, num_elements)
        self.irreps_in, self.irreps_out = self.contraction.irreps_in, self.contraction.irreps_out

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        return self.contraction(a, species)


@register_engine("cg")
class CGEngine(Engine):
    def edge_tp(self, irreps_node, irreps_sh, irreps_target) -> EdgeTensorProduct:
        return CGEdgeTensorProduct(irreps_node, irreps_sh, irreps_target)

    def product_basis(self, irreps_in, irreps_out, correlation, num_elements) -> ProductBasis:
        return CGProductBasis(irreps_in, irreps_out, correlation, num_elements)
