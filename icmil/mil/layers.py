"""Building blocks shared by the heads: the DimRed trunk and gated attention (Ilse et al., 2018).

Example:
    >>> import torch
    >>> trunk, att = DimRed(16, 8), GatedAttention(8, 4)
    >>> tuple(att(trunk(torch.randn(3, 16))).shape)
    (3,)
"""

from __future__ import annotations

import torch
from torch import nn


class DimRed(nn.Sequential):
    """``Linear(in_dim -> hidden_dim, bias=False) + ReLU (+ Dropout)``: the trunk every head starts with.

    No bias, as in ICMIL: the trunk's output is also the target of the L_w2 faithfulness loss.
    """

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class GatedAttention(nn.Module):
    """Gated attention scores ``w^T (tanh(V h) * sigmoid(U h))``: raw, pre-softmax, one per instance.

    Works on any leading shape: ``(..., N, H) -> (..., N)``.
    """

    def __init__(self, hidden_dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tanh_branch = nn.Linear(hidden_dim, attention_dim)
        self.gate_branch = nn.Linear(hidden_dim, attention_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.tanh_branch(h)) * torch.sigmoid(self.gate_branch(h))
        return self.score(self.dropout(gated)).squeeze(-1)
