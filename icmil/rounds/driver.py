"""The local round driver (``icmil couple``): the round wiring (:mod:`icmil.rounds.wiring`) run with folders in
one process, resuming stage by stage.

Run folder (docs/architecture.md, "Run folder layout")::

    RUN/config.yaml, RUN/manifest.csv          resolved config and manifest (the one split of the run)
    RUN/synth/                                 synthetic cohort when no manifest is given (+ lesions.json)
    RUN/lesions.json                           lesion boxes copied from beside a user's manifest, if any
    RUN/tiles/                                 tiling output
    RUN/round_0/encoder/                       the initial encoder, materialised once
    RUN/round_k/encoder/                       round k's fine-tuned encoder (k >= 1) + finetune.json, history.csv
    RUN/round_k/features/, tune/, head/        re-embedded features, the round's study, retrained bag head
    RUN/round_k/metrics.json                   round k's evaluation (marks the round as finished)
    RUN/summary.json, summary.csv, summary.png metrics by round (icmil.run_summary: the pipeline's format)

A rerun of the same command continues from the last finished stage; asking for more rounds on a finished run
adds them. Changing a setting that changes results is refused (the message names the settings), because
mixing rounds made with different settings would make the summary meaningless.

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config("configs/demo.yaml", ["run_dir=runs/couple", "coupling.rounds=2"])  # doctest: +SKIP
    >>> run_rounds(cfg)[["round", "test_auc", "patch_auc_test"]]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from icmil import stages
from icmil.cohort import MANIFEST_NAME, cohort_lesions, copy_lesions
from icmil.config import ICMILConfig, config_to_yaml
from icmil.errors import ConfigError
from icmil.io import text_digest, write_text_atomic
from icmil.log import get_logger
from icmil.nested import flatten
from icmil.rounds.wiring import (
    COHORT,
    ENCODER,
    EVALUATION,
    FEATURES,
    HEAD,
    TILE,
    TILES,
    TUNED,
    Lineage,
    Stage,
    kept_round,
    next_round_runs,
    round_start,
    teacher_kept,
    trained_round,
)
from icmil.run_summary import SUMMARY_FILES, log_run_summary, rounds_table, summary_row, write_run_summary
from icmil.tracking.base import NullTracker, StageTracker

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("rounds")

# Settings that do not change any result: they may differ between a run and its resumption.
RESUME_FREE_PREFIXES = (
    "coupling.rounds",
    "coupling.force_rounds",
    "run_dir",
    "cache_dir",
    "tracking.",
    "pipeline.",
    "tuning.storage",
    "tuning.workers",
    "embed.num_workers",
    "embed.batch_size",
    "embed.prefetch_factor",
    "embed.merge_reads",
    "embed.device",
    "coupling.num_workers",
    "coupling.device",
)

# Where each round output lives inside RUN/round_k (the evaluation is the round folder's metrics.json).
ROUND_FOLDERS = {ENCODER: "encoder", FEATURES: "features", TUNED: "tune", HEAD: "head", EVALUATION: "."}


def round_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"round_{k}"


def config_conflicts(
    old: Mapping[str, Any], new: Mapping[str, Any], coupling_started: bool = True
) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring :data:`RESUME_FREE_PREFIXES`.

    Stage-2 settings (``coupling.*`` except the round-0 encoder's ``initial_bn_calibration``) only matter once
    a round >= 1 has started: with ``coupling_started=False`` they may change.

    >>> config_conflicts({"seed": 0, "coupling": {"rounds": 1}}, {"seed": 1, "coupling": {"rounds": 3}})
    ['seed']
    >>> config_conflicts({"coupling": {"lr": 1e-5}}, {"coupling": {"lr": 1e-3}}, coupling_started=False)
    []
    """
    a, b = flatten(old), flatten(new)
    defaults = flatten(ICMILConfig().model_dump(mode="json"))
    keys = sorted(set(a) | set(b))
    # A setting added to the config after the run started is absent from its config.yaml: at its default it
    # reproduces what the run did.
    out = [
        k
        for k in keys
        if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)) and not k.startswith(RESUME_FREE_PREFIXES)
    ]
    if not coupling_started:
        round0 = (
            "coupling.initial_bn_calibration",
            "coupling.calibrate_pretrained_bn",
        )  # the round-0 encoder's
        out = [k for k in out if not k.startswith("coupling.") or k in round0]
    return out


def prepare_run(cfg: ICMILConfig) -> tuple[Path, Path | None]:
    """Create/verify ``RUN/config.yaml`` and the cohort in the run folder (``RUN/manifest.csv``, a synthetic
    cohort when no manifest is given, a manifest's ``lesions.json``). Returns ``(manifest_csv, lesions_json or
    None)``. The split is decided once: an existing resolved manifest is reused as is."""
    from icmil.cohort import prepare_cohort

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "config.yaml"
    new = cfg.model_dump(mode="json")
    if cfg_path.is_file():
        old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        started = any(p.is_dir() and p.name != "round_0" for p in run.glob("round_*"))
        conflicts = config_conflicts(old, new, coupling_started=started)
        if conflicts:
            before, after = flatten(old), flatten(new)
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in conflicts[:8])
            raise ConfigError(
                f"{run} holds a run made with different settings ({shown}); resuming would mix results. "
                "Use a new run folder (--out) or restore those settings."
            )
    write_text_atomic(cfg_path, config_to_yaml(cfg))

    manifest_csv = run / MANIFEST_NAME
    if not manifest_csv.is_file():
        prepare_cohort(cfg, run, n_shards=1)
    else:
        log.info("reusing the resolved manifest %s (the split is fixed for the run)", manifest_csv)
        copy_lesions(cfg.manifest, run)  # a run folder made before lesions were copied, or shared by a bench
    return manifest_csv, cohort_lesions(run)


# --------------------------------------------------------------------------- one stage, with folders


@dataclass(frozen=True)
class StageCall:
    """What a stage of round ``round`` gets in the local driver: its inputs as folders and its output folder."""

    cfg: ICMILConfig
    round: int
    inputs: dict[str, Path]
    out: Path
    manifest_csv: Path
    lesions_json: Path | None
    tracker: StageTracker


def _tile(c: StageCall) -> dict[str, Any]:
    return stages.tile_stage(c.cfg, c.manifest_csv, c.out, tracker=c.tracker)


def _encoder(c: StageCall) -> dict[str, Any]:
    return stages.encoder_stage(c.cfg, c.manifest_csv, c.inputs.get("tiles"), c.out, c.tracker)


def _finetune(c: StageCall) -> dict[str, Any]:
    i = c.inputs
    return stages.finetune_stage(
        c.cfg, c.manifest_csv, i["tiles"], i["encoder"], i["head"], i["features"], c.out, c.round, c.tracker
    )


def _embed(c: StageCall) -> dict[str, Any]:
    i = c.inputs
    return stages.embed_stage(
        c.cfg, c.manifest_csv, i["tiles"], i["encoder"], c.out, c.round, tracker=c.tracker
    )


def _tune(c: StageCall) -> dict[str, Any]:
    from icmil.tuning import tune_stage

    return tune_stage(c.cfg, c.manifest_csv, c.inputs["features"], c.out, c.round, c.tracker)


def _train(c: StageCall) -> dict[str, Any]:
    from icmil.tuning import load_best_params

    tuned = c.inputs.get("tuned")
    return stages.train_stage(
        c.cfg,
        c.manifest_csv,
        c.inputs["features"],
        c.out,
        c.round,
        c.tracker,
        params=load_best_params(tuned) if tuned is not None else None,
        lesions_json=c.lesions_json,
    )


def _evaluate(c: StageCall) -> dict[str, Any]:
    i = c.inputs
    return stages.evaluate_stage(
        c.cfg,
        c.manifest_csv,
        i["features"],
        i["head"],
        c.out,
        c.round,
        c.tracker,
        lesions_json=c.lesions_json,
        finetune_dir=i.get("finetune"),
    )


def _keep_teacher(c: StageCall) -> dict[str, Any]:
    return stages.keep_teacher_stage(
        c.cfg, c.inputs["evaluation"], c.inputs["finetune"], c.out, c.round, c.tracker
    )


# Stage name (icmil.rounds.wiring) -> its call with folders. The pipeline has the same table with tasks.
LOCAL_STAGES: dict[str, Callable[[StageCall], dict[str, Any]]] = {
    "tile": _tile,
    "encoder": _encoder,
    "finetune": _finetune,
    "embed": _embed,
    "tune": _tune,
    "train": _train,
    "evaluate": _evaluate,
    "keep-teacher": _keep_teacher,
}


class LocalRun:
    """One run folder: the lineage of its outputs and the stage calls that make them."""

    def __init__(self, cfg: ICMILConfig, tracker: StageTracker | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.tracker = tracker if tracker is not None else NullTracker()
        self.manifest_csv, self.lesions_json = prepare_run(cfg)
        self.lineage: Lineage[Path] = Lineage({COHORT: self.dir, TILES: self.dir / "tiles"})

    def call(self, stage: Stage, k: int | None) -> dict[str, Any]:
        """Run ``stage`` (of round ``k``; None for a run-level stage) with its inputs from the lineage."""
        if k is None:
            inputs, out = (
                {a: self.lineage.resolve(u, 0) for a, u in stage.uses},
                self.lineage.run[stage.output],
            )
        else:
            inputs = {a: self.lineage.resolve(u, k) for a, u in stage.uses}
            out = round_dir(self.dir, k) / ROUND_FOLDERS[stage.output]
        result = LOCAL_STAGES[stage.name](
            StageCall(
                self.cfg,
                k if k is not None else 0,
                inputs,
                out,
                self.manifest_csv,
                self.lesions_json,
                self.tracker if stage.tracked else NullTracker(),
            )
        )
        if k is not None:
            self.lineage.add(k, stage.output, out)
        return result

    def tile(self) -> dict[str, Any]:
        return self.call(TILE, None)

    def round(self, k: int) -> tuple[dict[str, Any], bool]:
        """All stages of round ``k``; returns its evaluation record and whether it kept its teacher."""
        started = self.call(round_start(self.cfg, k), k)
        kept = k > 0 and teacher_kept(started)
        record: dict[str, Any] = {}
        for stage in kept_round(k) if kept else trained_round(self.cfg, k):
            record = self.call(stage, k)
        self.lineage.close_round(k, kept)
        return record, kept


def run_rounds(cfg: ICMILConfig, tracker: StageTracker | None = None) -> pd.DataFrame:
    """Run (or resume) ICMIL in ``cfg.run_dir`` for ``cfg.coupling.rounds`` rounds; returns the per-round table
    (one row per round run: val/test slide metrics, instance-teacher patch AUC, stage-2 selection,
    ``teacher_kept``) and writes it as ``RUN/summary.json|csv|png``. Tracked stages and the summary go to
    ``tracker`` (default: none; :func:`couple` tracks to MLflow)."""
    run = LocalRun(cfg, tracker)
    run.tile()
    rows = []
    for k in range(cfg.coupling.rounds + 1):
        record, kept = run.round(k)
        rows.append(summary_row(record))
        if not next_round_runs(cfg, k, kept):
            if k < cfg.coupling.rounds:
                log.info(
                    "round %d kept its teacher: converged, rounds %d-%d not run "
                    "(coupling.force_rounds=true runs them)",
                    k,
                    k + 1,
                    cfg.coupling.rounds,
                )
            break
    write_run_summary(run.dir, rows, extra={"rounds_planned": cfg.coupling.rounds})
    log_run_summary(run.tracker, {"rounds": rows}, [run.dir / name for name in SUMMARY_FILES])
    return rounds_table(rows)


def couple(cfg: ICMILConfig, *, track: bool = True) -> pd.DataFrame:
    """``icmil couple``: :func:`run_rounds` under an MLflow parent run, like ``icmil run``.

    Tracking goes where ``icmil run`` sends it: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///RUN/mlflow.db``. The parent run is keyed by the run folder, so resuming a run (or adding
    rounds) continues the same run tree; it ends FINISHED, or FAILED when a stage fails. ``track=False``
    (``icmil couple --no-tracking``) records nothing.
    """
    if not track:
        return run_rounds(cfg)
    from icmil.tracking import parent_run

    key = text_digest("icmil couple", str(Path(cfg.run_dir).resolve()))
    with parent_run(cfg, run_name=f"couple {Path(cfg.run_dir).name}", run_key=key) as tracker:
        return run_rounds(cfg, tracker)
