"""Resumable training state: model + optimiser as safetensors, the rest (epoch, best so far, history) as JSON.

Files live in ``out_dir/checkpoint/``: ``model-<epoch>.safetensors``, ``optim-<epoch>.safetensors`` and
``state.json``, which is written LAST and names the epoch whose files are complete; older epoch files are
deleted only after it. A run killed at any point therefore resumes from the last epoch that finished.
Optimiser state dicts (nested dicts with int keys and tensors) are split into a flat tensor dict and a JSON
skeleton, so nothing is ever pickled.

Example:
    >>> import torch
    >>> state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    >>> skeleton, tensors = flatten_state(state)
    >>> again = unflatten_state(skeleton, tensors)
    >>> again["param_groups"][0]["lr"], float(again["state"][0]["step"]), list(again["state"])
    (0.1, 3.0, [0])
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from icmil.io import write_json_atomic
from icmil.log import get_logger
from icmil.mil.checkpoint import state_to_safetensors

log = get_logger("mil.resume")
CHECKPOINT_DIR = "checkpoint"


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into (JSON-able skeleton, {key: tensor}); dict keys keep their type."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[key] = o
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(o)]
        return o

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class TrainingState:
    """Where training stands after ``epoch`` (1-based; 0 = nothing trained yet)."""

    run_key: str
    epoch: int = 0
    best_epoch: int = 0
    best_auc: float | None = None
    best_loss: float | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_training_state(
    out_dir: str | os.PathLike[str],
    state: TrainingState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    averaged: torch.nn.Module | None = None,
) -> None:
    """Write this epoch's model/optimiser files (and the weight average's, when training keeps one), then
    ``state.json`` pointing at them, then drop older files."""
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten_state(optimizer.state_dict())
    state_to_safetensors(model.state_dict(), ckpt / f"model-{state.epoch}.safetensors")
    state_to_safetensors(tensors, ckpt / f"optim-{state.epoch}.safetensors")
    if averaged is not None:
        state_to_safetensors(averaged.state_dict(), ckpt / f"average-{state.epoch}.safetensors")
    write_json_atomic(ckpt / "state.json", {**state.__dict__, "optimizer": skeleton})
    for old in ckpt.glob("*-*.safetensors"):
        if old.stem.rsplit("-", 1)[-1] != str(state.epoch):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def load_training_state(
    out_dir: str | os.PathLike[str],
    run_key: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    averaged: torch.nn.Module | None = None,
) -> TrainingState | None:
    """Restore model + optimiser (+ the weight average) from the last finished epoch; None if there is nothing
    (compatible) to resume."""
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    path = ckpt / "state.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is unreadable; training starts from scratch", path)
        return None
    if raw.get("run_key") != run_key:
        log.warning(
            "checkpoint in %s was made with another config/manifest/features (key %s != %s); starting fresh",
            ckpt,
            raw.get("run_key"),
            run_key,
        )
        return None
    epoch = int(raw["epoch"])
    try:
        model.load_state_dict(load_file(str(ckpt / f"model-{epoch}.safetensors")))
        tensors = load_file(str(ckpt / f"optim-{epoch}.safetensors"))
        optimizer.load_state_dict(unflatten_state(raw["optimizer"], tensors))
        if averaged is not None:
            averaged.load_state_dict(load_file(str(ckpt / f"average-{epoch}.safetensors")))
    except Exception as err:  # corrupt or missing epoch files: do not trust any of it
        log.warning("checkpoint of epoch %d in %s cannot be loaded (%s); starting fresh", epoch, ckpt, err)
        return None
    fields = {k: raw[k] for k in TrainingState.__dataclass_fields__ if k in raw}
    return TrainingState(**fields)
