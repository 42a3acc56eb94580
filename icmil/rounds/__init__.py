"""ICMIL rounds: the round wiring (what each stage of round k consumes from which earlier round) and the local
driver that runs it (``icmil couple``). The Kubeflow pipeline is built from the same wiring.

* :mod:`~icmil.rounds.wiring` — :class:`Stage`, :class:`Use`, :class:`Lineage`, the stage lists of a round and
  the two decisions (:func:`teacher_kept`, :func:`next_round_runs`).
* :mod:`~icmil.rounds.driver` — :func:`run_rounds` (folders, one process, resumable) and :func:`couple` (the
  same under an MLflow parent run).

Example:
    >>> from icmil.rounds import run_rounds, couple
    >>> callable(run_rounds) and callable(couple)
    True
"""

from icmil.rounds.driver import (
    LocalRun,
    config_conflicts,
    couple,
    prepare_run,
    round_dir,
    run_rounds,
)
from icmil.rounds.wiring import (
    Lineage,
    Source,
    Stage,
    Use,
    kept_round,
    next_round_runs,
    round_start,
    teacher_kept,
    trained_round,
)

__all__ = [
    "Lineage",
    "LocalRun",
    "Source",
    "Stage",
    "Use",
    "config_conflicts",
    "couple",
    "kept_round",
    "next_round_runs",
    "prepare_run",
    "round_dir",
    "round_start",
    "run_rounds",
    "teacher_kept",
    "trained_round",
]
