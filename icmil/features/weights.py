"""Encoder weight files: where they come from, how they are read safely, and how their keys are mapped.

Sources, in order (:func:`resolve_weights`):

1. ``encoder.weights``: a local file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
   ``torch.load(weights_only=True)``), or a folder holding one of the preset's official files (e.g. a
   ``hf download ... --local-dir`` copy).
2. ``encoder.pretrained: true``: the official file of the preset (or timm model) in a local Hugging Face hub
   cache (``encoder.hub_cache``, else ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``). The
   lookup reads the cache folder only: the hub is never contacted. Only with ``encoder.allow_download: true``
   is a missing file downloaded (internet, and ``HF_TOKEN`` for gated models).

``encoder.sha256`` (optional) is checked against the file before anything is read from it. A damaged or
foreign file is a :class:`~icmil.errors.ConfigError` naming the file; nothing is ever unpickled, and the
error never suggests ``weights_only=False``.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"a": torch.zeros(2)}, path)
    >>> sorted(read_state_file(path))
    ['a']
    >>> read_state_file(path, sha256="0" * 64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    icmil.errors.ConfigError: encoder.weights ...: SHA-256 is ... but encoder.sha256 expects 000000000000...
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icmil.errors import ConfigError
from icmil.io import file_digest
from icmil.log import get_logger

if TYPE_CHECKING:
    from icmil.config import EncoderConfig
    from icmil.features.presets import EncoderPreset

log = get_logger("encoders")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightsSource:
    """One resolved weights file: where it is, how it was found, and the hub repo it stands for."""

    path: Path
    origin: str  # "file", "hub-cache" or "download"
    repo: str | None = None

    def describe(self) -> str:
        return f"{self.path} ({self.origin}{', ' + self.repo if self.repo else ''})"


@dataclass(frozen=True)
class HubSource:
    """Where the official weights of an encoder live on the hub, and in which key layout."""

    repo: str
    files: tuple[str, ...]
    layout: str = "timm"


# --------------------------------------------------------------------------- reading files safely


def check_sha256(path: Path, expected: str | None, what: str = "encoder.weights") -> None:
    """Raise :class:`ConfigError` when the file's SHA-256 differs from ``expected`` (no-op for None)."""
    if not expected:
        return
    actual = file_digest(path)
    if actual.lower() != expected.strip().lower():
        raise ConfigError(
            f"{what} {path}: SHA-256 is {actual} but encoder.sha256 expects {expected}: this is not the file "
            "the config names (a different model, another release, or a damaged download). Fetch it again, or "
            "fix encoder.sha256 if you changed the weights on purpose"
        )


def read_state_file(
    path: str | os.PathLike[str], sha256: str | None = None, what: str = "encoder.weights"
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or PyTorch state-dict file, after the optional SHA-256 check.

    PyTorch files are read with ``torch.load(weights_only=True)`` (memory-mapped when possible); a checkpoint
    wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped. Anything else — a damaged or
    truncated file, another format, pickled Python objects — is a :class:`ConfigError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    check_sha256(p, sha256, what)
    if p.suffix == ".safetensors":
        return _read_safetensors(p, what)
    obj = _torch_load(p, what)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"{what} {p} does not hold a state dict of tensors (found {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"{what} {p} holds non-tensor entries (e.g. {bad[:3]}): it looks like a training checkpoint, not "
            "a state dict. Save model.state_dict() alone, or convert the file to .safetensors"
        )
    return {str(k): v for k, v in obj.items()}


def _read_safetensors(p: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p)))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"{what} {p} is not a readable .safetensors file ({_first_line(err)}): it is damaged, truncated "
            "or in another format. Download it again (and set encoder.sha256 to catch this before loading)"
        ) from None


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(p: Path, what: str) -> Any:
    # Zip archives (every torch.save since PyTorch 1.6) can be memory-mapped: a 4 GB checkpoint then costs
    # no second copy in RAM. Older files are read the plain way; both only ever with weights_only=True.
    is_zip = zipfile.is_zipfile(p)
    with p.open("rb") as fh:
        looks_zip = fh.read(4) == b"PK\x03\x04"  # a zip's start, even when its end (the index) is missing
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:
        text = str(err)
        found = _UNSUPPORTED_GLOBAL.search(text)
        if found:
            cause = (
                f"it holds pickled Python objects ({found.group(1)}), not only tensors. Objects are never "
                "unpickled here, because unpickling runs code from the file. Export the weights alone "
                "(torch.save(model.state_dict(), ...)) or convert them to .safetensors"
            )
        elif is_zip or looks_zip:
            cause = "the archive is damaged or incomplete (truncated download?). Download it again"
        else:
            cause = (
                "it is neither a PyTorch checkpoint nor a .safetensors file (damaged, or another format). "
                "Download it again, or convert it to .safetensors"
            )
        # The PyTorch message is not repeated: it recommends weights_only=False, i.e. running the file's code.
        raise ConfigError(f"{what} {p} could not be read as weights: {cause}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# --------------------------------------------------------------------------- key layouts


def convert_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a checkpoint to timm's key layout. Hugging Face ``Dinov2Model`` files (Phikon-v2) are detected by
    their ``embeddings.patch_embeddings`` key and converted (query/key/value fused into ``qkv``); anything else
    is returned as it is (timm, torchvision and our own layouts need no conversion)."""
    prefix = next(
        (p for p in ("", "dinov2.") if f"{p}embeddings.patch_embeddings.projection.weight" in state), None
    )
    if prefix is None:
        return dict(state)
    return _dinov2_hf_to_timm({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


_HF_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.register_tokens", "reg_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
)
_HF_LAYER_RENAMES = (
    ("attention.output.dense.", "attn.proj."),  # transformers 4 (the files on the hub)
    ("attention.o_proj.", "attn.proj."),  # transformers 5
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.fc1."),
    ("mlp.weights_out.", "mlp.fc2."),
)
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# attention.attention.query.weight (transformers 4) or attention.q_proj.weight (transformers 5)
_HF_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")


def _dinov2_hf_to_timm(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key == "embeddings.mask_token":
            continue  # used in DINOv2 training only
        m = _HF_LAYER.match(key)
        if m is None:
            new = next((key.replace(a, b, 1) for a, b in _HF_RENAMES if key.startswith(a)), key)
            out[new] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        qkv_part = _HF_QKV.match(rest)
        if qkv_part is not None:
            name = qkv_part.group(1) or {"q": "query", "k": "key", "v": "value"}[qkv_part.group(2)]
            qkv.setdefault(i, {})[f"{name}.{qkv_part.group(3)}"] = value
            continue
        new_rest = next((rest.replace(a, b, 1) for a, b in _HF_LAYER_RENAMES if rest.startswith(a)), rest)
        out[f"blocks.{i}.{new_rest}"] = value
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{name}.{kind}") for name in ("query", "key", "value")]
            if all(p is not None for p in pieces):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([p for p in pieces if p is not None], dim=0)
    return out


def resample_position_embeddings(
    mapped: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], model: torch.nn.Module | None
) -> None:
    """A checkpoint trained at another image size has a position-embedding grid of another size: resample
    it (bicubic, as timm does when it loads pretrained weights) to the model's grid, in place."""
    for key, value in list(mapped.items()):
        if not key.endswith("pos_embed") or key not in own or value.shape == own[key].shape:
            continue
        want = own[key].shape
        if value.ndim != 3 or value.shape[-1] != want[-1]:
            continue  # a width mismatch is a wrong file, reported by the shape check
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0
        vit = _find_vit(model)
        if vit is not None and not getattr(vit, "no_embed_class", False):
            n_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        side = round((want[1] - n_prefix) ** 0.5)
        if side * side + n_prefix != want[1]:
            continue
        old_side = round((value.shape[1] - n_prefix) ** 0.5)
        if old_side * old_side + n_prefix != value.shape[1]:
            continue
        mapped[key] = resample_abs_pos_embed(
            value.float(), new_size=[side, side], old_size=[old_side, old_side], num_prefix_tokens=n_prefix
        ).to(value.dtype)
        log.info(
            "position embeddings %s resampled from a %dx%d to a %dx%d grid", key, *[old_side] * 2, side, side
        )


def _find_vit(model: torch.nn.Module | None) -> torch.nn.Module | None:
    if model is None:
        return None
    for module in model.modules():
        if hasattr(module, "pos_embed") and hasattr(module, "num_prefix_tokens"):
            return module
    return None


# --------------------------------------------------------------------------- where the file is


def hub_cache_dir(configured: str | None = None) -> Path:
    """The Hugging Face hub cache searched for official weights (``encoder.hub_cache`` or the hub's default)."""
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_in_hub_cache(repo: str, files: Sequence[str], cache_dir: Path) -> Path | None:
    """The first of ``files`` of ``repo`` present in the hub cache folder (no network: the cache is only read).

    ``huggingface_hub.try_to_load_from_cache`` resolves the ``main`` ref; a cache copied by hand without its
    ``refs`` folder is searched snapshot by snapshot (newest first).
    """
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        try:
            found = try_to_load_from_cache(repo_id=repo, filename=name, cache_dir=str(cache_dir))
        except Exception:  # a malformed cache folder is "not found", never a crash
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    snapshots = cache_dir / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        for snap in sorted(snapshots.iterdir(), key=lambda s: s.stat().st_mtime, reverse=True):
            for name in files:
                if (snap / name).is_file():
                    return snap / name
    return None


def download_to_hub_cache(repo: str, files: Sequence[str], cache_dir: Path) -> Path:
    """Download the first available of ``files`` into the cache (only with ``encoder.allow_download``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    last: str = ""
    for name in files:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name, cache_dir=str(cache_dir)))
        except EntryNotFoundError:
            last = f"{repo} has no file {name}"
            continue
        except GatedRepoError:
            raise ConfigError(
                f"{repo} is gated: accept its conditions at https://huggingface.co/{repo} with your account, then "
                "set HF_TOKEN to a read token of that account"
            ) from None
        except RepositoryNotFoundError:
            raise ConfigError(
                f"hub repository {repo} not found (or it is private and HF_TOKEN is not set)"
            ) from None
        except Exception as err:
            raise ConfigError(
                f"could not download {repo}/{name} into {cache_dir}: {type(err).__name__}: {_first_line(err)}"
            ) from None
    raise ConfigError(f"none of {list(files)} found in {repo}: {last}")


def timm_hub_source(name: str) -> HubSource | None:
    """The hub repo of a timm model's default pretrained weights (None when timm knows of none)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    return HubSource(str(repo), ("model.safetensors", "pytorch_model.bin"), "timm")


def preset_hub_source(preset: EncoderPreset) -> HubSource | None:
    if not preset.hf_repo:
        return None
    return HubSource(preset.hf_repo, preset.weight_files, preset.checkpoint_layout)


def _file_in_folder(folder: Path, hub: HubSource | None) -> Path:
    names = list(hub.files) if hub else []
    for name in names:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    wanted = f"one of {names}" if names else f"one weights file ({', '.join(WEIGHT_SUFFIXES)})"
    found = [p.name for p in candidates][:8]
    raise ConfigError(f"encoder.weights folder {folder} does not hold {wanted} (found: {found or 'nothing'})")


def resolve_weights(cfg: EncoderConfig, hub: HubSource | None) -> WeightsSource | None:
    """The weights file ``cfg`` asks for (None: random init). See the module docstring for the order."""
    if cfg.weights and cfg.pretrained:
        raise ConfigError("set either encoder.weights (a local file) or encoder.pretrained=true, not both")
    if cfg.weights:
        p = Path(cfg.weights).expanduser()
        if p.is_dir():
            return WeightsSource(_file_in_folder(p, hub), "file")
        if not p.is_file():
            raise ConfigError(f"encoder.weights file not found: {p}")
        return WeightsSource(p, "file")
    if not cfg.pretrained:
        return None
    if hub is None:
        raise ConfigError(
            f"encoder {cfg.name!r} has no official pretrained weights to look for; set encoder.weights to a "
            "local file, or encoder.pretrained=false"
        )
    cache = hub_cache_dir(cfg.hub_cache)
    found = find_in_hub_cache(hub.repo, hub.files, cache)
    if found is not None:
        return WeightsSource(found, "hub-cache", hub.repo)
    if cfg.allow_download and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    ):
        raise ConfigError(
            f"weights for encoder {cfg.name!r} are not in the hub cache {cache}, and encoder.allow_download=true "
            "cannot fetch them: HF_HUB_OFFLINE is set, which forces the hub offline. Unset it, or put "
            f"{hub.repo} ({hub.files[0]}) into the cache"
        )
    if cfg.allow_download:
        log.info("downloading %s (%s) into %s (encoder.allow_download=true)", hub.repo, hub.files[0], cache)
        return WeightsSource(download_to_hub_cache(hub.repo, hub.files, cache), "download", hub.repo)
    raise ConfigError(
        f"weights for encoder {cfg.name!r} not found locally: looked for {hub.repo} ({' or '.join(hub.files)}) "
        f"in the hub cache {cache}. The hub is not contacted unless encoder.allow_download=true (that needs "
        f"internet access, and HF_TOKEN for gated models). Offline: on a machine with internet run "
        f"`hf download {hub.repo} {hub.files[0]} --cache-dir {cache}` and copy that folder here (or set "
        f"encoder.hub_cache to where it is), or set encoder.weights to the local file"
    )
