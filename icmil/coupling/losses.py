"""The stage-2 loss of ICMIL: ``L = L_c + w1·L_w1 + w2·L_w2`` (docs/method.md, "Stage 2").

Notation: teacher ``(f_T, DimRed_T, Head_T)`` frozen and fed the clean patch ``x``; student ``(f_S, DimRed_S,
Head_S)`` trainable and fed the augmented view ``x'``. Every term is a KL divergence ``KL(p ‖ q)`` with the
teacher-side distribution first:

* ``L_c  = KL(p_T(x) ‖ softmax(Head_S(DimRed_S(f_S(x')))))`` — distils the teacher's instance decision into
  the student *embedder* (gradients reach f_S, DimRed_S and Head_S);
* ``L_w1 = KL(p_T(x) ‖ softmax(Head_S(DimRed_S(f_T(x)))))`` — keeps the student *head* faithful. We stop the
  gradient at ``DimRed_S(f_T(x))`` so this term moves Head_S only: the trunk has its own anchor (L_w2) and
  each term then constrains exactly one module (the value is the formula's; only the gradient path is cut);
* ``L_w2 = KL(softmax(DimRed_T(f_T(x))) ‖ softmax(DimRed_S(f_T(x))))`` — keeps the student *trunk* faithful
  (softmax over the hidden units); gradients reach DimRed_S only.

Options (CouplingConfig): ``target_probs`` replaces ``p_T`` inside L_c only (hard negatives: the negative
class one-hot for patches of negative slides), ``sample_weights`` weights each patch's L_c (TMI confidence
``|2ã − 1|^β``). L_w1 and L_w2 always use the unmodified teacher, because their job is to keep the student's
head and trunk equal to the teacher's, not to learn new targets.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from icmil.mil import create_mil_head
    >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    >>> head = create_mil_head("abmil", in_dim=6, n_classes=2, hidden_dim=4, attention_dim=3)
    >>> x = torch.rand(5, 3, 2, 2)
    >>> t = teacher_outputs(enc, head, x)
    >>> losses = coupling_losses(t, enc, head, x)  # student == teacher on the same view: every term is 0
    >>> abs(round(float(losses.total.detach()), 6))
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from icmil.mil.base import MILHead


@dataclass
class TeacherOutputs:
    """What the frozen teacher computes once per batch on the clean patches (no autograd graph)."""

    features: torch.Tensor  # f_T(x), (B, D)
    hidden: torch.Tensor  # DimRed_T(f_T(x)), (B, H)
    logits: torch.Tensor  # Head_T(DimRed_T(f_T(x))), (B, C)

    @property
    def probs(self) -> torch.Tensor:
        """``p_T(x)``: the teacher's instance class probabilities, float32."""
        return self.logits.float().softmax(dim=-1)


@dataclass
class CouplingLosses:
    """The three terms and their weighted sum (each a 0-d tensor; ``total`` is what is back-propagated)."""

    total: torch.Tensor
    consistency: torch.Tensor  # L_c
    head_anchor: torch.Tensor  # L_w1
    trunk_anchor: torch.Tensor  # L_w2
    feature_anchor: torch.Tensor | None = None  # L_f (option), unweighted

    def as_floats(self) -> dict[str, float]:
        """``{"loss": ..., "loss_c": ..., "loss_w1": ..., "loss_w2": ...[, "loss_f": ...]}`` for logging."""
        out = {
            "loss": float(self.total.detach()),
            "loss_c": float(self.consistency.detach()),
            "loss_w1": float(self.head_anchor.detach()),
            "loss_w2": float(self.trunk_anchor.detach()),
        }
        if self.feature_anchor is not None:
            out["loss_f"] = float(self.feature_anchor.detach())
        return out


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)``: T < 1 sharpens the teacher's probabilities, T = 1 returns them unchanged.

    >>> [round(v, 4) for v in sharpen(torch.tensor([[0.75, 0.25]]), 0.5)[0].tolist()]
    [0.9, 0.1]
    """
    if temperature == 1.0:
        return probs
    return (probs.float().clamp_min(1e-12).log() / temperature).softmax(dim=-1)


def kl_per_sample(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ softmax(logits))`` for each row, ``(B,)``; rows of ``p`` may contain exact zeros (0·log 0 = 0).

    Computed in float32 whatever the autocast dtype, because bf16 log-probabilities lose the small
    differences the anchors are about.

    >>> p = torch.tensor([[0.5, 0.5]])
    >>> round(float(kl_per_sample(p, torch.zeros(1, 2))[0]), 6)
    0.0
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    # kl_div(input=log q, target=p) = p·(log p − log q), with xlogy semantics for p = 0.
    return F.kl_div(log_q, target_probs.float(), reduction="none").sum(dim=-1)


@torch.no_grad()
def teacher_outputs(encoder: nn.Module, head: MILHead, x: torch.Tensor) -> TeacherOutputs:
    """Run the frozen teacher on the clean patches ``x`` (uint8 or float in [0, 1], ``(B, 3, S, S)``)."""
    features = encoder(x)
    hidden = head.instance_embed(features)
    logits = head.instance_classify(hidden)
    return TeacherOutputs(features=features, hidden=hidden, logits=logits)


def coupling_losses(
    teacher: TeacherOutputs,
    student_encoder: nn.Module,
    student_head: MILHead,
    x_student: torch.Tensor,
    *,
    target_probs: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    weight_head: float = 0.5,
    weight_trunk: float = 0.5,
    anchor_features: torch.Tensor | None = None,
    anchor_scale: torch.Tensor | None = None,
    weight_anchor: float = 0.0,
) -> CouplingLosses:
    """The ICMIL stage-2 loss for one batch (see the module docstring for each term).

    ``teacher``: :func:`teacher_outputs` on the clean batch. ``x_student``: the student's (augmented) view of
    the same patches. ``target_probs`` ``(B, C)`` replaces ``p_T`` in L_c (hard negatives).
    ``sample_weights`` ``(B,)`` weights L_c per patch; the term is ``mean(w · KL)`` as in the TMI variant
    (so the weights also scale its size, which is the point of down-weighting unconfident patches).
    ``anchor_features`` ``(B, D)``: the frozen teacher encoder's features of the STUDENT's view; with
    ``weight_anchor > 0`` the loss adds ``weight_anchor · L_f``, ``L_f = mean((f_S(x') − f_T(x'))² / s²)`` with
    ``s = anchor_scale`` (per-dimension sd of the training patches' features): the student may change what the
    instance decision needs, not the rest of what the pretrained features encode.
    """
    p_teacher = teacher.probs
    target = p_teacher if target_probs is None else target_probs
    features_t = teacher.features.detach()

    student_features = student_encoder(x_student)
    student_logits = student_head.instance_classify(student_head.instance_embed(student_features))
    kl_c = kl_per_sample(target, student_logits)
    if sample_weights is not None:
        if sample_weights.shape != kl_c.shape:
            raise ValueError(
                f"sample_weights must have shape {tuple(kl_c.shape)}, got {tuple(sample_weights.shape)}"
            )
        kl_c = kl_c * sample_weights.to(kl_c)
    loss_c = kl_c.mean()

    hidden_s_on_teacher = student_head.instance_embed(features_t)
    loss_w1 = kl_per_sample(p_teacher, student_head.instance_classify(hidden_s_on_teacher.detach())).mean()
    loss_w2 = kl_per_sample(teacher.hidden.float().softmax(dim=-1), hidden_s_on_teacher).mean()

    total = loss_c + weight_head * loss_w1 + weight_trunk * loss_w2
    loss_f = None
    if anchor_features is not None and weight_anchor > 0:
        diff = student_features.float() - anchor_features.detach().float()
        if anchor_scale is not None:
            diff = diff / anchor_scale.to(diff).clamp_min(1e-6)
        loss_f = diff.pow(2).mean()
        total = total + weight_anchor * loss_f
    return CouplingLosses(
        total=total, consistency=loss_c, head_anchor=loss_w1, trunk_anchor=loss_w2, feature_anchor=loss_f
    )
