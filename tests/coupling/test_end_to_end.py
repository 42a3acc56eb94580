"""End to end on CPU: one ICMIL round raises the instance teacher's patch-level AUC against the lesion boxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icmil.rounds import run_rounds
from tests.coupling._cohort import copy_run, round0_run, tiny_config


@pytest.fixture(scope="module")
def run0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return round0_run(tmp_path_factory.mktemp("e2e"))


def test_one_round_raises_the_instance_teachers_patch_auc(run0: Path, tmp_path: Path) -> None:
    run = copy_run(run0, tmp_path / "run")
    # Faithful stage 2 (loss, augmentation, selection) with a demo-scale budget: 20 steps of 32 patches at a
    # learning rate that lets a random tiny CNN move in that budget (docs/method.md's 1e-5 assumes epochs over
    # millions of patches). Seeds 3, 4 and 5 of this cohort gave +0.05, +0.08 and +0.04 on all slides.
    cfg = tiny_config(run, ["coupling.rounds=1", "coupling.lr=1e-3", "coupling.max_steps=20"])
    summary = run_rounds(cfg).set_index("round")
    before, after = summary.loc[0], summary.loc[1]
    ft = json.loads((run / "round_1" / "encoder" / "finetune.json").read_text())
    assert ft["best_step"] > 0  # a student beat the teacher on validation slides
    assert after["patch_auc_all"] > before["patch_auc_all"] + 0.02
    assert after["patch_auc_test"] > before["patch_auc_test"]
    assert ft["selected"]["val_auc"] >= ft["teacher"]["val_auc"]  # never worse than the teacher on validation
