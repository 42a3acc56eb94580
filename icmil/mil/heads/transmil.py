"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with Nyström self-attention and a PPEG position map.

``DimRed -> [CLS; tokens padded to a square grid] -> x + NystromAttn(LN(x)) -> PPEG -> x + NystromAttn(LN(x))
-> LN -> Linear(H -> C) on the CLS token``. The grid is filled in bag order and padded by repeating the
first tokens (as the reference model does); padded tokens never appear in outputs or attention.

Instance teacher (ICMIL has no public TransMIL variant; this is our design, docs/method.md):

* ``teacher="single_instance"`` (default): ``instance_classify(h)`` runs the frozen TransMIL on a bag of ONE
  patch (CLS + 1 token, a 1x1 grid) for every row of ``h`` at once (a batch of N two-token bags). It is
  defined per patch, so it works on the coupling stage's random cross-slide patch batches.
* ``teacher="token_head"``: ``instance_classify(h)`` treats the rows of ``h`` as ONE bag, runs the whole model
  and applies the head to each output instance token after the final LayerNorm. It uses slide context, so
  pass one slide's patches (or a sizeable subset) at a time.

``attention_scores``: exact raw CLS->token scores of the second attention layer (mean over heads); one row
of attention is O(n), so it is computed exactly even though the layer uses the Nyström approximation.
``forward(...).attention`` is their softmax over the bag's real tokens.

Example:
    >>> import torch
    >>> head = TransMIL(in_dim=16, n_classes=2, hidden_dim=32, n_heads=4, landmarks=8).eval()
    >>> x = torch.randn(40, 16)
    >>> tuple(head(x).logits.shape), tuple(head.instance_logits(x).shape), tuple(head.attention_scores(x).shape)
    ((2,), (40, 2), (40,))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from icmil.errors import ConfigError
from icmil.mil.base import BagOutput, MILHead, register_mil_head
from icmil.mil.heads.nystrom import NystromAttention
from icmil.mil.layers import DimRed
from icmil.mil.optim import Lookahead

Teacher = Literal["single_instance", "token_head"]


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` on the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class _Layer(nn.Module):
    """``x + NystromAttention(LN(x))``; optionally also the CLS query's raw scores (see ``forward_with_scores``)."""

    def __init__(self, dim: int, attention: NystromAttention) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention

    def forward(
        self, x: torch.Tensor, with_cls_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, scores = self.attention.forward_with_scores(self.norm(x), 0 if with_cls_scores else None)
        return x + out, scores


@register_mil_head("transmil")
class TransMIL(MILHead):
    """Hyper-parameters: ``hidden_dim`` (512), ``n_heads`` (8; head width ``hidden_dim // n_heads`` = 64),
    ``landmarks`` (256), ``pinv_iterations`` (6), ``residual_kernel`` (33, Nyström value conv; 0 disables),
    ``dropout`` (0), ``teacher`` (``single_instance`` | ``token_head``). Not permutation-invariant (PPEG).
    Lookahead(RAdam), lr 2e-4, weight decay 1e-5 (as in its paper); β 6.
    """

    permutation_invariant = False
    default_lr = 2e-4
    default_weight_decay = 1e-5
    confidence_beta = 6.0

    @classmethod
    def make_optimizer(
        cls, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """Lookahead(RAdam), TransMIL's optimiser in its paper."""
        return Lookahead(torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay))

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        n_heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
        teacher: Teacher = "single_instance",
    ) -> None:
        if hidden_dim % n_heads:
            raise ConfigError(f"transmil: hidden_dim {hidden_dim} must be a multiple of n_heads {n_heads}")
        if teacher not in ("single_instance", "token_head"):
            raise ConfigError(
                f"transmil: teacher must be single_instance or token_head, got {teacher!r} (mil.heads.transmil.teacher)"
            )
        super().__init__(
            in_dim,
            n_classes,
            hidden_dim=hidden_dim,
            n_heads=n_heads,
            landmarks=landmarks,
            pinv_iterations=pinv_iterations,
            residual_kernel=residual_kernel,
            dropout=dropout,
            teacher=teacher,
        )
        self.teacher: Teacher = teacher
        self.dimred = DimRed(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))

        def attention() -> NystromAttention:
            return NystromAttention(
                hidden_dim,
                n_heads,
                hidden_dim // n_heads,
                landmarks,
                pinv_iterations,
                residual_kernel,
                dropout,
            )

        self.layer1 = _Layer(hidden_dim, attention())
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = _Layer(hidden_dim, attention())
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def _encode(self, h: torch.Tensor, with_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h (B, n, H)`` -> (tokens after the final LN ``(B, 1 + side^2, H)``, CLS raw scores ``(B, n)``)."""
        b, n, _ = h.shape
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % n]], dim=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        x, _ = self.layer1(x)
        x = self.ppeg(x, side)
        x, scores = self.layer2(x, with_cls_scores=with_scores)
        return self.norm(x), None if scores is None else scores[:, 1 : n + 1]

    def forward(self, features: torch.Tensor) -> BagOutput:
        self._check_bag(features, self.in_dim, "transmil")
        tokens, scores = self._encode(self.dimred(features).unsqueeze(0), with_scores=True)
        assert scores is not None
        return BagOutput(logits=self.classifier(tokens[0, 0]), attention=torch.softmax(scores[0], dim=0))

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.dimred(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        if self.teacher == "single_instance":
            tokens, _ = self._encode(h.unsqueeze(1))
            return self.classifier(tokens[:, 0])
        tokens, _ = self._encode(h.unsqueeze(0))
        return self.classifier(tokens[0, 1 : h.shape[0] + 1])

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        _, scores = self._encode(self.dimred(features).unsqueeze(0), with_scores=True)
        assert scores is not None
        return scores[0]
