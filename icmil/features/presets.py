"""Named encoder presets: the pathology foundation models labs bring as local weight files.

A preset pins everything needed to use a published encoder exactly as its authors do: the timm architecture
and keyword arguments (the ones its official checkpoint loads into with ``strict=True``), how the output
vector is pooled, the normalisation mean/std, the input size and interpolation, the native µm/px, the output
dimension, the licence and access conditions, where the official weights live on the Hugging Face hub and in
which key layout. Weights are never downloaded unless the config says so (:mod:`icmil.features.weights`).

``encoder.name`` accepts a preset name or an alias (case and ``-``/``_`` ignored: ``UNI2-h``, ``uni2_h``).
Labs add their own with :func:`register_preset`.

Example:
    >>> p = get_preset("Virchow2")
    >>> p.name, p.out_dim, p.input_size, p.mpp, p.normalization
    ('virchow2', 2560, 224, 0.5, 'imagenet')
    >>> get_preset("H-optimus-0").mean
    (0.707223, 0.578729, 0.703617)
    >>> get_preset("no_such_model") is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from icmil.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0/1 were trained with their own statistics (the model's config.json on the hub).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# name -> (mean, std). "none" (no normalisation) is handled by the encoder itself.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "hoptimus": (HOPTIMUS_MEAN, HOPTIMUS_STD),
}

# Layouts the weights loader understands: "timm" (timm's own state-dict keys; torchvision ResNet keys are the
# same) and "hf_dinov2" (Hugging Face transformers ``Dinov2Model``: separate query/key/value, ``embeddings.*``).
CheckpointLayout = Literal["timm", "hf_dinov2"]
# "model": the timm model's own pooling (class token for ViTs); "cls_mean_patch": class token concatenated with
# the mean of the patch tokens (register tokens excluded), Virchow's official embedding.
Pooling = Literal["model", "cls_mean_patch"]


@dataclass(frozen=True)
class EncoderPreset:
    """Everything that defines one published patch encoder (see the module docstring)."""

    name: str
    title: str
    architecture: str  # timm model name; "registered" builders (resnet50_trunc) use their own code
    timm_kwargs: Mapping[str, Any]  # JSON-like; "mlp_layer": "swiglu_packed", "act_layer": "silu" by name
    out_dim: int
    normalization: str  # a key of NORMALIZATIONS
    input_size: int | None  # patches are resized to this (None: any size, no resize)
    mpp: float  # native µm/px of the training tiles
    hf_repo: str | None  # where the official weights live on the Hugging Face hub
    weight_files: tuple[str, ...]  # official file names in that repo, preferred first
    checkpoint_layout: CheckpointLayout
    licence: str
    gated: bool
    params_m: float  # parameter count in millions (model card / paper), without any classifier
    pooling: Pooling = "model"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    aliases: tuple[str, ...] = ()
    notes: str = ""
    # A few keys of the official checkpoint with their shapes: documents the layout, checked by the tests.
    checkpoint_keys: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][1]

    def summary(self) -> dict[str, Any]:
        """The preset as plain data (what ``icmil encoders --json`` prints)."""
        return {
            "name": self.name,
            "title": self.title,
            "architecture": self.architecture,
            "timm_kwargs": dict(self.timm_kwargs),
            "out_dim": self.out_dim,
            "pooling": self.pooling,
            "normalization": self.normalization,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "mpp": self.mpp,
            "hf_repo": self.hf_repo,
            "weight_files": list(self.weight_files),
            "checkpoint_layout": self.checkpoint_layout,
            "licence": self.licence,
            "gated": self.gated,
            "params_m": self.params_m,
            "notes": self.notes,
        }


_PRESETS: dict[str, EncoderPreset] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register_preset(preset: EncoderPreset) -> EncoderPreset:
    """Add a preset (and its aliases) to the table ``encoder.name`` is looked up in.

    >>> from dataclasses import replace
    >>> mine = register_preset(replace(get_preset("uni"), name="uni_lab_finetuned", aliases=()))
    >>> get_preset("UNI-lab-finetuned").name
    'uni_lab_finetuned'
    """
    if preset.normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"preset {preset.name!r}: unknown normalization {preset.normalization!r} "
            f"(known: {sorted(NORMALIZATIONS)}; add yours to icmil.features.presets.NORMALIZATIONS)"
        )
    for key in (preset.name, *preset.aliases):
        held = _PRESETS.get(_key(key))
        if held is not None and held.name != preset.name:
            raise ConfigError(f"encoder preset name {key!r} is already taken by {held.name!r}")
        _PRESETS[_key(key)] = preset
    return preset


def get_preset(name: str) -> EncoderPreset | None:
    """The preset called ``name`` (or one of its aliases), or None."""
    return _PRESETS.get(_key(name))


def list_presets() -> list[EncoderPreset]:
    """Every preset once, in table order."""
    seen: dict[str, EncoderPreset] = {}
    for preset in _PRESETS.values():
        seen.setdefault(preset.name, preset)
    return list(seen.values())


# --------------------------------------------------------------------------- the table
# Sources: each model's Hugging Face card and config.json, and the timm keyword arguments under which their
# official checkpoints load with strict=True. Parameter counts as printed on the cards / in the papers.

_VIT_L16 = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}

register_preset(
    EncoderPreset(
        name="resnet50_trunc",
        title="ResNet-50 (ImageNet) to layer 3 + average pooling — the CLAM / DTFD / ICMIL baseline",
        architecture="registered",
        timm_kwargs={"model": "resnet50", "features_only": True, "out_indices": [3]},
        out_dim=1024,
        normalization="imagenet",
        input_size=None,
        mpp=0.5,
        hf_repo="timm/resnet50.a1_in1k",
        weight_files=("model.safetensors", "pytorch_model.bin"),
        checkpoint_layout="timm",
        licence="Apache-2.0 (timm ImageNet weights); not gated",
        gated=False,
        params_m=8.54,
        notes="full torchvision/timm ResNet-50 checkpoints load (layer4 and fc are ignored); any patch size",
        checkpoint_keys={"conv1.weight": (64, 3, 7, 7), "layer3.5.bn3.running_var": (1024,)},
    )
)
register_preset(
    EncoderPreset(
        name="uni",
        title="UNI (Mahmood Lab), ViT-L/16",
        architecture="vit_large_patch16_224",
        timm_kwargs=_VIT_L16,
        out_dim=1024,
        normalization="imagenet",
        input_size=224,
        mpp=0.5,
        hf_repo="MahmoodLab/UNI",
        weight_files=("pytorch_model.bin",),
        checkpoint_layout="timm",
        licence="CC-BY-NC-ND-4.0, non-commercial research only; gated (request access on Hugging Face)",
        gated=True,
        params_m=303.4,
        aliases=("uni_v1", "uni1"),
        checkpoint_keys={"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,)},
    )
)
register_preset(
    EncoderPreset(
        name="uni2_h",
        title="UNI2-h (Mahmood Lab), ViT-H/14 with 8 register tokens, SwiGLU",
        architecture="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        out_dim=1536,
        normalization="imagenet",
        input_size=224,
        mpp=0.5,
        hf_repo="MahmoodLab/UNI2-h",
        weight_files=("pytorch_model.bin",),
        checkpoint_layout="timm",
        licence="CC-BY-NC-ND-4.0, non-commercial research only; gated (request access on Hugging Face)",
        gated=True,
        params_m=681.0,
        aliases=("uni2", "uni_v2"),
        checkpoint_keys={
            "reg_token": (1, 8, 1536),
            "pos_embed": (1, 256, 1536),
            "blocks.0.mlp.fc1.weight": (8192, 1536),
            "blocks.0.mlp.fc2.weight": (1536, 4096),
        },
    )
)
register_preset(
    EncoderPreset(
        name="virchow2",
        title="Virchow2 (Paige), ViT-H/14 with 4 register tokens, SwiGLU; class token + mean patch token",
        architecture="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        out_dim=2560,
        pooling="cls_mean_patch",
        normalization="imagenet",
        input_size=224,
        interpolation="bicubic",
        mpp=0.5,
        hf_repo="paige-ai/Virchow2",
        weight_files=("model.safetensors", "pytorch_model.bin"),
        checkpoint_layout="timm",
        licence="CC-BY-NC-ND-4.0, non-commercial research only; gated (request access on Hugging Face)",
        gated=True,
        params_m=631.2,
        notes="trained on tiles at 5x, 10x, 20x and 40x; 0.5 µm/px (20x) is the usual choice. The embedding is "
        "the class token (1280) concatenated with the mean of the 256 patch tokens (1280), as on the model card",
        checkpoint_keys={
            "reg_token": (1, 4, 1280),
            "pos_embed": (1, 261, 1280),
            "blocks.31.mlp.fc1.weight": (6832, 1280),
        },
    )
)
_HOPTIMUS_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "global_pool": "token",
    "dynamic_img_size": True,
}
_HOPTIMUS_KEYS = {
    "reg_token": (1, 4, 1536),
    "pos_embed": (1, 256, 1536),
    "blocks.39.mlp.fc1.weight": (8192, 1536),
}
register_preset(
    EncoderPreset(
        name="h_optimus_0",
        title="H-optimus-0 (Bioptimus), ViT-g/14 with 4 register tokens",
        architecture="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_HOPTIMUS_KWARGS,
        out_dim=1536,
        normalization="hoptimus",
        input_size=224,
        interpolation="bicubic",
        mpp=0.5,
        hf_repo="bioptimus/H-optimus-0",
        weight_files=("model.safetensors", "pytorch_model.bin"),
        checkpoint_layout="timm",
        licence="Apache-2.0; Hugging Face may ask you to accept the access conditions",
        gated=True,
        params_m=1134.8,
        aliases=("hoptimus0",),
        notes="its own normalisation (not ImageNet's)",
        checkpoint_keys=_HOPTIMUS_KEYS,
    )
)
register_preset(
    EncoderPreset(
        name="h_optimus_1",
        title="H-optimus-1 (Bioptimus), ViT-g/14 with 4 register tokens",
        architecture="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_HOPTIMUS_KWARGS,
        out_dim=1536,
        normalization="hoptimus",
        input_size=224,
        interpolation="bicubic",
        mpp=0.5,
        hf_repo="bioptimus/H-optimus-1",
        weight_files=("model.safetensors", "pytorch_model.bin"),
        checkpoint_layout="timm",
        licence="Bioptimus licence, academic research only; gated (access request reviewed by Bioptimus)",
        gated=True,
        params_m=1134.8,
        aliases=("hoptimus1",),
        notes="same architecture and normalisation as H-optimus-0",
        checkpoint_keys=_HOPTIMUS_KEYS,
    )
)
register_preset(
    EncoderPreset(
        name="prov_gigapath",
        title="Prov-GigaPath tile encoder (Providence / Microsoft), ViT-g with 16-px patches",
        architecture="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        out_dim=1536,
        normalization="imagenet",
        input_size=224,
        interpolation="bicubic",
        mpp=0.5,
        hf_repo="prov-gigapath/prov-gigapath",
        weight_files=("pytorch_model.bin",),
        checkpoint_layout="timm",
        licence="Apache-2.0, research use only (not for clinical use); gated (accept the conditions on Hugging Face)",
        gated=True,
        params_m=1134.9,
        aliases=("gigapath",),
        notes="the official transform resizes 256-px tiles to 256 and centre-crops 224; here the whole tile is "
        "resized to 224",
        checkpoint_keys={"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16)},
    )
)
register_preset(
    EncoderPreset(
        name="phikon_v2",
        title="Phikon-v2 (Owkin), ViT-L/16 trained with DINOv2",
        architecture="vit_large_patch16_224",
        timm_kwargs=_VIT_L16,
        out_dim=1024,
        normalization="imagenet",
        input_size=224,
        mpp=0.5,
        hf_repo="owkin/phikon-v2",
        weight_files=("model.safetensors",),
        checkpoint_layout="hf_dinov2",
        licence="Owkin non-commercial licence; not gated",
        gated=False,
        params_m=303.4,
        aliases=("phikon2",),
        notes="published as a Hugging Face transformers Dinov2Model; its keys are converted to timm's on load "
        "(the class token of the last layer, as the model card's last_hidden_state[:, 0])",
        checkpoint_keys={
            "embeddings.position_embeddings": (1, 197, 1024),
            "encoder.layer.0.attention.attention.query.weight": (1024, 1024),
            "encoder.layer.23.layer_scale2.lambda1": (1024,),
            "layernorm.weight": (1024,),
        },
    )
)
