"""One end-to-end run of the whole pipeline with the KFP local runner on tiny synthetic slides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icmil.config import load_config
from icmil_kfp.pipelines.runner import RunSummary, format_summary, run_local

# Small enough for CI on 2 cores; every stage and both round kinds still run for real.
TINY = [
    "synth.n_slides=6",
    "synth.width=1536",
    "synth.height=1024",
    "synth.lesion_radius_px=[200, 300]",
    "synth.val_fraction=0.34",
    "synth.test_fraction=0.34",
    "tiling.patch_size=64",
    "encoder.name=tiny_cnn",
    "embed.batch_size=64",
    "embed.num_workers=0",
    "mil.epochs=2",
    "mil.patience=null",
    "mil.bootstrap_samples=0",
    "coupling.rounds=1",
    "coupling.batch_size=16",
    "coupling.max_steps=2",
    "coupling.eval_every=2",
    "coupling.num_workers=0",
    "coupling.initial_bn_calibration=64",
    "pipeline.shards=2",
    "tracking.promotion_floor=0.0",
]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> RunSummary:
    run_dir = tmp_path_factory.mktemp("icmil-run")
    cfg = load_config(None, [f"run_dir={run_dir}", *TINY])
    return run_local(cfg, print_summary=False)


@pytest.mark.slow
def test_local_run_executes_every_stage_and_reports_per_round_metrics(local_run: RunSummary) -> None:
    s = local_run
    assert [r["round"] for r in s.rounds] == [0, 1]
    for row in s.rounds:
        for key in ("val_auc", "test_auc", "patch_auc_test", "test_n"):
            assert isinstance(row[key], float), (row["round"], key)
    assert "finetune_selected_val_auc" in s.rounds[1] and "finetune_selected_val_auc" not in s.rounds[0]
    assert s.evaluation == s.rounds[-1]
    # The run-folder contract: resolved config, summary (json + csv), index of every output.
    for name in ("config.yaml", "summary.json", "summary.csv", "outputs.json", "mlflow.db"):
        assert (s.run_dir / name).is_file(), name
    assert json.loads((s.run_dir / "summary.json").read_text())["rounds"] == s.rounds
    outputs = s.outputs
    assert any(k.endswith("prepare/cohort") for k in outputs)
    encoders = [Path(v) for k, v in outputs.items() if k.endswith("/encoder")]
    assert len(encoders) == 2 and all((e / "weights.safetensors").is_file() for e in encoders)
    features = [Path(v) for k, v in outputs.items() if k.endswith("/features")]
    assert len(features) == 4  # 2 shards x 2 rounds
    assert sorted(p.name for f in features for p in f.glob("*.h5")) == sorted(
        2 * [f"slide_{i:03d}.h5" for i in range(6)]
    )
    text = format_summary(s)
    assert "per-round metrics" in text and "val_auc" in text and str(s.run_dir) in text


@pytest.mark.slow
def test_local_run_registers_promotes_and_closes_the_mlflow_parent_run(local_run: RunSummary) -> None:
    from mlflow import MlflowClient

    reg = local_run.registration
    assert reg["version"] == "1" and reg["promote"] is True and "no champion yet" in reg["reason"]
    assert reg["champion"] == "1"  # the gate's promote task ran inside dsl.If
    client = MlflowClient(tracking_uri=f"sqlite:///{local_run.run_dir / 'mlflow.db'}")
    model = client.get_registered_model(reg["model"])
    assert {k: str(v) for k, v in model.aliases.items()} == {"challenger": "1", "champion": "1"}
    exp = client.get_experiment_by_name("icmil")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags.get("icmil.kfp_final_state") == "SUCCEEDED"
    children = {
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert {
        "round0/train",
        "round0/evaluate",
        "round1/finetune",
        "round1/train",
        "round1/evaluate",
        "register",
    } <= children
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.json", "summary.csv", "config.yaml"} <= artifacts
    # The parent run itself carries the per-round metrics and the gate's decision (the experiment table).
    metrics, tags = parents[0].data.metrics, parents[0].data.tags
    assert metrics["round_test_auc"] == local_run.rounds[-1]["test_auc"] and "gain_test_auc" in metrics
    history = client.get_metric_history(parents[0].info.run_id, "round_val_auc")
    assert [m.step for m in history] == [0, 1]
    assert metrics["gate_promote"] == 1.0 and metrics["gate_promoted"] == 1.0
    assert tags["icmil.gate.decision"] == "promote" and tags["icmil.gate.final"] == "promoted"
    assert tags["icmil.model_version"] == "1"
    # The registered bundle: slim, with the validation-chosen threshold and its rule.
    import json

    source = client.get_model_version(reg["model"], "1").source.removeprefix("file://")
    settings = json.loads((Path(source) / "artifacts" / "bundle" / "settings.json").read_text())
    assert (
        settings["threshold"]["rule"] in ("youden", "default") and settings["threshold"]["value"] is not None
    )
    assert not (Path(source) / "artifacts" / "bundle" / "head" / "checkpoint").exists()


@pytest.mark.slow
def test_exit_handler_bookkeeping_marks_a_failed_run_failed(local_run: RunSummary) -> None:
    """What close-run does when KFP reports a failure (reusing this run's MLflow database: creating one is slow)."""
    from mlflow import MlflowClient

    from icmil.tracking import start_parent_run
    from icmil_kfp.components import _runtime as rt

    db = f"sqlite:///{local_run.run_dir / 'mlflow.db'}"
    cfg = load_config(None, [f"run_dir={local_run.run_dir}", f"tracking.tracking_uri={db}"])
    run_id = start_parent_run(cfg, run_name="broken", kfp_run_id="kfp-run-broken")
    assert rt.close_parent_run(cfg, "kfp-run-broken", "FAILED", "Task tile failed.") == "FAILED"
    run = MlflowClient(db).get_run(run_id)
    assert run.info.status == "FAILED"
    assert (
        run.data.tags["icmil.kfp_error"] == "Task tile failed."
        and run.data.tags["icmil.kfp_final_state"] == "FAILED"
    )


@pytest.mark.slow
def test_report_of_the_pipeline_run(local_run: RunSummary) -> None:
    """RUN/report.html from the pipeline's layout (RUN/kfp/<run>/<task>/...): both rounds, the gate's decision,
    the final round's heatmaps in the zoomable viewer."""
    import re

    from icmil.report import collect_run, write_run_report

    contents = collect_run(local_run.run_dir)
    assert sorted(contents.heads) == [0, 1] and len(contents.features[1]) == 2 and contents.manifest
    page = write_run_report(local_run.run_dir).read_text(encoding="utf-8")
    assert "Promoted: version 1 of" in page
    assert '<tr data-round="0">' in page and re.search(r'<tr( class="kept")? data-round="1">', page)
    slides = re.search(r'id="slides-data" type="application/json">(.*?)</script>', page, re.S)
    assert slides and json.loads(slides.group(1))
    assert (local_run.run_dir / "report_files" / "openseadragon" / "openseadragon.min.js").is_file()


def _tree(tracking_uri: str) -> tuple[set[str], dict[str, list[int]], dict[str, str]]:
    """The shape of the one run tree in an MLflow store: child run names under the parent, the parent's
    per-round metric series (name -> steps), and the tags of each round's evaluate run that mark kept teachers."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("icmil")
    runs = client.search_runs([exp.experiment_id])
    # The one parent run that has children (the exit-handler test adds a childless "broken" parent to this store).
    child_of = [r.data.tags.get("mlflow.parentRunId") for r in runs]
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_id in child_of]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    series = {
        name: [m.step for m in client.get_metric_history(parent.info.run_id, name)]
        for name in parent.data.metrics
        if name.startswith(("round_", "gain_"))
    }
    kept = {
        r.info.run_name: r.data.tags.get("teacher_kept", "")
        for r in children
        if r.info.run_name.endswith("/evaluate")
    }
    return {r.info.run_name for r in children}, series, kept


@pytest.mark.slow
def test_couple_and_run_make_the_same_mlflow_run_tree(local_run: RunSummary, tmp_path: Path) -> None:
    """`icmil couple` with tracking set records the run as `icmil run` does: one parent run, a child run per
    round and tracked stage, the per-round summary on the parent (the pipeline adds its register run and the
    gate's decision)."""
    from icmil.rounds import couple

    db = f"sqlite:///{tmp_path / 'couple.db'}"
    cfg = load_config(None, [f"run_dir={tmp_path / 'couple'}", *TINY, f"tracking.tracking_uri={db}"])
    table = couple(cfg)
    assert list(table["round"]) == [r["round"] for r in local_run.rounds]
    couple_children, couple_series, couple_kept = _tree(db)
    run_children, run_series, run_kept = _tree(f"sqlite:///{local_run.run_dir / 'mlflow.db'}")
    assert run_children - couple_children == {"register"}  # (the gate's decision goes on the parent run)
    assert couple_children == run_children - {"register"}
    assert run_series == couple_series
    assert couple_kept == run_kept
    assert "round_test_auc" in couple_series and couple_series["round_test_auc"] == [0, 1]


# Stage 2 trains no encoder layer (coupling.train_blocks=0): every student's encoder is the teacher's, so none
# can beat it and each round keeps its teacher - deterministically, whatever the data.
KEPT = [*TINY, "coupling.rounds=2", "coupling.train_blocks=0", "coupling.force_rounds=true"]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> RunSummary:
    run_dir = tmp_path_factory.mktemp("icmil-kept")
    return run_local(load_config(None, [f"run_dir={run_dir}", *KEPT]), print_summary=False)


@pytest.mark.slow
def test_a_kept_teacher_neither_re_embeds_nor_retrains_in_the_pipeline(kept_run: RunSummary) -> None:
    from mlflow import MlflowClient

    rows = kept_run.rounds
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["teacher_kept"] for r in rows] == [False, True, True]
    assert [r.get("reused_from_round") for r in rows] == [None, 0, 0]
    for key in ("test_auc", "val_auc", "patch_auc_test"):
        assert rows[1][key] == rows[2][key] == rows[0][key], key
    assert rows[2]["finetune_best_step"] == 0
    # Stage 2 ran in rounds 1 and 2 (forced: round 2's teacher view is round 0's merged features); nothing
    # was embedded or trained after round 0. (Output keys are task folders: <task>/<output>.)
    outputs = sorted(kept_run.outputs)
    assert len([k for k in outputs if k.endswith("/features")]) == 2  # round 0's two shards
    assert len([k for k in outputs if k.endswith("/head")]) == 1
    assert len([k for k in outputs if k.startswith("finetune") and k.endswith("/encoder")]) == 2
    assert len([k for k in outputs if k.startswith("keep-teacher")]) == 2
    assert len([k for k in outputs if k.startswith("evaluate")]) == 1
    # MLflow: the kept rounds' evaluate runs are marked; no train run after round 0; the parent has the series.
    client = MlflowClient(tracking_uri=f"sqlite:///{kept_run.run_dir / 'mlflow.db'}")
    children, series, kept = _tree(f"sqlite:///{kept_run.run_dir / 'mlflow.db'}")
    assert {"round1/finetune", "round2/finetune", "round1/evaluate", "round2/evaluate"} <= children
    assert not {"round1/train", "round2/train"} & children
    assert kept == {"round0/evaluate": "", "round1/evaluate": "true", "round2/evaluate": "true"}
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    history = client.get_metric_history(parent.info.run_id, "round_teacher_kept")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.0), (2, 1.0)]
    # The registered model is round 0's head with the (unchanged) encoder; the report marks the kept rounds.
    assert kept_run.registration["version"] == "1"
    assert series["round_test_auc"] == [0, 1, 2]
    from icmil.report import write_run_report

    page = write_run_report(kept_run.run_dir).read_text(encoding="utf-8")
    assert '<tr class="kept" data-round="1">' in page and '<tr class="kept" data-round="2">' in page
