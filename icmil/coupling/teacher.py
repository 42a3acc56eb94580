"""Teacher and student for stage 2: a frozen copy and a trainable copy of (encoder, bag head).

The teacher is the round's encoder f_T plus its bag head (DimRed_T, Head_T), frozen: ``requires_grad`` off
and eval mode (BatchNorm uses running statistics, dropout is off), so its instance decision is the one the
bag classifier was trained with. The student starts as an exact copy; ALL encoder layers train (docs/method.md:
no layer freezing, no EMA), as do the copy's trunk and head.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from icmil.mil import create_mil_head
    >>> pair = make_teacher_student(nn.Linear(4, 6), create_mil_head("abmil", 6, 2, hidden_dim=4, attention_dim=3))
    >>> any(p.requires_grad for p in pair.teacher_encoder.parameters()), pair.student_encoder.training
    (False, True)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from icmil.coupling.trainable import (
    add_lora,
    encoder_blocks,
    freeze_leading_blocks,
    merged_state_dict,
    set_frozen_eval,
)
from icmil.mil.base import MILHead

M = TypeVar("M", bound=nn.Module)


@dataclass
class TeacherStudent:
    """The four modules of stage 2. Only the student's parameters are ever handed to the optimiser."""

    teacher_encoder: nn.Module
    teacher_head: MILHead
    student_encoder: nn.Module
    student_head: MILHead
    student_bn: str = "train"
    frozen_blocks: list[nn.Module] = field(default_factory=list)
    lora: bool = False

    def student_encoder_state(self) -> dict[str, torch.Tensor]:
        """The student encoder's weights in the encoder's own layout (LoRA adapters merged), on the CPU."""
        if self.lora:
            return merged_state_dict(self.student_encoder)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.student_encoder.state_dict().items()}

    def train_student(self) -> TeacherStudent:
        """Put the student in training mode; with ``student_bn="frozen"`` its BatchNorm layers stay in eval mode
        (running statistics fixed at the teacher's, affine parameters still trained), and blocks left out of
        training (``coupling.train_blocks``) stay in eval mode altogether."""
        self.student_encoder.train()
        self.student_head.train()
        if self.student_bn == "frozen":
            for m in self.student_encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        set_frozen_eval(self.frozen_blocks)
        return self

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The student encoder's trainable parameters."""
        yield from (p for p in self.student_encoder.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The student trunk's and head's parameters. Parameters of the bag head that the instance path does not
        use (attention) simply never get a gradient and so are never updated."""
        yield from self.student_head.parameters()

    def student_parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable student parameter (encoder, trunk, head)."""
        yield from self.encoder_parameters()
        yield from self.head_parameters()

    def to(self, device: torch.device | str, channels_last: bool = False) -> TeacherStudent:
        for enc in (self.teacher_encoder, self.student_encoder):
            enc.to(device)
            if channels_last:
                enc.to(memory_format=torch.channels_last)
        self.teacher_head.to(device)
        self.student_head.to(device)
        return self


def freeze(module: M) -> M:
    """Eval mode and no gradients, in place."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_teacher_student(
    encoder: nn.Module,
    head: MILHead,
    student_bn: str = "train",
    train_blocks: int | None = None,
    lora_rank: int = 0,
    lora_alpha: int | None = None,
) -> TeacherStudent:
    """Deep-copy ``encoder`` and ``head`` twice: a frozen teacher and a trainable student (inputs untouched).

    ``student_bn``: ``"train"`` (faithful: the student's BatchNorm normalises with batch statistics and keeps
    updating its running statistics — on augmented views) or ``"frozen"`` (running statistics stay the
    teacher's, so the student starts as exactly the teacher and its clean-patch features do not drift).
    ``train_blocks``: train only the encoder's last N blocks (:mod:`icmil.coupling.trainable`; None = all).
    ``lora_rank`` > 0: the student encoder trains low-rank adapters instead of its weights (within the trained
    blocks); :meth:`TeacherStudent.student_encoder_state` merges them back.
    """
    if student_bn not in ("train", "frozen"):
        raise ValueError(f"student_bn must be 'train' or 'frozen', got {student_bn!r}")
    teacher_encoder = freeze(copy.deepcopy(encoder))
    teacher_head = freeze(copy.deepcopy(head))
    student_encoder = copy.deepcopy(encoder)
    student_head = copy.deepcopy(head)
    for p in (*student_encoder.parameters(), *student_head.parameters()):
        p.requires_grad_(True)
    frozen = freeze_leading_blocks(student_encoder, train_blocks)
    if lora_rank > 0:
        trained = [b for b in encoder_blocks(student_encoder) if all(b is not f for f in frozen)]
        add_lora(student_encoder, lora_rank, lora_alpha or 2 * lora_rank, trained)
    pair = TeacherStudent(
        teacher_encoder, teacher_head, student_encoder, student_head, student_bn, frozen, lora_rank > 0
    )
    return pair.train_student()
