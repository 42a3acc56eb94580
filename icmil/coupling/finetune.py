"""Stage 2 of ICMIL: fine-tune the patch embedder as the student of the bag classifier's instance teacher.

One call = one round's fine-tuning (METHOD.md, faithful by default):

* teacher = frozen copy of (encoder, DimRed, head) in eval mode on the clean patch; student = trainable copy
  (ALL encoder layers) on the augmented view (flips + RandomResizedCrop(0.5–1), batched on the device);
* loss ``L_c + 0.5·L_w1 + 0.5·L_w2`` (:mod:`icmil.coupling.losses`), Adam lr 1e-5, wd 1e-4, batches of 100
  random patches read straight from the TRAINING slides' tiles;
* options: TMI confidence weights (β per head), hard negatives, balanced sampler, per-slide confidence,
  stain/colour augmentation (CouplingConfig);
* selection on a slide-level signal: every ``eval_every`` steps the VALIDATION slides are re-embedded with the
  student and scored by the frozen bag head; the best student by (val AUC, then val separation — the
  shift/scale-invariant correlation of slide log-odds with the labels) is kept. Step 0 — the teacher itself — is a candidate and wins ties, so coupling never returns an encoder that
  scores worse on validation than the one it started from. Distance to the teacher is never used.

On CUDA: bf16 autocast and channels_last. Outputs (``out_dir``): ``weights.safetensors`` + ``config.json``
(the selected encoder, :func:`icmil.features.save_encoder`), ``history.csv`` (losses per step, val metrics
per evaluation) and ``finetune.json`` (selection, throughput, settings) — written last, it marks completion.

Example:
    >>> res = finetune_encoder(encoder, head, manifest, "run/tiles", "run/round_1/encoder", cfg,
    ...                        features_dir="run/round_0/features")  # doctest: +SKIP
    >>> res.best_step, res.selected["val_auc"] >= res.teacher_eval["val_auc"]  # doctest: +SKIP
    (150, True)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from icmil.config import ICMILConfig
from icmil.coupling.augment import student_view
from icmil.coupling.confidence import confidence_weights, normalised_scores, raw_confidence_scores
from icmil.coupling.data import TrainBatches, ValEmbedder, build_pool, slide_sources, train_loader
from icmil.coupling.losses import coupling_losses, sharpen, teacher_outputs
from icmil.coupling.teacher import make_teacher_student
from icmil.errors import ConfigError, ICMILError
from icmil.io import write_json_atomic, write_text_atomic
from icmil.log import get_logger
from icmil.manifest import Manifest
from icmil.mil.base import MILHead
from icmil.tracking.base import StageRun

log = get_logger("coupling")

FINETUNE_MARKER = "finetune.json"


class SplitLeakError(ICMILError):
    """A slide of the validation/test split reached stage-2 training (or a slide is in two splits)."""


@dataclass
class FinetuneResult:
    """What one fine-tuning call produced. ``encoder`` is the selected student (or the teacher at step 0)."""

    encoder: torch.nn.Module
    best_step: int
    selected: dict[str, float]  # val metrics of the selected encoder
    teacher_eval: dict[str, float]  # val metrics at step 0 (the teacher)
    steps_run: int
    stop_reason: str
    history: pd.DataFrame
    seconds: float
    train_seconds: float
    eval_seconds: float
    patches_per_s: float
    n_train_slides: int
    n_train_patches: int
    n_val_slides: int
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (what ``finetune.json`` holds)."""
        return {
            "best_step": self.best_step,
            "selected": self.selected,
            "teacher": self.teacher_eval,
            "steps_run": self.steps_run,
            "stop_reason": self.stop_reason,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "patches_per_s": self.patches_per_s,
            "n_train_slides": self.n_train_slides,
            "n_train_patches": self.n_train_patches,
            "n_val_slides": self.n_val_slides,
            **self.extra,
        }


def random_head_like(head: MILHead, seed: int) -> MILHead:
    """The control teacher: ``head``'s architecture and input standardisation with freshly drawn weights."""
    from icmil.mil import create_mil_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        fresh = create_mil_head(head.name, head.in_dim, head.n_classes, **head.hparams)
    buffers = {k: v for k, v in head.state_dict().items() if k not in dict(fresh.named_parameters())}
    fresh.load_state_dict({**fresh.state_dict(), **buffers})
    fresh.classes = list(getattr(head, "classes", []) or [])
    log.warning("coupling.random_teacher: the teacher head has RANDOM weights (a control experiment)")
    return fresh.eval()


def check_split(manifest: Manifest, train_ids: set[str]) -> None:
    """Raise :class:`SplitLeakError` unless every slide is in exactly one split and ``train_ids`` are all in
    the training split (stage-2 patches must come only from training slides)."""
    slides = manifest.slides
    dup = slides["slide_id"][slides["slide_id"].duplicated()].tolist()
    if dup:
        raise SplitLeakError(f"slides listed more than once in the manifest: {dup[:10]}")
    split_of = dict(zip(slides["slide_id"].astype(str), slides["split"].astype(str), strict=True))
    leaked = sorted(s for s in train_ids if split_of.get(s) != "train")
    if leaked:
        raise SplitLeakError(
            f"stage 2 would train on slides outside the training split: "
            f"{[(s, split_of.get(s)) for s in leaked[:10]]}; patches must come only from training slides"
        )


def resolve_beta(cfg: ICMILConfig, head_name: str) -> float:
    """β of the TMI confidence weights for this head: ``coupling.beta.<head>``, else the head's own default."""
    from icmil.mil.settings import confidence_beta

    return confidence_beta(head_name, cfg.coupling.beta)


def _amp_dtype(enabled: bool, device: torch.device) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def separation(labels: np.ndarray, logits: np.ndarray) -> float:
    """How well slide log-odds separate the classes, invariant to any shift or scale of the logits: the
    point-biserial correlation between "is class c" and ``logit_c − logsumexp(other logits)``, averaged over
    classes (one class for binary). In [−1, 1]; NaN with a single class.

    >>> round(separation(np.array([0, 0, 1, 1]), np.array([[0, -1], [0, -2], [0, 1], [0, 3]])), 3)
    0.911
    """
    y = np.asarray(labels)
    z = np.asarray(logits, dtype=float)
    if len(np.unique(y)) < 2:
        return float("nan")
    classes = [1] if z.shape[1] == 2 else list(range(z.shape[1]))
    values = []
    for c in classes:
        others = np.delete(z, c, axis=1)
        log_odds = z[:, c] - np.logaddexp.reduce(others, axis=1)
        is_c = (y == c).astype(float)
        if is_c.std() == 0:
            continue
        sd = log_odds.std()
        values.append(0.0 if sd < 1e-12 else float(np.corrcoef(is_c, log_odds)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def score_val(
    head: MILHead, features: Mapping[str, np.ndarray], labels: Mapping[str, int], device: torch.device
) -> dict[str, float]:
    """Slide-level validation signal of ``features`` under the frozen bag ``head``: AUC (one-vs-rest macro for
    more than two classes; NaN with a single class), :func:`separation` of the slide log-odds, and the mean
    cross-entropy (reported, not used for selection: a head scoring features it was not trained on is
    miscalibrated by any uniform shift of those features, which says nothing about their ranking)."""
    from sklearn.metrics import roc_auc_score

    head.eval()
    logits_all, ys, losses = [], [], []
    # DTFD and friends draw random pseudo-bags in training only, but fix the RNG anyway: selection must be
    # a deterministic function of the encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for sid, feats in features.items():
            out = head(torch.from_numpy(feats).to(device))
            logits = out.logits.float().view(1, -1)
            y = torch.tensor([int(labels[sid])], device=logits.device)
            losses.append(float(F.cross_entropy(logits, y)))
            logits_all.append(logits[0].cpu().numpy())
            ys.append(int(labels[sid]))
    z = np.stack(logits_all) if logits_all else np.zeros((0, 2))
    p = torch.from_numpy(z).softmax(-1).numpy()
    y_arr = np.asarray(ys)
    auc = float("nan")
    if len(np.unique(y_arr)) >= 2:
        if p.shape[1] == 2:
            auc = float(roc_auc_score(y_arr, p[:, 1]))
        else:
            auc = float(roc_auc_score(y_arr, p, multi_class="ovr", labels=list(range(p.shape[1]))))
    return {
        "val_auc": auc,
        "val_separation": separation(y_arr, z),
        "val_loss": float(np.mean(losses)) if losses else float("nan"),
        "val_slides": len(ys),
    }


def _selection_key(metrics: Mapping[str, float], selection: str = "val") -> tuple[float, float]:
    """Bigger is better; NaN counts as worst. ``val``: (frozen-head val AUC, val separation); ``cv``:
    (cross-validated AUC of a refit head, minus its cross-validated loss)."""

    def val(k: str, sign: float = 1.0) -> float:
        v = metrics.get(k, float("nan"))
        return -math.inf if v is None or math.isnan(v) else sign * float(v)

    if selection == "cv":
        return (val("cv_auc"), val("cv_loss", -1.0))
    return (val("val_auc"), val("val_separation"))


SELECTION_METRICS = ("val_auc", "val_separation", "val_loss", "cv_auc", "cv_loss")


def _loggable(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SELECTION_METRICS if k in metrics}


def _describe(metrics: Mapping[str, float]) -> str:
    text = (
        f"frozen-head val AUC {metrics['val_auc']:.4f}, separation {metrics['val_separation']:.4f}, "
        f"loss {metrics['val_loss']:.4f} ({int(metrics['val_slides'])} slides)"
    )
    if "cv_auc" in metrics:
        text += f"; refit-head CV AUC {metrics['cv_auc']:.4f}, loss {metrics['cv_loss']:.4f}"
    return text


def score_cv(
    features: Mapping[str, np.ndarray], labels: Mapping[str, int], cfg: ICMILConfig, n_classes: int
) -> dict[str, float]:
    """Cross-validated AUC and loss of a bag head trained afresh on ``features`` (train + val slides): what
    the retrained head of the next stage can make of an encoder (:mod:`icmil.mil.crossval`)."""
    from icmil.mil.crossval import crossval_score

    ids = sorted(features)
    bags = [torch.from_numpy(np.ascontiguousarray(features[i], dtype=np.float32)) for i in ids]
    res = crossval_score(
        bags,
        [int(labels[i]) for i in ids],
        cfg.mil,
        n_classes,
        folds=cfg.coupling.cv_folds,
        epochs=cfg.coupling.cv_epochs,
        seed=cfg.coupling.seed,
    )
    return {"cv_auc": res.auc, "cv_loss": res.loss, "cv_slides": float(len(ids))}


def finetune_encoder(
    encoder: torch.nn.Module,
    head: MILHead,
    manifest: Manifest,
    tiles_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    cfg: ICMILConfig,
    *,
    features_dir: str | os.PathLike[str] | None = None,
    run: StageRun | None = None,
    step_callback: Callable[[int, dict[str, float]], None] | None = None,
    eval_callback: Callable[[int, torch.nn.Module], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder`` as the student of ``head``'s instance teacher (see the module docstring).

    ``features_dir``: the round's features (made by ``encoder``); they give the teacher's per-patch scores for
    the balanced sampler and per-slide confidence without re-encoding, and restrict the pool to patches that
    embedded cleanly. Required for those two options. ``run``: a tracker stage run (metrics per step/eval).
    ``step_callback(step, metrics)`` is called after every optimiser step and evaluation (may raise to stop).
    ``eval_callback(step, encoder)`` sees the encoder being evaluated (step 0: the teacher) right after each
    evaluation, for diagnostics that need the weights themselves (it must not modify them).
    Inputs are not modified; the returned encoder is a new module on the CPU.
    """
    cc = cfg.coupling
    t_start = time.perf_counter()
    if cc.per_slide_confidence and not cc.confidence:
        raise ConfigError(
            "coupling.per_slide_confidence normalises the confidence weights per slide; it needs "
            "coupling.confidence=true"
        )
    if (cc.balanced_sampler or cc.per_slide_confidence) and features_dir is None:
        raise ConfigError(
            "coupling.balanced_sampler / per_slide_confidence need the round's features "
            "(features_dir) for the teacher's per-patch scores"
        )
    if cc.negative_class_index >= head.n_classes:
        raise ConfigError(
            f"coupling.negative_class_index={cc.negative_class_index} but the head has "
            f"{head.n_classes} classes"
        )
    beta = resolve_beta(cfg, head.name) if cc.confidence else 0.0
    from icmil.features.embed import resolve_device

    device = resolve_device(cc.device)
    amp_dtype = _amp_dtype(cc.amp, device)
    labels = dict(
        zip(manifest.slides["slide_id"].astype(str), manifest.slides["label_index"].astype(int), strict=True)
    )

    # ---- data: training patches only from training slides; validation slides for selection
    train_rows, val_rows = manifest.split("train"), manifest.split("val")
    check_split(manifest, set(train_rows["slide_id"].astype(str)))
    if val_rows.empty:
        raise ConfigError(
            "coupling selects the student on validation slides but the split has none; "
            "set val_fraction > 0 or add split=val rows to the manifest"
        )
    train_sources, _ = slide_sources(train_rows, tiles_dir, cfg.cache_dir)
    val_sources, val_failures = slide_sources(val_rows, tiles_dir, cfg.cache_dir)
    if not val_sources:
        raise ICMILError(f"coupling: no validation slide is readable: {val_failures}")

    if cc.random_teacher:
        head = random_head_like(head, seed=cc.seed)
    pair = make_teacher_student(
        encoder,
        head,
        student_bn=cc.student_bn,
        train_blocks=cc.train_blocks,
        lora_rank=cc.lora_rank,
        lora_alpha=cc.lora_alpha,
    )
    digest_fn = getattr(encoder, "digest", None)
    pool, pool_sources = build_pool(
        train_sources,
        labels,
        pair.teacher_head,
        features_dir,
        encoder_digest=digest_fn() if callable(digest_fn) else None,
        negative_class=cc.negative_class_index,
    )
    check_split(manifest, set(pool.slide_ids))  # the pool itself, after every filtering step
    pair.to(device, channels_last=cc.channels_last)

    # Selection by cross-validation re-embeds the training slides too (capped per slide, a fixed subset).
    select_sources = val_sources
    if cc.selection == "cv":
        select_sources = [*slide_sources(train_rows, tiles_dir, cfg.cache_dir)[0], *val_sources]
    val_ids = {s.slide_id for s in val_sources}
    valer = ValEmbedder(
        select_sources,
        batch_size=cfg.embed.batch_size,
        num_workers=min(cc.num_workers, 2),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=cc.channels_last,
        max_patches=cc.eval_max_patches,
        seed=cc.seed,
    )

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        feats = valer.embed(model)
        metrics = score_val(
            pair.teacher_head, {k: v for k, v in feats.items() if k in val_ids}, labels, device
        )
        if cc.selection == "cv":
            metrics |= score_cv(feats, labels, cfg, head.n_classes)
        return metrics

    groups = [{"params": list(pair.head_parameters()), "lr": cc.lr}]
    encoder_params = list(pair.encoder_parameters())
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cc.encoder_lr if cc.encoder_lr is not None else cc.lr})
    optimizer = torch.optim.Adam(groups, lr=cc.lr, weight_decay=cc.weight_decay)
    warmup = max(cc.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    # Per-dimension sd of the training patches' features (the head's standardisation): the unit of L_f.
    anchor_scale = getattr(getattr(pair.teacher_head, "dimred", None), "input_scale", None)
    if cc.feature_anchor > 0 and anchor_scale is not None:
        anchor_scale = anchor_scale.detach().to(device)
    gen = torch.Generator(device=device).manual_seed(cc.seed)
    batches = TrainBatches(
        pool, pool_sources, cc.batch_size, cc.balanced_sampler, cc.seed, cc.balanced_positive_fraction
    )
    loader = train_loader(batches, cc.num_workers, pin_memory=device.type == "cuda")
    slide_label_t = torch.as_tensor(pool.slide_labels)
    slide_index_t = torch.as_tensor(pool.slide_index)
    slide_conf_t = torch.as_tensor(pool.slide_confidence) if pool.slide_confidence is not None else None
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else (contextlib.nullcontext)
    )

    # ---- step 0: the teacher is the first candidate
    t_eval = time.perf_counter()
    teacher_metrics = evaluate(pair.teacher_encoder)
    eval_seconds = time.perf_counter() - t_eval
    log.info("coupling step 0 (teacher): %s", _describe(teacher_metrics))
    history: list[dict[str, Any]] = [{"step": 0, **teacher_metrics, "selected": True}]
    if run is not None:
        run.log_metrics(_loggable(teacher_metrics), step=0)
    if step_callback is not None:
        step_callback(0, dict(teacher_metrics))
    if eval_callback is not None:
        eval_callback(0, pair.teacher_encoder)
    best_key, best_step, best_metrics = (
        _selection_key(teacher_metrics, cc.selection),
        0,
        dict(teacher_metrics),
    )
    best_state: dict[str, torch.Tensor] | None = None  # None = the teacher
    evals_since_best, stop_reason, step = 0, "max_steps", 0
    n_patches, train_seconds = 0, 0.0
    running: dict[str, float] = {}
    running_n = 0

    it = iter(loader)
    t_train = time.perf_counter()
    try:
        for step in range(1, cc.max_steps + 1):
            idx, x = next(it)
            x = x.to(device, non_blocking=True)
            if cc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                t_out = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
            x_student = student_view(
                x,
                crop_scale=cc.crop_scale,
                stain=cc.stain_augment,
                stain_sigma=cc.stain_sigma,
                color=cc.color_jitter,
                generator=gen,
            )
            if cc.channels_last:
                x_student = x_student.contiguous(memory_format=torch.channels_last)
            target = sharpen(t_out.probs, cc.target_temperature) if cc.target_temperature != 1.0 else None
            if cc.hard_negatives:
                neg = (slide_label_t[slide_index_t[idx]] == cc.negative_class_index).to(device)
                onehot = F.one_hot(torch.tensor(cc.negative_class_index), head.n_classes).float().to(device)
                soft = target if target is not None else t_out.probs
                target = torch.where(neg[:, None], onehot[None, :], soft)
            anchor = None
            if cc.feature_anchor > 0:
                with torch.no_grad(), autocast():
                    anchor = pair.teacher_encoder(x_student)
            weights = None
            if cc.confidence:
                if slide_conf_t is not None and cc.per_slide_confidence:
                    a_norm = slide_conf_t[idx].to(device)
                else:
                    raw = raw_confidence_scores(
                        pair.teacher_head, t_out.features.float(), t_out.logits, cc.negative_class_index
                    )
                    a_norm = normalised_scores(raw)
                weights = confidence_weights(a_norm, beta)
            with autocast():
                losses = coupling_losses(
                    t_out,
                    pair.student_encoder,
                    pair.student_head,
                    x_student,
                    target_probs=target,
                    sample_weights=weights,
                    weight_head=cc.loss_weight_wide1,
                    weight_trunk=cc.loss_weight_wide2,
                    anchor_features=anchor,
                    anchor_scale=anchor_scale if cc.feature_anchor > 0 else None,
                    weight_anchor=cc.feature_anchor,
                )
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            scheduler.step()
            n_patches += int(x.shape[0])
            values = losses.as_floats()
            if weights is not None:
                values["conf_weight_mean"] = float(weights.mean())
            for k, v in values.items():
                running[k] = running.get(k, 0.0) + v
            running_n += 1
            if not math.isfinite(values["loss"]):
                raise ICMILError(
                    f"coupling: the loss became {values['loss']} at step {step}; lower coupling.lr"
                )
            history.append({"step": step, **values})
            if step_callback is not None:
                step_callback(step, values)

            if step % cc.eval_every == 0 or step == cc.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                train_seconds += time.perf_counter() - t_train
                t_eval = time.perf_counter()
                metrics = evaluate(pair.student_encoder)
                pair.train_student()  # evaluation switched the student to eval mode and back
                eval_seconds += time.perf_counter() - t_eval
                mean_losses = {f"train_{k}": v / max(running_n, 1) for k, v in running.items()}
                running, running_n = {}, 0
                key = _selection_key(metrics, cc.selection)
                improved = key > best_key or cc.selection == "last"
                if improved:
                    best_key, best_step, best_metrics = key, step, dict(metrics)
                    best_state = pair.student_encoder_state()
                    evals_since_best = 0
                else:
                    evals_since_best += 1
                history.append({"step": step, **metrics, "selected": improved})
                log.info(
                    "coupling step %d: %s (best: step %d)%s",
                    step,
                    _describe(metrics),
                    best_step,
                    "  <- new best" if improved else "",
                )
                if run is not None:
                    run.log_metrics({**_loggable(metrics), **mean_losses}, step=step)
                if step_callback is not None:
                    step_callback(step, dict(metrics))
                if eval_callback is not None:
                    eval_callback(step, pair.student_encoder)
                    pair.train_student()
                if cc.patience is not None and evals_since_best >= cc.patience and cc.selection != "last":
                    stop_reason = "patience"
                    break
                t_train = time.perf_counter()
    finally:
        del it  # shuts the loader's workers down

    selected = copy.deepcopy(encoder).cpu()
    if best_state is not None:
        selected.load_state_dict(best_state)
    selected.eval()
    result = FinetuneResult(
        encoder=selected,
        best_step=best_step,
        selected=best_metrics,
        teacher_eval=teacher_metrics,
        steps_run=step,
        stop_reason=stop_reason,
        history=pd.DataFrame(history),
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        patches_per_s=n_patches / train_seconds if train_seconds > 0 else 0.0,
        n_train_slides=len(pool.slide_ids),
        n_train_patches=len(pool),
        n_val_slides=int(teacher_metrics["val_slides"]),
        extra={
            "device": str(device),
            "amp_dtype": str(amp_dtype) if amp_dtype is not None else None,
            "options": {
                k: getattr(cc, k)
                for k in (
                    "selection",
                    "student_bn",
                    "confidence",
                    "hard_negatives",
                    "balanced_sampler",
                    "per_slide_confidence",
                    "stain_augment",
                    "train_blocks",
                    "encoder_lr",
                    "warmup_steps",
                    "feature_anchor",
                    "target_temperature",
                    "random_teacher",
                    "lora_rank",
                )
            },
            "beta": beta if cc.confidence else None,
            "val_failures": {**val_failures, **valer.failures},
        },
    )
    log.info(
        "coupling: selected step %d (%s %.4f vs teacher %.4f) after %d steps (%s); %.0f patches/s",
        best_step,
        "refit-head CV AUC" if cc.selection == "cv" else "frozen-head val AUC",
        best_metrics["cv_auc" if cc.selection == "cv" else "val_auc"],
        teacher_metrics["cv_auc" if cc.selection == "cv" else "val_auc"],
        step,
        stop_reason,
        result.patches_per_s,
    )
    if out_dir is not None:
        write_finetune_outputs(result, Path(out_dir), cfg)
    return result


def write_finetune_outputs(result: FinetuneResult, out_dir: Path, cfg: ICMILConfig) -> Path:
    """``weights.safetensors`` + ``config.json`` (encoder), ``history.csv``, then ``finetune.json`` (marker)."""
    from icmil.features import save_encoder

    out_dir.mkdir(parents=True, exist_ok=True)
    save_encoder(result.encoder, out_dir, extra={"finetune": {"best_step": result.best_step}})  # type: ignore[arg-type]
    write_text_atomic(out_dir / "history.csv", result.history.to_csv(index=False))
    write_json_atomic(out_dir / FINETUNE_MARKER, result.summary() | {"config_digest": cfg.digest()})
    result.out_dir = out_dir
    return out_dir
