"""Slide ids of ``icmil predict`` become file and folder names under the output folder: two slides never get the
same id (their tiles, features and outputs would overwrite each other), and given ids follow the training rule."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from icmil.errors import ConfigError
from icmil.predict import expand_slide_inputs
from icmil.slide_ids import MAX_LENGTH, id_key, slide_id_problem


def test_ids_made_from_names_never_take_an_id_already_in_use() -> None:
    # b/s1 becomes s1_2, which is also the next file's own name: it used to get s1_2 too (one folder, two slides).
    ids = expand_slide_inputs(["a/s1.svs", "b/s1.svs", "s1_2.svs", "c/S1.svs"])["slide_id"].tolist()
    assert ids == ["s1", "s1_2", "s1_2_2", "S1_3"]
    assert len({id_key(i) for i in ids}) == len(ids)


def test_ids_made_from_names_keep_clear_of_given_ids(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\ns1,x.svs\n")  # a given id that a file name below would also produce
    table = expand_slide_inputs(["d/s1.svs"], manifest=manifest)
    assert table["slide_id"].tolist() == ["s1_2", "s1"]
    long = expand_slide_inputs([f"{'x' * 300}.svs"])["slide_id"].iloc[0]
    assert slide_id_problem(long) is None and len(long) <= MAX_LENGTH - 8


def test_given_ids_follow_the_training_rule_and_must_be_unique(tmp_path: Path) -> None:
    ok = tmp_path / "ok.csv"
    ok.write_text("slide_id,path\nSlide 12 (re-scan),a.svs\nTCGA-A1-A0SB-01Z,b.svs\n")
    assert expand_slide_inputs([], manifest=ok)["slide_id"].tolist() == [
        "Slide 12 (re-scan)",
        "TCGA-A1-A0SB-01Z",
    ]

    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id,path\nS1,a.svs\nx,b.svs\ns1,c.svs\n")
    with pytest.raises(ConfigError, match=r"'s1' \(manifest .*dup.csv row 4\) and 'S1' \(manifest .*row 2\)"):
        expand_slide_inputs([], manifest=dup)

    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path\n../../x,a.svs\n")
    with pytest.raises(
        ConfigError, match=r"bad.csv row 2: slide_id '../../x' contains '/', a path separator"
    ):
        expand_slide_inputs([], manifest=bad)

    with pytest.raises(ConfigError, match="would share one output file"):
        expand_slide_inputs(pd.DataFrame({"slide_id": ["a", "A"], "path": ["1.svs", "2.svs"]}))
