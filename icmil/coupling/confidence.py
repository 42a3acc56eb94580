"""TMI confidence weights for L_c: ``w = |2ã − 1|^β`` with ã the min–max normalised raw attention score.

Faithful TMI behaviour: ã is normalised across the random batch (which mixes slides). Option
``per_slide_confidence``: ã is normalised within each slide over all of its patches (precomputed once per
round from the round's features, see :mod:`icmil.coupling.sampler`), so a patch's weight does not depend on
which other slides happened to share its batch.

Heads with two attention tiers (DTFD) may return ``(N, 2)`` scores: each tier is normalised on its own and
ã = ã1·ã2 (docs/method.md). Heads without attention (max-pooling; TransMIL's instance teacher) return None; then
ã is the min–max normalised teacher score of "not the negative class" — for max-pooling that score *is* what
the pooling attends to — and the method stays defined for every head.

Example:
    >>> import torch
    >>> a = minmax_normalise(torch.tensor([0.0, 1.0, 3.0]))
    >>> [round(float(v), 3) for v in confidence_weights(a, beta=2.0)]
    [1.0, 0.111, 1.0]
"""

from __future__ import annotations

import torch

from icmil.mil.base import MILHead


def minmax_normalise(scores: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale to [0, 1] along dim 0 (per column if 2-D). A constant column maps to 0.5 (weight 0: no signal)."""
    scores = scores.float()
    lo = scores.min(dim=0, keepdim=True).values
    hi = scores.max(dim=0, keepdim=True).values
    span = hi - lo
    out = (scores - lo) / span.clamp(min=eps)
    return torch.where(span > eps, out, torch.full_like(out, 0.5))


def combine_tiers(normalised: torch.Tensor) -> torch.Tensor:
    """``(N,)`` stays; ``(N, T)`` -> product over tiers (DTFD: ã = ã1·ã2)."""
    if normalised.dim() == 1:
        return normalised
    return normalised.prod(dim=1)


def confidence_weights(a_norm: torch.Tensor, beta: float) -> torch.Tensor:
    """``|2ã − 1|^β``: near 1 for patches the bag head clearly attends to or ignores, near 0 in between."""
    return (2 * a_norm.float() - 1).abs().pow(beta)


@torch.no_grad()
def raw_confidence_scores(
    head: MILHead, features: torch.Tensor, teacher_logits: torch.Tensor, negative_class: int = 0
) -> torch.Tensor:
    """The head's raw per-instance scores ``(N,)`` or ``(N, T)``; for heads without attention the teacher's
    "not negative" probability (see the module docstring)."""
    scores = head.attention_scores(features)
    if scores is None:
        probs = teacher_logits.float().softmax(dim=-1)
        return 1.0 - probs[:, negative_class]
    return scores.float()


def normalised_scores(raw: torch.Tensor) -> torch.Tensor:
    """Min–max normalise raw scores (per tier) and combine tiers: the ã of the TMI paper, ``(N,)``."""
    return combine_tiers(minmax_normalise(raw))
