"""A whole pipeline run against a real MLflow server whose URI carries a password, with more secrets planted in
the environment: no output of the run holds any of them — not the run folder (pipeline.log, configs, task
outputs), not what the command printed, not the parameters, tags or artifacts stored in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from icmil.cli import main

PASSWORD = "PLANTEDpw8d2c"
AWS_SECRET = "PLANTED-aws-9b1e4f"
KFP_TOKEN = "PLANTED-kfp-token-51aa"
PLANTED = (PASSWORD, AWS_SECRET, KFP_TOKEN)

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
    "coupling.rounds=0",
    "coupling.initial_bn_calibration=0",
    "pipeline.shards=1",
    "tracking.experiment=secrets",
    "tracking.promotion_floor=0.0",
]


def _leaks(data: bytes) -> list[str]:
    return [s for s in PLANTED if s.encode() in data]


@pytest.mark.slow
@pytest.mark.servers
def test_no_output_of_a_run_holds_a_planted_secret(
    mlflow_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    secret_uri = mlflow_server.url.replace("http://", f"http://icmil:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", KFP_TOKEN)
    # MLflow prints "View run ... at <URI with the password>" unless told not to: as in a user's shell.
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), *[a for o in TINY for a in ("--set", o)]]) == 0
    printed = capfd.readouterr()

    leaks: dict[str, list[str]] = {}
    assert (run / "kfp" / "pipeline.log").is_file()
    for path in run.rglob("*"):
        if path.is_file() and (found := _leaks(path.read_bytes())):
            leaks[str(path)] = found
    for name, text in (("stdout", printed.out), ("stderr", printed.err)):
        if found := _leaks(text.encode()):
            leaks[name] = found

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 4  # parent, round0/train, round0/evaluate, register
    downloads = tmp_path / "artifacts"
    for r in runs:
        stored = repr(r.data.params) + repr(r.data.tags) + repr(r.info)
        if found := _leaks(stored.encode()):
            leaks[f"mlflow run {r.info.run_name} params/tags"] = found
        folder = Path(client.download_artifacts(r.info.run_id, "", str(downloads / r.info.run_id)))
        for path in folder.rglob("*"):
            if path.is_file() and (found := _leaks(path.read_bytes())):
                leaks[f"mlflow artifact {path.relative_to(downloads)}"] = found
    assert not leaks, leaks
    # The run did talk to the server through the URI with the password, and said where (redacted).
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert "round_test_auc" in parent.data.metrics and parent.data.tags["icmil.gate.decision"] == "promote"
    assert "http://***@127.0.0.1" in (run / "kfp" / "pipeline.log").read_text() + printed.err
