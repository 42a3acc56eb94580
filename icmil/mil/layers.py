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

# Keys of the standardisation buffers in a DimRed's state dict (checkpoints written before they existed lack them).
STANDARDIZATION_BUFFERS = ("input_mean", "input_scale")


class DimRed(nn.Sequential):
    """``standardise -> Linear(in_dim -> hidden_dim, bias=False) + ReLU (+ Dropout)``: the trunk of every head.

    No bias, as in ICMIL: the trunk's output is also the target of the L_w2 faithfulness loss.

    The input is standardised per dimension, ``(x - input_mean) / input_scale``, with fixed statistics of the
    training patches (buffers set by :meth:`set_standardization`, saved with the weights; identity until set).
    Why: encoder outputs are far from centred. After a ReLU/pooling trunk every dimension carries a common
    positive offset larger than its patch-to-patch variation (a random ``tiny_cnn`` on the synthetic slides: mean
    0.39, median per-dimension sd 0.09), and the bias-free linear layer sees mostly that offset. Measured on
    such features (``bench/round0_diagnosis.py``; docs/coupling.md, section 1b): the AB-MIL head stayed at
    chance (validation loss ln 2, val-slide instance patch AUC 0.62-0.65) while a linear probe found the lesions
    (0.81); standardised, the same head and budget learn (val AUC 0.67-1.0, patch AUC 0.72-0.75). Being part of
    the trunk, the standardisation travels with the head into the instance teacher and the student of stage 2
    (never trained there).

    >>> t = DimRed(2, 3)
    >>> t.set_standardization(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.5]))
    >>> t.standardize(torch.tensor([[3.0, 2.5]])).tolist()
    [[1.0, 1.0]]
    """

    input_mean: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(in_dim))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Fix the per-dimension input statistics (``std`` below ``eps`` counts as ``eps``: constant dims)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.input_mean.numel() or std.numel() != self.input_scale.numel():
            raise ValueError(
                f"standardisation statistics have {mean.numel()}/{std.numel()} dims, the trunk takes "
                f"{self.input_mean.numel()}"
            )
        with torch.no_grad():
            self.input_mean.copy_(mean)
            self.input_scale.copy_(std.clamp_min(eps))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """``(features - input_mean) / input_scale`` in the features' dtype."""
        return (features - self.input_mean.to(features.dtype)) / self.input_scale.to(features.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(self.standardize(features))


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
