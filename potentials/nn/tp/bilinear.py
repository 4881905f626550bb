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
  never materialises the [E, C, K] messages, and recomputes them chunk by chunk in the backward pass. Saved for
  backward: only the inputs (node features [n, C, A], y [E, Y], w [E, P·C]). This is the inference path: peak
  memory O(n·C·K + chunk·C·K) instead of O(E·C·K), and every temporary stays cache-sized. Its backward is
  written in differentiable ops, so it also supports double backward (it is only slower than ``messages`` there).
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

    def aggregate(self, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``Σ_j m_ij`` per centre: h [n, A, C] node features (gathered at the neighbour ``edge_index[1]``) → [n, K, C]."""
        return _FusedAggregate.apply(self, h, y, w, edge_index)


def _chunks(num_edges: int):
    for start in range(0, num_edges, CHUNK_EDGES):
        yield slice(start, min(start + CHUNK_EDGES, num_edges))


class _FusedAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: BilinearEdgeKernel, h, y, w, edge_index):
        centre, neighbour = edge_index[0], edge_index[1]
        out = h.new_zeros((h.shape[0], kernel.dims[2], h.shape[2]))
        for s in _chunks(y.shape[0]):
            m = kernel.messages(h.index_select(0, neighbour[s]), y[s], w[s])
            out.index_add_(0, centre[s], m)
        ctx.kernel = kernel
        ctx.save_for_backward(h, y, w, edge_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kernel = ctx.kernel
        h, y, w, edge_index = ctx.saved_tensors
        centre, neighbour = edge_index[0], edge_index[1]
        need_h, need_y, need_w = ctx.needs_input_grad[1:4]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_y, grad_w = [], []
        b_flat = kernel.b_flat.to(y.dtype)
        for s in _chunks(y.shape[0]):
            g = grad_out.index_select(0, centre[s])          # [e, K, C]
            x = h.index_select(0, neighbour[s])               # [e, A, C]
            z = kernel._z(y[s])                               # [e, K, A]
            gm = g * kernel._weights(w[s])                    # d/d(z x)
            if need_h:
                gx = torch.bmm(z.transpose(1, 2), gm)        # [e, A, C]
                # out of place only when the backward itself is differentiated (create_graph=True)
                grad_h = grad_h.index_add(0, neighbour[s], gx) if torch.is_grad_enabled() else grad_h.index_add_(0, neighbour[s], gx)
            if need_y:
                gz = torch.bmm(gm, x.transpose(1, 2))         # [e, K, A]
                grad_y.append(gz.reshape(gz.shape[0], -1) @ b_flat.t())
            if need_w:
                gk = g * torch.bmm(z, x)                      # [e, K, C]
                per_path = gk.new_zeros(gk.shape[0], kernel.num_paths, gk.shape[2]).index_add(1, kernel.path_of, gk)
                grad_w.append(per_path.reshape(gk.shape[0], -1))
        return (
            None,
            grad_h,
            torch.cat(grad_y) if need_y else None,
            torch.cat(grad_w) if need_w else None,
            None,
        )
