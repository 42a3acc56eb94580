"""Resumable stage 2: the fine-tuning state at its last evaluation, so a killed run continues from there.

Files live in ``out_dir/checkpoint/`` and are written at every evaluation: ``student-<step>.safetensors``
(student encoder and head, LoRA adapters included), ``optim-<step>.safetensors`` (optimiser tensors),
``best-<step>.safetensors`` (the best candidate so far, when it is not the teacher) and ``state.json`` — written
LAST; it names the step whose files are complete and holds the rest (history, selection so far, scheduler and
random-generator state, throughput counters, the run key). Older step files are deleted only after it. Nothing is
pickled: the optimiser's nested state is split into tensors and a JSON skeleton.

The run key covers the config and the teacher (encoder and head digests): a checkpoint of another run is never
resumed. The training batches after a resume come from a sampler re-seeded by the resume step (deterministic, but
not the batches an uninterrupted run would have drawn). The folder is deleted when stage 2 finishes.

Example:
    >>> ckpt = Stage2Checkpoint("run/round_1/encoder", run_key="abc")  # doctest: +SKIP
    >>> state = ckpt.load(pair, optimizer, scheduler, generator)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from icmil.io import write_json_atomic
from icmil.log import get_logger
from icmil.mil.checkpoint import state_to_safetensors
from icmil.mil.resume import flatten_state, unflatten_state

log = get_logger("coupling")
CHECKPOINT_DIR = "checkpoint"


class Stage2Checkpoint:
    """Save / load the stage-2 state under ``out_dir/checkpoint`` for one run key."""

    def __init__(self, out_dir: str | os.PathLike[str], run_key: str) -> None:
        self.dir = Path(out_dir) / CHECKPOINT_DIR
        self.run_key = run_key

    def save(
        self,
        step: int,
        pair: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        best_state: dict[str, torch.Tensor] | None,
        state: dict[str, Any],
    ) -> None:
        """Write this evaluation's files, then ``state.json`` naming them, then remove older files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        student = {f"encoder.{k}": v for k, v in pair.student_encoder.state_dict().items()}
        student |= {f"head.{k}": v for k, v in pair.student_head.state_dict().items()}
        state_to_safetensors(student, self.dir / f"student-{step}.safetensors")
        skeleton, tensors = flatten_state(optimizer.state_dict())
        tensors = {**tensors, "generator": generator.get_state()}
        state_to_safetensors(tensors, self.dir / f"optim-{step}.safetensors")
        if best_state is not None:
            state_to_safetensors(best_state, self.dir / f"best-{step}.safetensors")
        write_json_atomic(
            self.dir / "state.json",
            {
                "run_key": self.run_key,
                "step": step,
                "has_best": best_state is not None,
                "optimizer": skeleton,
                "scheduler": scheduler.state_dict(),
                **state,
            },
        )
        for old in self.dir.glob("*-*.safetensors"):
            if old.stem.rsplit("-", 1)[-1] != str(step):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def load(
        self,
        pair: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
        """Restore the student, optimiser, scheduler and generator in place; returns ``(state, best_state)``
        or None when there is nothing (compatible, complete) to resume."""
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is unreadable; stage 2 starts from step 0", path)
            return None
        if raw.get("run_key") != self.run_key:
            log.warning(
                "stage-2 checkpoint in %s belongs to another run (settings or teacher); starting at step 0",
                self.dir,
            )
            return None
        step = int(raw["step"])
        try:
            student = load_file(str(self.dir / f"student-{step}.safetensors"))
            pair.student_encoder.load_state_dict(
                {k[len("encoder.") :]: v for k, v in student.items() if k.startswith("encoder.")}
            )
            pair.student_head.load_state_dict(
                {k[len("head.") :]: v for k, v in student.items() if k.startswith("head.")}
            )
            tensors = load_file(str(self.dir / f"optim-{step}.safetensors"))
            generator.set_state(tensors.pop("generator"))
            optimizer.load_state_dict(unflatten_state(raw["optimizer"], tensors))
            scheduler.load_state_dict(raw["scheduler"])
            best = load_file(str(self.dir / f"best-{step}.safetensors")) if raw.get("has_best") else None
        except Exception as err:  # a missing or damaged file: trust none of it
            log.warning(
                "stage-2 checkpoint of step %d in %s cannot be loaded (%s); starting at step 0",
                step,
                self.dir,
                err,
            )
            return None
        log.info("stage 2 resumes after step %d (checkpoint in %s)", step, self.dir)
        return raw, best

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
