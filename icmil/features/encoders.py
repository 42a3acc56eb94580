"""Patch encoders: a small registry over timm, one wrapper that takes uint8 patches and normalises on the device.

Every encoder is a :class:`PatchEncoder`: ``forward`` takes **uint8** ``(B, 3, H, W)`` (or float in [0, 1]),
normalises inside the module (so patches travel to the GPU as bytes, 4x less than float32), and returns
``(B, out_dim)``. All layers are trainable and the state dict round-trips through :func:`save_encoder` /
:func:`load_encoder`, because the coupling stage deep-copies an encoder and fine-tunes all of it.

Names: a preset (:mod:`icmil.features.presets`: ``resnet50_trunc`` — ResNet-50 cut after ``layer3`` + global
average pooling, 1024-d, the CLAM / DTFD / TransMIL / ICMIL baseline — and the pathology foundation models UNI,
UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath, Phikon-v2), ``tiny_cnn`` (a small fast CNN for demos and tests),
or any timm model name (``num_classes=0``, the model's own global pooling). Weights: :mod:`icmil.features.weights`.

Example:
    >>> import torch
    >>> from icmil.config import EncoderConfig
    >>> enc = create_encoder(EncoderConfig(name="tiny_cnn"))  # random init: warns loudly
    >>> enc(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, enc.out_dim)
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from icmil.config import EncoderConfig
from icmil.errors import ConfigError
from icmil.features.presets import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, EncoderPreset, get_preset
from icmil.features.weights import (
    HubSource,
    convert_checkpoint,
    preset_hub_source,
    read_state_file,
    resample_position_embeddings,
    resolve_weights,
    timm_hub_source,
)
from icmil.io import atomic_path, write_json_atomic
from icmil.log import get_logger

log = get_logger("encoders")

ENCODER_FORMAT = "icmil-encoder/1"

# A builder turns the config into (backbone, out_dim). The backbone maps a normalised float batch
# (B, 3, H, W) to (B, out_dim); it starts randomly initialised (weights are loaded afterwards in one place).
EncoderBuilder = Callable[[EncoderConfig], tuple[nn.Module, int]]
_REGISTRY: dict[str, EncoderBuilder] = {}


class RandomWeightsWarning(UserWarning):
    """The encoder has random weights: its features carry no ImageNet knowledge."""


def register_encoder(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator: register ``builder(cfg) -> (backbone, out_dim)`` under ``name``.

    >>> @register_encoder("my_identity_pool")
    ... def _build(cfg):
    ...     return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 3
    >>> "my_identity_pool" in list_encoders()
    True
    """

    def decorator(builder: EncoderBuilder) -> EncoderBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ConfigError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_encoders() -> list[str]:
    """Names registered here (presets — :func:`icmil.features.presets.list_presets` — and any timm model name
    are accepted by :func:`create_encoder` as well)."""
    return sorted(_REGISTRY)


class PatchEncoder(nn.Module):
    """uint8 patches in, one feature vector per patch out; normalisation happens inside, on the device.

    ``normalization`` names a mean/std pair (``imagenet``, ``hoptimus``, … — see
    :data:`icmil.features.presets.NORMALIZATIONS`) or ``none``. With ``input_size`` set, patches of another size
    are resized to it (``interpolation``) after normalisation, as the model was trained at that size. Name,
    normalisation and input size are part of :meth:`digest`, so features from differently prepared inputs are
    never mistaken for each other.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int,
        name: str,
        normalization: str = "imagenet",
        input_size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        if normalization != "none" and normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"encoder.normalization must be one of {['auto', *sorted(NORMALIZATIONS), 'none']}, "
                f"got {normalization!r}"
            )
        if interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.name = name
        self.normalization = normalization
        self.input_size = int(input_size) if input_size else None
        self.interpolation = interpolation
        self.weights_source: dict[str, Any] | None = None  # provenance, written to config.json
        mean, std = NORMALIZATIONS.get(normalization, (IMAGENET_MEAN, IMAGENET_STD))
        # Non-persistent: constants, not weights; they stay out of the state dict and the weights file.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] -> the float input the backbone expects.

        One fused multiply-add per element (``x * scale + shift``, the /255 folded into ``scale``): on a busy
        CPU the naive ``(x / 255 - mean) / std`` costs as much as a small encoder's first layer.
        """
        if x.dtype == torch.uint8:
            x, unit = x.float(), 255.0
        elif x.is_floating_point():
            unit = 1.0
        else:
            raise TypeError(f"PatchEncoder expects uint8 or float patches, got {x.dtype}")
        if self.normalization != "none":
            mean, std = cast(torch.Tensor, self.mean).to(x.dtype), cast(torch.Tensor, self.std).to(x.dtype)
            return torch.addcmul(-mean / std, x, 1.0 / (unit * std))
        return x * (1.0 / unit) if unit != 1.0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"PatchEncoder expects (B, 3, H, W) patches, got shape {tuple(x.shape)}")
        x = self.normalize(x)
        size = self.input_size
        if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
            x = F.interpolate(
                x, size=(size, size), mode=self.interpolation, align_corners=False, antialias=True
            )
        return cast(torch.Tensor, self.backbone(x))

    def config(self) -> dict[str, Any]:
        """What :func:`load_encoder` needs to rebuild the architecture (weights come from the file)."""
        out: dict[str, Any] = {
            "format": ENCODER_FORMAT,
            "name": self.name,
            "normalization": self.normalization,
            "out_dim": self.out_dim,
        }
        if self.input_size is not None:
            out |= {"input_size": self.input_size, "interpolation": self.interpolation}
        if self.weights_source:
            out["weights"] = dict(self.weights_source)
        return out

    def digest(self) -> str:
        """Short SHA-256 of name + normalisation (+ input size) + every tensor of the state dict (weights and
        BN statistics).

        Recomputed on each call (a few ms for ResNet-50 up to layer 3) because fine-tuning changes weights.
        Encoders without resizing and with ImageNet / no normalisation hash exactly as they always did, so
        features made before presets existed keep their digests.
        """
        h = hashlib.sha256()
        ident: list[Any] = [self.name, self.normalization, self.out_dim]
        if self.input_size is not None or self.normalization not in ("imagenet", "none"):
            mean, std = NORMALIZATIONS.get(self.normalization, (None, None))
            ident += [self.input_size, self.interpolation, mean, std]
        h.update(json.dumps(ident).encode())
        for key, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        size = f", input_size={self.input_size}" if self.input_size is not None else ""
        return f"name={self.name!r}, out_dim={self.out_dim}, normalization={self.normalization!r}{size}"


# --------------------------------------------------------------------------- registered encoders


@register_encoder("resnet50_trunc")
def _resnet50_trunc(cfg: EncoderConfig) -> tuple[nn.Module, int]:
    """ResNet-50 up to ``layer3`` (stride 16, 1024 channels) + global average pooling: the CLAM baseline."""
    import timm

    # features_only with out_indices=(3,) keeps conv1..layer3 and drops layer4 / fc entirely (no dead weights),
    # and its module names match timm's resnet50, so full resnet50 checkpoints load with layer4/fc ignored.
    trunk = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
    out_dim = int(cast(Any, trunk).feature_info.channels()[-1])
    return _TrunkPool(trunk), out_dim


class _TrunkPool(nn.Module):
    """A timm ``features_only`` trunk (returns a list of maps) followed by global average pooling."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(x)[-1]
        return fmap.mean(dim=(2, 3))


@register_encoder("tiny_cnn")
def _tiny_cnn(cfg: EncoderConfig) -> tuple[nn.Module, int]:
    """Four strided conv blocks -> GAP -> 128-d: ~20 MMAC per 256-px patch, hundreds of patches/s on a CPU."""

    def block(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    net = nn.Sequential(
        block(3, 16, 5, 4),
        block(16, 32, 3, 2),
        block(32, 64, 3, 2),
        block(64, 128, 3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, 128


class _PresetBackbone(nn.Module):
    """A preset's timm model (``backbone.model.*``: the official keys one level down) and its pooling."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.pooling == "cls_mean_patch":  # tokens (B, N, D): class token ++ mean of the patch tokens
            n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
            return torch.cat([out[:, 0], out[:, n_prefix:].mean(dim=1)], dim=-1)
        return cast(torch.Tensor, out)


def timm_kwargs(preset: EncoderPreset) -> dict[str, Any]:
    """The preset's timm keyword arguments with layer names (``swiglu_packed``, ``silu``) resolved to classes."""
    import timm.layers

    classes = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    out = dict(preset.timm_kwargs)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(out.get(key), str):
            if out[key] not in classes:
                raise ConfigError(
                    f"preset {preset.name!r}: unknown {key} {out[key]!r} (known: {sorted(classes)})"
                )
            out[key] = classes[out[key]]
    return out


def build_preset_backbone(preset: EncoderPreset, **overrides: Any) -> tuple[nn.Module, int]:
    """The preset's architecture with random weights (``overrides`` change timm arguments, e.g. ``depth=2`` in
    tests). Raises :class:`ConfigError` when the built model's output size is not the preset's ``out_dim``."""
    import timm

    if preset.architecture == "registered":
        return _REGISTRY[preset.name](EncoderConfig(name=preset.name))
    model = timm.create_model(preset.architecture, pretrained=False, **(timm_kwargs(preset) | overrides))
    width = int(cast(Any, model).num_features)
    out_dim = 2 * width if preset.pooling == "cls_mean_patch" else width
    if out_dim != preset.out_dim:
        raise ConfigError(
            f"preset {preset.name!r}: {preset.architecture} with these arguments gives {out_dim}-d features, "
            f"the preset says {preset.out_dim}"
        )
    return _PresetBackbone(model, preset.pooling), out_dim


def _timm_model(cfg: EncoderConfig) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(cfg.name):
        raise ConfigError(
            f"encoder.name {cfg.name!r} is neither a preset (`icmil encoders` lists them), a registered encoder "
            f"{list_encoders()} nor a timm model (see timm.list_models())"
        )
    model = _create_timm(cfg.name)
    return model, int(cast(Any, model).num_features)


def _create_timm(name: str) -> nn.Module:
    """A timm model without classifier; ViT-style models get ``dynamic_img_size`` so 256-px patches work with
    224-px position embeddings (interpolated on the fly), as pathology ViT encoders are used."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # CNNs do not take the argument (and accept any input size anyway)
        return timm.create_model(name, pretrained=False, num_classes=0)


# --------------------------------------------------------------------------- creation and weights


def _resolve(cfg: EncoderConfig) -> tuple[str, EncoderPreset | None, EncoderBuilder]:
    """(canonical name, preset or None, builder) for ``cfg.name``."""
    preset = get_preset(cfg.name)
    if preset is not None and preset.architecture == "registered":
        return preset.name, preset, _REGISTRY[preset.name]
    if preset is not None:
        return preset.name, preset, lambda _cfg: build_preset_backbone(preset)
    return cfg.name, None, _REGISTRY.get(cfg.name, _timm_model)


def _hub_source(name: str, preset: EncoderPreset | None) -> HubSource | None:
    if preset is not None:
        return preset_hub_source(preset)
    if name in _REGISTRY:
        return None  # tiny_cnn & co: no published weights
    return timm_hub_source(name)


def _build(cfg: EncoderConfig, *, on_meta: bool) -> PatchEncoder:
    """The encoder of ``cfg`` without weights: seeded random init, or on the meta device (no memory, no init
    time) when weights are about to be assigned from a file."""
    name, preset, builder = _resolve(cfg)
    normalization = cfg.normalization
    if normalization == "auto":
        normalization = preset.normalization if preset is not None else "imagenet"
    input_size = cfg.input_size if cfg.input_size is not None else (preset.input_size if preset else None)
    interpolation = preset.interpolation if preset is not None else "bilinear"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if on_meta:
            with torch.device("meta"):
                backbone, out_dim = builder(cfg)
        else:
            backbone, out_dim = builder(cfg)
    return PatchEncoder(backbone, out_dim, name, normalization, input_size, interpolation)


def create_encoder(cfg: EncoderConfig, *, quiet_random: bool = False) -> PatchEncoder:
    """Build the encoder named in ``cfg`` (a preset, a registered name or a timm model) with its weights from
    ``cfg.weights`` (a local file or folder), the local hub cache (``cfg.pretrained``; downloaded only with
    ``cfg.allow_download``), or — with a loud :class:`RandomWeightsWarning` — random init seeded by ``cfg.seed``
    (so two processes build the same random encoder and features stay cacheable).

    >>> enc = create_encoder(EncoderConfig(name="tiny_cnn", normalization="none"), quiet_random=True)
    >>> enc.name, enc.out_dim
    ('tiny_cnn', 128)
    """
    name, preset, _ = _resolve(cfg)
    source = resolve_weights(cfg, _hub_source(name, preset))
    if source is None:
        encoder = _build(cfg, on_meta=False)
        if not quiet_random:
            message = (
                f"encoder {name!r} has RANDOM weights: its features carry no pretrained knowledge. "
                "Set encoder.weights to a local .safetensors/.pth file (or encoder.pretrained=true with the "
                "weights in the local hub cache) for real use."
            )
            warnings.warn(message, RandomWeightsWarning, stacklevel=2)
            log.warning(message)
        return encoder
    encoder = _build(cfg, on_meta=True)
    load_weights_file(encoder, source.path, sha256=cfg.sha256, preset=preset)
    encoder.weights_source = {"path": str(source.path), "origin": source.origin, "repo": source.repo} | (
        {"sha256": cfg.sha256} if cfg.sha256 else {}
    )
    log.info("encoder %s: weights from %s", name, source.describe())
    return encoder


def _strip_prefixes(state: Mapping[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto ours: our own layout, a bare trunk's / timm model's keys, DataParallel
    (``module.``) and wrapper (``model.``) prefixes. A key that already matches is never rewritten."""
    out: dict[str, torch.Tensor] = {}
    ours = ("", "backbone.", "backbone.trunk.", "backbone.model.")
    wrappers = ("module.", "model.", "state_dict.")
    for key, value in state.items():
        variants = [key] + [key[len(w) :] for w in wrappers if key.startswith(w)]
        hit = next((p + v for v in variants for p in ours if p + v in wanted), None)
        if hit is not None:
            out[hit] = value
    return out


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def load_weights_file(
    encoder: PatchEncoder,
    path: str | os.PathLike[str],
    sha256: str | None = None,
    preset: EncoderPreset | None = None,
) -> PatchEncoder:
    """Load a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict into ``encoder`` (in place).

    Keys may be ours (``backbone.…``), a bare trunk's or timm model's (every preset's official layout; for
    ``resnet50_trunc`` full timm/torchvision ResNet-50 files with ``layer4``/``fc`` ignored), or Hugging Face
    ``Dinov2Model``'s (converted). Every weight of the encoder must be found, else ``ConfigError``. An encoder
    built on the meta device gets the file's tensors assigned (no second copy in memory).
    """
    p = Path(path)
    raw = convert_checkpoint(read_state_file(p, sha256=sha256))
    own = encoder.state_dict()
    mapped = _strip_prefixes(raw, set(own))
    expected = (
        f"; {encoder.name} expects the official {preset.hf_repo} file ({' or '.join(preset.weight_files)})"
        if preset is not None and preset.hf_repo
        else ""
    )
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ConfigError(
            f"encoder.weights {p} does not fit encoder {encoder.name!r}: {len(missing)} missing key(s), "
            f"e.g. {missing[:5]}; file keys look like {sorted(raw)[:5]}{expected}"
        )
    resample_position_embeddings(mapped, own, encoder.backbone)
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(
            f"encoder.weights {p} does not fit encoder {encoder.name!r}: shape mismatch for {bad[:5]} "
            f"(file {tuple(mapped[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}){expected}"
        )
    ignored = len(raw) - len(mapped)
    if ignored:
        log.info(
            "encoder weights %s: ignored %d key(s) the %s encoder does not use", p, ignored, encoder.name
        )
    mapped = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in mapped.items()}
    on_meta = _is_meta(encoder)
    encoder.load_state_dict(mapped, strict=True, assign=on_meta)
    if _is_meta(encoder):  # a non-persistent buffer the file cannot fill: should not happen with our builders
        raise ConfigError(f"encoder {encoder.name!r}: some tensors were not filled from {p}")
    return encoder


def save_encoder(
    encoder: PatchEncoder, out_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``out_dir/weights.safetensors`` and ``out_dir/config.json`` (written last: it marks completeness).

    >>> import tempfile
    >>> enc = create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)
    >>> d = save_encoder(enc, tempfile.mkdtemp())
    >>> load_encoder(d).digest() == enc.digest()
    True
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone detaches from the live (maybe training) model.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    with atomic_path(out / "weights.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": ENCODER_FORMAT, "name": encoder.name})
    config = encoder.config() | {"digest": encoder.digest()} | dict(extra or {})
    write_json_atomic(out / "config.json", config)
    return out


def load_encoder(directory: str | os.PathLike[str]) -> PatchEncoder:
    """Rebuild an encoder saved by :func:`save_encoder` (architecture from config.json, weights strict)."""
    d = Path(directory)
    cfg_path, weights_path = d / "config.json", d / "weights.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"{d} is not a saved encoder: expected config.json and weights.safetensors")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path} is not valid JSON ({err}): the saved encoder is damaged") from None
    if meta.get("format") != ENCODER_FORMAT:
        raise ConfigError(
            f"{cfg_path}: unknown encoder format {meta.get('format')!r} (expected {ENCODER_FORMAT})"
        )
    settings: dict[str, Any] = {"name": meta["name"], "normalization": meta["normalization"]}
    if meta.get("input_size") is not None:
        settings["input_size"] = meta["input_size"]
    encoder = _build(EncoderConfig.model_validate(settings), on_meta=True)
    state = read_state_file(weights_path, what="saved encoder weights")
    own = encoder.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        raise ConfigError(
            f"{weights_path} does not match encoder {meta['name']!r} ({cfg_path}): {len(missing)} missing, "
            f"{len(extra)} unexpected and {len(bad)} mis-shaped tensor(s), e.g. {(missing + extra + bad)[:3]}"
        )
    encoder.load_state_dict(state, strict=True, assign=True)
    if meta.get("out_dim") not in (None, encoder.out_dim):
        raise ConfigError(f"{cfg_path}: out_dim {meta['out_dim']} but the model gives {encoder.out_dim}")
    encoder.weights_source = meta.get("weights")
    return encoder
