"""The registered slide classifier: a slim bundle (safetensors + JSON, no pickle, no training leftovers) with a
contract, loaded by the installed icmil code (never the Python file stored with the model), and the prediction
bundle `icmil predict` writes per slide (prediction.json, QuPath GeoJSON, absolute heatmap, run_metadata.json)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from icmil.cli import main
from icmil.config import SynthConfig, TilingConfig
from icmil.errors import ConfigError, StageFailed
from icmil.registry import log_slide_classifier, predict_slides, register_challenger, save_slide_classifier
from icmil.registry.slide_classifier import BUNDLE_IN_MODEL, as_slide_table, open_slide_classifier
from icmil.tracking import start_parent_run
from icmil.tracking.uris import resolve_tracking_uri
from tests.tracking.helpers import CLASSES, make_cfg

# Small patches so a 1024 x 768 synthetic slide yields a few dozen of them.
TILING = ["tiling.patch_size=64", "tiling.min_tissue_fraction=0.5"]
THRESHOLD = {"rule": "youden", "value": 0.42, "positive_class": "tumor", "split": "val", "n_slides": 6}


def test_slide_table_from_list_and_frame() -> None:
    df = as_slide_table(pd.DataFrame({"path": ["x/a.svs"], "mpp": [0.25]}))
    assert df.to_dict("records") == [{"slide_id": "a", "path": "x/a.svs", "mpp": 0.25}]
    with pytest.raises(ConfigError, match="'path' column"):
        as_slide_table(pd.DataFrame({"file": ["a"]}))


def _head_with_training_leftovers(src: Path, dst: Path) -> Path:
    """A head folder as training leaves it: weights + config, and a checkpoint, optimiser state, predictions."""
    shutil.copytree(src, dst)
    (dst / "checkpoint").mkdir()
    (dst / "checkpoint" / "optim-3.safetensors").write_bytes(b"x" * 1000)
    (dst / "checkpoint" / "model-3.safetensors").write_bytes(b"x" * 1000)
    (dst / "predictions.csv").write_text("slide_id,path,label\ntrain_1,/cohort/secret/train_1.svs,tumor\n")
    (dst / "history.csv").write_text("epoch,loss\n1,0.5\n")
    (dst / "metrics.json").write_text("{}")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "run_key": "abc", "mil_config": {"epochs": 3}}))
    return dst


def test_bundle_holds_only_what_prediction_needs(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    p = tiny_model_parts
    head = _head_with_training_leftovers(p["head0"], tmp_path / "head")
    out = save_slide_classifier(
        p["encoder"], head, TilingConfig(), None, tmp_path / "model", threshold=THRESHOLD
    )
    bundle = out / BUNDLE_IN_MODEL
    files = sorted(f.relative_to(bundle).as_posix() for f in bundle.rglob("*") if f.is_file())
    assert files == [
        "encoder/config.json",
        "encoder/weights.safetensors",
        "head/config.json",
        "head/weights.safetensors",
        "settings.json",
    ]
    assert set(json.loads((bundle / "head" / "config.json").read_text())) == {
        "head",
        "in_dim",
        "n_classes",
        "kwargs",
        "classes",
    }
    everything = {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()}
    assert {"MLmodel", "requirements.txt", "input_example.json"} <= everything
    assert not any(f.endswith((".pkl", ".pt", ".pth", ".csv")) for f in everything), everything
    settings = json.loads((bundle / "settings.json").read_text())
    assert settings["classes"] == CLASSES and settings["threshold"] == THRESHOLD
    contract = settings["contract"]
    assert (
        contract["target_mpp"] == 0.5 and contract["patch_size"] == 256 and contract["max_slide_mpp"] == 0.55
    )
    assert contract["encoder"]["name"] == "tiny_cnn" and contract["encoder"]["digest"]
    assert set(settings["files"]) == {f for f in files if f != "settings.json"}
    mlmodel = (out / "MLmodel").read_text()
    assert "signature:" in mlmodel and "prob_tumor" in mlmodel and "predicted_label" in mlmodel
    # Same inputs: the folder is reused untouched (resume); a head without class names needs classes=.
    mtime = (out / "MLmodel").stat().st_mtime_ns
    save_slide_classifier(p["encoder"], head, TilingConfig(), None, out, threshold=THRESHOLD)
    assert (out / "MLmodel").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="class names"):
        save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), ["a", "b", "c"], tmp_path / "m2")


def test_a_damaged_bundle_is_refused(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    p = tiny_model_parts
    out = save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), None, tmp_path / "model")
    weights = out / BUNDLE_IN_MODEL / "head" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with (
        pytest.raises(ConfigError, match=r"head/weights.safetensors has SHA-256.*altered or damaged"),
        open_slide_classifier(str(out)),
    ):
        pass


@pytest.fixture()
def registered(tiny_model_parts: dict[str, Path], tmp_path: Path) -> dict[str, object]:
    """A slide classifier logged to a run and registered as version 1 with alias ``champion``."""
    p = tiny_model_parts
    cfg = make_cfg(tmp_path / "run", *TILING)
    parent = start_parent_run(cfg)
    uri = resolve_tracking_uri(cfg)
    model_uri = log_slide_classifier(
        p["encoder"], p["head0"], cfg.tiling, CLASSES, run_id=parent, tracking_uri=uri, threshold=THRESHOLD
    )
    version = register_challenger(model_uri, "slides", tracking_uri=uri)
    MlflowClient(uri).set_registered_model_alias("slides", "champion", version)
    source = Path(MlflowClient(uri).get_model_version("slides", version).source.removeprefix("file://"))
    return {"uri": uri, "model_uri": model_uri, "source": source, "slide": p["slide"]}


def test_log_load_and_predict_slides(registered: dict[str, object], tmp_path: Path) -> None:
    uri, model_uri, slide = (
        str(registered["uri"]),
        str(registered["model_uri"]),
        Path(str(registered["slide"])),
    )
    missing = tmp_path / "missing.svs"
    table = predict_slides(
        model_uri, [str(slide), str(missing)], tmp_path / "pred", tracking_uri=uri, max_failed_fraction=0.5
    )
    assert list(table["slide_id"]) == ["slide_a", "missing"]
    assert "label" not in table.columns and "predicted_label" in table.columns
    good, bad = table.iloc[0], table.iloc[1]
    assert good["status"] == "ok" and good["error"] == "" and good["n_patches"] > 0
    assert math.isclose(good["prob_normal"] + good["prob_tumor"], 1.0, rel_tol=1e-5)
    assert good["predicted_label"] == ("tumor" if good["prob_tumor"] >= 0.42 else "normal")
    assert bad["status"] == "failed" and "missing" in bad["error"] and math.isnan(bad["prob_tumor"])
    assert (tmp_path / "pred" / "predictions.csv").is_file()

    # The features the first call wrote can be fed back in: same probabilities, no slide needed.
    feats = tmp_path / "pred" / "features" / "slide_a.h5"
    again = predict_slides(model_uri, [str(feats)], tmp_path / "pred2", tracking_uri=uri, heatmaps=False)
    assert math.isclose(again.iloc[0]["prob_tumor"], good["prob_tumor"], rel_tol=1e-5)
    # Everything failing is a StageFailed that names the slide (the table is still written).
    with pytest.raises(StageFailed, match="missing"):
        predict_slides(model_uri, [str(missing)], tmp_path / "pred3", tracking_uri=uri)
    assert (tmp_path / "pred3" / "predictions.csv").is_file()


def test_predict_cli_writes_the_prediction_bundle(
    registered: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, slide = str(registered["uri"]), Path(str(registered["slide"]))
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("case1.tiff", "case2.tiff"):
        shutil.copyfile(slide, folder / name)
    out = tmp_path / "out"
    args = ["predict", "--model", "models:/slides@champion", "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, str(folder / "case*.tiff")]) == 0  # a glob, expanded by icmil
    printed = capsys.readouterr().out
    assert "predicted_label" in printed and "2 of 2 slide(s) predicted, 0 failed" in printed

    folder1 = out / "slides" / "case1"
    record = json.loads((folder1 / "prediction.json").read_text())
    assert record["status"] == "ok" and set(record["probabilities"]) == set(CLASSES)
    assert record["predicted_label"] in CLASSES
    assert record["decision"]["rule"] == "youden" and record["decision"]["value"] == 0.42
    assert record["decision"]["applied"].startswith("p(tumor) = ")
    assert record["model"]["uri"] == "models:/slides@champion"
    assert record["model"]["version"] == "1" and record["model"]["alias"] == "champion"
    assert record["encoder"]["digest"] == record["contract"]["encoder"]["digest"]
    assert record["slide"]["mpp"] == pytest.approx(0.5) and record["outputs"]["heatmap_scale"] == "absolute"

    # GeoJSON: valid per the specification (checked by the geojson library), QuPath objects and measurements.
    collection = geojson.loads((folder1 / "case1.geojson").read_text())
    assert isinstance(collection, geojson.FeatureCollection) and collection.is_valid
    assert all(f.is_valid and f["geometry"].is_valid for f in collection["features"])
    kinds = [f["properties"]["objectType"] for f in collection["features"]]
    assert kinds[0] == "annotation" and kinds.count("detection") == record["slide"]["n_patches"]
    tissue = collection["features"][0]
    assert (
        tissue["geometry"]["type"] == "MultiPolygon"
        and tissue["properties"]["classification"]["name"] == "Tissue"
    )
    patch = collection["features"][1]
    ring = np.asarray(patch["geometry"]["coordinates"][0])
    assert np.ptp(ring[:, 0]) == 64 and np.ptp(ring[:, 1]) == 64  # one 64-px patch at level 0 (0.5 µm/px)
    measurements = patch["properties"]["measurements"]
    assert {"tumor probability", "normal probability", "attention", "attention percentile"} <= set(
        measurements
    )
    assert 0.0 <= measurements["tumor probability"] <= 1.0
    assert (folder1 / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["arguments"]["slides"] == [str(folder / "case*.tiff")] and len(meta["slides"]) == 2
    assert meta["versions"]["torch"] and meta["versions"]["icmil"] and "git_commit" in meta
    assert meta["model"]["version"] == "1"

    # A rerun reuses the cached tiles and features (nothing is recomputed) and the rank-normalised option works.
    features = out / "features" / "case1.h5"
    stamp = features.stat().st_mtime_ns
    assert main([*args, "--heatmap-scale", "rank", str(folder / "case1.tiff")]) == 0
    assert features.stat().st_mtime_ns == stamp
    assert json.loads((folder1 / "prediction.json").read_text())["outputs"]["heatmap_scale"] == "rank"
    # A manifest CSV works too (relative paths resolve against it).
    manifest = folder / "new.csv"
    manifest.write_text("slide_id,path\nfirst,case1.tiff\n")
    assert main([*args, "--manifest", str(manifest)]) == 0
    assert (out / "slides" / "first" / "prediction.json").is_file()


def test_partial_predict_prints_what_succeeded_and_what_failed(
    registered: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, slide = str(registered["uri"]), str(registered["slide"])
    args = [
        "predict",
        "--model",
        "models:/slides@champion",
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, slide, str(tmp_path / "gone.svs")]) == 2  # 1 of 2 failed > the model's 10 % limit
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(
        line.split()[:3] == ["slide_a", "ok", "tumor"] or line.split()[:3] == ["slide_a", "ok", "normal"]
        for line in lines
    )
    assert any(line.split()[:2] == ["gone", "failed"] for line in lines)
    assert "1 of 2 slide(s) predicted, 1 failed" in captured.out
    assert "gone" in captured.err and "max_failed_fraction" in captured.err
    assert (tmp_path / "o" / "slides" / "slide_a" / "prediction.json").is_file()
    # Within the given tolerance the exit code is 0 and the failure is still in the table.
    assert main([*args, "--max-failed-fraction", "0.5", slide, str(tmp_path / "gone.svs")]) == 0
    assert "gone" in capsys.readouterr().out


def test_contract_mismatch_is_refused_clearly(registered: dict[str, object], tmp_path: Path) -> None:
    from icmil.slides import write_synthetic_slide

    coarse = tmp_path / "coarse.tiff"  # scanned at 1 µm/px: the model needs 0.5 µm/px patches
    write_synthetic_slide(coarse, SynthConfig(mpp=1.0), seed=2, positive=False, width=2048, height=1536)
    table = predict_slides(
        str(registered["model_uri"]),
        [str(coarse)],
        tmp_path / "o",
        tracking_uri=str(registered["uri"]),
        max_failed_fraction=1.0,
    )
    error = table.iloc[0]["error"]
    assert "contract mismatch" in error and "1 µm/px" in error and "0.55 µm/px" in error
    assert (
        json.loads((tmp_path / "o" / "slides" / "coarse" / "prediction.json").read_text())["status"]
        == "failed"
    )
    # A wrong µm/px in the file can be corrected from the manifest: then the slide is accepted.
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,mpp\n{coarse},0.5\n")
    ok = predict_slides(
        str(registered["model_uri"]), [str(manifest)], tmp_path / "o2", tracking_uri=str(registered["uri"])
    )
    assert ok.iloc[0]["status"] == "ok"


def test_predict_never_runs_the_code_stored_with_the_model(
    registered: dict[str, object], tmp_path: Path
) -> None:
    """Anyone who can write to the registry could replace the model's Python file: predict must not run it."""
    source = Path(str(registered["source"]))
    marker = tmp_path / "pwned"
    for code in source.glob("*.py"):
        code.write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('registry code ran')\n")
    table = predict_slides(
        "models:/slides@champion",
        [str(registered["slide"])],
        tmp_path / "o",
        tracking_uri=str(registered["uri"]),
    )
    assert table.iloc[0]["status"] == "ok" and not marker.exists()


def test_features_from_another_encoder_are_refused(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    from icmil.features import write_features

    p = tiny_model_parts
    out = save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), None, tmp_path / "model")
    feats = tmp_path / "other.h5"
    write_features(
        feats,
        np.zeros((4, 16), np.float32),
        np.zeros((4, 2), np.int64),
        {"encoder_digest": "0" * 16, "slide_id": "o"},
    )
    with open_slide_classifier(str(out)) as model:
        table = model.classify(as_slide_table([str(feats)]), tmp_path / "o", heatmaps=False)
    assert "not this model's coupled encoder" in table.iloc[0]["error"]


def test_the_pyfunc_flavour_still_serves(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    """`mlflow models serve` loads the same folder as a pyfunc (that path runs the stored code, by design)."""
    import mlflow.pyfunc

    p = tiny_model_parts
    tiling = TilingConfig(patch_size=64, min_tissue_fraction=0.5)
    out = save_slide_classifier(p["encoder"], p["head0"], tiling, None, tmp_path / "model")
    with open_slide_classifier(str(out)) as model:
        feats = model.classify(as_slide_table([str(p["slide"])]), tmp_path / "direct", heatmaps=False)
    served = mlflow.pyfunc.load_model(str(out))
    table = pd.DataFrame(
        served.predict(
            pd.DataFrame({"path": [str(p["slide"])]}), params={"out_dir": str(tmp_path / "served")}
        )
    )
    assert list(table.columns) == list(feats.columns) and table.iloc[0]["status"] == "ok"
    assert table.iloc[0]["prob_tumor"] == pytest.approx(feats.iloc[0]["prob_tumor"], rel=1e-5)
    assert (tmp_path / "served" / "slides" / "slide_a" / "slide_a.geojson").is_file()


@pytest.mark.servers
def test_predict_slides_from_s3_uris_and_globs(
    registered: dict[str, object],
    s3_server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    s3_server.apply_env(monkeypatch)
    bucket = s3_server.ensure_bucket("icmil-predict")
    data = Path(str(registered["slide"])).read_bytes()
    for key in ("new/a.tiff", "new/b.tiff", "other/c.tiff"):
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)
    table = predict_slides(
        "models:/slides@champion",
        [f"s3://{bucket}/new/*.tiff", f"s3://{bucket}/other/c.tiff"],
        tmp_path / "o",
        tracking_uri=str(registered["uri"]),
    )
    assert list(table["slide_id"]) == ["a", "b", "c"] and set(table["status"]) == {"ok"}
    assert table.iloc[0]["path"] == f"s3://{bucket}/new/a.tiff"
    assert (tmp_path / "o" / "slides" / "c" / "c.geojson").is_file()
    with pytest.raises(ConfigError, match="no slide matches"):
        predict_slides(
            "models:/slides@champion",
            [f"s3://{bucket}/none/*.svs"],
            tmp_path / "o2",
            tracking_uri=str(registered["uri"]),
        )
