"""Tiny stand-in modules for coupling tests: an encoder and a MIL head with the documented interfaces."""

from __future__ import annotations

import torch
from torch import nn

from icmil.mil.base import BagOutput, MILHead


class TinyEncoder(nn.Module):
    """uint8/float (B, 3, S, S) -> (B, D): a conv + pooling + linear, like a PatchEncoder but 100x smaller."""

    def __init__(self, out_dim: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class TinyHead(MILHead):
    """DimRed (no bias) + ReLU -> attention -> linear classifier, the ABMIL shape in miniature."""

    def __init__(self, in_dim: int = 6, n_classes: int = 2, hidden_dim: int = 5) -> None:
        super().__init__(in_dim, n_classes, hidden_dim=hidden_dim)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.att = nn.Linear(hidden_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor) -> BagOutput:
        h = self.trunk(features)
        a = torch.softmax(self.att(h).squeeze(-1), dim=0)
        return BagOutput(logits=self.classifier(a @ h), attention=a)

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.att(self.trunk(features)).squeeze(-1)
