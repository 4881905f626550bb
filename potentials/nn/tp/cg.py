"""``cg``: exact Clebsch–Gordan products through e3nn (the MACE reference engine).

* edge product: e3nn ``TensorProduct`` with one 'uvu' path per allowed (l1, l2 → l3) coupling and
  one radial weight per (path, channel): ``weight_numel = n_paths · C``;
* product basis: MACE's symmetric contraction (all symmetric couplings up to the correlation order,
  one learnable weight per coupling, channel and element).
"""

from __future__ import annotations

import torch
from e3nn import o3

from potentials.nn.precision import outside_autocast
from potentials.nn.symmetric_contraction import SymmetricContraction
from potentials.nn.tp.base import EdgeTensorProduct, Engine, ProductBasis, register_engine


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

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return outside_autocast(self.tp, x, y, weight)


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
