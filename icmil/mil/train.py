"""Bag-head training (stage 1): one slide per step, selection on validation AUC, the test split scored once.

Outputs in ``out_dir``: ``weights.safetensors`` + ``config.json`` (the selected head, rewritten whenever
validation improves), ``history.csv`` (per epoch), ``predictions.csv`` (every slide, after selection),
``metrics.json`` (written last: its presence with the same run key means "finished"), ``roc.png`` and
``heatmaps/<slide_id>.png``; ``checkpoint/`` holds the resumable state of the last finished epoch.

Example:
    >>> from icmil.config import MILConfig
    >>> result = train_mil_head("RUN/manifest.csv", "RUN/round_0/features", "RUN/round_0/head",
    ...                         MILConfig(head="abmil"))  # doctest: +SKIP
    >>> result.metrics["test"]["auc"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from icmil.config import MILConfig
from icmil.errors import FeatureStoreError, ManifestError, check_failure_fraction
from icmil.io import text_digest, write_json_atomic, write_text_atomic
from icmil.log import get_logger, progress
from icmil.manifest import Manifest
from icmil.mil.base import MILHead
from icmil.mil.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_mil_head, save_mil_head
from icmil.mil.data import BagStore
from icmil.mil.evaluate import Predictions, as_manifest, predict_slides, predictions_frame
from icmil.mil.metrics import (
    bootstrap_auc_ci,
    classification_metrics,
    multiclass_auc,
    patch_level_auc,
    youden_threshold,
)
from icmil.mil.optim import build_optimizer
from icmil.mil.plots import plot_heatmap, plot_roc
from icmil.mil.resume import TrainingState, load_training_state, save_training_state
from icmil.mil.settings import head_from_config

log = get_logger("mil.train")
HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc",
    "val_accuracy",
    "val_balanced_accuracy",
    "best_epoch",
    "seconds",
]
EpochCallback = Callable[[int, dict[str, float]], None]
LesionBoxes = Mapping[str, Sequence[Sequence[float]]]


@dataclass
class TrainResult:
    """What :func:`train_mil_head` produced. ``metrics`` is the content of ``metrics.json``."""

    out_dir: Path
    head: str
    best_epoch: int
    epochs_run: int
    metrics: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    resumed_from_epoch: int = 0
    reused: bool = False  # finished output with the same run key was found; nothing was trained

    def __str__(self) -> str:
        test = self.metrics.get("test", {})
        val = self.metrics.get("val", {})
        note = " (reused finished output)" if self.reused else ""
        return (
            f"{self.head}: best epoch {self.best_epoch}/{self.epochs_run}, val AUC {_fmt(val.get('auc'))}, "
            f"test AUC {_fmt(test.get('auc'))} (95% CI {_fmt((test.get('auc_ci95') or [None])[0])}-"
            f"{_fmt((test.get('auc_ci95') or [None, None])[1])}), skipped {len(self.skipped)} slide(s); "
            f"outputs in {self.out_dir}{note}"
        )


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"


# Below this many feature values per bag (N x D) a bag's matrix products take microseconds, and torch's
# intra-op thread pool costs more than it saves: on a busy 2-core machine, AB-MIL epochs ran 3x faster with one
# thread (bench/mil_throughput.py). Larger bags keep the configured thread count.
SMALL_BAG_VALUES = 2**21


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` CPU threads for torch ops (None: leave as is); restores the previous count."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's randomness depends only on (seed, epoch), so a resumed run replays the same epochs.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _run_key(
    cfg: MILConfig, manifest: Manifest, store: BagStore, slide_ids: Sequence[str], lesions: Any
) -> str:
    # Feature files are identified by size + mtime (hashing a 100 GB store on every run is not an option).
    stats = []
    for sid in slide_ids:
        st = store.path(sid).stat()
        stats.append([sid, st.st_size, st.st_mtime_ns])
    return text_digest(cfg.model_dump(mode="json"), manifest.digest, manifest.classes, stats, lesions or {})


def _better(auc: float, loss: float, state: TrainingState, selection: str = "auc") -> bool:
    """``selection="auc"``: higher validation AUC wins; equal (or both undefined) AUC -> lower validation loss.
    ``"loss"``: lower validation cross-entropy wins (a continuous signal: on a few validation slides AUC moves
    in coarse steps and ties or flips on one slide)."""
    if state.best_epoch == 0:
        return True
    best_loss = state.best_loss if state.best_loss is not None else math.inf
    if selection == "loss":
        return (loss if loss == loss else math.inf) < best_loss
    best_auc = state.best_auc if state.best_auc is not None else float("nan")
    a = auc if auc == auc else -math.inf
    b = best_auc if best_auc == best_auc else -math.inf
    if a != b:
        return a > b
    return loss < best_loss


class WeightAverage:
    """Exponential moving average of a module's parameters, updated after every optimiser step.

    The average is a second copy of the head (buffers copied from the live head); a decay of 0.9 over ~50
    steps per epoch averages roughly the last epoch of updates. It smooths the epoch-to-epoch jitter of a head
    trained one slide per step, which is what makes selection on a small validation split a coin toss.
    """

    def __init__(self, model: MILHead, decay: float) -> None:
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, live: torch.nn.Module) -> None:
        for avg, p in zip(self.model.parameters(), live.parameters(), strict=True):
            avg.lerp_(p.detach(), 1.0 - self.decay)
        for avg_b, b in zip(self.model.buffers(), live.buffers(), strict=True):
            avg_b.copy_(b)


def _finished(out: Path, run_key: str) -> dict[str, Any] | None:
    path = out / "metrics.json"
    if not (path.is_file() and (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()):
        return None
    try:
        metrics: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return metrics if metrics.get("run_key") == run_key else None


def _check_dims(store: BagStore, slide_ids: Sequence[str]) -> int:
    """Feature dimension shared by all slides (FeatureStoreError naming the odd ones out)."""
    dims = {sid: store.feature_dim(sid) for sid in slide_ids}
    values = sorted(set(dims.values()))
    if len(values) > 1:
        common = max(values, key=lambda d: sum(v == d for v in dims.values()))
        odd = {sid: d for sid, d in dims.items() if d != common}
        raise FeatureStoreError(
            f"feature dimensions differ across slides (most have {common}); odd ones: {odd}. "
            "Were they embedded with different encoders? Re-embed them with one encoder."
        )
    return values[0]


def _train_epoch(
    head: MILHead,
    optimizer: torch.optim.Optimizer,
    store: BagStore,
    train: pd.DataFrame,
    cfg: MILConfig,
    epoch: int,
    average: WeightAverage | None = None,
) -> float:
    head.train()
    order = np.random.default_rng(_epoch_seed(cfg.seed, epoch)).permutation(len(train))
    losses = []
    rows = train.iloc[order]
    for sid, label in progress(
        zip(rows["slide_id"], rows["label_index"], strict=True),
        desc=f"epoch {epoch}",
        total=len(rows),
        leave=False,
    ):
        bag = store.load(str(sid))
        out = head(bag.features)
        loss = head.bag_loss(out, torch.tensor(int(label)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(head)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def train_mil_head(
    manifest: Manifest | str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: MILConfig,
    epoch_callback: EpochCallback | None = None,
    lesions: LesionBoxes | None = None,
) -> TrainResult:
    """Train ``cfg.head`` on the manifest's ``train`` split, select on ``val``, then score every split once.

    ``manifest``: a resolved :class:`Manifest` (or its CSV path) with the ``split`` column filled in; it is never
    re-split. ``features_dir`` holds ``<slide_id>.h5``. Slides without a usable features file (missing,
    unreadable, zero patches) are logged, listed with the reason in ``metrics.json["skipped_slides"]`` and left
    out (``StageFailed`` above ``cfg.max_missing_fraction``).
    ``epoch_callback(epoch, {"train_loss", "val_loss", "val_auc", "val_accuracy", "seconds"})`` runs after
    each epoch's checkpoint is on disk; whatever it raises (e.g. ``optuna.TrialPruned``) propagates, leaving the
    best head so far in ``out_dir/weights.safetensors``. ``lesions`` (``{slide_id: [[x0, y0, x1, y1], ...]}``,
    level 0) adds patch-level AUCs to metrics.json and outlines lesions on the heatmaps.

    A rerun with the same inputs returns the finished result without training; a killed run resumes from
    its last finished epoch.
    """
    m = as_manifest(manifest)
    out = Path(out_dir)
    store = BagStore(features_dir, cache_size=cfg.cache_bags)
    slides = m.slides
    skipped = store.unusable(list(slides["slide_id"]))
    for sid, why in sorted(skipped.items()):
        log.error("slide %r skipped: %s", sid, why)
    check_failure_fraction("train (unusable features)", skipped, len(slides), cfg.max_missing_fraction)
    usable = slides[~slides["slide_id"].isin(skipped)]
    train_df, val_df, test_df = (
        usable[usable["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")
    )
    if train_df.empty or val_df.empty:
        raise ManifestError(
            f"training needs slides with features in both the train and val splits; found "
            f"{len(train_df)} train and {len(val_df)} val (of {len(slides)} manifest rows, {len(skipped)} missing "
            "features). Set the manifest's split column or val_fraction."
        )
    n_classes = len(m.classes)
    in_dim = _check_dims(store, list(usable["slide_id"]))
    run_key = _run_key(cfg, m, store, list(usable["slide_id"]), lesions)

    done = _finished(out, run_key)
    if done is not None:
        log.info("finished output for this config/manifest/features found in %s; not retraining", out)
        return TrainResult(
            out, cfg.head, int(done["best_epoch"]), int(done["epochs_run"]), done, skipped, reused=True
        )

    moments = store.feature_moments(train_df["slide_id"]) if cfg.standardize_features else None

    def fresh() -> tuple[MILHead, torch.optim.Optimizer, WeightAverage | None]:
        seed_everything(cfg.seed)
        head = head_from_config(cfg, in_dim, n_classes)
        head.classes = list(m.classes)
        if moments is not None and not head.set_feature_standardization(*moments):
            log.warning("head %r has no DimRed trunk: mil.standardize_features does not apply", cfg.head)
        average = WeightAverage(head, cfg.ema) if cfg.ema > 0 else None
        return head, build_optimizer(cfg.head, head.parameters(), cfg), average

    head, optimizer, average = fresh()
    state = load_training_state(
        out, run_key, head, optimizer, averaged=average.model if average is not None else None
    )
    if state is None:
        head, optimizer, average = fresh()  # a failed load may have left half-restored weights
        state = TrainingState(run_key=run_key)
        # Outputs of an older, different run must not sit next to (or be mistaken for) this one's.
        for stale in ("metrics.json", "predictions.csv", "history.csv", "roc.png", WEIGHTS_FILE, CONFIG_FILE):
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / "heatmaps", ignore_errors=True)
    else:
        log.info("resuming %s from epoch %d (best so far: epoch %d)", cfg.head, state.epoch, state.best_epoch)
    resumed_from = state.epoch
    extra = {"mil_config": cfg.model_dump(mode="json"), "run_key": run_key}

    log.info(
        "training %s on %d train / %d val slides (%d classes, %d-d features); test (%d slides) is scored once "
        "after selection",
        cfg.head,
        len(train_df),
        len(val_df),
        n_classes,
        in_dim,
        len(test_df),
    )
    # Selection and early stopping start at min_epochs (never later than the last epoch).
    first_selectable = min(max(cfg.min_epochs, 1), cfg.epochs)
    largest_bag = max((store.shape(str(sid))[0] for sid in train_df["slide_id"]), default=0) * in_dim
    with intra_op_threads(1 if largest_bag <= SMALL_BAG_VALUES else None):
        _epochs(
            head,
            optimizer,
            average,
            store,
            train_df,
            val_df,
            cfg,
            state,
            out,
            extra,
            first_selectable,
            epoch_callback,
        )
        best = load_mil_head(out)
        metrics = _final_evaluation(best, m, store, train_df, val_df, test_df, out, cfg, lesions)
    metrics.update(
        run_key=run_key,
        head=cfg.head,
        classes=list(m.classes),
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.epoch < cfg.epochs,
        skipped_slides=skipped,
        manifest_errors=dict(m.errors),
        mil_config=cfg.model_dump(mode="json"),
    )
    write_json_atomic(out / "metrics.json", metrics)
    result = TrainResult(out, cfg.head, state.best_epoch, state.epoch, metrics, skipped, resumed_from)
    log.info("%s", result)
    return result


def _epochs(
    head: MILHead,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None,
    store: BagStore,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    cfg: MILConfig,
    state: TrainingState,
    out: Path,
    extra: dict[str, Any],
    first_selectable: int,
    epoch_callback: EpochCallback | None,
) -> None:
    """Train epochs until ``cfg.epochs`` or patience, selecting and checkpointing after each (resumable)."""
    while state.epoch < cfg.epochs and (cfg.patience is None or state.bad_epochs < cfg.patience):
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))
        train_loss = _train_epoch(head, optimizer, store, train_df, cfg, epoch, average)
        scored = average.model if average is not None else head
        val = predict_slides(scored, store, val_df)
        val_auc = multiclass_auc(val.labels, val.probs)
        val_metrics = classification_metrics(val.labels, val.probs)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val.mean_loss,
            "val_auc": val_auc,
            "val_accuracy": val_metrics["accuracy"],
            "val_balanced_accuracy": val_metrics["balanced_accuracy"],
            "seconds": time.perf_counter() - t0,
        }
        if epoch < first_selectable:
            # Too early to select or to count towards patience; the latest head stands in, so an interrupted
            # run (or a pruned trial) still leaves a usable head behind.
            save_mil_head(scored, out, extra={**extra, "best_epoch": epoch, "provisional": True})
        elif _better(val_auc, val.mean_loss, state, cfg.selection):
            state.best_epoch, state.best_auc, state.best_loss = epoch, val_auc, val.mean_loss
            state.bad_epochs = 0
            save_mil_head(scored, out, extra={**extra, "best_epoch": epoch})
        else:
            state.bad_epochs += 1
        row["best_epoch"] = state.best_epoch
        state.epoch = epoch
        state.history.append(row)
        save_training_state(
            out, state, head, optimizer, averaged=average.model if average is not None else None
        )
        write_text_atomic(
            out / "history.csv", pd.DataFrame(state.history, columns=HISTORY_COLUMNS).to_csv(index=False)
        )
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val AUC %s%s",
            epoch,
            train_loss,
            val.mean_loss,
            _fmt(val_auc),
            " (best)" if state.best_epoch == epoch else "",
        )
        if epoch_callback is not None:
            epoch_callback(epoch, {k: float(v) for k, v in row.items()})


def _final_evaluation(
    head: MILHead,
    m: Manifest,
    store: BagStore,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    test_df: pd.DataFrame,
    out: Path,
    cfg: MILConfig,
    lesions: LesionBoxes | None,
) -> dict[str, Any]:
    """Score the selected head: val first (to choose the threshold), then test exactly once, then train."""
    classes = list(m.classes)
    binary = len(classes) == 2
    val = predict_slides(head, store, val_df, keep_instances=lesions is not None)
    threshold = youden_threshold(val.labels, val.probs[:, 1]) if binary else None
    # The test split is read here for the first and only time.
    test = predict_slides(head, store, test_df, keep_instances=True)
    train = predict_slides(head, store, train_df)

    metrics: dict[str, Any] = {"threshold": threshold}
    frames = []
    for name, pred in (("train", train), ("val", val), ("test", test)):
        split_metrics: dict[str, Any] = classification_metrics(pred.labels, pred.probs, threshold)
        split_metrics["loss"] = pred.mean_loss
        metrics[name] = split_metrics
        frames.append(predictions_frame(pred, name, classes, threshold))
    if len(test.labels):
        lo, hi = bootstrap_auc_ci(test.labels, test.probs, cfg.bootstrap_samples, seed=cfg.seed)
        metrics["test"]["auc_ci95"] = [lo, hi]
    write_text_atomic(out / "predictions.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    curves = {name: (p.labels, p.probs) for name, p in (("val", val), ("test", test)) if len(p.labels)}
    plot_roc(curves, out / "roc.png", classes)

    if lesions is not None:
        metrics["patch_auc"] = _patch_aucs({**val.instances, **test.instances}, lesions, val, test)
    _draw_heatmaps(test, m, out / "heatmaps", cfg.max_heatmaps, classes, lesions)
    return metrics


def _patch_aucs(
    instances: Mapping[str, Any], lesions: LesionBoxes, val: Predictions, test: Predictions
) -> dict[str, dict[str, float]]:
    """Patch-level AUC (patch >= 50 % inside a lesion box) of attention scores and instance probabilities."""
    result: dict[str, dict[str, float]] = {}
    for split, pred in (("val", val), ("test", test)):
        inst = {sid: instances[sid] for sid in pred.slide_ids if sid in instances}
        coords = {sid: s.coords for sid, s in inst.items()}
        sizes = {sid: s.patch_size_level0 for sid, s in inst.items()}
        res = {
            "instance": patch_level_auc({k: s.positive_prob for k, s in inst.items()}, coords, sizes, lesions)
        }
        if inst and all(s.attention is not None for s in inst.values()):
            res["attention"] = patch_level_auc(
                {k: s.attention for k, s in inst.items()}, coords, sizes, lesions
            )
        result[split] = res
    return result


def _draw_heatmaps(
    test: Predictions,
    m: Manifest,
    directory: Path,
    limit: int,
    classes: list[str],
    lesions: LesionBoxes | None,
) -> None:
    """Heatmaps of the first ``limit`` test slides, positive (non-class-0) slides first."""
    if limit <= 0 or not test.slide_ids:
        return
    paths = dict(zip(m.slides["slide_id"], m.slides["path"], strict=True))
    order = sorted(range(len(test.slide_ids)), key=lambda i: (test.labels[i] == 0, test.slide_ids[i]))
    for i in order[:limit]:
        sid = test.slide_ids[i]
        inst = test.instances[sid]
        scores = inst.attention if inst.attention is not None else inst.positive_prob
        what = "attention" if inst.attention is not None else "instance p(positive)"
        title = f"{sid}: label {classes[test.labels[i]]}, p = {[round(float(x), 3) for x in test.probs[i]]} ({what})"
        try:
            plot_heatmap(
                inst.coords,
                scores,
                inst.patch_size_level0,
                directory / f"{sid}.png",
                slide_path=str(paths.get(sid, "")),
                slide_id=sid,
                title=title,
                lesion_boxes=(lesions or {}).get(sid),
            )
        except Exception as err:  # a broken plot must not lose a trained model
            log.warning("slide %r: heatmap failed: %s", sid, err)
