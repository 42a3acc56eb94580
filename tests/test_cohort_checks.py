"""Splits and cohort checks as a user meets them through ``icmil couple`` and ``icmil run``: official
train/test splits get a validation split carved from train, and a bad cohort fails in seconds, before any
tiling or embedding, with a message that names what is wrong."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pandas as pd
import pytest

from icmil.cli import main
from icmil.config import SynthConfig
from icmil.slides import synthesize_cohort

TINY = [
    "tiling.target_mpp=1.0",
    "tiling.patch_size=64",
    "tiling.mask_mpp=4.0",
    "tiling.min_tissue_area_um2=2000",
    "tiling.min_hole_area_um2=400",
    "encoder.name=tiny_cnn",
    "embed.num_workers=0",
    "embed.batch_size=256",
    "mil.epochs=2",
    "mil.patience=null",
    "mil.bootstrap_samples=0",
    "mil.max_heatmaps=0",
    "coupling.initial_bn_calibration=0",
]


def _sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


@pytest.fixture(scope="module")
def camelyon_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small slides with official splits, train and test only (as Camelyon16 ships them)."""
    root = tmp_path_factory.mktemp("official")
    source = synthesize_cohort(
        root,
        SynthConfig(n_slides=12, width=1024, height=768, seed=4, tissue_blobs=(1, 2), tissue_coverage=0.5),
    )
    rows = list(csv.DictReader(source.open()))
    for row in rows:
        row["split"] = "train" if row["split"] == "val" else row["split"]
    out = root / "train_test.csv"
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_couple_carves_a_val_split_from_train_and_trains(
    camelyon_like: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["couple", "--manifest", str(camelyon_like), "--out", str(run), "--rounds", "0"]
    assert main([*args, *_sets([*TINY, "val_fraction=0.25"])]) == 0
    resolved = pd.read_csv(run / "manifest.csv")
    official = pd.read_csv(camelyon_like).set_index("slide_id")["split"]
    val = resolved[resolved["split"] == "val"]
    assert len(val) >= 2 and set(val["label"]) == {"normal", "tumor"}  # stratified
    assert (official[val["slide_id"]] == "train").all()  # carved from train only
    assert set(val["split_source"]) == {"carved from train (val_fraction=0.25, seed=0)"}
    test_ids = set(resolved.loc[resolved["split"] == "test", "slide_id"])
    assert test_ids == set(official[official == "test"].index)  # the official test split is untouched
    assert (run / "round_0" / "metrics.json").is_file()
    out = capsys.readouterr().out
    assert "val_auc" in out
    # Tracked like `icmil run` by default: the embedded MLflow store in the run folder.
    assert (run / "mlflow.db").is_file() and f"MLflow: sqlite:///{run.resolve() / 'mlflow.db'}" in out


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    return path


BAD_COHORTS = {
    "unseen label": (
        ["a,a.tif,tumor,train", "b,b.tif,normal,train", "c,c.tif,normal,train", "d,d.tif,metastasis,test"],
        [],
        "'metastasis' (line 5) appear in val/test rows but never in the train split",
    ),
    "typo": (
        ["a,a.tif,tumor,train", "b,b.tif,tumour,train", "c,c.tif,normal,train", "d,d.tif,normal,test"],
        [],
        "'tumor' (line 2) / 'tumour' (line 3)",
    ),
    "no val possible": (
        ["a,a.tif,tumor,train", "b,b.tif,normal,train", "d,d.tif,normal,test"],
        ["val_fraction=0"],
        "has no val slides (2 train, 0 val, 1 test slides): set val_fraction > 0",
    ),
    "one training class": (
        ["a,a.tif,tumor,train", "b,b.tif,tumor,val", "d,d.tif,tumor,test"],
        [],
        "the train split needs slides of at least two classes",
    ),
    "too many rejected rows": (
        [
            "a,a.tif,tumor,train",
            "b,b.tif,normal,train",
            "../../etc/x,c.tif,normal,train",
            ",d.tif,tumor,val",
            "e,e.tif,normal,val",
        ],
        ["tiling.max_failed_fraction=0.1"],
        "manifest check: ",
    ),
}


@pytest.mark.parametrize("command", ["couple", "run"])
@pytest.mark.parametrize("case", sorted(BAD_COHORTS))
def test_a_bad_cohort_fails_in_seconds_before_any_stage(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, sets, expected = BAD_COHORTS[case]
    manifest = _write(tmp_path / "m.csv", rows)
    run = tmp_path / "run"
    if command == "couple":
        args = ["couple", "--manifest", str(manifest), "--out", str(run)]
    else:
        args = ["run", "--out", str(run), "--set", f"manifest={manifest}"]
    t0 = time.perf_counter()
    assert main([*args, *_sets(sets)]) == 2
    assert time.perf_counter() - t0 < 20
    err = capsys.readouterr().err
    assert err.startswith(f"icmil {command}: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not run.exists()  # nothing tiled, embedded or even started: a fixed rerun starts clean
