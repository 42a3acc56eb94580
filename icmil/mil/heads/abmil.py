"""Gated attention-based MIL (Ilse et al., 2018) on the DimRed trunk.

The bag logit is ``W (sum_k a_k h_k) + b = sum_k a_k (W h_k + b)`` because the attention weights sum to 1:
the head applied to one instance's trunk feature is ICMIL's instance classifier.

Example:
    >>> import torch
    >>> head = ABMIL(in_dim=16, n_classes=2, hidden_dim=8, attention_dim=4)
    >>> x = torch.randn(6, 16)
    >>> out = head(x)
    >>> torch.allclose(out.logits, out.attention @ head.instance_logits(x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from icmil.mil.base import BagOutput, MILHead, register_mil_head
from icmil.mil.layers import DimRed, GatedAttention


@register_mil_head("abmil")
class ABMIL(MILHead):
    """``DimRed -> gated attention (hidden attention_dim) -> weighted mean -> Linear(H -> C)``.

    Hyper-parameters: ``hidden_dim`` (512), ``attention_dim`` (128), ``dropout`` (0). Adam, lr 2e-4; β 6.
    ``attention_scores`` are the raw gated-attention scores (before the softmax over the bag).
    """

    default_lr = 2e-4
    confidence_beta = 6.0

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            in_dim, n_classes, hidden_dim=hidden_dim, attention_dim=attention_dim, dropout=dropout
        )
        self.dimred = DimRed(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor) -> BagOutput:
        self._check_bag(features, self.in_dim, "abmil")
        h = self.dimred(features)
        weights = torch.softmax(self.attention(h), dim=0)
        return BagOutput(logits=self.classifier(weights @ h), attention=weights)

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.dimred(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.attention(self.dimred(features))
