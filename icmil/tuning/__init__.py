"""Optuna per-round tuning of the bag head: one study per round, objective = validation AUC, pruning on it.

Public API (small private modules behind these exports):

- :func:`tune_round` — the whole round in one process (``icmil tune``); returns :class:`TuneResult`;
  :func:`tune_stage` is the same as a resumable stage with a marker (``icmil couple``).
- :func:`prepare_tuning`, :func:`run_tuning_worker`, :func:`finish_tuning` — the same split over pipeline
  tasks: one prepare, a ParallelFor of GPU workers sharing the study (PostgreSQL), one finish.
- :func:`create_study`, :func:`study_name_for`, :func:`best_params_of`, :func:`trial_counts`.
- :func:`load_best_params` + :func:`apply_params` — how ``best_params.json`` overrides MILConfig fields in the
  round's training step.
- :func:`resolve_storage` — sqlite in the run folder, or ``tuning.storage`` / ``$ICMIL_OPTUNA_STORAGE``.

Example:
    >>> from icmil.config import load_config
    >>> from icmil.tuning import tune_round, load_best_params, apply_params
    >>> cfg = load_config("configs/demo.yaml")                                           # doctest: +SKIP
    >>> r = tune_round(cfg, "runs/demo/manifest.csv", "runs/demo/round_0/features",
    ...                "runs/demo/round_0/tune", round_index=0)                          # doctest: +SKIP
    >>> train_cfg = apply_params(cfg, load_best_params("runs/demo/round_0/tune"))        # doctest: +SKIP
"""

from icmil.tuning.driver import TuneResult, finish_tuning, prepare_tuning, tune_round, tune_stage
from icmil.tuning.report import BEST_PARAMS_FILE, load_best_params
from icmil.tuning.space import apply_params, validate_space
from icmil.tuning.storage import resolve_storage
from icmil.tuning.study import NoCompletedTrial, best_params_of, create_study, study_name_for, trial_counts
from icmil.tuning.worker import run_tuning_worker

__all__ = [
    "BEST_PARAMS_FILE",
    "NoCompletedTrial",
    "TuneResult",
    "apply_params",
    "best_params_of",
    "create_study",
    "finish_tuning",
    "load_best_params",
    "prepare_tuning",
    "resolve_storage",
    "run_tuning_worker",
    "study_name_for",
    "trial_counts",
    "tune_round",
    "tune_stage",
    "validate_space",
]
