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

from potentials.nn.ops import scatter_sum
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
        self.uniform = len({mul for mul, _ in irreps_node}) == 1
        if self.uniform:
            self.kernel = BilinearEdgeKernel(*coupling_tensor(self.tp), num_paths=len(self.tp.instructions))
        else:
            self._build_groups(irreps_node, irreps_sh, instructions, irreps_mid, perm)

    def _build_groups(self, irreps_node, irreps_sh, instructions, irreps_mid, perm) -> None:
        """Unequal multiplicities: one dense kernel per run of consecutive input irreps with a common multiplicity.

        The instructions are ordered by input irrep, so each group owns a contiguous slice of the weights and of
        the unsorted output blocks; ``finish_nodes`` puts the blocks back in the sorted order of ``irreps_out``.
        The path weights of a 'uvu' path do not depend on the other paths, so the result equals ``self.tp``."""
        runs: list[list[int]] = []
        for i, (mul, _) in enumerate(irreps_node):
            if runs and irreps_node[runs[-1][0]].mul == mul:
                runs[-1].append(i)
            else:
                runs.append([i])
        self.kernels = torch.nn.ModuleList()
        self.group_shapes: list[tuple[int, int, int, int, int]] = []  # (C, A, K, weight count, message numel)
        block_of = []  # unsorted output block index of each instruction, in instruction order
        for run in runs:
            sub_in = o3.Irreps([irreps_node[i] for i in run])
            ins = [(i1 - run[0], i2, k, mode, train) for k, (i1, i2, _, mode, train) in
                   enumerate(x for x in instructions if x[0] in run)]
            sub_mid = o3.Irreps([irreps_mid[len(block_of) + k] for k in range(len(ins))])
            block_of += [len(block_of) + k for k in range(len(ins))]
            sub_tp = o3.TensorProduct(sub_in, irreps_sh, sub_mid, ins, shared_weights=False, internal_weights=False)
            coupling, path_of = coupling_tensor(sub_tp)
            self.kernels.append(BilinearEdgeKernel(coupling, path_of, num_paths=len(ins)))
            c = sub_in[0].mul
            a, k = coupling.shape[0], coupling.shape[2]
            self.group_shapes.append((c, a, k, sub_tp.weight_numel, k * c))
        self.group_irreps_in = [o3.Irreps([irreps_node[i] for i in run]) for run in runs]
        self.group_irreps_mid = []
        start = 0
        for run in runs:
            count = sum(1 for x in instructions if x[0] in run)
            self.group_irreps_mid.append(o3.Irreps(irreps_mid[start:start + count]))
            start += count
        # sorted position perm[k] of unsorted block k → the unsorted block of each sorted position
        self.sorted_from_unsorted = [perm.index(p) for p in range(len(perm))]

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.finish_nodes(self.edge_messages(self.prepare_nodes(x), y, weight))

    def aggregate(self, h, y, radial, radial_in, edge_index, num_nodes, fused=False) -> torch.Tensor:
        """Grouped (unequal multiplicities), training path: gather, multiply and sum each group on its own, so
        that no [E, Σ A_g·C_g] edge tensor is built and split (its split/slice backward fills zeros per group).
        Uniform multiplicities and the fused inference path: the interface's default."""
        if self.uniform or fused:
            return super().aggregate(h, y, radial, radial_in, edge_index, num_nodes, fused=fused)
        weights = torch.split(radial(radial_in), [nw for _, _, _, nw, _ in self.group_shapes], dim=-1)
        parts = torch.split(h, [irreps.dim for irreps in self.group_irreps_in], dim=-1)
        blocks = []
        for kernel, irreps_in, irreps_mid, (c, _, k, _, _), part, w in zip(
            self.kernels, self.group_irreps_in, self.group_irreps_mid, self.group_shapes, parts, weights
        ):
            x = to_channels_last(part, irreps_in).transpose(1, 2).contiguous()  # [n, A_g, C_g]
            m = kernel.messages(x.index_select(0, edge_index[1]), y, w)  # [E, K_g, C_g]
            a = from_channels_last(scatter_sum(m, edge_index[0], num_nodes).transpose(1, 2), irreps_mid)
            blocks += list(torch.split(a, [mul * ir.dim for mul, ir in irreps_mid], dim=-1))
        return torch.cat([blocks[u] for u in self.sorted_from_unsorted], dim=-1)

    def prepare_nodes(self, h: torch.Tensor) -> torch.Tensor:
        """Uniform: [n, A, C] component-major; grouped: the groups' [n, A_g, C_g] flattened and concatenated."""
        if self.uniform:
            return to_channels_last(h, self.irreps_in1).transpose(1, 2).contiguous()
        parts = torch.split(h, [irreps.dim for irreps in self.group_irreps_in], dim=-1)
        return torch.cat([to_channels_last(part, irreps).transpose(1, 2).reshape(h.shape[0], -1)
                          for part, irreps in zip(parts, self.group_irreps_in)], dim=-1)

    def edge_messages(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Uniform: [E, K, C]; grouped: the groups' [E, K_g, C_g] flattened and concatenated."""
        if self.uniform:
            return self.kernel.messages(x, y, weight)
        # torch.split, not slicing: its backward is one cat, where each slice's backward fills a zero [E, ·] tensor
        xs = torch.split(x, [a * c for c, a, _, _, _ in self.group_shapes], dim=-1)
        ws = torch.split(weight, [nw for _, _, _, nw, _ in self.group_shapes], dim=-1)
        out = [kernel.messages(xg.reshape(x.shape[0], a, c), y, wg).reshape(x.shape[0], -1)
               for kernel, (c, a, _, _, _), xg, wg in zip(self.kernels, self.group_shapes, xs, ws)]
        return torch.cat(out, dim=-1)

    def finish_nodes(self, a: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return from_channels_last(a.transpose(1, 2), self.irreps_out)
        blocks = []
        parts = torch.split(a, [numel for _, _, _, _, numel in self.group_shapes], dim=-1)
        for irreps, (c, _, k, _, _), part in zip(self.group_irreps_mid, self.group_shapes, parts):
            part = from_channels_last(part.reshape(a.shape[0], k, c).transpose(1, 2), irreps)
            blocks += list(torch.split(part, [mul * ir.dim for mul, ir in irreps], dim=-1))
        return torch.cat([blocks[u] for u in self.sorted_from_unsorted], dim=-1)


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
    unequal_multiplicities = True  # the edge product; the product basis (symmetric contraction) needs one C

    def edge_tp(self, irreps_node, irreps_sh, irreps_target) -> EdgeTensorProduct:
        return CGEdgeTensorProduct(irreps_node, irreps_sh, irreps_target)

    def product_basis(self, irreps_in, irreps_out, correlation, num_elements) -> ProductBasis:
        return CGProductBasis(irreps_in, irreps_out, correlation, num_elements)
