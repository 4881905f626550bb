"""Dense bilinear edge product with per-path weights (the ``cg`` engine's edge product).

Any channel-wise ("uvu") product whose paths each carry one radial weight per channel is

    m_e[k, u] = w_e[p(k), u] · Σ_{a, b} B[a, b, k] · y_e[b] · x_e[a, u]

with ``x`` the neighbour's features (component-major: ``a`` runs over all node components, ``u`` over channels),
``y`` the edge harmonics, ``B`` a fixed coupling tensor (CG coefficients × path weights for ``cg``) and ``p(k)``
the path of output component ``k``. With ``Z_e = y_e · B`` ([K, A], one GEMM for all edges) the message is one
small batched matmul ``Z_e x_e`` times the weights expanded along ``k`` (every operand contiguous, channels last).

The neighbour sum (plain or chunked for inference) is the engine interface's job
(:meth:`~potentials.nn.tp.base.EdgeTensorProduct.aggregate`).
"""

from __future__ import annotations

import torch


class BilinearEdgeKernel(torch.nn.Module):
    """Coupling tensor ``B`` [A, Y, K] (float64 buffer) and path map ``path_of`` [K] (long), ``num_paths`` P.

    Shapes: x [E, A, C] (component-major node features), y [E, Y], w [E, P·C] (path-major, channel-minor: e3nn's
    'uvu' weight layout) → messages [E, K, C].
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
        # explicit C (not -1): an empty edge set (isolated atom) must still reshape
        return w.view(w.shape[0], self.num_paths, w.shape[1] // self.num_paths).index_select(1, self.path_of)

    def messages(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = self._z(y)
        zx = z * x if self.dims[0] == 1 else torch.bmm(z, x)  # scalar node features: an outer product, no GEMM
        return zx * self._weights(w)
