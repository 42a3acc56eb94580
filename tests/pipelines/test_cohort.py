"""The prepare step (cohort folder, shards, fingerprints) and the component plumbing, without KFP."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from icmil.cohort import (
    Shard,
    cohort_lesions,
    merge_shard_dirs,
    prepare_cohort,
    shard_manifest,
    slide_fingerprint,
)
from icmil.config import load_config
from icmil.errors import ManifestError
from icmil.manifest import read_manifest
from icmil.registry.release import split_metrics
from icmil_kfp.components import _runtime as rt


def _manifest(tmp_path: Path, n: int = 7) -> Path:
    slides = tmp_path / "data"
    slides.mkdir()
    rows = ["slide_id,path,label"]
    for i in range(n):
        (slides / f"s{i}.tif").write_bytes(b"x" * (100 * (i + 1)))  # sizes differ: shards balance bytes
        rows.append(f"s{i},data/s{i}.tif,{'tumor' if i % 2 else 'normal'}")
    rows.append("bad,data/bad.tif,unknown-label")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_prepare_resolves_splits_once_and_balances_shards(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    cfg = load_config(
        None, [f"manifest={manifest}", "classes=[normal, tumor]", "tiling.max_failed_fraction=0.2"]
    )
    cohort = prepare_cohort(cfg, tmp_path / "cohort", n_shards=3)
    assert cohort.n_slides == 7 and not cohort.synthetic
    assert set(cohort.errors) == {"bad"}
    assert json.loads((tmp_path / "cohort" / "manifest_errors.json").read_text())["bad"].startswith(
        "line 9: unknown label"
    )
    ids = [sid for s in cohort.shards for sid in s.slide_ids]
    assert sorted(ids) == [f"s{i}" for i in range(7)] and len(set(ids)) == 7
    loads = [sum(100 * (int(sid[1:]) + 1) for sid in s.slide_ids) for s in cohort.shards]
    assert max(loads) - min(loads) <= 700  # LPT: within the largest slide of each other
    # Every stage reads the same split: the resolved manifest has it, and so do the shard rows.
    resolved = read_manifest(cohort.manifest_csv, classes=["normal", "tumor"])
    split = dict(zip(resolved.slides["slide_id"], resolved.slides["split"], strict=True))
    for shard in cohort.shards:
        for row in shard.rows:
            assert row["split"] == split[row["slide_id"]]
            assert row["fingerprint"] == slide_fingerprint(str(tmp_path / "data" / f"{row['slide_id']}.tif"))
    # Deterministic: same input, same shards and digest; a changed slide changes the digest.
    again = prepare_cohort(cfg, tmp_path / "cohort2", n_shards=3)
    assert [s.to_json() for s in again.shards] == [s.to_json() for s in cohort.shards]
    assert again.manifest_digest == cohort.manifest_digest
    (tmp_path / "data" / "s3.tif").write_bytes(b"changed")
    assert prepare_cohort(cfg, tmp_path / "cohort3", n_shards=3).manifest_digest != cohort.manifest_digest


def test_a_manifests_lesion_boxes_travel_with_the_cohort(tmp_path: Path) -> None:
    """lesions.json beside a user's manifest is copied into the cohort folder, so the pipeline's train and
    evaluate tasks (which only see the cohort artifact) score patch-level AUCs as ``icmil couple`` does."""
    manifest = _manifest(tmp_path)
    cfg = load_config(
        None, [f"manifest={manifest}", "classes=[normal, tumor]", "tiling.max_failed_fraction=0.2"]
    )
    assert (
        prepare_cohort(cfg, tmp_path / "without", n_shards=2) and cohort_lesions(tmp_path / "without") is None
    )
    boxes = {"s1": [[0, 0, 64, 64]], "s0": []}
    (tmp_path / "lesions.json").write_text(json.dumps(boxes))
    prepare_cohort(cfg, tmp_path / "cohort", n_shards=2)
    copied = cohort_lesions(tmp_path / "cohort")
    assert copied == tmp_path / "cohort" / "lesions.json" and json.loads(copied.read_text()) == boxes


def test_prepare_never_makes_more_shards_than_slides(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"manifest={_manifest(tmp_path, n=4)}",
            "classes=[normal, tumor]",
            "val_fraction=0.5",
            "test_fraction=0",
            "tiling.max_failed_fraction=0.5",
        ],
    )
    assert len(prepare_cohort(cfg, tmp_path / "c", n_shards=8).shards) == 4


def test_synthetic_cohort_folder_is_portable(tmp_path: Path) -> None:
    cfg = load_config(None, ["synth.n_slides=6", "synth.width=768", "synth.height=512"])
    cohort = prepare_cohort(cfg, tmp_path / "cohort", n_shards=2)
    assert cohort.synthetic and cohort.n_slides == 6
    table = pd.read_csv(cohort.manifest_csv)
    assert all(p.startswith("synth/slides/") for p in table["path"])  # relative: works where KFP downloads it
    moved = tmp_path / "moved"
    (tmp_path / "cohort").rename(moved)
    m = read_manifest(moved / "manifest.csv")
    assert all(Path(p).is_file() for p in m.slides["path"])
    # A shard's manifest resolves its rows against the cohort folder it is given.
    csv = shard_manifest(cohort.shards[0].to_json(), tmp_path / "shard.csv", base_dir=moved)
    shard = read_manifest(csv, partial=True)
    assert sorted(shard.slides["slide_id"]) == cohort.shards[0].slide_ids
    assert all(Path(p).is_file() and str(moved) in p for p in shard.slides["path"])
    assert cohort_lesions(moved) == moved / "synth" / "lesions.json"


def test_shard_json_roundtrip_and_errors(tmp_path: Path) -> None:
    shard = Shard(1, [{"slide_id": "a", "path": "rel/a.svs", "label": "t", "split": "train", "mpp": 0.25}])
    assert Shard.from_json(shard.to_json()) == shard
    with pytest.raises(ManifestError, match="not a shard"):
        Shard.from_json('{"rows": []}')
    with pytest.raises(ManifestError, match=r"relative path 'rel/a\.svs' but no cohort folder"):
        shard_manifest(shard, tmp_path / "x.csv")
    s3 = Shard(0, [{"slide_id": "b", "path": "s3://bucket/b.svs", "label": "n", "split": "val", "mpp": ""}])
    assert "s3://bucket/b.svs" in shard_manifest(s3, tmp_path / "y.csv").read_text()


def test_merge_shard_dirs_copies_or_links_and_refuses_duplicates(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, sid in ((a, "s1"), (b, "s2")):
        d.mkdir()
        (d / f"{sid}.h5").write_text(sid)
        (d / "config.yaml").write_text(f"from {sid}")
    merged = merge_shard_dirs([a, b], tmp_path / "merged")
    assert sorted(p.name for p in merged.iterdir()) == ["config-part1.yaml", "config.yaml", "s1.h5", "s2.h5"]
    assert not (merged / "s1.h5").is_symlink()
    with rt.merged_view([str(a), str(b)]) as view:
        assert (view / "s2.h5").is_symlink() and (view / "s2.h5").read_text() == "s2"
    assert not view.exists()  # the view is temporary
    (b / "s1.h5").write_text("again")
    with pytest.raises(ManifestError, match=r"s1\.h5 was written by shard outputs 0 and 1"):
        merge_shard_dirs([a, b], tmp_path / "m2")
    with pytest.raises(ManifestError, match="does not exist"):
        merge_shard_dirs([tmp_path / "missing"], tmp_path / "m3")


def test_runtime_helpers() -> None:
    cfg = load_config(None, ["mil.head=maxpool"])
    assert type(rt.stage_tracker(cfg, "")).__name__ == "NullTracker"
    history = rt.append_round("[]", 1, {"val_auc": 0.9, "note": "x", "seconds": 2})
    history = rt.append_round(history, 0, {"val_auc": 0.7})
    history = rt.append_round(history, 1, {"val_auc": 0.95})  # a rerun of a round replaces its row
    assert json.loads(history) == [{"round": 0, "val_auc": 0.7}, {"round": 1, "val_auc": 0.95}]
    assert split_metrics(
        {"test_auc": 0.8, "val_f1": 0.5, "test_n": 3, "patch_auc_test": 0.6, "val_x": float("nan")}
    ) == {
        "test": {"auc": 0.8, "n": 3.0},
        "val": {"f1": 0.5},
    }

    class FakeMetrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, k: str, v: float) -> None:
            self.logged[k] = v

    m = FakeMetrics()
    row = rt.log_kfp_metrics(m, {"metrics": {"val_auc": 0.5}, "best_epoch": 3, "head": "abmil", "ok": True})
    assert row == m.logged == {"val_auc": 0.5, "best_epoch": 3.0}
    meta = rt.metadata({"a": {"b": 1.5, "c": float("inf")}, "d": [1, 2], "e": "x" * 600, "f": "short"})
    assert meta == {"a.b": 1.5, "a.c": None, "f": "short"}
