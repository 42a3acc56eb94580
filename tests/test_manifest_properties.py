"""Property-based test over generated manifests (hypothesis), run through ``icmil tile`` as a user would.

For any manifest — odd or unsafe slide ids, good, missing, foreign and escaping paths, labels written several
ways, splits, µm/px values, blank rows, rows with extra or missing fields, quoted commas and newlines — the
command either tiles or reports every row by its CSV line (or refuses the whole file with exit status 2 and a
message), writes nothing outside its output folder, and never shows the user a traceback.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from icmil.cli import main
from icmil.config import SynthConfig
from icmil.slides import write_synthetic_slide

SLIDE_IDS = st.one_of(
    st.sampled_from(
        [
            "s1",
            "s2",
            "S1",
            "slide 3",
            "",
            "../x",
            "../../escape",
            "/abs/y",
            "a\\b",
            "..",
            ".hidden",
            "x" * 130,
            "tab\there",
            "naïve",
            "a..b",
            "dot.",
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10),
)
# Good values are drawn more often than odd ones, so most manifests get past the whole-file checks and the
# per-row handling is exercised too (the statistics: pytest --hypothesis-show-statistics).
LABELS = st.sampled_from(["tumor"] * 6 + ["normal"] * 6 + ["tumour", "Tumor", " normal ", "", "0"])
SPLITS = st.sampled_from(["train"] * 6 + ["val", "test", "", "holdout", "TRAIN"])
MPPS = st.sampled_from([""] * 6 + ["0.5", "-1", "abc", "nan", "1e9", "0"])
PATHS = ["good"] * 4 + ["good_rel", "missing", "text", "empty", "gs", "folder", "escape"]


@st.composite
def manifests(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    """A header and rows (rows may have a field more or less than the header, or be all blank)."""
    header = ["slide_id", "path", "label"]
    if draw(st.booleans()):
        header.append("split")
    if draw(st.booleans()):
        header.append("mpp")
    if draw(st.booleans()):
        header.append("notes")
    rows = []
    for i in range(draw(st.integers(1, 7))):
        values = {
            "slide_id": f"s{i}" if draw(st.integers(0, 9)) < 6 else draw(SLIDE_IDS),
            "path": draw(st.sampled_from(PATHS)),
            "label": draw(LABELS),
            "split": draw(SPLITS),
            "mpp": draw(MPPS),
            "notes": draw(st.sampled_from(["", "a, b", "line\nbreak", '"quoted"'])),
        }
        row = [values[c] for c in header]
        shape = draw(st.sampled_from(["ok"] * 8 + ["extra", "short", "blank"]))
        if shape == "extra":
            row.append("EXTRA")
        elif shape == "short":
            row = row[:-1]
        elif shape == "blank":
            row = [""] * len(header)
        rows.append(row)
    return header, rows


def _csv_with_lines(header: list[str], rows: list[list[str]]) -> tuple[str, list[int]]:
    """The CSV text and the line each row starts on (quoted newlines make a row span lines)."""
    buf = io.StringIO()
    writer = csv.writer(
        buf
    )  # "\r\n" rows: values holding "\r" or "\n" get quoted (as spreadsheets write them)
    writer.writerow(header)
    starts = []
    for row in rows:
        text = buf.getvalue()
        starts.append(len(io.StringIO(text, newline="").readlines()) + 1)
        writer.writerow(row)
    return buf.getvalue(), starts


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("property-slides")
    good = root / "good.tiff"
    write_synthetic_slide(good, SynthConfig(), seed=4, positive=True, width=768, height=512)
    (root / "notes.txt").write_text("not a slide\n")
    (root / "empty.svs").write_bytes(b"")
    (root / "folder").mkdir()
    return {
        "good": str(good),
        "missing": str(root / "missing.tiff"),
        "text": str(root / "notes.txt"),
        "empty": str(root / "empty.svs"),
        "gs": "gs://bucket/slide.svs",
        "folder": str(root / "folder"),
    }


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


TILING = [
    "--set",
    "tiling.patch_size=64",
    "--set",
    "tiling.target_mpp=1.0",
    "--set",
    "tiling.mask_mpp=4.0",
    "--set",
    "tiling.min_tissue_area_um2=2000",
    "--set",
    "tiling.min_hole_area_um2=400",
    "--set",
    "tiling.max_failed_fraction=1.0",
]


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(manifests())
def test_every_row_is_tiled_or_reported_by_line_and_nothing_escapes(
    slide_files: dict[str, str], capsys: pytest.CaptureFixture[str], data: tuple[list[str], list[list[str]]]
) -> None:
    header, rows = data
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = root / "project" / "cohort"
        work.mkdir(parents=True)
        rel_good = os.path.relpath(slide_files["good"], work)
        paths = {**slide_files, "good_rel": rel_good, "escape": "../../../outside.tiff"}
        path_at = header.index("path")
        rows = [[paths.get(v, v) if i == path_at else v for i, v in enumerate(r)] for r in rows]
        text, starts = _csv_with_lines(header, rows)
        (work / "manifest.csv").write_text(text, encoding="utf-8", newline="")
        out = work / "runs" / "tiles"
        before = _tree(root)

        records = _Records()
        logging.getLogger("icmil").addHandler(records)
        try:
            cwd = os.getcwd()
            os.chdir(work)
            try:
                rc = main(["tile", "--manifest", "manifest.csv", "--out", str(out), *TILING])
            finally:
                os.chdir(cwd)
        finally:
            logging.getLogger("icmil").removeHandler(records)
        captured = capsys.readouterr()
        shown = captured.out + captured.err + "\n".join(records.lines)

        assert "Traceback" not in shown
        assert rc in (0, 2)
        event(f"exit {rc}: {captured.err.splitlines()[-1][:60] if rc else 'tiled'}")
        # Nothing outside the output folder: every new path is the output folder or inside it.
        new = _tree(root) - before
        assert all(p == "project/cohort/runs" or p.startswith("project/cohort/runs/tiles") for p in new), new
        if rc == 2:
            assert (
                captured.err.startswith("icmil tile: error: manifest") and not (out / "status.csv").exists()
            )
            return
        status = pd.read_csv(out / "status.csv", dtype=str, keep_default_na=False)
        tiled = set(status["slide_id"])
        reported = shown + "\n".join(status["error"])
        for row, line in zip(rows, starts, strict=True):
            sid = row[0].strip() if len(row) == len(header) else None  # values are read stripped
            assert (sid in tiled) or (f"line {line}:" in reported), (line, row, text)
        # Every status row is a manifest row: a kept slide, or a rejected row named by its line.
        assert len(status) <= len(rows)
        for h5 in out.glob("*.h5"):
            assert h5.stem in tiled and (status.set_index("slide_id").loc[h5.stem, "status"] == "ok")
