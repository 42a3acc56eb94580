"""The pyfunc slide classifier: save (safetensors, no pickle), log to a run, load back, predict slides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from icmil.config import TilingConfig
from icmil.errors import ConfigError, StageFailed
from icmil.tracking import log_slide_classifier, predict_slides, save_slide_classifier, start_parent_run
from icmil.tracking.slide_classifier import as_slide_table, open_slide_classifier
from icmil.tracking.uris import resolve_tracking_uri
from tests.tracking.helpers import CLASSES, make_cfg

# Small patches so a 1024 x 768 synthetic slide yields a few dozen of them.
TILING = ["tiling.patch_size=64", "tiling.min_tissue_fraction=0.5"]


def test_slide_table_from_list_and_frame() -> None:
    df = as_slide_table(pd.DataFrame({"path": ["x/a.svs"], "mpp": [0.25]}))
    assert df.to_dict("records") == [{"slide_id": "a", "path": "x/a.svs", "mpp": 0.25}]
    with pytest.raises(ConfigError, match="'path' column"):
        as_slide_table(pd.DataFrame({"file": ["a"]}))


def test_model_folder_contents(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    p = tiny_model_parts
    out = save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), None, tmp_path / "model")
    files = {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()}
    assert {"MLmodel", "requirements.txt", "input_example.json"} <= files
    assert {
        "artifacts/bundle/encoder/weights.safetensors",
        "artifacts/bundle/head/weights.safetensors",
    } <= files
    assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in files), files  # nothing pickled
    reqs = (out / "requirements.txt").read_text()
    assert "torch==" in reqs and "mlflow==" in reqs
    mlmodel = (out / "MLmodel").read_text()
    assert "signature:" in mlmodel and "prob_tumor" in mlmodel
    settings = json.loads((out / "artifacts/bundle/settings.json").read_text())
    assert settings["classes"] == CLASSES and settings["tiling"]["patch_size"] == 256
    # Same inputs: the folder is reused untouched (resume); a head without class names needs classes=.
    mtime = (out / "MLmodel").stat().st_mtime_ns
    save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), None, out)
    assert (out / "MLmodel").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="class names"):
        save_slide_classifier(p["encoder"], p["head0"], TilingConfig(), ["a", "b", "c"], tmp_path / "m2")


def test_log_load_and_predict_slides(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    p = tiny_model_parts
    cfg = make_cfg(tmp_path / "run", *TILING)
    parent = start_parent_run(cfg)
    uri = resolve_tracking_uri(cfg)
    model_uri = log_slide_classifier(
        p["encoder"],
        p["head0"],
        cfg.tiling,
        CLASSES,
        run_id=parent,
        tracking_uri=uri,
        out_dir=tmp_path / "model",
    )
    assert model_uri == f"runs:/{parent}/slide_classifier"
    assert (tmp_path / "model" / "MLmodel").is_file()  # on disk first
    names = {a.path for a in MlflowClient(uri).list_artifacts(parent, "slide_classifier")}
    assert "slide_classifier/MLmodel" in names

    missing = tmp_path / "missing.svs"
    table = predict_slides(
        model_uri,
        [str(p["slide"]), str(missing)],
        tmp_path / "pred",
        tracking_uri=uri,
        max_failed_fraction=0.5,
    )
    assert list(table["slide_id"]) == ["slide_a", "missing"]
    good, bad = table.iloc[0], table.iloc[1]
    assert good["error"] == "" and good["n_patches"] > 0
    assert math.isclose(good["prob_normal"] + good["prob_tumor"], 1.0, rel_tol=1e-5)
    assert good["label"] in CLASSES and Path(good["heatmap"]).is_file()
    assert Path(good["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    assert "missing" in bad["error"] and math.isnan(bad["prob_tumor"])
    assert (tmp_path / "pred" / "predictions.csv").is_file()

    # The features the first call wrote can be fed back in: same probabilities, no slide needed.
    feats = tmp_path / "pred" / "features" / "slide_a.h5"
    again = predict_slides(model_uri, [str(feats)], tmp_path / "pred2", tracking_uri=uri, heatmaps=False)
    assert math.isclose(again.iloc[0]["prob_tumor"], good["prob_tumor"], rel_tol=1e-5)
    # Everything failing is a StageFailed that names the slide (the table is still written).
    with pytest.raises(StageFailed, match="missing"):
        predict_slides(model_uri, [str(missing)], tmp_path / "pred3", tracking_uri=uri)
    assert (tmp_path / "pred3" / "predictions.csv").is_file()


def test_features_from_another_encoder_are_refused(tiny_model_parts: dict[str, Path], tmp_path: Path) -> None:
    import numpy as np

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
        table = model.predict(pd.DataFrame({"path": [str(feats)]}), params={"heatmaps": False})
    assert "not this model's coupled encoder" in table.iloc[0]["error"]
