"""``submit`` and ``schedule`` against a local KFP API server; cron validation."""

from __future__ import annotations

import json

import pytest
import yaml

from icmil.config import load_config
from icmil.errors import ConfigError, ICMILError
from icmil_kfp.pipelines.runner import schedule, submit, validate_cron
from tests.pipelines.fake_kfp import fake_kfp_server

CFG = ["coupling.rounds=1", "pipeline.pipeline_name=icmil-test"]


def _uploaded_pipeline(package: bytes) -> dict:
    return next(iter(yaml.safe_load_all(package.decode())))


def test_submit_uploads_the_pipeline_and_starts_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-123")
    cfg = load_config(None, CFG)
    with fake_kfp_server() as (host, state):
        run_id = submit(
            cfg, host, experiment="icmil-exp", service_account="icmil-pipeline-runner", run_name="nightly"
        )
        # Later submits reuse the pipeline; a version is named by the package's content digest, so the same
        # package is uploaded as a version once and then reused.
        submit(cfg, host, experiment="icmil-exp")
        submit(cfg, host, experiment="icmil-exp")
    assert run_id.startswith("run-")
    assert state.calls("GET", "/apis/v2beta1/healthz")
    uploads = state.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert len(uploads) == 1 and uploads[0].query["name"] == ["icmil-test"]
    assert uploads[0].form["_filenames"]["uploadfile"].endswith(".yaml")
    spec = _uploaded_pipeline(uploads[0].form["uploadfile"])
    assert spec["pipelineInfo"]["name"] == "icmil-test" and "comp-finetune" in spec["components"]
    assert len(state.calls("POST", "/apis/v2beta1/pipelines/upload_version")) == 1
    # Bearer token from the environment on every call.
    assert all(
        {k.lower(): v for k, v in r.headers.items()}.get("authorization") == "Bearer tok-123"
        for r in state.requests
    )
    exps = state.calls("POST", "/apis/v2beta1/experiments")
    assert len(exps) == 1 and exps[0].json["display_name"] == "icmil-exp"
    runs = state.calls("POST", "/apis/v2beta1/runs")
    assert len(runs) == 3
    refs = [r.json["pipeline_version_reference"]["pipeline_version_id"] for r in runs]
    assert refs[1] == refs[2] != refs[0]
    body = runs[0].json
    pid = next(iter(state.pipelines))
    version = state.versions[pid][0]
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == exps[0].json.get("experiment_id", body["experiment_id"])
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pid,
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert body["service_account"] == "icmil-pipeline-runner"
    assert "pipeline_spec" not in body  # runs reference the uploaded version
    assert body["runtime_config"].get("parameters", {}) == {}


def test_submit_uploads_a_new_version_when_the_pipeline_changed() -> None:
    with fake_kfp_server() as (host, state):
        submit(load_config(None, CFG), host)
        submit(load_config(None, [*CFG, "coupling.rounds=2"]), host)
    versions = state.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert len(versions) == 1  # the first submit created the pipeline (its first version) itself
    pid = next(iter(state.pipelines))
    assert versions[0].query["pipelineid"] == [pid]
    assert versions[0].query["name"][0].startswith("icmil-test-")
    spec = _uploaded_pipeline(versions[0].form["uploadfile"])
    assert "comp-finetune-2" in spec["components"]  # the 2-round pipeline
    second = state.calls("POST", "/apis/v2beta1/runs")[1].json
    assert (
        second["pipeline_version_reference"]["pipeline_version_id"]
        == state.versions[pid][-1]["pipeline_version_id"]
    )


def test_submit_passes_the_manifest_parameter_and_rejects_unknown_ones() -> None:
    cfg = load_config(None, [*CFG, "manifest=s3://slides/2024-01.csv"])
    with fake_kfp_server() as (host, state):
        submit(cfg, host, params={"manifest": "s3://slides/2024-02.csv"})
        with pytest.raises(ConfigError, match=r"unknown pipeline parameter\(s\) \['epochs'\]"):
            submit(cfg, host, params={"epochs": 3})
    body = state.calls("POST", "/apis/v2beta1/runs")[0].json
    assert body["runtime_config"]["parameters"] == {"manifest": "s3://slides/2024-02.csv"}
    assert len(state.calls("POST", "/apis/v2beta1/runs")) == 1


def test_schedule_creates_a_recurring_run_without_catchup_or_overlap() -> None:
    cfg = load_config(None, CFG)
    with fake_kfp_server() as (host, state):
        job_id = schedule(
            cfg, host, cron="0 0 3 * * 1", experiment="retraining", name="weekly", service_account="runner"
        )
        with pytest.raises(ConfigError, match="already exists"):
            schedule(cfg, host, cron="0 0 4 * * 1", experiment="retraining", name="weekly")
    assert job_id.startswith("rr-")
    jobs = state.calls("POST", "/apis/v2beta1/recurringruns")
    assert len(jobs) == 1
    body = jobs[0].json
    assert body["display_name"] == "weekly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert body["max_concurrency"] == "1" or body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "runner"
    pid = next(iter(state.pipelines))
    assert body["pipeline_version_reference"]["pipeline_id"] == pid
    # The duplicate name was refused before anything was uploaded a second time.
    assert len(state.calls("POST", "/apis/v2beta1/pipelines/upload")) == 1
    listing = state.calls("GET", "/apis/v2beta1/recurringruns")[-1]
    assert json.loads(listing.query["filter"][0])["predicates"][0]["stringValue"] == "weekly"


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * 1", r"5 fields.*Did you mean '0 0 3 \* \* 1'"),
        ("0 0 3 * * 1 2030", "7 fields"),
        ("0 60 3 * * *", "minute 60 is outside 0-59"),
        ("0 0 3 * * MON-FOO", "invalid value 'FOO'"),
        ("? 0 3 * * *", r"'\?' is allowed only"),
        ("0 */0 * * * *", "invalid step"),
        ("0 0 5-3 * * *", "runs backwards"),
    ],
)
def test_bad_cron_gets_a_clear_error(cron: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_cron(cron)


@pytest.mark.parametrize(
    "cron", ["0 0 3 * * 1", "*/30 * * * * *", "0 15 10 ? * MON-FRI", "0 0 0 1,15 JAN,JUL *"]
)
def test_valid_cron(cron: str) -> None:
    assert validate_cron(cron) == cron


def test_schedule_validates_cron_before_contacting_the_server() -> None:
    with pytest.raises(ConfigError, match="5 fields"):
        schedule(load_config(None, CFG), "http://127.0.0.1:9", cron="0 3 * * 1")


def test_missing_token_and_unreachable_host_give_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    cfg = load_config(None, CFG)
    with fake_kfp_server(token="right") as (host, state):
        with pytest.raises(ICMILError, match=r"HTTP 401.*KF_PIPELINES_TOKEN"):
            submit(cfg, host)
        assert submit(cfg, host, token="right").startswith("run-")
    assert len(state.calls("POST", "/apis/v2beta1/runs")) == 1
    with fake_kfp_server() as (host, _):
        pass  # the server is gone: nothing listens on that port any more
    with pytest.raises(ICMILError, match=f"cannot reach Kubeflow Pipelines at {host}"):
        schedule(cfg, host, cron="0 0 3 * * 1")
