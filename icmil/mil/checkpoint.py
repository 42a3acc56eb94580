"""Save and load a head as ``weights.safetensors`` + ``config.json`` (no pickle anywhere).

Example:
    >>> import tempfile, torch
    >>> head = create_mil_head("abmil", 8, 2, hidden_dim=4, attention_dim=4)
    >>> d = save_mil_head(head, tempfile.mkdtemp())
    >>> again = load_mil_head(d)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(head.eval()(x).logits, again(x).logits)
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from icmil.errors import FeatureStoreError
from icmil.io import atomic_path, write_json_atomic
from icmil.mil.base import MILHead, create_mil_head
from icmil.mil.layers import STANDARDIZATION_BUFFERS

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def state_to_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write a state dict atomically (contiguous CPU copies; safetensors rejects shared storage)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))


def save_mil_head(
    head: MILHead, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``directory/weights.safetensors`` and ``directory/config.json``; returns ``directory``.

    ``extra`` is merged into config.json (e.g. the training config). Weights are written first, so a
    config.json that exists always describes weights that exist.
    """
    out = Path(directory)
    state_to_safetensors(head.state_dict(), out / WEIGHTS_FILE)
    write_json_atomic(out / CONFIG_FILE, {**(extra or {}), **head.config()})
    return out


def read_head_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of a saved head (FeatureStoreError naming the file if missing or unreadable)."""
    path = Path(directory) / CONFIG_FILE
    try:
        cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureStoreError(f"no MIL head at {path.parent}: {CONFIG_FILE} is missing") from None
    except json.JSONDecodeError as err:
        raise FeatureStoreError(f"MIL head config {path} is not valid JSON: {err}") from None
    for key in ("head", "in_dim", "n_classes"):
        if key not in cfg:
            raise FeatureStoreError(f"MIL head config {path} lacks the field {key!r}")
    return cfg


def load_mil_head(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> MILHead:
    """Rebuild a head saved by :func:`save_mil_head`, in eval mode."""
    cfg = read_head_config(directory)
    head = create_mil_head(cfg["head"], int(cfg["in_dim"]), int(cfg["n_classes"]), **cfg.get("kwargs", {}))
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FeatureStoreError(f"MIL head at {weights.parent}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights), device=str(map_location))
        # Heads saved before the trunk's input standardisation existed: identity standardisation (as trained).
        for key, value in head.state_dict().items():
            if key.rsplit(".", 1)[-1] in STANDARDIZATION_BUFFERS and key not in state:
                state[key] = value
        head.load_state_dict(state)
    except Exception as err:  # safetensors raises its own types for corrupt files
        raise FeatureStoreError(f"cannot load MIL head weights {weights}: {err}") from None
    head.classes = cfg.get("classes")
    return head.eval()
