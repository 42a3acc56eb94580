"""Path-explicit stage functions: the ONE implementation of each stage, called by the local round driver
(:func:`icmil.rounds.run_rounds`, ``icmil couple``) and by the Kubeflow components alike.

Each stage takes the resolved :class:`ICMILConfig`, explicit input/output folders (artifact paths on a cluster),
the round index where it applies and a :class:`StageTracker`; it logs its parameters, metrics and artifacts under
``tracker.stage(name, round_index)``, writes the resolved config next to its output and returns a JSON-ready
dict — the same dict it stores in its **completion marker**. A stage is finished iff its marker exists
(``<out>/stage.json``, ``stage-<shard>.json`` for a shard, ``round_k/metrics.json`` for evaluation); markers
are written atomically and last, so a killed run resumes from the last finished stage and a finished stage is
never repeated (its stored result is returned without opening a tracker run). Inside a stage the library's own
per-slide skipping (tiles, features) resumes partial work.

Stages (round ``k``; the round-0 encoder is the configured one, materialised once so every later stage
and process uses the same weights):

====================  ==============================================================================
``tile_stage``        manifest -> ``tiles/`` (per-slide HDF5 + status.csv)
``encoder_stage``     config -> ``round_0/encoder/`` (the initial encoder: local weights or seeded init)
``embed_stage``       tiles + encoder -> ``round_k/features/``
``train_stage``       features -> ``round_k/head/`` (bag head, stage 1)
``finetune_stage``    tiles + round k-1 encoder/head/features -> ``round_k/encoder/`` (stage 2)
``evaluate_stage``    features + head -> ``round_k/metrics.json`` (val/test slide metrics, patch-level AUC)
``keep_teacher_stage`` (round k kept its teacher) the model round's evaluation -> ``round_k/metrics.json``
====================  ==============================================================================

Which round's outputs each stage reads is :mod:`icmil.rounds.wiring` (the one description of a round).

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["encoder.name=tiny_cnn"])
    >>> tile_stage(cfg, "run/manifest.csv", "run/tiles")  # doctest: +SKIP
    {'stage': 'tile', 'n_ok': 24, ...}
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icmil.config import ICMILConfig, apply_params, calibrates_initial_encoder, dump_config
from icmil.errors import ConfigError, FeatureStoreError
from icmil.io import text_digest, write_json_atomic
from icmil.log import get_logger
from icmil.manifest import Manifest, read_run_manifest
from icmil.nested import flatten
from icmil.tracking.base import NullTracker, StageRun, StageTracker

log = get_logger("stages")

STAGE_MARKER = "stage.json"
METRICS_FILE = "metrics.json"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- markers and shared helpers


def marker_path(out_dir: PathLike, shard: Sequence[str] | None = None) -> Path:
    """The completion marker of a stage writing into ``out_dir`` (one per shard for sharded stages)."""
    if shard is None:
        return Path(out_dir) / STAGE_MARKER
    return Path(out_dir) / f"stage-{text_digest(sorted(str(s) for s in shard))[:8]}.json"


def read_marker(path: PathLike) -> dict[str, Any] | None:
    """The stored result of a finished stage, or None when the stage has not finished."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        # Markers are written atomically, so this is an outside edit: say so instead of silently redoing work.
        raise FeatureStoreError(
            f"stage marker {p} is not valid JSON ({err}); delete it to rerun the stage"
        ) from None
    return data


def finished_result(path: Path, name: str, round_index: int | None) -> dict[str, Any] | None:
    """The stored result when the stage writing ``path`` has finished (logged as a skip), else None."""
    done = read_marker(path)
    if done is not None:
        where = f" round {round_index}" if round_index is not None else ""
        log.info("stage %s%s already finished (%s): skipping", name, where, path)
    return done


def write_marker(
    path: Path, name: str, round_index: int | None, cfg: ICMILConfig, result: Mapping[str, Any], t0: float
) -> dict[str, Any]:
    """Record a finished stage: ``result`` plus stage, round, config digest and timing, written atomically and
    last (the output is complete when the marker exists). Returns the record."""
    record = {
        "stage": name,
        "round": round_index,
        "config_digest": cfg.digest(),
        "seconds": round(time.perf_counter() - t0, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **result,
    }
    write_json_atomic(path, record)
    return record


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a (nested) dict, nested keys joined by ``_`` — what a tracker accepts.

    >>> _numeric({"test": {"auc": 0.9, "n": 4}, "head": "abmil", "x": float("nan")})
    {'test_auc': 0.9, 'test_n': 4.0}
    """
    return {
        name: float(v)
        for name, v in flatten(metrics, sep="_").items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _tracker(tracker: StageTracker | None) -> StageTracker:
    return tracker if tracker is not None else NullTracker()


def _log_artifact(run: StageRun, path: Path, artifact_path: str | None = None) -> None:
    if path.exists():
        run.log_artifact(path, artifact_path)


def initial_encoder(
    cfg: ICMILConfig, manifest_csv: PathLike | None = None, tiles_dir: PathLike | None = None
) -> Any:
    """The round-0 encoder from ``cfg.encoder`` (local weights, hub, or seeded random init).

    A randomly initialised encoder (no ``weights``, not ``pretrained``; or any encoder with
    ``coupling.calibrate_pretrained_bn``) gets its BatchNorm statistics re-estimated on ``coupling.initial_bn_calibration`` random patches of the TRAINING slides (seeded, so every
    process builds the same encoder; see :mod:`icmil.coupling.batchnorm`), which needs ``manifest_csv`` and
    ``tiles_dir``.
    """
    from icmil.features import create_encoder

    encoder = create_encoder(cfg.encoder)
    n_patches = cfg.coupling.initial_bn_calibration
    if not calibrates_initial_encoder(cfg):
        return encoder  # real weights carry their own statistics: overwritten only when asked
    if manifest_csv is None or tiles_dir is None:
        raise ConfigError(
            "coupling.initial_bn_calibration needs the manifest and tiles to calibrate the initial encoder"
        )
    from icmil.coupling.batchnorm import calibrate_batchnorm
    from icmil.coupling.data import TrainBatches, build_pool, slide_sources

    manifest = read_run_manifest(cfg, manifest_csv)
    sources, _ = slide_sources(manifest.split("train"), tiles_dir, cfg.cache_dir)
    labels = dict(zip(manifest.slides["slide_id"].astype(str), manifest.slides["label_index"], strict=True))
    pool, aligned = build_pool(sources, labels)
    batch = min(cfg.coupling.batch_size, n_patches)
    stream = iter(TrainBatches(pool, aligned, batch, balanced=False, seed=cfg.seed))
    n_batches = max(1, -(-n_patches // batch))
    used = calibrate_batchnorm(encoder, (next(stream)[1] for _ in range(n_batches)))
    log.info("initial encoder: BatchNorm statistics calibrated on %d training patches", used * batch)
    return encoder


def _load_encoder_or_initial(
    cfg: ICMILConfig, encoder_dir: PathLike | None, manifest_csv: PathLike, tiles_dir: PathLike
) -> Any:
    from icmil.features import load_encoder

    if encoder_dir is not None:
        return load_encoder(encoder_dir)
    return initial_encoder(cfg, manifest_csv, tiles_dir)


def _digest(module: Any) -> str | None:
    fn = getattr(module, "digest", None)
    return str(fn()) if callable(fn) else None


def read_lesions(lesions_json: PathLike | None) -> dict[str, list[list[float]]] | None:
    """Lesion boxes ``{slide_id: [[x0, y0, x1, y1], ...]}`` (synthetic cohorts, annotated data), or None."""
    if lesions_json is None or not Path(lesions_json).is_file():
        return None
    try:
        data = json.loads(Path(lesions_json).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"lesions file {lesions_json} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"lesions file {lesions_json} must map slide ids to lists of [x0, y0, x1, y1] boxes"
        )
    return {str(k): [list(map(float, b)) for b in v] for k, v in data.items()}


# --------------------------------------------------------------------------- stages


def tile_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    tiles_dir: PathLike,
    shard: Sequence[str] | None = None,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Tile every slide of the manifest (or the ``shard`` of slide ids) into ``tiles_dir``."""
    from icmil.slides import tile_manifest

    out = Path(tiles_dir)
    marker = marker_path(out, shard)
    if (done := finished_result(marker, "tile", None)) is not None:
        return done
    t0 = time.perf_counter()
    # A shard's rows are a part of the resolved manifest: its labels and splits were checked when it was made.
    manifest = read_run_manifest(cfg, manifest_csv, partial=shard is not None)
    with _tracker(tracker).stage("tile", None) as run:
        run.log_params(
            {
                "target_mpp": cfg.tiling.target_mpp,
                "patch_size": cfg.tiling.patch_size,
                "min_tissue_fraction": cfg.tiling.min_tissue_fraction,
            }
        )
        report = tile_manifest(
            manifest,
            out,
            cfg.tiling,
            cache_dir=cfg.cache_dir,
            slide_ids=list(shard) if shard is not None else None,
        )
        status = report.status
        result = {
            "n_slides": len(status),
            "n_ok": int((status["status"] != "error").sum()),
            "n_failed": int((status["status"] == "error").sum()),
            "n_patches": int(status["n_patches"].sum()) if "n_patches" in status else 0,
            "failures": dict(getattr(report, "failures", {}) or {}),
            "status": str(report.status_path),
        }
        run.log_metrics(_numeric(result))
        _log_artifact(run, Path(report.status_path))
        dump_config(cfg, out)
        return write_marker(marker, "tile", None, cfg, result, t0)


def encoder_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike | None,
    tiles_dir: PathLike | None,
    out_encoder_dir: PathLike,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Materialise the round-0 encoder (``cfg.encoder``) as ``weights.safetensors`` + ``config.json``.

    ``manifest_csv`` and ``tiles_dir`` are read only to calibrate a random init's BatchNorm
    (``coupling.initial_bn_calibration``); otherwise they may be None.

    Every later stage (embedding, the round-1 teacher) then loads these exact weights, whichever process runs it.
    """
    from icmil.features import save_encoder

    out = Path(out_encoder_dir)
    marker = marker_path(out)
    if (done := finished_result(marker, "encoder", 0)) is not None:
        return done
    t0 = time.perf_counter()
    with _tracker(tracker).stage("encoder", 0) as run:
        encoder = initial_encoder(cfg, manifest_csv, tiles_dir)
        save_encoder(
            encoder,
            out,
            extra={
                "source": cfg.encoder.weights
                or ("pretrained" if cfg.encoder.pretrained else f"random(seed={cfg.encoder.seed})")
            },
        )
        result = {
            "encoder_name": encoder.name,
            "encoder_digest": encoder.digest(),
            "out_dim": encoder.out_dim,
            "random_init": not (cfg.encoder.weights or cfg.encoder.pretrained),
            "bn_calibration_patches": 0
            if (cfg.encoder.weights or cfg.encoder.pretrained)
            else cfg.coupling.initial_bn_calibration,
        }
        run.log_params(
            {
                "encoder": encoder.name,
                "normalization": encoder.normalization,
                "encoder_digest": result["encoder_digest"],
            }
        )
        dump_config(cfg, out)
        return write_marker(marker, "encoder", 0, cfg, result, t0)


def embed_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    tiles_dir: PathLike,
    encoder_dir: PathLike | None,
    features_dir: PathLike,
    round_index: int,
    shard: Sequence[str] | None = None,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Embed the tiled slides with the encoder in ``encoder_dir`` (None: the configured initial encoder)."""
    from icmil.features import embed_manifest

    out = Path(features_dir)
    marker = marker_path(out, shard)
    if (done := finished_result(marker, "embed", round_index)) is not None:
        return done
    t0 = time.perf_counter()
    manifest = read_run_manifest(cfg, manifest_csv, partial=shard is not None)
    with _tracker(tracker).stage("embed", round_index) as run:
        encoder = _load_encoder_or_initial(cfg, encoder_dir, manifest_csv, tiles_dir)
        run.log_params(
            {"encoder": encoder.name, "encoder_digest": encoder.digest(), "batch_size": cfg.embed.batch_size}
        )
        report = embed_manifest(
            manifest,
            tiles_dir,
            out,
            encoder,
            cfg.embed,
            slide_ids=list(shard) if shard is not None else None,
            cache_dir=cfg.cache_dir,
        )
        result = {
            "encoder_name": report.encoder_name,
            "encoder_digest": report.encoder_digest,
            "n_ok": report.n_ok,
            "n_skipped": report.n_skipped,
            "n_failed": report.n_failed,
            "n_patches": report.n_embedded_patches,
            "patches_per_s": report.patches_per_s,
            "failures": dict(report.failures),
            "status": str(report.status_path),
        }
        run.log_metrics(_numeric(result))
        _log_artifact(run, Path(report.status_path))
        dump_config(cfg, out)
        return write_marker(marker, "embed", round_index, cfg, result, t0)


def train_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    features_dir: PathLike,
    head_dir: PathLike,
    round_index: int,
    tracker: StageTracker | None = None,
    params: Mapping[str, Any] | None = None,
    lesions_json: PathLike | None = None,
) -> dict[str, Any]:
    """Train the bag head (stage 1) on ``features_dir``; ``params`` override ``cfg.mil`` (tuning)."""
    from icmil.mil import train_mil_head

    out = Path(head_dir)
    marker = marker_path(out)
    if (done := finished_result(marker, "train", round_index)) is not None:
        return done
    t0 = time.perf_counter()
    manifest = read_run_manifest(cfg, manifest_csv)
    mil_cfg = apply_params(cfg, params).mil if params else cfg.mil
    with _tracker(tracker).stage("train", round_index) as run:
        run.log_params({f"mil.{k}": v for k, v in mil_cfg.model_dump(mode="json").items()})

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            run.log_metrics(_numeric(metrics), step=epoch)

        res = train_mil_head(
            manifest, features_dir, out, mil_cfg, epoch_callback=on_epoch, lesions=read_lesions(lesions_json)
        )
        metrics = _numeric(
            {k: v for k, v in res.metrics.items() if k in ("train", "val", "test", "patch_auc")}
        )
        result = {
            "head": mil_cfg.head,
            "params": dict(params or {}),
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "metrics": metrics,
        }
        run.log_metrics(metrics)
        for name in ("metrics.json", "history.csv", "roc.png"):
            _log_artifact(run, out / name)
        dump_config(cfg, out)
        return write_marker(marker, "train", round_index, cfg, result, t0)


def finetune_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    tiles_dir: PathLike,
    encoder_dir: PathLike | None,
    head_dir: PathLike,
    features_dir: PathLike | None,
    out_encoder_dir: PathLike,
    round_index: int,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Stage 2 of round ``round_index``: the teacher is (``encoder_dir``, ``head_dir``) of round k-1 and
    ``features_dir`` the features that encoder made; writes the selected student to ``out_encoder_dir``."""
    from icmil.coupling.finetune import finetune_encoder
    from icmil.mil import load_mil_head

    out = Path(out_encoder_dir)
    marker = marker_path(out)
    if (done := finished_result(marker, "finetune", round_index)) is not None:
        return done
    t0 = time.perf_counter()
    manifest = read_run_manifest(cfg, manifest_csv)
    with _tracker(tracker).stage("finetune", round_index) as run:
        encoder = _load_encoder_or_initial(cfg, encoder_dir, manifest_csv, tiles_dir)
        head = load_mil_head(head_dir)
        cc = cfg.coupling
        run.log_params(
            {f"coupling.{k}": v for k, v in cc.model_dump(mode="json").items() if k != "beta"}
            | {"teacher_encoder_digest": encoder.digest(), "head": head.name}
        )
        res = finetune_encoder(
            encoder, head, manifest, tiles_dir, out, cfg, features_dir=features_dir, run=run
        )
        summary = res.summary()
        result = {
            "encoder_digest": _digest(res.encoder),
            "teacher_encoder_digest": encoder.digest(),
            **summary,
        }
        run.log_metrics(
            _numeric(
                {
                    "best_step": res.best_step,
                    "selected_val_auc": res.selected["val_auc"],
                    "teacher_val_auc": res.teacher_eval["val_auc"],
                    "patches_per_s": res.patches_per_s,
                    "train_seconds": res.train_seconds,
                    "eval_seconds": res.eval_seconds,
                }
            )
        )
        for name in ("finetune.json", "history.csv"):
            _log_artifact(run, out / name)
        dump_config(cfg, out)
        return write_marker(marker, "finetune", round_index, cfg, result, t0)


def instance_patch_auc(
    head: Any,
    manifest: Manifest,
    features_dir: PathLike,
    lesions: Mapping[str, Sequence[Sequence[float]]],
    splits: Sequence[str],
) -> float:
    """Patch-level AUC of the instance teacher (``head.instance_logits`` on the round's features) against
    the lesion boxes, pooled over the slides of ``splits`` that have a lesion entry."""
    from icmil.mil.data import BagStore
    from icmil.mil.evaluate import predict_slides
    from icmil.mil.metrics import patch_level_auc

    rows = manifest.slides[manifest.slides["split"].isin(list(splits))]
    rows = rows[rows["slide_id"].astype(str).isin(list(lesions))]
    store = BagStore(features_dir, cache_size=0)
    missing = store.missing(rows["slide_id"])
    rows = rows[~rows["slide_id"].isin(missing)]
    if rows.empty:
        return float("nan")
    pred = predict_slides(head, store, rows, keep_instances=True)
    scores = {sid: inst.positive_prob for sid, inst in pred.instances.items()}
    coords = {sid: inst.coords for sid, inst in pred.instances.items()}
    sizes = {sid: inst.patch_size_level0 for sid, inst in pred.instances.items()}
    return float(patch_level_auc(scores, coords, sizes, {k: lesions[k] for k in scores}))


def finetune_summary(finetune_dir: PathLike | None) -> dict[str, Any]:
    """The stage-2 fields of a round's evaluation record, from ``finetune_dir/finetune.json`` (empty without
    one): the selected step (0 = the teacher), the teacher's and the selected encoder's selection metrics."""
    path = Path(finetune_dir) / "finetune.json" if finetune_dir is not None else None
    if path is None or not path.is_file():
        return {}
    ft = json.loads(path.read_text(encoding="utf-8"))
    teacher, selected = ft.get("teacher") or {}, ft.get("selected") or {}
    return {
        "finetune_best_step": ft.get("best_step"),
        "finetune_teacher_val_auc": teacher.get("val_auc"),
        "finetune_selected_val_auc": selected.get("val_auc"),
        "finetune_teacher_cv_auc": teacher.get("cv_auc"),
        "finetune_selected_cv_auc": selected.get("cv_auc"),
        "finetune_patches_per_s": ft.get("patches_per_s"),
    }


def evaluate_stage(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    features_dir: PathLike,
    head_dir: PathLike,
    out_dir: PathLike,
    round_index: int,
    tracker: StageTracker | None = None,
    lesions_json: PathLike | None = None,
    finetune_dir: PathLike | None = None,
) -> dict[str, Any]:
    """Score round ``round_index``: slide metrics on val and test, the instance teacher's patch-level AUC
    against lesion boxes (when ``lesions_json`` exists), and the fine-tuning summary (``finetune_dir``).
    Writes ``out_dir/metrics.json`` (the marker) and ``out_dir/predictions.csv``."""
    from icmil.mil import evaluate_mil_head, load_mil_head

    out = Path(out_dir)
    marker = out / METRICS_FILE
    if (done := finished_result(marker, "evaluate", round_index)) is not None:
        return done
    t0 = time.perf_counter()
    manifest = read_run_manifest(cfg, manifest_csv)
    head = load_mil_head(head_dir)
    with _tracker(tracker).stage("evaluate", round_index) as run:
        result: dict[str, Any] = {"head": head.name}
        frames = []
        for split in ("val", "test"):
            if manifest.split(split).empty:
                continue
            metrics, preds = evaluate_mil_head(head, manifest, features_dir, split)
            for k, v in metrics.items():
                if k != "skipped":
                    result[f"{split}_{k}"] = v
            if metrics.get("skipped"):
                result[f"{split}_skipped"] = metrics["skipped"]
            frames.append(preds)
        lesions = read_lesions(lesions_json)
        if lesions is not None:
            result["patch_auc_test"] = instance_patch_auc(head, manifest, features_dir, lesions, ["test"])
            result["patch_auc_all"] = instance_patch_auc(
                head, manifest, features_dir, lesions, ["train", "val", "test"]
            )
        result.update(finetune_summary(finetune_dir))
        if frames:
            import pandas as pd

            from icmil.io import write_text_atomic

            write_text_atomic(
                out / "predictions.csv", pd.concat(frames, ignore_index=True).to_csv(index=False)
            )
        run.log_metrics(_numeric(result), step=round_index)
        _log_artifact(run, out / "predictions.csv")
        return write_marker(marker, "evaluate", round_index, cfg, result, t0)


def keep_teacher_stage(
    cfg: ICMILConfig,
    model_evaluation_dir: PathLike,
    finetune_dir: PathLike,
    out_dir: PathLike,
    round_index: int,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Round ``round_index``'s evaluation when its stage 2 kept the teacher (selected step 0).

    The round's encoder is then the previous one, so re-embedding and retraining would only reproduce the
    model round (the last round that trained its own head, whose evaluation is ``model_evaluation_dir``): this
    stage records that round's metrics with ``teacher_kept: true`` and ``reused_from_round``, plus this round's
    stage-2 summary, in ``out_dir/metrics.json`` (the marker) and links its ``predictions.csv``. Nothing is
    embedded or trained. Tracked as the round's ``evaluate`` run, tagged ``teacher_kept``.
    """
    out = Path(out_dir)
    marker = out / METRICS_FILE
    if (done := finished_result(marker, "evaluate", round_index)) is not None:
        return done
    t0 = time.perf_counter()
    source = Path(model_evaluation_dir)
    model = read_marker(source / METRICS_FILE)
    if model is None:
        raise FeatureStoreError(
            f"round {round_index} kept its teacher but the evaluation it reuses ({source / METRICS_FILE}) is "
            "missing; rerun that round's evaluation"
        )
    reused = int(model["reused_from_round"] if model.get("teacher_kept") else model["round"])
    bookkeeping = ("stage", "round", "seconds", "finished_at", "config_digest")
    carried = {k: v for k, v in model.items() if k not in bookkeeping}
    result = {**carried, "teacher_kept": True, "reused_from_round": reused, **finetune_summary(finetune_dir)}
    log.info(
        "round %d: stage 2 kept the teacher (no student beat it on validation); round %d's features and head "
        "stand for this round - nothing re-embedded or retrained",
        round_index,
        reused,
    )
    with _tracker(tracker).stage("evaluate", round_index) as run:
        run.set_tags({"teacher_kept": "true", "reused_from_round": str(reused)})
        run.log_metrics({**_numeric(result), "teacher_kept": 1.0}, step=round_index)
        if (source / "predictions.csv").is_file():
            _link_or_copy(source / "predictions.csv", out / "predictions.csv")
        return write_marker(marker, "evaluate", round_index, cfg, result, t0)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same bytes as ``src``: a hard link where the filesystem allows, else a copy."""
    import shutil

    from icmil.io import atomic_path

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()  # the placeholder atomic_path made: a link needs the name free
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(src, tmp)
