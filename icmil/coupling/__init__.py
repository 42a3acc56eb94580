"""ICMIL coupling (stage 2): the bag classifier's instance teacher fine-tunes the patch embedder.

The rounds that alternate it with embedding and bag-head training are :mod:`icmil.rounds` (the wiring and the
local driver, ``icmil couple``).

Example:
    >>> from icmil.coupling import coupling_losses, finetune_encoder
    >>> callable(finetune_encoder)
    True
"""

import importlib
import warnings
from typing import Any

from icmil.coupling.augment import stain_jitter, student_view
from icmil.coupling.confidence import confidence_weights, minmax_normalise
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
    "score_val",
    "stain_jitter",
    "student_view",
    "teacher_outputs",
]


def __getattr__(name: str) -> Any:
    # The round driver moved to icmil.rounds. Its old name still works (with a DeprecationWarning) for scripts
    # that import it from here; it is looked up at call time so this package does not depend on the rounds
    # (icmil.rounds runs the stages, which run this package's stage 2).
    if name == "run_coupling":
        warnings.warn(
            "icmil.coupling.run_coupling moved to icmil.rounds.run_rounds; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("icmil.rounds").run_rounds
    raise AttributeError(f"module 'icmil.coupling' has no attribute {name!r}")
