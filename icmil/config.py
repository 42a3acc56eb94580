"""The one typed configuration of the project: every default of the method (docs/method.md) lives here.

YAML in, resolved YAML out (:func:`dump_config` writes it next to every output). ``--set a.b=c`` overrides are
applied by :func:`load_config` and parsed as YAML scalars, so ``--set mil.lr=3e-4`` is a float.

Example:
    >>> cfg = load_config(None, ["mil.head=dtfd", "coupling.rounds=2"])
    >>> cfg.mil.head, cfg.coupling.rounds, cfg.tiling.target_mpp
    ('dtfd', 2, 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icmil.errors import ConfigError
from icmil.io import text_digest, write_text_atomic


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    """Synthetic cohort generated when no manifest is given (demo, tests)."""

    n_slides: int = Field(24, ge=2)
    seed: int = 0
    width: int = Field(6144, ge=512, description="level-0 width in px")
    height: int = Field(4096, ge=512, description="level-0 height in px")
    mpp: float = Field(0.5, gt=0, description="level-0 µm/px written into the resolution tags")
    positive_fraction: float = Field(0.5, gt=0, lt=1)
    lesions_per_slide: tuple[int, int] = (1, 3)
    # A lesion must hold several whole 256-px patches at 0.5 µm/px (a radius-360 disc holds about four).
    lesion_radius_px: tuple[int, int] = (360, 720)
    lesion_contrast: float = Field(0.35, ge=0, le=1, description="0 = lesion identical to normal tissue")
    # Appearance knobs (the coupling study varies these). Lesion nuclei look like tumour nuclei: larger, darker
    # (hyperchromatic), more varied in size (pleomorphic) and a little sparser, so the nuclear area (and so the
    # mean colour) barely changes: texture, not colour, tells them apart. At contrast c each factor applies as
    # factor**c (pleomorphism: c * value added to the log-normal size spread).
    nucleus_radius_px: float = Field(4.5, gt=0, description="mean normal nucleus radius at level 0")
    nucleus_density: float = Field(14.0, gt=0, description="normal nuclei per 100x100 level-0 px")
    lesion_nucleus_scale: float = Field(1.6, gt=0)
    lesion_density_scale: float = Field(0.6, gt=0)
    lesion_darkening: float = Field(0.3, ge=0, description="extra haematoxylin: (1 + value)**contrast")
    lesion_pleomorphism: float = Field(0.25, ge=0)
    tissue_blobs: tuple[int, int] = Field((2, 5), description="number of tissue pieces per slide (min, max)")
    tissue_coverage: float = Field(0.4, gt=0, le=0.9, description="approx. fraction of the slide covered")
    stain_jitter: float = Field(0.08, ge=0, le=0.5, description="per-slide stain colour variation")
    val_fraction: float = Field(0.25, ge=0, lt=1)
    test_fraction: float = Field(0.25, ge=0, lt=1)


class TilingConfig(_Section):
    """Tissue mask (CLAM-style, on a thumbnail) and the patch grid."""

    patch_size: int = Field(256, ge=16, description="output patch edge in px")
    target_mpp: float = Field(0.5, gt=0, description="µm/px of the output patches (0.5 = 20x)")
    min_tissue_fraction: float = Field(0.8, ge=0, le=1, description="keep a patch if this much is tissue")
    mask_mpp: float = Field(8.0, gt=0, description="µm/px of the thumbnail the mask is computed on")
    saturation_threshold: int = Field(8, ge=0, le=255)
    use_otsu: bool = False
    median_blur: int = Field(7, ge=1, description="odd kernel size")
    close_kernel: int = Field(4, ge=0)
    min_tissue_area_um2: float = Field(20_000.0, ge=0, description="drop tissue components smaller than this")
    min_hole_area_um2: float = Field(4_000.0, ge=0, description="fill holes smaller than this")
    max_failed_fraction: float = Field(0.1, ge=0, le=1, description="stage fails above this fraction")
    # Work bounds per slide: a corrupt or lying header must not cost minutes before it is reported.
    mask_max_pixels: int = Field(
        256_000_000,
        ge=1_000_000,
        description="largest level read whole for the tissue mask; a slide whose smallest level is larger "
        "(no pyramid) is refused",
    )
    max_pixels_per_byte: float = Field(
        5000.0,
        gt=0,
        description="level-0 pixels per byte of slide file above which the slide is reported as corrupt "
        "(real scans store far more than 1/5000 byte per pixel, even blank glass)",
    )

    @field_validator("median_blur")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("median_blur must be odd")
        return v


class EncoderConfig(_Section):
    """Patch embedder: a preset (``icmil encoders`` lists them: ``resnet50_trunc``, ``uni``, ``uni2_h``,
    ``virchow2``, ``h_optimus_0``, ``h_optimus_1``, ``prov_gigapath``, ``phikon_v2``), a registered name
    (``tiny_cnn``) or any timm model name. Weights never come from the network unless ``allow_download``."""

    name: str = "resnet50_trunc"
    weights: str | None = Field(
        None, description="local .safetensors/.pth/.bin file, or a folder holding the preset's official file"
    )
    sha256: str | None = Field(
        None, description="expected SHA-256 (hex) of the weights file, checked at load"
    )
    pretrained: bool = Field(
        False, description="the official weights, from the local Hugging Face hub cache (offline)"
    )
    hub_cache: str | None = Field(
        None, description="hub cache folder; None: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub"
    )
    allow_download: bool = Field(
        False, description="let pretrained=true download missing weights from the hub (internet, HF_TOKEN)"
    )
    normalization: str = Field(
        "auto", description="auto = the preset's own (ImageNet otherwise); imagenet, hoptimus or none"
    )
    input_size: int | None = Field(
        None, ge=16, description="resize patches to this edge inside the encoder; None = the preset's own"
    )
    seed: int = Field(0, description="seed of the random init (no weights): same seed -> same encoder digest")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(
                "encoder.sha256 must be 64 hexadecimal characters (the output of `sha256sum FILE`)"
            )
        return v


class EmbedConfig(_Section):
    batch_size: int = Field(128, ge=1)
    num_workers: int | None = Field(
        None,
        ge=0,
        description="patch-decoding DataLoader workers; None = auto (CUDA: cores-1 up to 16; CPU: up to 2)",
    )
    amp: bool = Field(True, description="autocast on CUDA (ignored on CPU)")
    channels_last: bool = True
    device: str = Field("auto", description="auto = cuda if available, else cpu; or cpu, cuda, cuda:1, mps")
    amp_dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="autocast dtype on CUDA")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker reads ahead of the model")
    merge_reads: int = Field(8, ge=1, description="adjacent patches merged into one read_region (1 = off)")
    on_corrupt_patch: Literal["error", "skip"] = Field(
        "error", description="error: the slide fails, naming the patch; skip: drop the patch and record it"
    )
    max_corrupt_fraction: float = Field(
        0.01, ge=0, le=1, description="with on_corrupt_patch=skip, the slide still fails above this fraction"
    )
    max_failed_fraction: float = Field(0.1, ge=0, le=1)


class MILConfig(_Section):
    """Bag classifier (stage 1). A head's own settings are ``heads.<head>.<setting>`` (``icmil heads`` lists them);
    ``hidden_dim``, ``attention_dim`` and ``dropout`` go to every head that has them (see icmil.mil.settings).
    ``lr`` / ``weight_decay`` null: the head's own defaults."""

    head: str = "abmil"
    hidden_dim: int = Field(512, ge=1, description="DimRed output size (every head with a hidden_dim)")
    attention_dim: int = Field(
        128, ge=1, description="attention hidden size (every head with an attention_dim)"
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    heads: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-head settings, e.g. {dtfd: {pseudo_bags: 5}}; unknown heads or settings are errors",
    )
    lr: float | None = Field(None, gt=0, description="null: the head's default_lr")
    weight_decay: float | None = Field(
        None, ge=0, description="null: the head's default_weight_decay (1e-4; TransMIL 1e-5)"
    )
    epochs: int = Field(200, ge=1)
    patience: int | None = Field(30, ge=1)
    selection: Literal["auc", "loss"] = Field(
        "loss",
        description="checkpoint selection on the val split: loss (mean cross-entropy: continuous, where a few "
        "val slides give AUC in coarse steps) or auc (ties -> lower loss); measured in docs/coupling.md",
    )
    min_epochs: int = Field(
        10, ge=0, description="epochs trained before selection and early stopping start (0 = from epoch 1)"
    )
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the head's weights per step (0 = off); the "
        "average is what is validated, selected and saved",
    )
    grad_clip: float = Field(5.0, gt=0)
    standardize_features: bool = Field(
        True,
        description="standardise head inputs per dimension with the training patches' mean/sd (fixed, saved "
        "with the head; see icmil.mil.layers.DimRed). false = raw features, as the original code",
    )
    seed: int = 0
    bootstrap_samples: int = Field(1000, ge=0)
    cache_bags: int = Field(
        4, ge=0, description="bags kept in memory (LRU); the rest stream from the HDF5 store"
    )
    max_heatmaps: int = Field(8, ge=0, description="attention heatmaps drawn (test slides, positives first)")
    max_missing_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="fail when more slides lack usable features (missing/empty file); the rest are skipped",
    )

    @model_validator(mode="before")
    @classmethod
    def _per_head_keys(cls, data: Any) -> Any:
        """Configs written before heads owned their settings used flat keys (``dtfd_pseudo_bags``): read them as
        ``heads.<head>.<setting>``, saying so once per key."""
        if not isinstance(data, dict) or not LEGACY_HEAD_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        heads = {name: dict(values) for name, values in (data.get("heads") or {}).items()}
        for old, (head, setting) in LEGACY_HEAD_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            if setting == "weight_decay":
                # TransMIL trained with this weight decay INSTEAD of mil.weight_decay; other heads ignored it.
                if data.get("head", "abmil") == "transmil":
                    data["weight_decay"] = value
                _deprecated(old, "mil.weight_decay (TransMIL's own default is 1e-5)")
                continue
            current = heads.setdefault(head, {})
            if setting in current and current[setting] != value:
                raise ValueError(f"{old}={value!r} contradicts heads.{head}.{setting}={current[setting]!r}")
            current.setdefault(setting, value)
            _deprecated(old, f"mil.heads.{head}.{setting}")
        data["heads"] = heads
        return data


# Flat MILConfig keys of per-head settings, before each head owned its settings: read as heads.<head>.<setting>.
LEGACY_HEAD_KEYS = {
    "dtfd_pseudo_bags": ("dtfd", "pseudo_bags"),
    "dtfd_distill": ("dtfd", "distill"),
    "dtfd_tier_blend": ("dtfd", "tier_blend"),
    "transmil_teacher": ("transmil", "teacher"),
    "transmil_heads": ("transmil", "n_heads"),
    "transmil_landmarks": ("transmil", "landmarks"),
    "transmil_weight_decay": ("transmil", "weight_decay"),
}
_WARNED: set[str] = set()


def _deprecated(old: str, new: str) -> None:
    if old not in _WARNED:
        _WARNED.add(old)
        from icmil.log import get_logger

        get_logger("config").warning("mil.%s is deprecated; it is read as %s: write that instead", old, new)


class CouplingConfig(_Section):
    """Stage 2 (teacher-student fine-tuning of the embedder) and how many rounds run (icmil.rounds)."""

    rounds: int = Field(1, ge=0)
    force_rounds: bool = Field(
        False,
        description="run every round even after one kept its teacher (by default the run stops there: converged)",
    )
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(100, ge=1)
    max_steps: int = Field(500, ge=1)
    eval_every: int = Field(50, ge=1, description="re-embed val slides and score them every K steps")
    loss_weight_wide1: float = 0.5
    loss_weight_wide2: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    confidence: bool = Field(False, description="TMI variant: weight L_c by |2a-1|^beta")
    beta: dict[str, float] = Field(
        default_factory=dict,
        description="confidence exponent per head, e.g. {dtfd: 2}; a head not named uses its own confidence_beta "
        "(ABMIL, max-pooling, TransMIL 6; DTFD 2)",
    )
    hard_negatives: bool = Field(False, description="patches of negative slides are hard 0 (improvement)")
    balanced_sampler: bool = Field(
        False, description="balance teacher-positive/negative patches (improvement)"
    )
    per_slide_confidence: bool = Field(False, description="normalise attention per slide (improvement)")
    stain_augment: bool = Field(False, description="HED/colour jitter on the student view (improvement)")
    stain_sigma: float = Field(0.05, ge=0, le=1, description="HED optical-density jitter strength")
    color_jitter: float = Field(
        0.1, ge=0, le=1, description="brightness/contrast/saturation jitter (stain_augment)"
    )
    balanced_positive_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of teacher-positive patches"
    )
    negative_class_index: int = Field(
        0, ge=0, description="label index of the negative class (hard negatives)"
    )
    patience: int | None = Field(None, ge=1, description="stop after this many evals without val improvement")
    selection: Literal["val", "cv", "last"] = Field(
        "cv",
        description="val: keep the best of teacher + evaluated students by the frozen head's val AUC (then "
        "separation); cv: by the cross-validated AUC (then loss) of a head refit on each candidate's train+val "
        "features; last: keep the last student (diagnostic: coupling without selection)",
    )
    random_teacher: bool = Field(
        False,
        description="control experiment: the teacher head keeps its input standardisation but gets random "
        "weights, so it knows nothing about the labels (measures what coupling gains without the teacher)",
    )
    cv_folds: int = Field(5, ge=2, description="selection=cv: folds over the train+val slides")
    cv_epochs: int = Field(20, ge=1, description="selection=cv: epochs of each refit head")
    cv_head: str | None = Field(
        "abmil",
        description="selection=cv: the head refit to judge a candidate encoder (null: the round's own head); "
        "a stable learner makes a low-noise judge",
    )
    eval_max_patches: int | None = Field(
        None, ge=1, description="cap on patches per val slide when re-embedding for selection (None: all)"
    )
    device: str = Field("auto", description="auto: cuda if available, else cpu")
    student_bn: Literal["train", "frozen"] = Field(
        "train",
        description="train: student BatchNorm uses batch statistics and updates its running statistics (faithful); "
        "frozen: running statistics stay the teacher's (affine parameters still train)",
    )
    initial_bn_calibration: int = Field(
        1000,
        ge=0,
        description="re-estimate the round-0 encoder's BatchNorm statistics on this many training patches "
        "(0 = off): a random init always, pretrained weights only with calibrate_pretrained_bn",
    )
    calibrate_pretrained_bn: bool = Field(
        False,
        description="also re-estimate a PRETRAINED round-0 encoder's BatchNorm statistics on "
        "initial_bn_calibration training patches (label-free; AdaBN): for weights from another domain, whose "
        "stored statistics make the stage-2 student (batch statistics) disagree with its teacher from step 1",
    )
    encoder_lr: float | None = Field(
        None, gt=0, description="learning rate of the student encoder (None: coupling.lr, as the head)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up over this many steps")
    train_blocks: int | None = Field(
        None,
        ge=0,
        description="train only the encoder's last N blocks (None: all layers, faithful; 0: none, head only); "
        "frozen blocks keep their BatchNorm statistics",
    )
    lora_rank: int = Field(
        0,
        ge=0,
        description="train low-rank adapters (LoRA, rank r) on the encoder's Linear/Conv2d layers instead of "
        "its weights (0 = off); merged into the weights when stage 2 ends, so the encoder's files keep their format",
    )
    lora_alpha: int | None = Field(None, gt=0, description="LoRA scale numerator (None: 2 x rank)")
    feature_anchor: float = Field(
        0.0,
        ge=0,
        description="weight of a feature-preservation term: squared distance between student and teacher "
        "features of the student's view, per dimension in units of the training patches' sd (0 = off)",
    )
    target_temperature: float = Field(
        1.0,
        gt=0,
        description="temperature applied to the teacher's instance probabilities in L_c (<1 sharpens)",
    )
    checkpoint: bool = Field(
        True, description="save the stage-2 state at every evaluation so a killed run resumes from there"
    )
    amp: bool = True
    channels_last: bool = True
    num_workers: int = Field(2, ge=0)
    seed: int = 0


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="None: MLFLOW_TRACKING_URI or sqlite in the run folder"
    )
    registry_uri: str | None = None
    experiment: str = "icmil"
    registered_model: str = "icmil-slide-classifier"
    promotion_metric: str = "auc"
    promotion_split: Literal["val", "test"] = "test"
    promotion_margin: float = Field(0.0, ge=0)
    promotion_floor: float = Field(0.5, ge=0, le=1, description="first version needs at least this")
    # When challenger and champion were scored on different evaluation data their metrics are not comparable:
    # "reevaluate" scores both models on the challenger's evaluation table, "refuse" rejects the promotion.
    on_data_mismatch: Literal["reevaluate", "refuse"] = "reevaluate"
    # One budget for every call to the tracking server / registry, MLflow's own HTTP client included (its
    # retries are set to 0, its timeout to request_timeout): an outage is reported after at most
    # (retries + 1) * request_timeout + the backoff waits = 48 s with these defaults.
    retries: int = Field(2, ge=0, description="retries of a failed tracking call (exponential backoff)")
    retry_backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles each retry")
    retry_backoff_max: float = Field(
        60.0, ge=0, description="longest wait between retries; an offline stage re-probes this often"
    )
    request_timeout: int = Field(
        15, ge=1, description="seconds per MLflow HTTP request (raise it for multi-GB model uploads)"
    )


class SearchSpace(_Section):
    low: float
    high: float
    log: bool = False
    kind: Literal["float", "int"] = "float"


class TuningConfig(_Section):
    """Optuna, one study per round: which bag-head settings to search, how, and where the study lives.

    Search-space keys are :class:`MILConfig` field names (``mil_space``) or stage-2 settings (``coupling_space``:
    ``lr``, ``weight_decay``, ``beta`` = the confidence exponent of the current head, ``max_steps``). The
    objective is always the validation AUC; the test split is never looked at.
    """

    enabled: bool = False
    n_trials: int = Field(8, ge=1, description="trials per round, over all workers together")
    workers: int = Field(1, ge=1, description="parallel workers sharing one study (needs PostgreSQL)")
    storage: str | None = Field(
        None, description="None: $storage_env, else sqlite in the run folder; postgresql://... for workers"
    )
    # On a cluster the PostgreSQL URL holds a password: it arrives through this environment variable, set from
    # the Kubernetes Secret `storage_secret`, so it never lands in the compiled pipeline or in MLflow params.
    storage_env: str = "ICMIL_OPTUNA_STORAGE"
    storage_secret: str = "icmil-optuna"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(2, ge=0, description="median pruner: trials finished before pruning")
    pruner_warmup_epochs: int = Field(
        2, ge=0, description="epochs a trial always gets before it can be pruned"
    )
    epochs: int = Field(30, ge=1, description="bag-head epochs per trial")
    heartbeat_interval: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    heartbeat_grace_period: int | None = Field(
        None, ge=1, description="a trial silent this long is failed (None: 2 x heartbeat_interval)"
    )
    max_retry: int = Field(2, ge=0, description="times a trial failed by a dead worker is re-queued")
    mil_space: dict[str, SearchSpace] = Field(
        default_factory=lambda: {
            "lr": SearchSpace(low=1e-5, high=1e-3, log=True),
            "weight_decay": SearchSpace(low=1e-6, high=1e-3, log=True),
            "dropout": SearchSpace(low=0.0, high=0.5),
            "attention_dim": SearchSpace(low=32, high=256, log=True, kind="int"),
        }
    )
    coupling_space: dict[str, SearchSpace] = Field(
        default_factory=lambda: {
            "lr": SearchSpace(low=1e-6, high=1e-4, log=True),
            "beta": SearchSpace(low=1.0, high=8.0),
            "max_steps": SearchSpace(low=100, high=1000, log=True, kind="int"),
        }
    )


GpuStage = Literal["embed", "finetune", "tune", "train", "evaluate"]


def _default_gpu_stages() -> list[GpuStage]:
    return ["embed", "finetune", "tune"]


class PipelineConfig(_Section):
    """Kubeflow placement. Ignored by the local runner."""

    image: str = "ghcr.io/icmil-kfp/icmil:0.1.0"
    pipeline_name: str = "icmil"
    shards: int = Field(2, ge=1, description="ParallelFor width for tiling and embedding")
    gpu_accelerator_type: str = "nvidia.com/gpu"
    gpu_limit: int = Field(1, ge=0)
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    mlflow_secret: str = "icmil-mlflow"
    s3_secret: str = "icmil-s3"
    feature_store_pvc: str | None = None
    feature_store_mount: str = "/mnt/icmil"
    cpu_request: str = "2"
    memory_request: str = "8G"
    gpu_memory_request: str = "32G"
    gpu_stages: list[GpuStage] = Field(
        default_factory=_default_gpu_stages,
        description="stages that get the GPU placement (accelerator, node selector, tolerations)",
    )
    enable_caching: bool = Field(True, description="KFP cache for the content-addressed steps (tile, embed)")


class ICMILConfig(_Section):
    """Root config. ``run_dir`` holds every output of one run; relative paths resolve against the CWD."""

    run_dir: Path = Path("runs/demo")
    manifest: str | None = Field(None, description="CSV slide_id,path,label[,split][,mpp]; None: synthesise")
    classes: list[str] | None = Field(None, description="allowed labels in order; None: sorted unique labels")
    seed: int = 0
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    cache_dir: Path | None = Field(None, description="local cache for s3:// slides; None: run_dir/cache")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    mil: MILConfig = Field(default_factory=MILConfig)
    coupling: CouplingConfig = Field(default_factory=CouplingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    def digest(self) -> str:
        """Stable short hash of the resolved config."""
        return text_digest(self.model_dump(mode="json"))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form a.b=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML) and return it."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ICMILConfig:
    """Validate a nested dict into :class:`ICMILConfig`, turning pydantic errors into a ``ConfigError``."""
    try:
        return ICMILConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise ConfigError(f"invalid config {source}: {problems}") from None


def calibrates_initial_encoder(cfg: ICMILConfig) -> bool:
    """Whether round 0's encoder gets its BatchNorm statistics re-estimated on training patches (and so reads
    the tiles): a random init always (``coupling.initial_bn_calibration`` > 0), pretrained weights only with
    ``coupling.calibrate_pretrained_bn``.

    >>> calibrates_initial_encoder(load_config(None, ["encoder.weights=w.safetensors"]))
    False
    """
    pretrained = bool(cfg.encoder.weights or cfg.encoder.pretrained)
    return cfg.coupling.initial_bn_calibration > 0 and (
        not pretrained or cfg.coupling.calibrate_pretrained_bn
    )


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ICMILConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``a.b=c`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, list(overrides))
    return config_from_dict(data, source)


def config_to_yaml(cfg: ICMILConfig, redact: bool = True) -> str:
    """The resolved config as YAML text (all defaults spelled out), credentials redacted.

    Every file, log and MLflow artifact gets the redacted text (``user:password@`` and secret query parameters
    in URIs become ``***``). ``redact=False`` gives the exact text, for passing the config to another process
    (a compiled pipeline refuses configs that hold credentials, so there the two are the same).

    >>> "hunter2" in config_to_yaml(load_config(None, ["tuning.storage=postgresql://u:hunter2@db/o"]))
    False
    """
    data = cfg.model_dump(mode="json")
    if redact:
        from icmil.redact import redact_data

        data = redact_data(data)
    return yaml.safe_dump(data, sort_keys=False)


def config_from_yaml(text: str) -> ICMILConfig:
    """Inverse of :func:`config_to_yaml` (used by pipeline components, which receive the config as a string)."""
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ConfigError("config text must hold a mapping at the top level")
    return config_from_dict(loaded, "<text>")


def dump_config(cfg: ICMILConfig, directory: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output (``directory/config.yaml``) atomically, credentials
    redacted (a config file beside the outputs is read by people and copied around: it must hold no secret)."""
    return write_text_atomic(Path(directory) / name, config_to_yaml(cfg))


# Tunable stage-2 settings (``tuning.coupling_space`` keys); ``beta`` is the confidence exponent of ``mil.head``.
COUPLING_KEYS = ("lr", "weight_decay", "max_steps", "beta")
# MILConfig fields that are not searched as numbers (a head's own settings are searched as heads.<head>.<key>).
NOT_TUNABLE_MIL_KEYS = ("head", "heads")


def _head_setting(name: str) -> tuple[str, str] | None:
    """``(head, setting)`` of a per-head key (``heads.dtfd.pseudo_bags`` or the older ``dtfd_pseudo_bags``)."""
    if name.startswith("heads."):
        _, head, setting = name.split(".")
        return head, setting
    if name in LEGACY_HEAD_KEYS and LEGACY_HEAD_KEYS[name][1] != "weight_decay":
        return LEGACY_HEAD_KEYS[name]
    return None


def _tunable_mil_key(name: str) -> bool:
    if name.startswith("heads."):
        parts = name.split(".")
        return len(parts) == 3 and all(parts)
    return name in LEGACY_HEAD_KEYS or (name in MILConfig.model_fields and name not in NOT_TUNABLE_MIL_KEYS)


def apply_params(cfg: ICMILConfig, params: Mapping[str, Any], target: str = "mil") -> ICMILConfig:
    """A copy of ``cfg`` with tuned ``params`` written into ``cfg.mil`` (or the stage-2 settings), validated.

    This is how ``best_params.json`` reaches the round's training step: ``train_stage(..., params=...)`` calls
    it. Keys: ``mil`` — MILConfig fields or ``heads.<head>.<setting>`` (whether the head has that setting is
    checked when the head is built, and by :func:`icmil.tuning.validate_space`); ``coupling`` —
    :data:`COUPLING_KEYS`, ``beta`` being the confidence exponent of ``mil.head``. Unknown keys and out-of-range
    values raise :class:`ConfigError` naming the key.

    >>> new = apply_params(ICMILConfig(), {"lr": 3e-4, "heads.dtfd.pseudo_bags": 3})
    >>> new.mil.lr, new.mil.heads
    (0.0003, {'dtfd': {'pseudo_bags': 3}})
    """
    if target == "mil":
        bad = sorted(name for name in params if not _tunable_mil_key(name))
        if bad:
            raise ConfigError(
                f"tuned parameters {bad} do not fit the mil section: give MILConfig fields "
                "or heads.<head>.<setting>"
            )
        data = cfg.mil.model_dump()
        for key, value in params.items():
            where = _head_setting(key)
            if where is None:
                data[key] = value
            else:
                head, setting = where
                data["heads"] = {**data["heads"], head: {**data["heads"].get(head, {}), setting: value}}
        try:
            mil = MILConfig.model_validate(data)
        except Exception as err:
            raise ConfigError(f"tuned parameters {dict(params)} do not fit MILConfig: {err}") from None
        return cfg.model_copy(update={"mil": mil})
    if target == "coupling":
        unknown = set(params) - set(COUPLING_KEYS)
        if unknown:
            raise ConfigError(f"tuned parameters {sorted(unknown)} are not stage-2 settings {COUPLING_KEYS}")
        data = cfg.coupling.model_dump()
        for key, value in params.items():
            if key == "beta":
                data["beta"] = {**data["beta"], cfg.mil.head: float(value)}
            else:
                data[key] = value
        try:
            coupling = CouplingConfig.model_validate(data)
        except Exception as err:
            raise ConfigError(f"tuned parameters {dict(params)} do not fit CouplingConfig: {err}") from None
        return cfg.model_copy(update={"coupling": coupling})
    raise ConfigError(f"unknown tuning target {target!r} (mil or coupling)")
