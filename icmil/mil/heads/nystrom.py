"""Nyström self-attention (Xiong et al., AAAI 2021), written for TransMIL.

Softmax attention ``softmax(Q K^T) V`` costs O(n^2). Nyström approximates it with ``m`` landmarks (segment
means of the queries and keys): ``softmax(Q K̃^T) · pinv(softmax(Q̃ K̃^T)) · softmax(Q̃ K^T) V``, O(n·m).
The pseudo-inverse is the iterative Moore–Penrose scheme of Razavi et al. (2014), as in Nyströmformer.
Sequences that are not a multiple of ``m`` are not zero-padded (Nyströmformer pads, which puts padding
rows into landmarks unless masked): the ``n`` rows are cut into ``m`` contiguous segments whose lengths
differ by at most one. Sequences with ``n <= m`` use exact attention (the approximation would only add
error there).

Example:
    >>> import torch
    >>> attn = NystromAttention(dim=32, heads=4, dim_head=8, landmarks=8)
    >>> tuple(attn(torch.randn(2, 50, 32)).shape)
    (2, 50, 32)
"""

from __future__ import annotations

import torch
from torch import nn


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose pseudo-inverse of a batch of square matrices ``(..., m, m)``.

    ``Z_0 = X^T / (max row-sum * max col-sum)`` guarantees convergence; each step is
    ``Z <- Z (13 I - X Z (15 I - X Z (7 I - X Z))) / 4``.
    """
    abs_x = x.abs()
    scale = abs_x.sum(dim=-1).amax(dim=-1) * abs_x.sum(dim=-2).amax(dim=-1)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def landmark_means(t: torch.Tensor, landmarks: int) -> torch.Tensor:
    """Segment means ``(B, h, n, d) -> (B, h, m, d)`` over ``m`` contiguous segments of near-equal length.

    Row ``i`` belongs to segment ``floor(i * m / n)``, so with ``n >= m`` every segment holds
    ``floor(n / m)`` or ``ceil(n / m)`` real rows: no padding row ever enters a landmark.
    """
    n = t.shape[2]
    segment = torch.arange(n, device=t.device) * landmarks // n
    sums = t.new_zeros(*t.shape[:2], landmarks, t.shape[3]).index_add(2, segment, t)
    counts = torch.bincount(segment, minlength=landmarks).to(t.dtype)
    return sums / counts[:, None]


class NystromAttention(nn.Module):
    """Multi-head Nyström attention with Nyströmformer's depthwise value convolution as a skip path.

    ``x (B, n, dim) -> (B, n, dim)``. ``residual_kernel`` (33, odd; 0 disables) is the sequence-axis kernel of
    the per-head depthwise convolution added to the attention output, as in the TransMIL reference setup.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual: nn.Module | None = None
        if residual_kernel:
            self.residual = nn.Conv2d(
                heads,
                heads,
                (residual_kernel, 1),
                padding=(residual_kernel // 2, 0),
                groups=heads,
                bias=False,
            )

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return qkv[0] * self.scale, qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_scores(x)[0]

    def forward_with_scores(
        self, x: torch.Tensor, query_index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and, with ``query_index``, that query's exact raw (pre-softmax) scores
        against every key, averaged over heads ``(B, n)``.

        One row of attention is O(n), so TransMIL's CLS attention is reported exactly even though the layer
        itself uses the Nyström approximation; it reuses this pass's queries and keys.
        """
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        scores = None
        if query_index is not None:
            row = q[:, :, query_index : query_index + 1] @ k.transpose(-1, -2)
            scores = row.squeeze(2).mean(dim=1)
        if n <= self.landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_l = landmark_means(q, self.landmarks)
            k_l = landmark_means(k, self.landmarks)
            kernel1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, h, n, m)
            kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, h, m, m)
            kernel3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, h, m, n)
            # Right to left: (m x m)(m x d) products first, so the only n-sized products are n x m x d
            # (multiplying kernel1 by the m x m pseudo-inverse first would cost n x m x m and an n x m buffer).
            out = kernel1 @ (iterative_pinv(kernel2, self.pinv_iterations) @ (kernel3 @ v))
        if self.residual is not None:
            out = out + self.residual(v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)), scores
