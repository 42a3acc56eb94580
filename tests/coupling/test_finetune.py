"""Stage-2 fine-tuning on real (tiny) slides: split hygiene, selection with the teacher as step 0, options, heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icmil.config import ICMILConfig
from icmil.coupling import data as coupling_data
from icmil.coupling.finetune import SplitLeakError, check_split, finetune_encoder
from icmil.features import load_encoder
from icmil.manifest import read_manifest
from icmil.mil import create_mil_head, list_mil_heads, load_mil_head
from tests.coupling._cohort import round0_run, tiny_config


@pytest.fixture(scope="module")
def run0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return round0_run(tmp_path_factory.mktemp("coupling"))


def _inputs(run: Path, extra: list[str] | None = None) -> tuple[ICMILConfig, object, object, object]:
    cfg = tiny_config(run, extra or [])
    manifest = read_manifest(run / "manifest.csv")
    return cfg, manifest, load_encoder(run / "round_0" / "encoder"), load_mil_head(run / "round_0" / "head")


def test_check_split_refuses_non_training_slides(run0: Path) -> None:
    m = read_manifest(run0 / "manifest.csv")
    train = set(m.split("train")["slide_id"])
    check_split(m, train)
    val_id = str(m.split("val")["slide_id"].iloc[0])
    with pytest.raises(SplitLeakError, match=val_id):
        check_split(m, train | {val_id})


def test_training_patches_come_only_from_training_slides(run0: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, manifest, encoder, head = _inputs(run0, ["coupling.max_steps=3", "coupling.eval_every=3"])
    seen: set[str] = set()
    original = coupling_data.TrainBatches.__iter__

    def spying_iter(self):  # type: ignore[no-untyped-def]
        for idx, x in original(self):
            seen.update(self.pool.slide_ids[i] for i in self.pool.slide_index[idx.numpy()])
            yield idx, x

    monkeypatch.setattr(coupling_data.TrainBatches, "__iter__", spying_iter)
    res = finetune_encoder(
        encoder, head, manifest, run0 / "tiles", None, cfg, features_dir=run0 / "round_0" / "features"
    )
    train_ids = set(manifest.split("train")["slide_id"])
    assert seen and seen <= train_ids
    assert res.n_train_slides == len(train_ids)
    assert res.n_val_slides == len(manifest.split("val"))


@pytest.mark.parametrize(
    ("scores", "expected_step"),
    [
        ([(0.8, 0.5), (0.7, 0.6), (0.6, 0.7)], 0),  # students worse on AUC: the teacher stays
        ([(0.8, 0.5), (0.8, 0.5), (0.8, 0.5)], 0),  # exact ties: the teacher (earliest) wins
        ([(0.8, 0.5), (0.8, 0.4), (0.8, 0.6)], 2),  # equal AUC: higher separation breaks the tie
        ([(0.8, 0.5), (0.9, 0.1), (0.85, 0.9)], 1),  # AUC first, separation only among equal AUCs
    ],
)
def test_selection_includes_the_teacher_as_step_zero(
    run0: Path, monkeypatch: pytest.MonkeyPatch, scores: list[tuple[float, float]], expected_step: int
) -> None:
    from icmil.coupling import finetune as ft

    queue = list(scores)
    monkeypatch.setattr(
        ft,
        "score_val",
        lambda *a, **k: (
            dict(zip(("val_auc", "val_separation"), queue.pop(0), strict=True))
            | {"val_loss": 0.7, "val_slides": 2}
        ),
    )
    cfg, manifest, encoder, head = _inputs(
        run0,
        ["coupling.max_steps=2", "coupling.eval_every=1", "coupling.batch_size=8", "coupling.selection=val"],
    )
    before = encoder.digest()
    res = finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg)
    assert not queue  # evaluated at steps 0, 1, 2
    assert res.best_step == expected_step
    assert encoder.digest() == before  # the input encoder is never modified
    assert (res.encoder.digest() == before) == (expected_step == 0)
    assert res.selected["val_auc"] == scores[expected_step][0]


def test_selection_picks_the_best_evaluation_and_the_student_moves(run0: Path, tmp_path: Path) -> None:
    cfg, manifest, encoder, head = _inputs(
        run0, ["coupling.lr=1e-3", "coupling.max_steps=4", "coupling.eval_every=2"]
    )
    res = finetune_encoder(
        encoder,
        head,
        manifest,
        run0 / "tiles",
        tmp_path / "enc",
        cfg,
        features_dir=run0 / "round_0" / "features",
    )
    evals = res.history[res.history["val_auc"].notna()].reset_index(drop=True)
    key = list(zip(evals["val_auc"], evals["val_separation"], strict=True))
    best = max(range(len(key)), key=lambda i: (key[i], -i))  # earliest of the best
    assert int(evals["step"][best]) == res.best_step
    losses = res.history[res.history["loss"].notna()]
    assert len(losses) == cfg.coupling.max_steps and np.isfinite(losses["loss"]).all()
    saved = load_encoder(tmp_path / "enc")
    assert saved.digest() == res.encoder.digest()
    assert (tmp_path / "enc" / "finetune.json").is_file() and (tmp_path / "enc" / "history.csv").is_file()
    assert res.steps_run == cfg.coupling.max_steps


@pytest.mark.parametrize(
    "options",
    [
        [
            "coupling.confidence=true",
            "coupling.hard_negatives=true",
            "coupling.balanced_sampler=true",
            "coupling.stain_augment=true",
        ],
        ["coupling.confidence=true", "coupling.per_slide_confidence=true"],
    ],
    ids=["batch_confidence+hard_negatives+balanced+stain", "per_slide_confidence"],
)
def test_every_option_runs(run0: Path, options: list[str]) -> None:
    cfg, manifest, encoder, head = _inputs(run0, [*options, "coupling.max_steps=2", "coupling.eval_every=2"])
    res = finetune_encoder(
        encoder, head, manifest, run0 / "tiles", None, cfg, features_dir=run0 / "round_0" / "features"
    )
    assert res.steps_run == 2 and res.summary()["options"]["confidence"] is True
    w = res.history["conf_weight_mean"].dropna()
    assert len(w) == 2 and ((w >= 0) & (w <= 1)).all()


def test_per_slide_confidence_needs_confidence(run0: Path) -> None:
    from icmil.errors import ConfigError

    cfg, manifest, encoder, head = _inputs(run0, ["coupling.per_slide_confidence=true"])
    with pytest.raises(ConfigError, match="confidence=true"):
        finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg, features_dir=run0)


@pytest.mark.parametrize("head_name", list_mil_heads())
def test_works_for_every_head(run0: Path, head_name: str) -> None:
    cfg, manifest, encoder, _ = _inputs(
        run0,
        [
            "coupling.max_steps=1",
            "coupling.eval_every=1",
            "coupling.confidence=true",
            "coupling.batch_size=8",
        ],
    )
    torch.manual_seed(0)
    head = create_mil_head(head_name, encoder.out_dim, 2, hidden_dim=16)
    res = finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg)
    assert res.steps_run == 1 and np.isfinite(res.history["loss"].dropna()).all()


@pytest.mark.parametrize(
    ("cv", "expected_step"),
    [
        ([(0.8, 0.5), (0.7, 0.3), (0.75, 0.2)], 0),  # no student beats the teacher's CV AUC: teacher kept
        ([(0.8, 0.5), (0.8, 0.4), (0.8, 0.45)], 1),  # equal AUC: the lower CV loss wins
        ([(0.6, 0.7), (0.7, 0.6), (0.9, 0.4)], 2),  # the best CV AUC wins, whatever the frozen head says
    ],
)
def test_cross_validated_selection(
    run0: Path, monkeypatch: pytest.MonkeyPatch, cv: list[tuple[float, float]], expected_step: int
) -> None:
    from icmil.coupling import finetune as ft

    queue = list(cv)
    seen_slides: list[set[str]] = []

    def fake_cv(features, labels, cfg, n_classes):  # type: ignore[no-untyped-def]
        seen_slides.append(set(features))
        auc, loss = queue.pop(0)
        return {"cv_auc": auc, "cv_loss": loss, "cv_slides": float(len(features))}

    monkeypatch.setattr(ft, "score_cv", fake_cv)
    # The frozen head's validation AUC falls at every step: cross-validation must not look at it.
    frozen = [(0.9, 0.5), (0.6, 0.1), (0.5, 0.0)]
    monkeypatch.setattr(
        ft,
        "score_val",
        lambda *a, **k: (
            dict(zip(("val_auc", "val_separation"), frozen.pop(0), strict=True))
            | {"val_loss": 0.7, "val_slides": 2}
        ),
    )
    cfg, manifest, encoder, head = _inputs(
        run0,
        ["coupling.max_steps=2", "coupling.eval_every=1", "coupling.batch_size=8", "coupling.selection=cv"],
    )
    res = finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg)
    assert not queue and res.best_step == expected_step
    assert res.selected["cv_auc"] == cv[expected_step][0]
    # Candidates are judged on the training AND validation slides, never on test slides.
    labelled = set(manifest.split("train")["slide_id"]) | set(manifest.split("val")["slide_id"])
    assert all(s == labelled for s in seen_slides)


def test_cross_validated_selection_runs_for_real(run0: Path) -> None:
    cfg, manifest, encoder, head = _inputs(
        run0,
        [
            "coupling.max_steps=2",
            "coupling.eval_every=2",
            "coupling.selection=cv",
            "coupling.cv_epochs=2",
            "coupling.cv_folds=2",
        ],
    )
    res = finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg)
    hist = res.history.dropna(subset=["cv_auc"])
    assert list(hist["step"]) == [0, 2]
    assert np.isfinite(hist["cv_loss"]).all() and (hist["cv_slides"] == 12).all()


@pytest.mark.parametrize(
    "extra",
    [
        ["coupling.train_blocks=1"],
        ["coupling.lora_rank=2"],
        ["coupling.feature_anchor=1.0", "coupling.target_temperature=0.5", "coupling.warmup_steps=2"],
        ["coupling.random_teacher=true"],
    ],
    ids=["last_block", "lora", "anchor_sharpen_warmup", "random_teacher"],
)
def test_stage_two_options_train_and_return_a_plain_encoder(run0: Path, extra: list[str]) -> None:
    cfg, manifest, encoder, head = _inputs(
        run0,
        [
            "coupling.max_steps=3",
            "coupling.eval_every=3",
            "coupling.selection=last",
            "coupling.lr=1e-2",
            *extra,
        ],
    )
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    res = finetune_encoder(encoder, head, manifest, run0 / "tiles", None, cfg)
    after = res.encoder.state_dict()
    assert sorted(after) == sorted(before)  # the encoder's own layout (LoRA merged back)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed
    if "coupling.train_blocks=1" in extra:
        # Only the last block (backbone.3) learns; frozen blocks keep even their BatchNorm statistics.
        assert all(k.startswith("backbone.3.") for k in changed)
    if "coupling.feature_anchor=1.0" in extra:
        assert "train_loss_f" in res.history.columns or "loss_f" in res.history.columns


def test_a_killed_stage_two_resumes_from_its_last_evaluation(run0: Path, tmp_path: Path) -> None:
    import json

    cfg, manifest, encoder, head = _inputs(
        run0,
        [
            "coupling.max_steps=6",
            "coupling.eval_every=2",
            "coupling.selection=last",
            "coupling.lr=1e-3",
            "coupling.batch_size=8",
        ],
    )
    out = tmp_path / "encoder"

    class Killed(Exception):
        pass

    def kill_at_five(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        finetune_encoder(encoder, head, manifest, run0 / "tiles", out, cfg, step_callback=kill_at_five)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (out / "finetune.json").exists()

    seen: list[int] = []
    res = finetune_encoder(
        encoder, head, manifest, run0 / "tiles", out, cfg, step_callback=lambda s, m: seen.append(s)
    )
    assert seen[0] == 5  # no teacher evaluation again: training continues after the checkpointed step 4
    assert res.steps_run == 6 and res.best_step == 6
    evals = res.history.dropna(subset=["val_auc"])["step"].tolist()
    assert evals == [0, 2, 4, 6]  # the history of the first attempt is kept
    assert not (out / "checkpoint").exists() and (out / "finetune.json").is_file()

    # A checkpoint left by a run with other settings is not resumed.
    with pytest.raises(Killed):
        finetune_encoder(
            encoder, head, manifest, run0 / "tiles", tmp_path / "b", cfg, step_callback=kill_at_five
        )
    other = tiny_config(
        run0,
        [
            "coupling.max_steps=6",
            "coupling.eval_every=2",
            "coupling.selection=last",
            "coupling.lr=2e-3",
            "coupling.batch_size=8",
        ],
    )
    seen.clear()
    finetune_encoder(
        encoder,
        head,
        manifest,
        run0 / "tiles",
        tmp_path / "b",
        other,
        step_callback=lambda s, m: seen.append(s),
    )
    assert seen[0] == 0  # started over, with the teacher's evaluation
