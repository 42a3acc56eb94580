"""Stage functions and the local round driver: markers, resume after a kill, one split, config guard, summary,
kept teachers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from icmil import stages
from icmil.config import apply_params
from icmil.errors import ConfigError
from icmil.rounds import config_conflicts, prepare_run, run_rounds
from icmil.stages import _numeric, marker_path, read_marker
from icmil.tracking.base import NullTracker
from tests.coupling._cohort import copy_run, round0_run, tiny_config


class Killed(RuntimeError):
    """Stands in for the process being killed."""


class RecordingTracker:
    """Records every stage run it opens; raises ``Killed`` when a chosen stage starts (a kill at that point)."""

    def __init__(self, kill_at: tuple[str, int | None] | None = None) -> None:
        self.opened: list[tuple[str, int | None]] = []
        self.metrics: list[tuple[str, int | None, dict[str, float]]] = []
        self.kill_at = kill_at

    @contextlib.contextmanager
    def stage(
        self, name: str, round_index: int | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[Any]:
        if (name, round_index) == self.kill_at:
            raise Killed(f"killed at the start of {name} round {round_index}")
        self.opened.append((name, round_index))
        tracker = self

        class _Run:
            run_id = f"{name}-{round_index}"

            def log_params(self, params: Mapping[str, Any]) -> None:
                return None

            def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
                tracker.metrics.append((name, round_index, dict(metrics)))

            def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
                assert Path(path).exists()

            def set_tags(self, tags: Mapping[str, str]) -> None:
                return None

        yield _Run()

    def parent(self) -> contextlib.AbstractContextManager[Any]:
        return NullTracker().parent()

    def nested(self, run_id: str) -> RecordingTracker:
        return self  # tuning trials: recorded as stages of this tracker


@pytest.fixture(scope="module")
def run0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return round0_run(tmp_path_factory.mktemp("stages"))


def test_resume_after_a_kill_repeats_no_finished_stage(
    run0: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(run0, tmp_path / "run")
    # selection=last: round 1 always has a new encoder to embed (a kept teacher would skip embedding).
    cfg = tiny_config(run, ["coupling.rounds=1", "coupling.selection=last"])
    embed = stages.embed_stage

    def killed_embedding(cfg, manifest_csv, tiles, encoder, out, round_index, **kw):  # type: ignore[no-untyped-def]
        if round_index == 1:
            raise Killed("killed at the start of round 1's embedding")
        return embed(cfg, manifest_csv, tiles, encoder, out, round_index, **kw)

    # Dies right after round 1's fine-tuning finished (embedding is not tracked: it is content-addressed).
    monkeypatch.setattr(stages, "embed_stage", killed_embedding)
    first = RecordingTracker()
    with pytest.raises(Killed):
        run_rounds(cfg, tracker=first)
    monkeypatch.setattr(stages, "embed_stage", embed)
    # Round 0 was already finished in the copied folder: only the fine-tuning ran before the kill.
    assert first.opened == [("finetune", 1)]
    ft_marker = marker_path(run / "round_1" / "encoder")
    done = read_marker(ft_marker)
    assert done is not None and done["stage"] == "finetune" and done["round"] == 1
    assert (
        not (run / "round_1" / "features").exists()
        or read_marker(marker_path(run / "round_1" / "features")) is None
    )
    stamp = ft_marker.stat().st_mtime_ns

    second = RecordingTracker()
    summary = run_rounds(cfg, tracker=second)
    assert second.opened == [("train", 1), ("evaluate", 1)]  # the tracked stages still to do
    assert ft_marker.stat().st_mtime_ns == stamp  # the fine-tuned encoder was not recomputed
    assert list(summary["round"]) == [0, 1]

    third = RecordingTracker()
    run_rounds(cfg, tracker=third)
    assert third.opened == []  # everything finished: nothing reruns

    # Round 1 used round 0's encoder as its teacher and wrote a different (or identical, if step 0 won) one.
    ft = json.loads((run / "round_1" / "encoder" / "finetune.json").read_text())
    r0 = read_marker(marker_path(run / "round_0" / "encoder"))
    assert read_marker(ft_marker)["teacher_encoder_digest"] == r0["encoder_digest"]  # type: ignore[index]
    assert ft["n_train_slides"] == int((pd.read_csv(run / "manifest.csv")["split"] == "train").sum())

    # Summary table, JSON and plot: the pipeline's format ({rounds, evaluation, registration}).
    table = pd.read_csv(run / "summary.csv")
    assert list(table["round"]) == [0, 1] and table["test_auc"].notna().all()
    written = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in written["rounds"]] == [0, 1] and written["evaluation"] == written["rounds"][
        -1
    ]
    assert written["registration"] == {} and written["rounds_planned"] == 1
    assert (run / "summary.png").stat().st_size > 1000
    for k in (0, 1):
        metrics = json.loads((run / f"round_{k}" / "metrics.json").read_text())
        assert {"val_auc", "test_auc", "patch_auc_test", "patch_auc_all"} <= set(metrics)
    assert json.loads((run / "round_1" / "metrics.json").read_text())["finetune_best_step"] == ft["best_step"]


def test_one_split_for_every_stage_and_round(run0: Path) -> None:
    resolved = pd.read_csv(run0 / "manifest.csv")
    source = pd.read_csv(run0 / "synth" / "manifest.csv")
    assert dict(zip(resolved["slide_id"], resolved["split"], strict=True)) == dict(
        zip(source["slide_id"], source["split"], strict=True)
    )
    head_preds = pd.read_csv(run0 / "round_0" / "head" / "predictions.csv")
    split_of = dict(zip(resolved["slide_id"], resolved["split"], strict=True))
    assert all(split_of[s] == sp for s, sp in zip(head_preds["slide_id"], head_preds["split"], strict=True))


def test_resuming_with_different_settings_is_refused(run0: Path, tmp_path: Path) -> None:
    run = copy_run(run0, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"mil\.lr"):
        prepare_run(tiny_config(run, ["mil.lr=0.5"]))
    # Settings that do not change results (more rounds, workers, devices) are fine, and stage-2 settings are
    # free until a coupling round has started ...
    prepare_run(tiny_config(run, ["coupling.rounds=3", "embed.num_workers=1", "coupling.lr=0.5"]))
    # ... after which they are part of the run.
    (run / "round_1").mkdir()
    with pytest.raises(ConfigError, match=r"coupling\.lr"):
        prepare_run(tiny_config(run, ["coupling.lr=0.25"]))


def test_config_conflicts_and_helpers() -> None:
    assert config_conflicts({"a": {"b": 1}, "tracking": {"x": 1}}, {"a": {"b": 2}, "tracking": {"x": 2}}) == [
        "a.b"
    ]
    assert _numeric({"val": {"auc": 0.5}, "n": 3, "ok": True, "s": "x"}) == {"val_auc": 0.5, "n": 3.0}
    cfg = tiny_config(Path("unused"))
    assert apply_params(cfg, {"lr": 1e-3}).mil.lr == 1e-3
    with pytest.raises(ConfigError, match="do not fit the mil section"):
        apply_params(cfg, {"learning_rate": 1e-3})
    assert marker_path("d", ["b", "a"]) == marker_path("d", ["a", "b"]) != marker_path("d")


def test_corrupt_marker_is_reported(tmp_path: Path) -> None:
    from icmil.errors import FeatureStoreError

    (tmp_path / "stage.json").write_text("{not json")
    with pytest.raises(FeatureStoreError, match="delete it"):
        read_marker(tmp_path / "stage.json")


def test_a_round_that_keeps_its_teacher_reuses_the_previous_round_and_stops(
    run0: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icmil.coupling import finetune as ft

    run = copy_run(run0, tmp_path / "run")
    # Every student scores below the teacher: stage 2 returns the teacher (selected step 0).
    scores = iter([(0.9, 0.3)] + [(0.5, 0.9)] * 20)

    def fake_cv(features, labels, cfg, n_classes):  # type: ignore[no-untyped-def]
        auc, loss = next(scores)
        return {"cv_auc": auc, "cv_loss": loss, "cv_slides": float(len(features))}

    monkeypatch.setattr(ft, "score_cv", fake_cv)
    cfg = tiny_config(run, ["coupling.rounds=3", "coupling.selection=cv"])
    tracker = RecordingTracker()
    summary = run_rounds(cfg, tracker=tracker)
    # Round 1 fine-tuned, kept the teacher, and neither re-embedded nor retrained; rounds 2-3 did not run.
    assert tracker.opened == [("finetune", 1), ("evaluate", 1)]
    assert not (run / "round_1" / "features").exists() and not (run / "round_1" / "head").exists()
    assert list(summary["round"]) == [0, 1] and list(summary["teacher_kept"]) == [False, True]
    r0 = json.loads((run / "round_0" / "metrics.json").read_text())
    r1 = json.loads((run / "round_1" / "metrics.json").read_text())
    assert r1["teacher_kept"] and r1["reused_from_round"] == 0 and r1["test_auc"] == r0["test_auc"]
    assert not (run / "round_2").exists()
    # The round stands for round 0 everywhere: its metrics, its predictions (a link), the summary.
    assert (run / "round_1" / "predictions.csv").read_bytes() == (
        run / "round_0" / "predictions.csv"
    ).read_bytes()
    rows = json.loads((run / "summary.json").read_text())["rounds"]
    assert rows[1]["teacher_kept"] and rows[1]["reused_from_round"] == 0 and not rows[0]["teacher_kept"]
    from icmil.report import write_run_report

    page = write_run_report(run, max_viewer_slides=0).read_text(encoding="utf-8")
    assert "teacher kept: round 0&#x27;s model" in page and "rounds 2–3 were not run" in page
    assert ("evaluate", 1, {"teacher_kept": 1.0}) in [
        (n, r, {k: v for k, v in m.items() if k == "teacher_kept"}) for n, r, m in tracker.metrics
    ]

    # Forcing the rounds runs round 2; its teacher is round 1's encoder (the teacher's weights) with the head
    # and features of round 0, the model round that round 1 stands for.
    teachers: list[tuple[str, str, str]] = []
    finetune = stages.finetune_stage

    def recording_finetune(cfg, manifest_csv, tiles, encoder, head, features, *rest, **kw):  # type: ignore[no-untyped-def]
        teachers.append((Path(encoder).parent.name, Path(head).parent.name, Path(features).parent.name))
        return finetune(cfg, manifest_csv, tiles, encoder, head, features, *rest, **kw)

    monkeypatch.setattr(stages, "finetune_stage", recording_finetune)
    scores = iter([(0.9, 0.3)] + [(0.95, 0.2)] * 20)
    forced = tiny_config(run, ["coupling.rounds=2", "coupling.selection=cv", "coupling.force_rounds=true"])
    summary = run_rounds(forced, tracker=RecordingTracker())
    assert list(summary["round"]) == [0, 1, 2] and not summary.set_index("round").loc[2, "teacher_kept"]
    assert (run / "round_2" / "features").is_dir()
    assert teachers[-1] == ("round_1", "round_0", "round_0")


def test_couple_tunes_each_round_when_tuning_is_enabled(tmp_path: Path) -> None:
    """tuning.enabled: the local driver runs the round's study before training (as the pipeline does) and the
    round's head is trained with the best settings; a rerun does not tune again."""
    cfg = tiny_config(
        tmp_path / "run",
        ["coupling.rounds=0", "tuning.enabled=true", "tuning.n_trials=2", "tuning.epochs=2", "mil.epochs=2"],
    )
    tracker = RecordingTracker()
    summary = run_rounds(cfg, tracker=tracker)
    assert list(summary["round"]) == [0]
    assert tracker.opened[0] == ("tune", 0) and ("train", 0) in tracker.opened
    assert tracker.opened.index(("train", 0)) > max(i for i, s in enumerate(tracker.opened) if s[0] == "tune")
    tune = tmp_path / "run" / "round_0" / "tune"
    best = json.loads((tune / "best_params.json").read_text())
    assert read_marker(tune / "stage.json")["best_params"] == best["params"]  # type: ignore[index]
    trained = read_marker(tmp_path / "run" / "round_0" / "head" / "stage.json")
    assert trained is not None and trained["params"] == best["params"]
    again = RecordingTracker()
    run_rounds(cfg, tracker=again)
    assert again.opened == []


@pytest.mark.parametrize("calibrate", [False, True])
def test_pretrained_batchnorm_statistics_change_only_when_asked(tmp_path: Path, calibrate: bool) -> None:
    """Weights from another domain keep their stored BatchNorm statistics unless
    ``coupling.calibrate_pretrained_bn`` re-estimates them on the training patches (label-free)."""
    import torch
    from safetensors.torch import save_file

    from icmil.features import create_encoder

    run = round0_run(tmp_path / "r0")
    cfg = tiny_config(run)
    donor = create_encoder(cfg.encoder)
    bns = [m for m in donor.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:  # "pretrained elsewhere": statistics that do not fit these patches
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    cfg = tiny_config(run, [f"encoder.weights={weights}", f"coupling.calibrate_pretrained_bn={calibrate}"])
    encoder = stages.initial_encoder(cfg, run / "manifest.csv", run / "tiles")
    means = [m.running_mean for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    conv = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    donor_conv = next(m for m in donor.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(conv.weight, donor_conv.weight)  # the weights themselves are never touched
    untouched = all(torch.equal(m, torch.full_like(m, 5.0)) for m in means)
    assert untouched is not calibrate
