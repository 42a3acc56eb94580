"""Max-pooling MIL: the bag logit of each class is the largest instance logit of that class.

Pooling the *instance logits* (not the features) keeps ICMIL's identity exact: the bag classifier is
literally the instance classifier followed by a max, so ``instance_logits`` is a faithful teacher.

Example:
    >>> import torch
    >>> head = MaxPoolMIL(in_dim=16, n_classes=2, hidden_dim=8)
    >>> x = torch.randn(6, 16)
    >>> torch.allclose(head(x).logits, head.instance_logits(x).max(dim=0).values)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from icmil.mil.base import BagOutput, MILHead, register_mil_head
from icmil.mil.layers import DimRed


def positive_evidence(logits: torch.Tensor) -> torch.Tensor:
    """Per-instance evidence against class 0 (the "negative" class): ``max_{c>=1} logit_c - logit_0``.

    For two classes this is the instance's log-odds of the positive class.
    """
    return logits[:, 1:].max(dim=1).values - logits[:, 0]


@register_mil_head("maxpool")
class MaxPoolMIL(MILHead):
    """``DimRed -> Linear(H -> C)`` per instance, then a per-class max over the instances.

    Hyper-parameters: ``hidden_dim`` (512), ``dropout`` (0). Adam, lr 1e-4; β 6. ``forward(...).attention`` is
    None (max pooling has no weights); ``attention_scores`` returns :func:`positive_evidence` of each instance
    (the quantity the max selects on in the binary case), used for heatmaps and the confidence variant.
    """

    default_lr = 1e-4
    confidence_beta = 6.0

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes, hidden_dim=hidden_dim, dropout=dropout)
        self.dimred = DimRed(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor) -> BagOutput:
        self._check_bag(features, self.in_dim, "maxpool")
        return BagOutput(logits=self.instance_logits(features).max(dim=0).values)

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.dimred(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        return positive_evidence(self.instance_logits(features))
