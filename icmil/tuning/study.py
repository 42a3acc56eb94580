"""One Optuna study per round: its name, sampler, pruner, and reading the result back.

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["run_dir=/tmp/run"])
    >>> study_name_for(cfg, 1, run_key="kfp-5f2a")
    'icmil-kfp-5f2a-round1'
    >>> study = create_study(cfg, "demo", storage="sqlite:///:memory:")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import ICMILError
from icmil.io import text_digest
from icmil.tuning.storage import _quiet_experimental, open_storage, resolve_storage

if TYPE_CHECKING:
    import optuna

    from icmil.config import ICMILConfig

# Study user attributes that workers of one study share.
ATTR_N_TRIALS = "icmil.n_trials"
ATTR_ROUND = "icmil.round"
ATTR_TUNE_RUN = "icmil.tune_run_id"
ATTR_OBJECTIVE = "icmil.objective"
ATTR_TARGET = "icmil.target"
OBJECTIVE = "val_auc"


class NoCompletedTrial(ICMILError):
    """A study has no completed trial, so it has no best parameters."""


# Tuning settings that do not change what a trial computes: a study may be resumed with other values.
_RESUMABLE_TUNING_KEYS = {
    "enabled",
    "n_trials",
    "workers",
    "storage",
    "storage_env",
    "storage_secret",
    "heartbeat_interval",
    "heartbeat_grace_period",
    "max_retry",
}


def study_name_for(
    cfg: ICMILConfig, round_index: int, run_key: str | None = None, target: str = "mil"
) -> str:
    """``icmil-<run>-round<r>`` (``-coupling`` appended for stage 2).

    ``run_key`` is the pipeline run (the KFP run id). Without it the run folder names the study, plus a digest
    of the settings a trial depends on (search spaces, epochs, sampler, pruner, the mil/coupling sections), so
    rerunning resumes the study while changed settings start a new one instead of mixing incomparable trials.
    """
    if run_key is None:
        folder = Path(cfg.run_dir).resolve()
        tuning = {
            k: v for k, v in cfg.tuning.model_dump(mode="json").items() if k not in _RESUMABLE_TUNING_KEYS
        }
        settings = text_digest(
            str(folder),
            tuning,
            cfg.mil.model_dump(mode="json"),
            cfg.coupling.model_dump(mode="json") if target == "coupling" else None,
        )
        run_key = f"{folder.name}-{settings[:8]}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_key).strip("-") or "run"
    suffix = "" if target == "mil" else f"-{target}"
    return f"icmil-{safe}-round{round_index}{suffix}"


def _sampler(cfg: ICMILConfig, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if cfg.tuning.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with _quiet_experimental():
        # constant_liar: a running trial in another worker counts as a bad result, so parallel workers
        # spread out instead of sampling the same point.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _pruner(cfg: ICMILConfig, target: str) -> optuna.pruners.BasePruner:
    import optuna

    t = cfg.tuning
    if t.pruner == "median":
        # Epochs are reported 1-based and steps below n_warmup_steps are never pruned: +1 gives every trial
        # its pruner_warmup_epochs full epochs.
        return optuna.pruners.MedianPruner(
            n_startup_trials=t.pruner_startup_trials, n_warmup_steps=t.pruner_warmup_epochs + 1
        )
    if t.pruner == "hyperband":
        # Resource = epochs of a bag-head trial; for stage 2 the number of evaluations, learnt from the trials.
        max_resource: int | str = t.epochs if target == "mil" else "auto"
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, t.pruner_warmup_epochs), max_resource=max_resource, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def create_study(
    cfg: ICMILConfig,
    study_name: str,
    storage: str | None = None,
    seed: int | None = None,
    target: str | None = None,
) -> optuna.Study:
    """Create or load (``load_if_exists``) the study ``study_name``: maximise the validation AUC.

    ``storage``: a URL (default :func:`~icmil.tuning.storage.resolve_storage`). ``seed``: the sampler seed of
    this process (default ``cfg.seed``; parallel workers pass distinct seeds). ``target``: ``mil`` (default)
    or ``coupling``, recorded on a new study. Sampler and pruner come from ``cfg.tuning``; they live in the
    process, the trials in the storage.
    """
    import optuna

    url = resolve_storage(cfg, storage)
    rdb = open_storage(url, cfg)
    try:
        stored = rdb.get_study_user_attrs(rdb.get_study_id_from_name(study_name)).get(ATTR_TARGET)
    except KeyError:  # a new study
        stored = None
    target = target or stored or "mil"
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        sampler=_sampler(cfg, cfg.seed if seed is None else seed),
        pruner=_pruner(cfg, target),
        direction="maximize",
        load_if_exists=True,
    )
    if study.user_attrs.get(ATTR_OBJECTIVE) != OBJECTIVE:
        study.set_user_attr(ATTR_OBJECTIVE, OBJECTIVE)
    if ATTR_TARGET not in study.user_attrs:
        study.set_user_attr(ATTR_TARGET, target)
    return study


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state, lower-case names: ``{"complete": 6, "pruned": 2, "fail": 1, ...}``."""
    from optuna.trial import TrialState

    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def best_params_of(study: optuna.Study) -> dict[str, Any]:
    """Parameters of the completed trial with the highest validation AUC.

    Raises :class:`NoCompletedTrial` (naming the study and its trial states) when every trial was pruned or
    failed: rerun with more trials, a later pruning warm-up or a wider search space.
    """
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise NoCompletedTrial(
            f"study {study.study_name!r} has no completed trial ({trial_counts(study)}): raise "
            "tuning.n_trials or tuning.pruner_warmup_epochs, or use tuning.pruner=none"
        )
    return dict(study.best_trial.params)
