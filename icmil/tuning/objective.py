"""What one trial trains: the bag head (stage 1, ``mil``) or the embedder fine-tuning (stage 2, ``coupling``).

Both objectives return a VALIDATION AUC and report it as they go, so the pruner can stop a poor trial early:

* ``mil``: ``train_mil_head`` for ``tuning.epochs`` epochs with the sampled MILConfig fields; reported after
  every epoch (step = epoch); the value is the best epoch's val AUC, the one the head is selected on.
* ``coupling``: ``finetune_encoder`` with the sampled stage-2 settings (lr, weight decay, β, steps), teacher =
  the round's encoder + bag head; reported at every evaluation (step = evaluation number, the teacher's step-0
  score is the same for every trial and is not reported); the value is the val AUC of the selected encoder.

Example:
    >>> objective = make_objective(cfg, "mil", manifest, features_dir="RUN/round_0/features")  # doctest: +SKIP
    >>> value = objective(trial, run, Path("RUN/round_0/tune/trials/trial_0000"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from icmil.config import SearchSpace
from icmil.errors import ConfigError, ICMILError
from icmil.tracking.base import StageRun
from icmil.tuning.space import apply_params, suggest, validate_space

if TYPE_CHECKING:
    import optuna

    from icmil.config import ICMILConfig
    from icmil.manifest import Manifest

TARGETS = ("mil", "coupling")


class Objective(Protocol):
    """One trial: sample settings, train, report intermediate val AUCs, return the final val AUC."""

    target: str
    space: Mapping[str, SearchSpace]

    def __call__(self, trial: optuna.Trial, run: StageRun, trial_dir: Path) -> float: ...


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError):
            v = float(value)
            if math.isfinite(v):
                out[str(key)] = v
    return out


def _report(trial: optuna.Trial, value: float, step: int, what: str) -> None:
    import optuna

    trial.report(value, step)
    if trial.should_prune():
        raise optuna.TrialPruned(f"{what} {step}: val_auc {value:.4f} below the median")


def _require_dir(path: str | os.PathLike[str] | None, what: str, target: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise ConfigError(f"tuning target {target!r} needs {what} (got {path}): pass the round's folder")
    return Path(path)


class MilObjective:
    """Bag-head trial (see the module docstring)."""

    target = "mil"

    def __init__(self, cfg: ICMILConfig, manifest: Manifest, features_dir: str | os.PathLike[str]) -> None:
        validate_space(cfg.tuning.mil_space, "mil")
        self.cfg = cfg
        self.space: Mapping[str, SearchSpace] = cfg.tuning.mil_space
        self.manifest = manifest
        self.features_dir = _require_dir(features_dir, "features_dir", "mil")

    def __call__(self, trial: optuna.Trial, run: StageRun, trial_dir: Path) -> float:
        from icmil.mil import train_mil_head

        cfg = self.cfg
        params = suggest(trial, self.space)
        run.log_params({**params, "trial": trial.number, "epochs": cfg.tuning.epochs})
        tuned = apply_params(cfg, params).mil
        mil = tuned.model_copy(
            update={
                "epochs": cfg.tuning.epochs,
                "patience": None if tuned.patience is None else min(tuned.patience, cfg.tuning.epochs),
                # Confidence intervals and heatmaps are for the round's final model, not for trials.
                "bootstrap_samples": 0,
                "max_heatmaps": 0,
            }
        )
        best = -math.inf

        def on_epoch(epoch: int, metrics: Mapping[str, Any]) -> None:
            nonlocal best
            values = _finite(metrics)
            run.log_metrics(values, step=int(epoch))
            if "val_auc" in values:  # absent/NaN when the validation split has one class: nothing to prune on
                best = max(best, values["val_auc"])
                _report(trial, values["val_auc"], int(epoch), "epoch")

        try:
            train_mil_head(self.manifest, self.features_dir, trial_dir, mil, epoch_callback=on_epoch)
        finally:
            # Trials are never resumed (a retry is a new trial in a new folder): drop the resumable state.
            shutil.rmtree(trial_dir / "checkpoint", ignore_errors=True)
        if best == -math.inf:
            raise ICMILError(
                f"trial {trial.number}: training reported no finite val_auc: the validation split needs slides "
                "of every class (check the manifest's split column or val_fraction)"
            )
        return best


class CouplingObjective:
    """Stage-2 trial (see the module docstring). Teacher: ``encoder_dir`` (None = the initial encoder) +
    ``head_dir``; patches from ``tiles_dir``; ``features_dir`` = the features that encoder made."""

    target = "coupling"

    def __init__(
        self,
        cfg: ICMILConfig,
        manifest: Manifest,
        manifest_csv: str | os.PathLike[str],
        tiles_dir: str | os.PathLike[str] | None,
        head_dir: str | os.PathLike[str] | None,
        encoder_dir: str | os.PathLike[str] | None = None,
        features_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from icmil.features import load_encoder
        from icmil.mil import load_mil_head
        from icmil.stages import initial_encoder

        validate_space(cfg.tuning.coupling_space, "coupling")
        self.cfg = cfg
        self.space: Mapping[str, SearchSpace] = cfg.tuning.coupling_space
        self.manifest = manifest
        self.tiles_dir = _require_dir(tiles_dir, "tiles_dir", "coupling")
        self.features_dir = (
            None if features_dir is None else _require_dir(features_dir, "features_dir", "coupling")
        )
        self.head = load_mil_head(_require_dir(head_dir, "head_dir (the round's bag head)", "coupling"))
        if encoder_dir is None:
            self.encoder = initial_encoder(cfg, manifest_csv, self.tiles_dir)
        else:
            self.encoder = load_encoder(_require_dir(encoder_dir, "encoder_dir", "coupling"))

    def __call__(self, trial: optuna.Trial, run: StageRun, trial_dir: Path) -> float:
        from icmil.coupling.finetune import finetune_encoder

        params = suggest(trial, self.space)
        run.log_params({**params, "trial": trial.number})
        cfg = apply_params(self.cfg, params, target="coupling")
        # A trial is short and disposable: no resumable stage-2 checkpoints in its folder.
        cfg = cfg.model_copy(update={"coupling": cfg.coupling.model_copy(update={"checkpoint": False})})
        # The trial's value is the signal stage 2 selects on (refit-head CV AUC, or the frozen head's val AUC).
        metric = "cv_auc" if cfg.coupling.selection == "cv" else "val_auc"
        evaluations = 0

        def on_step(step: int, metrics: Mapping[str, Any]) -> None:
            nonlocal evaluations
            values = _finite(metrics)
            if step == 0 or metric not in values:
                return  # a plain optimiser step, or the teacher (identical in every trial)
            evaluations += 1
            run.log_metrics(values, step=int(step))
            _report(trial, values[metric], evaluations, "evaluation")

        try:
            result = finetune_encoder(
                self.encoder,
                self.head,
                self.manifest,
                self.tiles_dir,
                trial_dir,
                cfg,
                features_dir=self.features_dir,
                step_callback=on_step,
            )
        finally:
            # The round's fine-tuning stage retrains with the best settings: trial encoders are not kept.
            for heavy in trial_dir.glob("*.safetensors"):
                heavy.unlink(missing_ok=True)
        value = float(result.selected.get(metric, float("nan")))
        if not math.isfinite(value):
            raise ICMILError(
                f"trial {trial.number}: fine-tuning selected an encoder without a finite {metric}"
            )
        return value


def make_objective(
    cfg: ICMILConfig,
    target: str,
    manifest: Manifest,
    manifest_csv: str | os.PathLike[str] | None = None,
    features_dir: str | os.PathLike[str] | None = None,
    tiles_dir: str | os.PathLike[str] | None = None,
    head_dir: str | os.PathLike[str] | None = None,
    encoder_dir: str | os.PathLike[str] | None = None,
) -> Objective:
    """The objective for ``target`` (``mil`` or ``coupling``); missing inputs raise :class:`ConfigError`."""
    if target == "mil":
        return MilObjective(cfg, manifest, _require_dir(features_dir, "features_dir", "mil"))
    if target == "coupling":
        if manifest_csv is None:
            raise ConfigError("tuning target 'coupling' needs manifest_csv")
        return CouplingObjective(cfg, manifest, manifest_csv, tiles_dir, head_dir, encoder_dir, features_dir)
    raise ConfigError(f"unknown tuning target {target!r} (choose from {', '.join(TARGETS)})")
