"""The full flow against a real MLflow server (PostgreSQL backend, artifacts on S3 via the server's proxy):
run hierarchy -> logged model -> versions -> promotion gate -> ``models:/NAME@champion`` predicts a slide;
then promotion from the server's registry into a second (sqlite) registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from icmil.errors import PromotionRejected
from icmil.registry import (
    CHAMPION,
    log_slide_classifier,
    predict_slides,
    promote,
    register_challenger,
)
from icmil.tracking import RetryPolicy, end_parent_run, start_parent_run, tracker_for
from tests.tracking.helpers import CLASSES, fresh_sqlite, make_cfg

pytestmark = pytest.mark.servers
FAST = RetryPolicy(retries=1, backoff=0.01)


def test_full_flow_on_postgres_and_s3(  # type: ignore[no-untyped-def]
    mlflow_server, s3_server, tiny_model_parts: dict[str, Path], tmp_path: Path
) -> None:
    p = tiny_model_parts
    cfg = make_cfg(
        tmp_path / "run",
        f"tracking.tracking_uri={mlflow_server.url}",
        "tracking.experiment=server-flow",
        "tiling.patch_size=64",
        "tiling.min_tissue_fraction=0.5",
    )
    client = MlflowClient(mlflow_server.url)
    name = "server-slide-classifier"
    versions = []
    for k, auc in ((0, 0.7), (1, 0.9)):
        parent = start_parent_run(
            cfg, run_name=f"pipeline-{k}", kfp_run_id=f"kfp-{k}", encoder_digest="e" * 16
        )
        tracker = tracker_for(cfg, parent)
        with tracker.stage("train", round_index=0) as run:
            run.log_metrics({"val_auc": auc}, step=0)
        with tracker.stage("register") as run:
            model_uri = log_slide_classifier(
                p["encoder"],
                p[f"head{k}"],
                cfg.tiling,
                CLASSES,
                run_id=run.run_id,
                tracking_uri=mlflow_server.url,
                out_dir=tmp_path / f"model{k}",
                retry=FAST,
            )
            versions.append(
                register_challenger(
                    model_uri,
                    name,
                    metrics={"test": {"auc": auc}},
                    data_digests={"test": "same-test-split"},
                    parent_run_id=parent,
                    tracking_uri=mlflow_server.url,
                    retry=FAST,
                )
            )
        result = promote(
            name, "auc", "test", margin=0.05, floor=0.6, tracking_uri=mlflow_server.url, retry=FAST
        )
        assert result.promoted and result.target_version == versions[-1]
        end_parent_run(cfg, parent)
        exp_id = client.get_run(parent).info.experiment_id
        children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert {c.info.run_name for c in children} == {"round0/train", "register"}

    # The artifacts really are in the S3 bucket behind the server.
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("slide_classifier/artifacts/bundle/head/weights.safetensors") for k in keys)

    # A weaker third version is rejected; champion stays.
    v3 = register_challenger(
        f"runs:/{client.get_model_version(name, versions[0]).run_id}/slide_classifier",
        name,
        metrics={"test": {"auc": 0.8}},
        data_digests={"test": "same-test-split"},
        tracking_uri=mlflow_server.url,
    )
    with pytest.raises(PromotionRejected, match="does not beat"):
        promote(name, "auc", "test", margin=0.05, floor=0.6, tracking_uri=mlflow_server.url, retry=FAST)
    assert client.get_model_version_by_alias(name, CHAMPION).version == versions[1] != v3

    # models:/NAME@champion loads from the server and predicts a slide (tiled + embedded on the fly).
    table = predict_slides(
        f"models:/{name}@{CHAMPION}", [p["slide"]], tmp_path / "pred", tracking_uri=mlflow_server.url
    )
    assert (
        table.loc[0, "error"] == ""
        and table.loc[0, "n_patches"] > 0
        and (Path(table.loc[0, "output_dir"]) / "heatmap.png").is_file()
        and (Path(table.loc[0, "output_dir"]) / "prediction.json").is_file()
    )

    # Promote the challenger (v3) into another registry, where there is no champion yet: the version there
    # points at the server's artifacts over HTTP and predicts exactly like v3 on the server.
    prod = fresh_sqlite(tmp_path / "prod" / "mlflow.db")
    result = promote(name, "auc", "test", 0.0, 0.6, tracking_uri=mlflow_server.url, target_registry_uri=prod)
    assert result.promoted and result.challenger_version == v3
    prod_mv = MlflowClient(prod).get_model_version_by_alias(name, CHAMPION)
    assert prod_mv.source.startswith(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/")
    slide = [table.loc[0, "path"]]
    on_prod = predict_slides(
        f"models:/{name}@{CHAMPION}", slide, tmp_path / "pred", tracking_uri=prod, heatmaps=False
    )
    on_dev = predict_slides(
        f"models:/{name}/{v3}", slide, tmp_path / "pred", tracking_uri=mlflow_server.url, heatmaps=False
    )
    assert on_prod.loc[0, "prob_tumor"] == pytest.approx(on_dev.loc[0, "prob_tumor"], rel=1e-5)


def test_promotion_from_a_local_registry_into_the_server(  # type: ignore[no-untyped-def]
    mlflow_server, tiny_model_parts: dict[str, Path], tmp_path: Path
) -> None:
    """dev on a laptop (sqlite, file:// artifacts) -> prod server: the server cannot read local files, so the
    model is uploaded to it; the version there loads from the server alone."""
    p = tiny_model_parts
    cfg = make_cfg(tmp_path / "dev")
    dev = str(cfg.run_dir / "mlflow.db")
    dev_uri = f"sqlite:///{dev}"
    parent = start_parent_run(cfg)
    model_uri = log_slide_classifier(
        p["encoder"], p["head0"], cfg.tiling, CLASSES, run_id=parent, tracking_uri=dev_uri
    )
    register_challenger(model_uri, "laptop-model", metrics={"test": {"auc": 0.75}}, tracking_uri=dev_uri)
    result = promote(
        "laptop-model", "auc", "test", 0.0, 0.6, tracking_uri=dev_uri, target_registry_uri=mlflow_server.url
    )
    assert result.promoted
    mv = MlflowClient(mlflow_server.url).get_model_version_by_alias("laptop-model", CHAMPION)
    assert mv.source.startswith("mlflow-artifacts:/") and mv.tags["icmil.metric.test.auc"] == "0.75"
    from icmil.registry.slide_classifier import open_slide_classifier

    with open_slide_classifier("models:/laptop-model@champion", tracking_uri=mlflow_server.url) as model:
        assert model.classes == CLASSES and model.ref["version"] == mv.version
