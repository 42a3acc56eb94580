from __future__ import annotations

from pathlib import Path

import pytest

from icmil.errors import ManifestError
from icmil.manifest import read_manifest


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
    # relative paths resolve against the manifest folder
    assert a.slides["path"].iloc[0] == str((tmp_path / "s0.tif").resolve())


def test_row_errors_are_kept_per_slide(tmp_path: Path) -> None:
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
        "g,s3://bucket/g.svs,normal,test,\n",
    )
    m = read_manifest(p, classes=["normal", "tumor"])
    assert sorted(m.slides["slide_id"]) == ["a", "g"]
    assert "duplicate slide_id" in m.errors["b"] and "[3, 4]" in m.errors["b"]
    assert "unknown label 'cancer'" in m.errors["c"]
    assert "empty path" in m.errors["d"]
    assert "holdout" in m.errors["e"]
    assert "positive number" in m.errors["f"]
    assert m.slides.set_index("slide_id").loc["g", "path"] == "s3://bucket/g.svs"


def test_integer_labels_and_written_manifest(tmp_path: Path) -> None:
    p = _write(tmp_path, "slide_id,path,label,split\nx,x.tif,2,train\ny,y.tif,0,val\nz,z.tif,10,test\n")
    m = read_manifest(p)
    assert m.classes == ["0", "2", "10"]
    assert dict(zip(m.slides["slide_id"], m.slides["label_index"], strict=True)) == {"x": 1, "y": 0, "z": 2}
    out = m.write(tmp_path / "resolved.csv")
    again = read_manifest(out, classes=m.classes)
    assert again.slides["split"].tolist() == m.slides["split"].tolist()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("slide_id,path\na,a.tif\n", "missing column"),
        ("slide_id,path,label\na,a.tif,x\na,b.tif,x\n", "no usable slide"),
    ],
)
def test_whole_file_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(_write(tmp_path, text))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
