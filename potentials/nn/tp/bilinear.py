"""Dense bilinear edge product with per-path weights, and its fused, chunked message aggregation.

Any channel-wise ("uvu") product whose paths each carry one radial weight per channel is

    m_e[k, u] = w_e[p(k), u] · Σ_{a, b} B[a, b, k] · y_e[b] · x_e[a, u]

with ``x`` the neighbour's features (component-major: ``a`` runs over all node components, ``u`` over channels),
``y`` the edge harmonics, ``B`` a fixed coupling tensor (CG coefficients × path weights for ``cg``) and ``p(k)``
the path of output component ``k``. With ``Z_e = y_e · B`` ([K, A], one GEMM for all edges) the message is one
small batched matmul ``Z_e x_e`` times the weights expanded along ``k`` (every operand contiguous, channels last).

:class:`BilinearEdgeKernel` evaluates it two ways that give the same numbers:

* ``messages`` — plain autograd ops over all edges at once (training: forces in the loss need second derivatives);
* ``aggregate`` — ``A_i = Σ_{e: centre(e)=i} m_e`` by a custom autograd function that walks the edges in chunks,
  evaluates the radial network per chunk, never materialises the [E, K, C] messages or the [E, P·C] weights, and
  recomputes both chunk by chunk in the backward pass. Saved for backward: only the inputs (node features
  [n, A, C], y [E, Y], the radial network's input [E, num_basis]). This is the inference path
  (:func:`~potentials.nn.ops.fused_inference`): peak memory O(n·K·C + chunk·K·C) instead of O(E·K·C), and every
  temporary stays cache-sized. Gradients reach the inputs, not the radial network's parameters; the backward is
  written in differentiable ops, so double backward works too (it is only slower than ``messages`` there).
"""

from __future__ import annotations

import torch

CHUNK_EDGES = 4096  # edges per chunk of the fused aggregation: temporaries of chunk·C·K floats (~2 MB at C=32, K=40)


class BilinearEdgeKernel(torch.nn.Module):
    """Coupling tensor ``B`` [A, Y, K] (float64 buffer) and path map ``path_of`` [K] (long), ``num_paths`` P.

    Shapes: x [E, A, C] (component-major node features), y [E, Y], w [E, P·C] (path-major, channel-minor: e3nn's
    'uvu' weight layout) → messages [E, K, C]; aggregate: h [n, A, C] → [n, K, C].
    """

    def __init__(self, coupling: torch.Tensor, path_of: torch.Tensor, num_paths: int):
        super().__init__()
        a, y, k = coupling.shape
        self.dims = (a, y, k)
        self.num_paths = int(num_paths)
        # Z = y @ B_flat with B_flat [Y, K·A]
        self.register_buffer("b_flat", coupling.permute(1, 2, 0).reshape(y, k * a).contiguous(), persistent=False)
        self.register_buffer("path_of", path_of.long(), persistent=False)

    def _z(self, y: torch.Tensor) -> torch.Tensor:
        a, _, k = self.dims
        return (y @ self.b_flat.to(y.dtype)).view(-1, k, a)

    def _weights(self, w: torch.Tensor) -> torch.Tensor:
        """[E, P·C] → [E, K, C] (each output component gets its path's weight)."""
        return w.view(w.shape[0], self.num_paths, -1).index_select(1, self.path_of)

    def messages(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self._z(y), x) * self._weights(w)

    def aggregate(self, h: torch.Tensor, y: torch.Tensor, radial, radial_in: torch.Tensor, edge_index: torch.Tensor):
        """``Σ_j m_ij`` per centre with ``w = radial(radial_in)`` evaluated chunk by chunk (never stored for all edges).

        h [n, A, C] node features (gathered at the neighbour ``edge_index[1]``), y [E, Y], radial_in [E, ...]
        → [n, K, C]. Gradients flow to h, y and radial_in (not to the radial network's parameters)."""
        return _FusedAggregate.apply(self, radial, h, y, radial_in, edge_index)


def _chunks(num_edges: int):
    for start in range(0, num_edges, CHUNK_EDGES):
        yield slice(start, min(start + CHUNK_EDGES, num_edges))


class _FusedAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: BilinearEdgeKernel, radial, h, y, radial_in, edge_index):
        centre, neighbour = edge_index[0], edge_index[1]
        out = h.new_zeros((h.shape[0], kernel.dims[2], h.shape[2]))
        for s in _chunks(y.shape[0]):
            m = kernel.messages(h.index_select(0, neighbour[s]), y[s], radial(radial_in[s]))
            out.index_add_(0, centre[s], m)
        ctx.kernel, ctx.radial = kernel, radial
        ctx.save_for_backward(h, y, radial_in, edge_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kernel, radial = ctx.kernel, ctx.radial
        h, y, radial_in, edge_index = ctx.saved_tensors
        centre, neighbour = edge_index[0], edge_index[1]
        need_h, need_y, need_r = ctx.needs_input_grad[2:5]
        create_graph = torch.is_grad_enabled()  # the backward itself is being differentiated
        grad_h = torch.zeros_like(h) if need_h else None
        grad_y, grad_r = [], []
        b_flat = kernel.b_flat.to(y.dtype)
        for s in _chunks(y.shape[0]):
            g = grad_out.index_select(0, centre[s])          # [e, K, C]
            x = h.index_select(0, neighbour[s])               # [e, A, C]
            z = kernel._z(y[s])                               # [e, K, A]
            r = radial_in[s] if create_graph else radial_in[s].detach().requires_grad_(need_r)
            with torch.enable_grad():
                w = radial(r)                                 # [e, P·C], recomputed
            gm = g * kernel._weights(w if create_graph else w.detach())   # d/d(z x)
            if need_h:
                gx = torch.bmm(z.transpose(1, 2), gm)        # [e, A, C]
                grad_h = grad_h.index_add(0, neighbour[s], gx) if create_graph else grad_h.index_add_(0, neighbour[s], gx)
            if need_y:
                gz = torch.bmm(gm, x.transpose(1, 2))         # [e, K, A]
                grad_y.append(gz.reshape(gz.shape[0], -1) @ b_flat.t())
            if need_r:
                gk = g * torch.bmm(z, x)                      # [e, K, C]
                gw = gk.new_zeros(gk.shape[0], kernel.num_paths, gk.shape[2]).index_add(1, kernel.path_of, gk)
                (gr,) = torch.autograd.grad(w, r, gw.reshape(gk.shape[0], -1), create_graph=create_graph)
                grad_r.append(gr)
        return (
            None,
            None,
            grad_h,
            torch.cat(grad_y) if need_y else None,
            torch.cat(grad_r) if need_r else None,
            None,
        )
