"""icmil.registry.release: the register and promote steps the pipeline runs, and the gate `icmil promote` runs,
with the config's settings (one function each for the CLI and the components)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from icmil.cli import main
from icmil.errors import TrackingError
from icmil.registry import (
    CHAMPION,
    promotion_step,
    read_registration,
    register_run_model,
    write_registration,
)
from icmil.tracking import NullTracker, start_parent_run, tracker_for
from icmil.tracking.uris import resolve_tracking_uri
from tests.tracking.helpers import CLASSES, make_cfg


def _inputs(root: Path, slide: Path, test_auc: float) -> tuple[Path, Path]:
    """A resolved manifest (two slides per split) and an evaluation folder with the final metrics."""
    rows = [
        {"slide_id": f"s{i}", "path": str(slide), "label": CLASSES[i % 2], "split": split}
        for i, split in enumerate(["train", "train", "val", "val", "test", "test"])
    ]
    manifest = root / "manifest.csv"
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(manifest, index=False)
    evaluation = root / "evaluation"
    evaluation.mkdir(exist_ok=True)
    metrics = {"test_auc": test_auc, "val_auc": 0.7, "head": "abmil"}
    (evaluation / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return manifest, evaluation


def test_register_then_promote_like_the_pipeline(
    tiny_model_parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tiny_model_parts
    cfg = make_cfg(tmp_path / "run", "tracking.registered_model=released", "tracking.promotion_floor=0.6")
    manifest, evaluation = _inputs(tmp_path / "inputs", p["slide"], test_auc=0.8)
    parent = start_parent_run(cfg, run_name="release")
    tracker = tracker_for(cfg, parent)

    done = register_run_model(
        cfg, manifest, p["encoder"], p["head0"], evaluation, parent_run_id=parent, tracker=tracker
    )
    assert (done.model, done.version, done.promote) == ("released", "1", True)
    assert "no champion yet" in done.reason
    out = tmp_path / "registration"
    assert write_registration(out, done) == read_registration(out) == done.as_dict()

    client = MlflowClient(resolve_tracking_uri(cfg))
    version = client.get_model_version("released", "1")
    assert version.tags["icmil.metric.test.auc"] == "0.8" and version.tags["icmil.parent_run_id"] == parent
    (register_run,) = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string="attributes.run_name = 'register'"
    )
    assert register_run.data.tags["icmil.model_version"] == "1"

    # The CLI's dry run and the pipeline's promote step are the same gate with the same settings.
    assert main(["promote", "--set", f"run_dir={cfg.run_dir}", "--set", "tracking.registered_model=released",
                 "--set", "tracking.promotion_floor=0.6", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "WOULD PROMOTE released v1: no champion yet" in out, out
    promoted, reason = promotion_step(cfg, tracker)
    assert promoted and reason.startswith("PROMOTED released v1")
    assert str(client.get_model_version_by_alias("released", CHAMPION).version) == "1"
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["gate_promoted"] == 1.0
    assert parent_run.data.tags["icmil.gate.final"] == "promoted"

    # A second version that does not beat the champion: the step returns the rejection, it does not raise.
    manifest2, evaluation2 = _inputs(tmp_path / "inputs2", p["slide"], test_auc=0.75)
    second = register_run_model(
        cfg, manifest2, p["encoder"], p["head1"], evaluation2, parent_run_id=parent, tracker=tracker
    )
    assert second.version == "2" and not second.promote
    promoted, reason = promotion_step(cfg, tracker)
    assert not promoted and "does not beat champion v1" in reason
    assert client.get_run(parent).data.metrics["gate_promoted"] == 0.0
    assert str(client.get_model_version_by_alias("released", CHAMPION).version) == "1"


def test_registering_needs_a_tracked_run(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    p = tiny_model_parts
    cfg = make_cfg(tmp_path / "run")
    manifest, evaluation = _inputs(tmp_path / "inputs", p["slide"], test_auc=0.8)
    with pytest.raises(TrackingError, match="needs MLflow tracking"):
        register_run_model(
            cfg, manifest, p["encoder"], p["head0"], evaluation, parent_run_id="", tracker=NullTracker()
        )


def test_old_import_paths_still_work() -> None:
    import icmil.registry
    import icmil.tracking
    from icmil.tracking.slide_classifier import SlideClassifier  # what models registered earlier import

    with pytest.warns(
        DeprecationWarning, match=r"icmil\.tracking\.promote moved to icmil\.registry\.promote"
    ):
        assert icmil.tracking.promote is icmil.registry.promote
    assert SlideClassifier is icmil.registry.SlideClassifier
    with pytest.raises(AttributeError):
        _ = icmil.tracking.no_such_name
