"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation over random pseudo-bags.

Tier 1: the slide's instances are split into ``pseudo_bags`` groups; each group is pooled by gated attention
on the DimRed trunk and classified (cross-entropy with the slide label). Tier 2: one vector per pseudo-bag is
distilled from tier 1 (``afs``: the attention-pooled feature; ``maxs``: the instance with the highest
positive probability; ``maxmins``: that instance and the one with the lowest) and pooled again by gated
attention; its output is the slide prediction. Tier 2 is fed DETACHED tier-1 features (docs/method.md), which is
what lets both tiers train with one optimiser.

Pseudo-bags: random in training mode (as in the paper); in eval mode they are deterministic and
permutation-invariant: instances are ranked by their tier-1 attention score and dealt round-robin, so every
pseudo-bag receives a share of the most-attended instances and reordering the bag changes nothing.

Example:
    >>> import torch
    >>> head = DTFDMIL(in_dim=16, n_classes=2, hidden_dim=8, attention_dim=4).eval()
    >>> out = head(torch.randn(12, 16))
    >>> tuple(out.logits.shape), tuple(out.extras["tier1_logits"].shape), round(float(out.attention.sum()), 4)
    ((2,), (5, 2), 1.0)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from icmil.errors import ConfigError
from icmil.mil.base import BagOutput, MILHead, register_mil_head
from icmil.mil.layers import DimRed, GatedAttention

Distill = Literal["afs", "maxs", "maxmins"]
# TMI teacher blend (Wang et al., IEEE TMI 2024): 0.7 * tier-2 + 0.3 * tier-1 logits.
TIER2_BLEND_WEIGHT = 0.7


@register_mil_head("dtfd")
class DTFDMIL(MILHead):
    """Hyper-parameters: ``hidden_dim`` (512), ``attention_dim`` (128), ``dropout`` (0), ``pseudo_bags`` (5),
    ``distill`` (``afs`` | ``maxs`` | ``maxmins``), ``tier_blend`` (False). Adam, lr 1e-4; β 2.

    Instance teacher (docs/method.md): the tier-2 classifier applied to an instance's tier-1 DimRed feature;
    with ``tier_blend`` the logits are ``0.7 * tier2(h) + 0.3 * tier1(h)`` (TMI variant).

    ``attention_scores`` (for the confidence weights, ã = ã1·ã2 of the two tiers), defined per instance so
    it does not depend on which other instances are scored with it: ``ã1 = sigmoid(s1(h))`` with ``s1`` the raw
    tier-1 gated-attention score of the instance, ``ã2 = sigmoid(s2(h))`` with ``s2`` the raw tier-2 score of
    the instance's own DimRed feature (an instance is a pseudo-bag of one, whose AFS feature is itself).
    The sigmoids make the product monotone in both scores; a product of raw scores would flip sign when both
    are negative. The caller min-max normalises ã over its set (batch or slide) as the TMI paper describes.

    ``forward(...).attention`` is ``a1_i * a2_{k(i)}``: the instance's softmax weight inside its pseudo-bag times
    the tier-2 weight of that pseudo-bag (summed over its rows for ``maxmins``); it sums to 1 over the bag.
    ``forward(...).extras["tier1_logits"]`` holds one row of logits per non-empty pseudo-bag.
    """

    default_lr = 1e-4
    confidence_beta = 2.0

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        dropout: float = 0.0,
        pseudo_bags: int = 5,
        distill: Distill = "afs",
        tier_blend: bool = False,
    ) -> None:
        if distill not in ("afs", "maxs", "maxmins"):
            raise ConfigError(
                f"dtfd: distill must be afs, maxs or maxmins, got {distill!r} (mil.heads.dtfd.distill)"
            )
        if pseudo_bags < 1:
            raise ConfigError(
                f"dtfd: pseudo_bags must be >= 1, got {pseudo_bags} (mil.heads.dtfd.pseudo_bags)"
            )
        super().__init__(
            in_dim,
            n_classes,
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            dropout=dropout,
            pseudo_bags=pseudo_bags,
            distill=distill,
            tier_blend=tier_blend,
        )
        self.pseudo_bags = pseudo_bags
        self.distill: Distill = distill
        self.tier_blend = tier_blend
        self.dimred = DimRed(in_dim, hidden_dim, dropout)
        self.attention1 = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier1 = nn.Linear(hidden_dim, n_classes)
        self.attention2 = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier2 = nn.Linear(hidden_dim, n_classes)

    def _pseudo_bags(self, scores: torch.Tensor) -> list[torch.Tensor]:
        n = scores.shape[0]
        if self.training:
            order = torch.randperm(n, device=scores.device)
            groups = list(torch.tensor_split(order, self.pseudo_bags))
        else:
            order = torch.argsort(scores.detach(), descending=True, stable=True)
            groups = [order[k :: self.pseudo_bags] for k in range(self.pseudo_bags)]
        return [g for g in groups if g.numel() > 0]

    def _positive_prob(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # DTFD's instance probability: the tier-1 classifier on the attention-weighted instance feature
        # (its contribution to the pooled logit); "positive" = not class 0.
        contrib = (weights.unsqueeze(1) * h) @ self.classifier1.weight.T
        return 1.0 - torch.softmax(contrib, dim=1)[:, 0]

    def forward(self, features: torch.Tensor) -> BagOutput:
        self._check_bag(features, self.in_dim, "dtfd")
        h = self.dimred(features)
        s1 = self.attention1(h)
        groups = self._pseudo_bags(s1)
        tier1_logits, rows, row_bag, inst_weights = [], [], [], []
        for k, idx in enumerate(groups):
            hk = h[idx]
            ak = torch.softmax(s1[idx], dim=0)
            pooled = ak @ hk
            tier1_logits.append(self.classifier1(pooled))
            inst_weights.append(ak)
            if self.distill == "afs":
                rows.append(pooled)
                row_bag.append(k)
            else:
                prob = self._positive_prob(hk, ak)
                rows.append(hk[torch.argmax(prob)])
                row_bag.append(k)
                if self.distill == "maxmins":
                    rows.append(hk[torch.argmin(prob)])
                    row_bag.append(k)
        distilled = torch.stack(rows).detach()
        a2 = torch.softmax(self.attention2(distilled), dim=0)
        logits = self.classifier2(a2 @ distilled)

        bag_weight = torch.zeros(len(groups), dtype=a2.dtype, device=a2.device)
        bag_weight = bag_weight.index_add(0, torch.as_tensor(row_bag, device=a2.device), a2)
        attention = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
        for k, idx in enumerate(groups):
            attention[idx] = inst_weights[k] * bag_weight[k]
        return BagOutput(
            logits=logits, attention=attention, extras={"tier1_logits": torch.stack(tier1_logits)}
        )

    def bag_loss(self, out: BagOutput, label: torch.Tensor) -> torch.Tensor:
        """Tier-2 cross-entropy plus the mean tier-1 cross-entropy over the pseudo-bags."""
        tier1 = out.extras["tier1_logits"]
        tier1_loss = F.cross_entropy(tier1, label.view(1).expand(tier1.shape[0]))
        return F.cross_entropy(out.logits.unsqueeze(0), label.view(1)) + tier1_loss

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.dimred(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        tier2 = self.classifier2(h)
        if not self.tier_blend:
            return tier2
        return TIER2_BLEND_WEIGHT * tier2 + (1.0 - TIER2_BLEND_WEIGHT) * self.classifier1(h)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        h = self.dimred(features)
        return torch.sigmoid(self.attention1(h)) * torch.sigmoid(self.attention2(h))
