"""Stage 2 of ICMIL: fine-tune the patch embedder as the student of the bag classifier's instance teacher.

One call = one round's fine-tuning (docs/method.md; faithful by default, improvements are options):

* teacher = frozen copy of (encoder, DimRed, head) in eval mode on the clean patch; student = trainable copy
  (all encoder layers, or the last N blocks, or LoRA adapters) on the augmented view (flips +
  RandomResizedCrop(0.5–1), batched on the device);
* loss ``L_c + 0.5·L_w1 + 0.5·L_w2`` (:mod:`icmil.coupling.losses`), Adam, batches of random patches read
  straight from the TRAINING slides' tiles;
* options: TMI confidence weights (β per head), hard negatives, balanced sampler, per-slide confidence,
  stain/colour augmentation, sharpened targets, a feature anchor, warm-up (CouplingConfig);
* selection (:mod:`icmil.coupling.selection`): every ``eval_every`` steps the candidate encoder is judged — by
  default by the cross-validated AUC of a bag head refit on its train + val features. Step 0 — the teacher
  itself — is a candidate and wins ties, so coupling returns the teacher when no student is better.

A killed run resumes from its last evaluation (:mod:`icmil.coupling.checkpoint`). On CUDA: bf16 autocast and
channels_last. Outputs (``out_dir``): ``weights.safetensors`` + ``config.json`` (the selected encoder,
:func:`icmil.features.save_encoder`), ``history.csv`` (losses per step, metrics per evaluation) and
``finetune.json`` (selection, throughput, settings) — written last, it marks completion.

Example:
    >>> res = finetune_encoder(encoder, head, manifest, "run/tiles", "run/round_1/encoder", cfg,
    ...                        features_dir="run/round_0/features")  # doctest: +SKIP
    >>> res.best_step, res.selected["cv_auc"] >= res.teacher_eval["cv_auc"]  # doctest: +SKIP
    (40, True)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from icmil.config import ICMILConfig
from icmil.coupling.augment import student_view
from icmil.coupling.checkpoint import Stage2Checkpoint
from icmil.coupling.confidence import confidence_weights, normalised_scores, raw_confidence_scores
from icmil.coupling.data import TrainBatches, ValEmbedder, build_pool, slide_sources, train_loader
from icmil.coupling.losses import CouplingLosses, coupling_losses, sharpen, teacher_outputs
from icmil.coupling.selection import describe, loggable, score_cv, score_val, selection_key
from icmil.coupling.teacher import TeacherStudent, make_teacher_student
from icmil.errors import ConfigError, ICMILError
from icmil.io import text_digest, write_json_atomic, write_text_atomic
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


OPTION_FIELDS = (
    "selection",
    "student_bn",
    "confidence",
    "hard_negatives",
    "balanced_sampler",
    "per_slide_confidence",
    "stain_augment",
    "train_blocks",
    "lora_rank",
    "encoder_lr",
    "warmup_steps",
    "feature_anchor",
    "target_temperature",
    "random_teacher",
)


def check_options(cfg: ICMILConfig, head: MILHead, features_dir: object) -> None:
    """Refuse option combinations that cannot work, naming the settings."""
    cc = cfg.coupling
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


class Stage2:
    """The working parts of one fine-tuning call: data, teacher and student, optimiser, the candidate judge.

    Built once by :func:`finetune_encoder`; :meth:`train_step` runs one optimiser step and :meth:`evaluate`
    judges an encoder. Inputs are never modified (the teacher and student are copies).
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        head: MILHead,
        manifest: Manifest,
        tiles_dir: str | os.PathLike[str],
        cfg: ICMILConfig,
        features_dir: str | os.PathLike[str] | None,
    ) -> None:
        from icmil.features.embed import resolve_device

        check_options(cfg, head, features_dir)
        self.cfg, self.cc = cfg, cfg.coupling
        cc = self.cc
        self.beta = resolve_beta(cfg, head.name) if cc.confidence else 0.0
        self.device = resolve_device(cc.device)
        self.amp_dtype = _amp_dtype(cc.amp, self.device)
        self.n_classes = head.n_classes
        slides = manifest.slides
        self.labels = dict(
            zip(slides["slide_id"].astype(str), slides["label_index"].astype(int), strict=True)
        )
        self.teacher_digest = _digest_of(encoder)
        self._build_data(manifest, tiles_dir, features_dir, encoder, head)
        self._build_optimiser()

    # ---------------------------------------------------------------------------------------- building
    def _build_data(
        self,
        manifest: Manifest,
        tiles_dir: str | os.PathLike[str],
        features_dir: str | os.PathLike[str] | None,
        encoder: torch.nn.Module,
        head: MILHead,
    ) -> None:
        """Training patches only from training slides; candidates judged on val (and train, for cv) slides."""
        cfg, cc = self.cfg, self.cc
        train_rows, val_rows = manifest.split("train"), manifest.split("val")
        check_split(manifest, set(train_rows["slide_id"].astype(str)))
        if val_rows.empty:
            raise ConfigError(
                "coupling selects the student on validation slides but the split has none; "
                "set val_fraction > 0 or add split=val rows to the manifest"
            )
        train_sources, _ = slide_sources(train_rows, tiles_dir, cfg.cache_dir)
        val_sources, self.val_failures = slide_sources(val_rows, tiles_dir, cfg.cache_dir)
        if not val_sources:
            raise ICMILError(f"coupling: no validation slide is readable: {self.val_failures}")
        if cc.random_teacher:
            head = random_head_like(head, seed=cc.seed)
        self.pair: TeacherStudent = make_teacher_student(
            encoder,
            head,
            student_bn=cc.student_bn,
            train_blocks=cc.train_blocks,
            lora_rank=cc.lora_rank,
            lora_alpha=cc.lora_alpha,
        )
        self.head_digest = text_digest(
            *(t.detach().cpu().numpy().tobytes() for t in head.state_dict().values())
        )
        self.pool, pool_sources = build_pool(
            train_sources,
            self.labels,
            self.pair.teacher_head,
            features_dir,
            encoder_digest=self.teacher_digest,
            negative_class=cc.negative_class_index,
        )
        check_split(manifest, set(self.pool.slide_ids))  # the pool itself, after every filtering step
        self.pool_sources = pool_sources
        self.pair.to(self.device, channels_last=cc.channels_last)
        # Cross-validation re-embeds the training slides too (capped per slide: a fixed subset).
        judged = [*train_sources, *val_sources] if cc.selection == "cv" else val_sources
        self.val_ids = {s.slide_id for s in val_sources}
        self.judge = ValEmbedder(
            judged,
            batch_size=cfg.embed.batch_size,
            num_workers=min(cc.num_workers, 2),
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=cc.channels_last,
            max_patches=cc.eval_max_patches,
            seed=cc.seed,
        )
        self.slide_label_t = torch.as_tensor(self.pool.slide_labels)
        self.slide_index_t = torch.as_tensor(self.pool.slide_index)
        conf = self.pool.slide_confidence
        self.slide_conf_t = torch.as_tensor(conf) if conf is not None else None

    def _build_optimiser(self) -> None:
        cc, pair = self.cc, self.pair
        groups = [{"params": list(pair.head_parameters()), "lr": cc.lr}]
        encoder_params = list(pair.encoder_parameters())
        if encoder_params:
            groups.append(
                {"params": encoder_params, "lr": cc.encoder_lr if cc.encoder_lr is not None else cc.lr}
            )
        self.optimizer = torch.optim.Adam(groups, lr=cc.lr, weight_decay=cc.weight_decay)
        warmup = max(cc.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        # Per-dimension sd of the training patches' features (the head's standardisation): the unit of L_f.
        scale = getattr(getattr(pair.teacher_head, "dimred", None), "input_scale", None)
        self.anchor_scale = (
            scale.detach().to(self.device) if cc.feature_anchor > 0 and scale is not None else None
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cc.seed)

    def run_key(self) -> str:
        """What a resumable checkpoint must match: the settings and the teacher (encoder and head)."""
        return text_digest(self.cfg.digest(), self.teacher_digest, self.head_digest, "stage2-v1")

    def loader(self, resume_step: int) -> DataLoader[Any]:
        """Training batches (a sampler re-seeded by the step a resumed run starts from)."""
        cc = self.cc
        seed = cc.seed if resume_step == 0 else cc.seed + 1_000_003 * resume_step
        batches = TrainBatches(
            self.pool,
            self.pool_sources,
            cc.batch_size,
            cc.balanced_sampler,
            seed,
            cc.balanced_positive_fraction,
        )
        return train_loader(batches, cc.num_workers, pin_memory=self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------------- work
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Judge an encoder: the frozen head on the val slides, plus cross-validation when selection is cv."""
        feats = self.judge.embed(model)
        val = {k: v for k, v in feats.items() if k in self.val_ids}
        metrics = score_val(self.pair.teacher_head, val, self.labels, self.device)
        if self.cc.selection == "cv":
            metrics |= score_cv(feats, self.labels, self.cfg, self.n_classes)
        return metrics

    def _targets(self, idx: torch.Tensor, probs: torch.Tensor) -> torch.Tensor | None:
        """L_c's target: the teacher's probabilities, sharpened, with hard negatives (None = unchanged)."""
        cc = self.cc
        target = sharpen(probs, cc.target_temperature) if cc.target_temperature != 1.0 else None
        if cc.hard_negatives:
            neg = (self.slide_label_t[self.slide_index_t[idx]] == cc.negative_class_index).to(self.device)
            onehot = F.one_hot(torch.tensor(cc.negative_class_index), self.n_classes).float().to(self.device)
            target = torch.where(neg[:, None], onehot[None, :], target if target is not None else probs)
        return target

    def _weights(self, idx: torch.Tensor, t_out: Any) -> torch.Tensor | None:
        """TMI confidence weights of each patch's L_c (None when the option is off)."""
        cc = self.cc
        if not cc.confidence:
            return None
        if self.slide_conf_t is not None and cc.per_slide_confidence:
            a_norm = self.slide_conf_t[idx].to(self.device)
        else:
            raw = raw_confidence_scores(
                self.pair.teacher_head, t_out.features.float(), t_out.logits, cc.negative_class_index
            )
            a_norm = normalised_scores(raw)
        return confidence_weights(a_norm, self.beta)

    def train_step(self, idx: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch of clean uint8 patches ``x`` (pool indices ``idx``)."""
        cc, pair = self.cc, self.pair
        x = x.to(self.device, non_blocking=True)
        if cc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            t_out = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
        x_student = student_view(
            x,
            crop_scale=cc.crop_scale,
            stain=cc.stain_augment,
            stain_sigma=cc.stain_sigma,
            color=cc.color_jitter,
            generator=self.generator,
        )
        if cc.channels_last:
            x_student = x_student.contiguous(memory_format=torch.channels_last)
        anchor = None
        if cc.feature_anchor > 0:
            with torch.no_grad(), self.autocast():
                anchor = pair.teacher_encoder(x_student)
        weights = self._weights(idx, t_out)
        with self.autocast():
            losses: CouplingLosses = coupling_losses(
                t_out,
                pair.student_encoder,
                pair.student_head,
                x_student,
                target_probs=self._targets(idx, t_out.probs),
                sample_weights=weights,
                weight_head=cc.loss_weight_wide1,
                weight_trunk=cc.loss_weight_wide2,
                anchor_features=anchor,
                anchor_scale=self.anchor_scale,
                weight_anchor=cc.feature_anchor,
            )
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        values = losses.as_floats()
        if weights is not None:
            values["conf_weight_mean"] = float(weights.mean())
        return values


@dataclass
class _Progress:
    """Where the loop stands; what a checkpoint stores besides tensors."""

    teacher: dict[str, float]
    history: list[dict[str, Any]]
    best_key: tuple[float, float]
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    evals_since_best: int = 0
    step: int = 0
    n_patches: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=dict)
    running_n: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if k == "best_key" else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Progress:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["best_key"] = tuple(fields["best_key"])
        return cls(**fields)


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
    evaluation, for diagnostics that need the weights themselves (it must not modify them). With ``out_dir`` the
    state is checkpointed at every evaluation and a rerun resumes from the last one.
    Inputs are not modified; the returned encoder is a new module on the CPU.
    """
    t_start = time.perf_counter()
    s2 = Stage2(encoder, head, manifest, tiles_dir, cfg, features_dir)
    cc, pair = s2.cc, s2.pair
    ckpt = Stage2Checkpoint(out_dir, s2.run_key()) if out_dir is not None and cc.checkpoint else None
    resumed = ckpt.load(pair, s2.optimizer, s2.scheduler, s2.generator) if ckpt is not None else None
    best_state: dict[str, torch.Tensor] | None = None  # None = the teacher
    if resumed is not None:
        progress, best_state = _Progress.from_json(resumed[0]), resumed[1]
        pair.train_student()
    else:
        progress = _evaluate_teacher(s2, run, step_callback, eval_callback)
    stop_reason = "max_steps"
    it = iter(s2.loader(progress.step))
    t_train = time.perf_counter()
    try:
        for step in range(progress.step + 1, cc.max_steps + 1):
            idx, x = next(it)
            values = s2.train_step(idx, x)
            progress.step, progress.n_patches = step, progress.n_patches + int(x.shape[0])
            for k, v in values.items():
                progress.running[k] = progress.running.get(k, 0.0) + v
            progress.running_n += 1
            if not math.isfinite(values["loss"]):
                raise ICMILError(
                    f"coupling: the loss became {values['loss']} at step {step}; lower coupling.lr"
                )
            progress.history.append({"step": step, **values})
            if step_callback is not None:
                step_callback(step, values)
            if step % cc.eval_every == 0 or step == cc.max_steps:
                if s2.device.type == "cuda":
                    torch.cuda.synchronize()
                progress.train_seconds += time.perf_counter() - t_train
                improved = _evaluate_student(s2, progress, run, step_callback, eval_callback)
                if improved:
                    best_state = pair.student_encoder_state()
                if ckpt is not None:
                    ckpt.save(
                        step, pair, s2.optimizer, s2.scheduler, s2.generator, best_state, progress.to_json()
                    )
                if (
                    cc.patience is not None
                    and progress.evals_since_best >= cc.patience
                    and cc.selection != "last"
                ):
                    stop_reason = "patience"
                    break
                t_train = time.perf_counter()
    finally:
        del it  # shuts the loader's workers down
    result = _result(s2, encoder, progress, best_state, stop_reason, time.perf_counter() - t_start)
    if out_dir is not None:
        write_finetune_outputs(result, Path(out_dir), cfg)
        if ckpt is not None:
            ckpt.remove()
    return result


def _evaluate_teacher(
    s2: Stage2,
    run: StageRun | None,
    step_callback: Callable[[int, dict[str, float]], None] | None,
    eval_callback: Callable[[int, torch.nn.Module], None] | None,
) -> _Progress:
    """Step 0: the teacher is the first candidate."""
    t_eval = time.perf_counter()
    metrics = s2.evaluate(s2.pair.teacher_encoder)
    log.info("coupling step 0 (teacher): %s", describe(metrics))
    progress = _Progress(
        teacher=dict(metrics),
        history=[{"step": 0, **metrics, "selected": True}],
        best_key=selection_key(metrics, s2.cc.selection),
        best_metrics=dict(metrics),
        eval_seconds=time.perf_counter() - t_eval,
    )
    if run is not None:
        run.log_metrics(loggable(metrics), step=0)
    if step_callback is not None:
        step_callback(0, dict(metrics))
    if eval_callback is not None:
        eval_callback(0, s2.pair.teacher_encoder)
    return progress


def _evaluate_student(
    s2: Stage2,
    progress: _Progress,
    run: StageRun | None,
    step_callback: Callable[[int, dict[str, float]], None] | None,
    eval_callback: Callable[[int, torch.nn.Module], None] | None,
) -> bool:
    """Judge the current student; update the selection in ``progress``; True when it is the new best."""
    cc, step = s2.cc, progress.step
    t_eval = time.perf_counter()
    metrics = s2.evaluate(s2.pair.student_encoder)
    s2.pair.train_student()  # evaluation switched the student to eval mode and back
    progress.eval_seconds += time.perf_counter() - t_eval
    mean_losses = {f"train_{k}": v / max(progress.running_n, 1) for k, v in progress.running.items()}
    progress.running, progress.running_n = {}, 0
    key = selection_key(metrics, cc.selection)
    improved = tuple(key) > tuple(progress.best_key) or cc.selection == "last"
    if improved:
        progress.best_key, progress.best_step, progress.best_metrics = key, step, dict(metrics)
        progress.evals_since_best = 0
    else:
        progress.evals_since_best += 1
    progress.history.append({"step": step, **metrics, "selected": improved})
    log.info(
        "coupling step %d: %s (best: step %d)%s",
        step,
        describe(metrics),
        progress.best_step,
        "  <- new best" if improved else "",
    )
    if run is not None:
        run.log_metrics({**loggable(metrics), **mean_losses}, step=step)
    if step_callback is not None:
        step_callback(step, dict(metrics))
    if eval_callback is not None:
        eval_callback(step, s2.pair.student_encoder)
        s2.pair.train_student()
    return improved


def _result(
    s2: Stage2,
    encoder: torch.nn.Module,
    progress: _Progress,
    best_state: dict[str, torch.Tensor] | None,
    stop_reason: str,
    seconds: float,
) -> FinetuneResult:
    cc = s2.cc
    selected = copy.deepcopy(encoder).cpu()
    if best_state is not None:
        selected.load_state_dict(best_state)
    selected.eval()
    result = FinetuneResult(
        encoder=selected,
        best_step=progress.best_step,
        selected=progress.best_metrics,
        teacher_eval=progress.teacher,
        steps_run=progress.step,
        stop_reason=stop_reason,
        history=pd.DataFrame(progress.history),
        seconds=seconds,
        train_seconds=progress.train_seconds,
        eval_seconds=progress.eval_seconds,
        patches_per_s=progress.n_patches / progress.train_seconds if progress.train_seconds > 0 else 0.0,
        n_train_slides=len(s2.pool.slide_ids),
        n_train_patches=len(s2.pool),
        n_val_slides=int(progress.teacher["val_slides"]),
        extra={
            "device": str(s2.device),
            "amp_dtype": str(s2.amp_dtype) if s2.amp_dtype is not None else None,
            "options": {k: getattr(cc, k) for k in OPTION_FIELDS},
            "beta": s2.beta if cc.confidence else None,
            "val_failures": {**s2.val_failures, **s2.judge.failures},
        },
    )
    metric = "cv_auc" if cc.selection == "cv" else "val_auc"
    log.info(
        "coupling: selected step %d (%s %.4f vs teacher %.4f) after %d steps (%s); %.0f patches/s",
        progress.best_step,
        "refit-head CV AUC" if cc.selection == "cv" else "frozen-head val AUC",
        progress.best_metrics[metric],
        progress.teacher[metric],
        progress.step,
        stop_reason,
        result.patches_per_s,
    )
    return result


def _digest_of(module: torch.nn.Module) -> str | None:
    fn = getattr(module, "digest", None)
    return str(fn()) if callable(fn) else None


def write_finetune_outputs(result: FinetuneResult, out_dir: Path, cfg: ICMILConfig) -> Path:
    """``weights.safetensors`` + ``config.json`` (encoder), ``history.csv``, then ``finetune.json`` (marker)."""
    from icmil.features import save_encoder

    out_dir.mkdir(parents=True, exist_ok=True)
    save_encoder(result.encoder, out_dir, extra={"finetune": {"best_step": result.best_step}})  # type: ignore[arg-type]
    write_text_atomic(out_dir / "history.csv", result.history.to_csv(index=False))
    write_json_atomic(out_dir / FINETUNE_MARKER, result.summary() | {"config_digest": cfg.digest()})
    result.out_dir = out_dir
    return out_dir
