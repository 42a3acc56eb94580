"""Patch encoders: a small registry over timm, one wrapper that takes uint8 patches and normalises on the device.

Every encoder is a :class:`PatchEncoder`: ``forward`` takes **uint8** ``(B, 3, H, W)`` (or float in [0, 1]),
normalises inside the module (so patches travel to the GPU as bytes, 4x less than float32), and returns
``(B, out_dim)``. All layers are trainable and the state dict round-trips through :func:`save_encoder` /
:func:`load_encoder`, because the coupling stage deep-copies an encoder and fine-tunes all of it.

Names: ``resnet50_trunc`` (ResNet-50 cut after ``layer3`` + global average pooling, 1024-d: the CLAM / DTFD /
TransMIL / ICMIL baseline), ``tiny_cnn`` (a small fast CNN for demos and tests), or any timm model name
(``num_classes=0``, the model's own global pooling).

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
from torch import nn

from icmil.config import EncoderConfig
from icmil.errors import ConfigError
from icmil.io import atomic_path, write_json_atomic
from icmil.log import get_logger

log = get_logger("encoders")

ENCODER_FORMAT = "icmil-encoder/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    """Names registered here (any timm model name is accepted by :func:`create_encoder` as well)."""
    return sorted(_REGISTRY)


class PatchEncoder(nn.Module):
    """uint8 patches in, one feature vector per patch out; normalisation happens inside, on the device.

    ``name`` and ``normalization`` are part of :meth:`digest`, so features from differently normalised
    encoders are never mistaken for each other.
    """

    def __init__(self, backbone: nn.Module, out_dim: int, name: str, normalization: str = "imagenet") -> None:
        super().__init__()
        if normalization not in ("imagenet", "none"):
            raise ConfigError(f"encoder.normalization must be 'imagenet' or 'none', got {normalization!r}")
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.name = name
        self.normalization = normalization
        # Non-persistent: constants, not weights; they stay out of the state dict and the weights file.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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
        if self.normalization == "imagenet":
            mean, std = cast(torch.Tensor, self.mean).to(x.dtype), cast(torch.Tensor, self.std).to(x.dtype)
            return torch.addcmul(-mean / std, x, 1.0 / (unit * std))
        return x * (1.0 / unit) if unit != 1.0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"PatchEncoder expects (B, 3, H, W) patches, got shape {tuple(x.shape)}")
        return self.backbone(self.normalize(x))

    def config(self) -> dict[str, Any]:
        """What :func:`load_encoder` needs to rebuild the architecture (weights come from the file)."""
        return {
            "format": ENCODER_FORMAT,
            "name": self.name,
            "normalization": self.normalization,
            "out_dim": self.out_dim,
        }

    def digest(self) -> str:
        """Short SHA-256 of name + normalisation + every tensor of the state dict (weights and BN statistics).

        Recomputed on each call (a few ms for ResNet-50 up to layer 3) because fine-tuning changes weights.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.normalization, self.out_dim]).encode())
        for key, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_dim={self.out_dim}, normalization={self.normalization!r}"


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


def _timm_model(cfg: EncoderConfig) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(cfg.name):
        raise ConfigError(
            f"encoder.name {cfg.name!r} is neither a registered encoder {list_encoders()} nor a timm model "
            "(see timm.list_models())"
        )
    model = _create_timm(cfg.name, pretrained=False)
    return model, int(cast(Any, model).num_features)


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    """A timm model without classifier; ViT-style models get ``dynamic_img_size`` so 256-px patches work with
    224-px position embeddings (interpolated on the fly), as pathology ViT encoders are used."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    except TypeError:  # CNNs do not take the argument (and accept any input size anyway)
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


# --------------------------------------------------------------------------- creation and weights


def create_encoder(cfg: EncoderConfig, *, quiet_random: bool = False) -> PatchEncoder:
    """Build the encoder named in ``cfg``; weights from ``cfg.weights`` (local file), the timm hub
    (``cfg.pretrained``, needs internet) or — with a loud :class:`RandomWeightsWarning` — random init seeded by
    ``cfg.seed`` (so two processes build the same random encoder and features stay cacheable).

    >>> enc = create_encoder(EncoderConfig(name="tiny_cnn", normalization="none"), quiet_random=True)
    >>> enc.name, enc.out_dim
    ('tiny_cnn', 128)
    """
    if cfg.weights and cfg.pretrained:
        raise ConfigError("set either encoder.weights (a local file) or encoder.pretrained=true, not both")
    builder = _REGISTRY.get(cfg.name, _timm_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone, out_dim = builder(cfg)
    encoder = PatchEncoder(backbone, out_dim, cfg.name, cfg.normalization)
    if cfg.weights:
        load_weights_file(encoder, cfg.weights)
    elif cfg.pretrained:
        _load_hub_weights(encoder, cfg)
    elif not quiet_random:
        message = (
            f"encoder {cfg.name!r} has RANDOM weights: its features carry no pretrained knowledge. "
            "Set encoder.weights to a local .safetensors/.pth file for real use."
        )
        warnings.warn(message, RandomWeightsWarning, stacklevel=2)
        log.warning(message)
    return encoder


def _strip_prefixes(state: Mapping[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto ours: our own layout, a bare trunk's / timm model's keys, DataParallel
    (``module.``) and wrapper (``model.``) prefixes. A key that already matches is never rewritten."""
    out: dict[str, torch.Tensor] = {}
    ours = ("", "backbone.", "backbone.trunk.")
    wrappers = ("module.", "model.", "state_dict.")
    for key, value in state.items():
        variants = [key] + [key[len(w) :] for w in wrappers if key.startswith(w)]
        hit = next((p + v for v in variants for p in ours if p + v in wanted), None)
        if hit is not None:
            out[hit] = value
    return out


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"encoder.weights {path} could not be loaded safely with torch.load(weights_only=True): {err}. "
            "Only plain tensor state dicts are accepted (never pickled code); convert it to .safetensors."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"encoder.weights {path} does not hold a state dict of tensors")
    return dict(obj)


def load_weights_file(encoder: PatchEncoder, path: str | os.PathLike[str]) -> PatchEncoder:
    """Load a local ``.safetensors`` or ``.pth``/``.pt`` state dict into ``encoder`` (in place).

    Keys may be ours (``backbone.…``), a bare trunk's, or a full timm/torchvision ResNet-50's (``layer4``/``fc``
    are ignored for ``resnet50_trunc``). Every weight of the encoder must be found, else ``ConfigError``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"encoder.weights file not found: {p}")
    raw = _read_state_file(p)
    own = encoder.state_dict()
    mapped = _strip_prefixes(raw, set(own))
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ConfigError(
            f"encoder.weights {p} does not fit encoder {encoder.name!r}: {len(missing)} missing key(s), "
            f"e.g. {missing[:5]}; file keys look like {sorted(raw)[:5]}"
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(
            f"encoder.weights {p}: shape mismatch for {bad[:5]} "
            f"(file {tuple(mapped[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)})"
        )
    ignored = len(raw) - len(mapped)
    if ignored:
        log.info(
            "encoder weights %s: ignored %d key(s) the %s encoder does not use", p, ignored, encoder.name
        )
    encoder.load_state_dict(mapped, strict=True)
    return encoder


def _load_hub_weights(encoder: PatchEncoder, cfg: EncoderConfig) -> None:

    # resnet50_trunc takes its weights from timm's resnet50 (layer4/fc are dropped by the key mapping).
    hub_name = "resnet50" if cfg.name == "resnet50_trunc" else cfg.name
    if cfg.name in _REGISTRY and cfg.name != "resnet50_trunc":
        raise ConfigError(f"encoder {cfg.name!r} has no pretrained hub weights; set encoder.pretrained=false")
    try:
        model = _create_timm(hub_name, pretrained=True)
    except Exception as err:
        raise ConfigError(
            f"could not download pretrained weights for {hub_name!r} from the timm/Hugging Face hub "
            f"(this needs internet access): {type(err).__name__}: {err}. Offline, download the weights elsewhere "
            "and set encoder.weights to the local .safetensors/.pth file (and encoder.pretrained=false)."
        ) from None
    own = encoder.state_dict()
    mapped = _strip_prefixes(model.state_dict(), set(own))
    encoder.load_state_dict(mapped, strict=True)


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
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, weights_path = d / "config.json", d / "weights.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"{d} is not a saved encoder: expected config.json and weights.safetensors")
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    if meta.get("format") != ENCODER_FORMAT:
        raise ConfigError(
            f"{cfg_path}: unknown encoder format {meta.get('format')!r} (expected {ENCODER_FORMAT})"
        )
    encoder = create_encoder(
        EncoderConfig.model_validate({"name": meta["name"], "normalization": meta["normalization"]}),
        quiet_random=True,
    )
    state = load_file(str(weights_path))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{weights_path} does not match encoder {meta['name']!r}: {err}") from None
    if meta.get("out_dim") not in (None, encoder.out_dim):
        raise ConfigError(f"{cfg_path}: out_dim {meta['out_dim']} but the model gives {encoder.out_dim}")
    return encoder
