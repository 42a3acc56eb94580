"""ICMIL coupling: the bag classifier's instance teacher fine-tunes the patch embedder (stage 2), and the round
driver that alternates it with embedding and bag-head training.

Example:
    >>> from icmil.coupling import coupling_losses, finetune_encoder, run_coupling
    >>> callable(run_coupling)
    True
"""

from icmil.coupling.augment import stain_jitter, student_view
from icmil.coupling.confidence import confidence_weights, minmax_normalise
from icmil.coupling.driver import prepare_run, run_coupling, summary_table, write_summary
from icmil.coupling.finetune import FinetuneResult, SplitLeakError, finetune_encoder, score_val
from icmil.coupling.losses import (
    CouplingLosses,
    TeacherOutputs,
    coupling_losses,
    kl_per_sample,
    teacher_outputs,
)
from icmil.coupling.sampler import BalancedSampler, PatchPool, UniformSampler
from icmil.coupling.teacher import TeacherStudent, make_teacher_student

__all__ = [
    "BalancedSampler",
    "CouplingLosses",
    "FinetuneResult",
    "PatchPool",
    "SplitLeakError",
    "TeacherOutputs",
    "TeacherStudent",
    "UniformSampler",
    "confidence_weights",
    "coupling_losses",
    "finetune_encoder",
    "kl_per_sample",
    "make_teacher_student",
    "minmax_normalise",
    "prepare_run",
    "run_coupling",
    "score_val",
    "stain_jitter",
    "student_view",
    "summary_table",
    "teacher_outputs",
    "write_summary",
]
