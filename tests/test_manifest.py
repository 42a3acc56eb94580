from __future__ import annotations

from pathlib import Path

import pytest

from icmil.errors import ManifestError
from icmil.manifest import Manifest, check_trainable, confusable_labels, read_manifest
from icmil.slide_ids import slide_file, slide_id_problem


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_split_is_stratified_seeded_and_stable(tmp_path: Path) -> None:
    rows = "\n".join(f"s{i},s{i}.tif,{'tumor' if i % 3 == 0 else 'normal'}" for i in range(30))
    p = _write(tmp_path, "slide_id,path,label\n" + rows + "\n")
    a = read_manifest(p, seed=1)
    b = read_manifest(p, seed=1)
    c = read_manifest(p, seed=2)
    assert a.slides["split"].tolist() == b.slides["split"].tolist()
    assert a.slides["split"].tolist() != c.slides["split"].tolist()
    for split in ("train", "val", "test"):
        part = a.split(split)
        assert set(part["label"]) == {"normal", "tumor"}, split
    assert a.digest == b.digest != c.digest
    assert a.notes == []  # no split column: the usual three-way split, nothing carved
    # relative paths resolve against the manifest folder
    assert a.slides["path"].iloc[0] == str((tmp_path / "s0.tif").resolve())


def test_row_errors_are_kept_per_slide_with_their_line(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "slide_id,path,label,split,mpp\n"
        "a,a.tif,tumor,train,\n"
        "b,b.tif,normal,val,0.25\n"
        "b,b2.tif,normal,val,\n"
        "c,c.tif,cancer,train,\n"
        "d,,tumor,test,\n"
        "e,e.tif,normal,holdout,\n"
        "f,f.tif,normal,test,-1\n"
        "g,s3://bucket/g.svs,normal,test,\n"
        "h,gs://bucket/h.svs,normal,test,\n"
        "i,i.tif,normal,,\n",
    )
    m = read_manifest(p, classes=["normal", "tumor"])
    assert sorted(m.slides["slide_id"]) == ["a", "g"]
    assert "duplicate slide_id" in m.errors["b"] and "[3, 4]" in m.errors["b"]
    assert m.errors["c"].startswith("line 5: unknown label 'cancer'")
    assert m.errors["d"] == "line 6: empty path"
    assert "holdout" in m.errors["e"] and m.errors["e"].startswith("line 7:")
    assert "positive number" in m.errors["f"]
    assert "unsupported scheme 'gs'" in m.errors["h"]
    assert "split empty" in m.errors["i"]
    assert sorted(m.rejected) == [3, 4, 5, 6, 7, 8, 10, 11]
    assert m.slides.set_index("slide_id").loc["g", "path"] == "s3://bucket/g.svs"


def test_every_row_is_kept_or_reported_by_its_line_and_nothing_shifts(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "slide_id,path,label\n"
        "a,a.tif,tumor\n"
        ",x.tif,normal\n"  # empty id: reported, not silently dropped
        "b,b.tif,normal,EXTRA\n"  # extra field: reported, not shifted into the wrong columns
        "c,c.tif\n"  # a field short
        "\n"  # an empty line is not a row
        ",,\n"  # a spreadsheet's blank trailing row: reported as ignored, not counted as a slide
        '"d, the second",d.tif,tumor\n'  # a quoted comma is one field; the id is still refused (comma)
        "e,e.tif,normal\n",
    )
    m = read_manifest(p, val_fraction=0, test_fraction=0)
    assert sorted(m.slides["slide_id"]) == ["a", "e"]
    assert m.slides.set_index("slide_id").loc["e", "label"] == "normal"
    assert set(m.rejected) == {3, 4, 5, 7, 8}
    assert "empty slide_id" in m.rejected[3]
    assert "has 4 fields but the header has 3" in m.rejected[4] and "'b'" in m.rejected[4]
    assert "has 2 fields" in m.rejected[5]
    assert "blank row" in m.rejected[7]
    assert "contains ','" in m.rejected[8]
    # Stage-facing errors: rows that name no usable id are keyed by line; blank rows do not count as slides.
    assert set(m.errors) == {"<line 3>", "<line 4>", "<line 5>", "<line 8>"}


@pytest.mark.parametrize(
    ("slide_id", "fragment"),
    [
        ("../../etc/x", "path separator"),
        ("/etc/passwd", "path separator"),
        ("C:\\slides\\x", "path separator"),
        ("a..b", "'..'"),
        (".hidden", "must start with a letter or digit"),
        ("-rf", "must start with a letter or digit"),
        ("x" * 129, "at most 128"),
        ("scan\x1b[2J", "control character U+001B"),
        ("tab\there", "control character U+0009"),
        ("schnitt_ä", "'ä'"),
        ("trailing.", "ends with a dot"),
        ("a*b", "'*'"),
    ],
)
def test_unsafe_slide_ids_are_refused_with_their_line(tmp_path: Path, slide_id: str, fragment: str) -> None:
    p = tmp_path / "m.csv"
    with p.open("w", newline="", encoding="utf-8") as fh:
        import csv

        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label"])
        w.writerow(["ok1", "a.tif", "tumor"])
        w.writerow([slide_id, "b.tif", "tumor"])
        w.writerow(["ok2", "c.tif", "normal"])
    m = read_manifest(p, val_fraction=0, test_fraction=0)
    assert sorted(m.slides["slide_id"]) == ["ok1", "ok2"]
    assert fragment in m.rejected[3] and m.rejected[3].startswith("line 3: slide id")
    assert slide_id_problem(slide_id) is not None
    assert "<line 3>" in m.errors  # never keyed by the unsafe id itself


def test_safe_ids_and_ids_differing_only_by_case(tmp_path: Path) -> None:
    for sid in ("TCGA-A1-A0SB-01Z-00-DX1.8E8F", "tumor_001", "Slide 12 (re-scan)", "a+b@c~d"):
        assert slide_id_problem(sid) is None, sid
    assert slide_file(tmp_path, "s 1", ".h5") == tmp_path / "s 1.h5"
    p = _write(tmp_path, "slide_id,path,label\nSlide1,a.tif,tumor\nslide1,b.tif,tumor\nz,z.tif,normal\n")
    m = read_manifest(p, val_fraction=0, test_fraction=0)
    assert list(m.slides["slide_id"]) == ["z"]
    assert "differ only by letter case" in m.errors["Slide1"] and "[2, 3]" in m.errors["slide1"]


def test_integer_labels_and_written_manifest(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "slide_id,path,label,split\nx,x.tif,2,train\nw,w.tif,0,train\nv,v.tif,10,train\n"
        "y,y.tif,0,val\nz,z.tif,10,test\n",
    )
    m = read_manifest(p)
    assert m.classes == ["0", "2", "10"]
    assert dict(zip(m.slides["slide_id"], m.slides["label_index"], strict=True))["z"] == 2
    out = m.write(tmp_path / "resolved.csv")
    again = read_manifest(out)
    assert again.slides["split"].tolist() == m.slides["split"].tolist()
    assert again.classes == m.classes


def test_classes_come_from_the_training_split(tmp_path: Path) -> None:
    rows = [
        "a,a.tif,normal,train",
        "b,b.tif,tumor,train",
        "c,c.tif,normal,val",
        "d,d.tif,metastasis,test",
        "e,e.tif,metastasis,val",
    ]
    p = _write(tmp_path, "slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(p)
    text = str(err.value)
    assert "'metastasis' (lines 5, 6)" in text and "never in the train split" in text
    assert "['normal', 'tumor']" in text
    # Listing the classes makes it a per-row problem instead (the user chose the classes).
    m = read_manifest(p, classes=["normal", "tumor"])
    assert sorted(m.slides["slide_id"]) == ["a", "b", "c"]
    assert "unknown label 'metastasis'" in m.errors["d"]


@pytest.mark.parametrize(
    ("a", "b"),
    [("tumor", "tumour"), ("tumor", "Tumor"), ("normal", "Normal "), ("lymph node", "lymph_node")],
)
def test_labels_written_two_ways_are_an_error_naming_both(tmp_path: Path, a: str, b: str) -> None:
    rows = [f"s{i},s{i}.tif,{a if i % 2 else 'other'}" for i in range(6)] + [f"t,t.tif,{b}"]
    p = _write(tmp_path, "slide_id,path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(p)
    text = str(err.value)
    assert repr(a.strip()) in text and repr(b.strip()) in text and "line 8" in text
    assert "differ only by case, spacing or a small typo" in text


def test_confusable_labels_keep_real_classes_apart() -> None:
    assert confusable_labels("adenocarcinoma", "adenocarcinomma")
    for a, b in [("grade1", "grade2"), ("LUAD", "LUSC"), ("HER2+", "HER2-"), ("normal", "tumor"), ("0", "1")]:
        assert not confusable_labels(a, b), (a, b)


def test_explicit_classes_suggest_the_near_label(tmp_path: Path) -> None:
    p = _write(tmp_path, "slide_id,path,label\na,a.tif,tumor\nb,b.tif,normal\nc,c.tif,Tumour\n")
    m = read_manifest(p, classes=["normal", "tumor"], val_fraction=0, test_fraction=0)
    assert "did you mean 'tumor'?" in m.errors["c"]


def _train_test_manifest(tmp_path: Path, n_train: int = 20, n_test: int = 6) -> Path:
    rows = [f"tr{i},tr{i}.tif,{'tumor' if i % 2 else 'normal'},train" for i in range(n_train)]
    rows += [f"te{i},te{i}.tif,{'tumor' if i % 2 else 'normal'},test" for i in range(n_test)]
    return _write(tmp_path, "slide_id,path,label,split\n" + "\n".join(rows) + "\n")


def test_train_test_manifest_gets_a_seeded_stratified_val_from_train(tmp_path: Path) -> None:
    p = _train_test_manifest(tmp_path)
    m = read_manifest(p, val_fraction=0.2, seed=0)
    val = m.split("val")
    assert len(val) == 4 and sorted(val["label"]) == ["normal", "normal", "tumor", "tumor"]
    assert all(sid.startswith("tr") for sid in val["slide_id"])  # carved from train only
    assert sorted(m.split("test")["slide_id"]) == sorted(f"te{i}" for i in range(6))  # test untouched
    assert m.notes and "carved a stratified validation split of 4 of the 20 training slides" in m.notes[0]
    # The resolved manifest says, row by row, where the split came from.
    assert set(val["split_source"]) == {"carved from train (val_fraction=0.2, seed=0)"}
    assert set(m.split("test")["split_source"]) == set(m.split("train")["split_source"]) == {"manifest"}
    # Seeded and stable; another seed picks other slides; the resolved manifest keeps the split as it is.
    assert read_manifest(p, val_fraction=0.2, seed=0).slides.equals(m.slides)
    assert set(read_manifest(p, val_fraction=0.2, seed=7).split("val")["slide_id"]) != set(val["slide_id"])
    again = read_manifest(m.write(tmp_path / "resolved.csv"), val_fraction=0.2, seed=0)
    assert again.slides["split"].tolist() == m.slides["split"].tolist() and again.notes == []
    # val_fraction=0: nothing carved, and a cohort without val cannot train (said before any stage runs).
    none = read_manifest(p, val_fraction=0)
    assert none.split("val").empty
    with pytest.raises(ManifestError, match=r"no val slides .*set val_fraction > 0"):
        check_trainable(none, val_fraction=0)
    check_trainable(m, val_fraction=0.2)


def test_check_trainable_needs_two_training_classes(tmp_path: Path) -> None:
    p = _write(tmp_path, "slide_id,path,label,split\na,a.tif,x,train\nb,b.tif,x,val\n")
    m = read_manifest(p)
    with pytest.raises(ManifestError, match="at least two classes"):
        check_trainable(m)
    assert isinstance(m, Manifest)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("slide_id,path\na,a.tif\n", "missing column"),
        ("slide_id,path,label\na,a.tif,x\na,b.tif,x\n", "no usable slide"),
        ("slide_id;path;label\na;a.tif;x\n", "separated by commas"),
        ("", "is empty"),
        ('slide_id,path,label\na,"a.tif,x\n', "not a valid CSV"),
        ("slide_id,path,label,label\na,a.tif,x,y\n", "duplicate column"),
    ],
)
def test_whole_file_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(_write(tmp_path, text))


def test_bom_and_non_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffslide_id,path,label\na,a.tif,x\nb,b.tif,y\n".encode())
    assert list(read_manifest(p, val_fraction=0, test_fraction=0).slides["slide_id"]) == ["a", "b"]
    p.write_bytes(b"slide_id,path,label\na,a.tif,x\nb,b.tif,\xff\n")
    with pytest.raises(ManifestError, match=r"not UTF-8 text .*line 3"):
        read_manifest(p)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
