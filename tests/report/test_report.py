"""RUN/report.html: written from a real run folder, offline, and checked in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from icmil.cli import main
from icmil.report import collect_run, teacher_kept, write_run_report
from tests.coupling._cohort import BASE_OVERRIDES, copy_run, round0_run


@pytest.fixture(scope="module")
def run0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished round 0 of the tiny synthetic cohort (real slides, tiles, features, head), shared with the
    other modules that use it."""
    return round0_run(tmp_path_factory.mktemp("report"))


def _draw_heatmaps(run: Path, n: int = 2) -> list[str]:
    """What training draws with mil.max_heatmaps=n (the shared run is built with 0): the head's attention on
    the first n test slides, positives first, drawn by the same function."""
    import pandas as pd
    import torch

    from icmil.features import read_features
    from icmil.mil import load_mil_head
    from icmil.mil.data import patch_size_level0
    from icmil.mil.plots import plot_heatmap

    head_dir = run / "round_0" / "head"
    head = load_mil_head(head_dir).eval()
    preds = pd.read_csv(head_dir / "predictions.csv")
    test = preds[preds["split"] == "test"].sort_values(["label_index", "slide_id"], ascending=[False, True])
    ids = list(test["slide_id"])[:n]
    for sid in ids:
        bag = read_features(run / "round_0" / "features" / f"{sid}.h5")
        with torch.no_grad():
            att = head.attention_scores(torch.as_tensor(bag.features)).numpy()
        plot_heatmap(
            bag.coords,
            att,
            patch_size_level0(bag.coords, dict(bag.attrs)),
            head_dir / "heatmaps" / f"{sid}.png",
        )
    return ids


@pytest.fixture(scope="module")
def reported(run0: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`icmil couple` on that run (it resumes: nothing to redo) writes the report and prints its path."""
    run = copy_run(run0, tmp_path_factory.mktemp("reported") / "run")
    _draw_heatmaps(run)
    sets = [a for o in BASE_OVERRIDES for a in ("--set", o)]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["couple", "--out", str(run), "--rounds", "0", "--no-tracking", *sets]) == 0
    assert f"report: {run / 'report.html'}" in out.getvalue()
    return run


def test_teacher_kept_rule() -> None:
    assert teacher_kept({"round": 1, "finetune_best_step": 0.0})
    assert not teacher_kept({"round": 1, "finetune_best_step": 10})
    assert not teacher_kept({"round": 0, "finetune_best_step": None})
    assert teacher_kept({"round": 2, "finetune_best_step": 5, "teacher_kept": True})  # the row says so
    assert not teacher_kept({"round": 1, "finetune_best_step": float("nan")})


def test_the_rounds_table_shows_the_columns_the_cli_prints() -> None:
    """One per-round column list (icmil.run_summary.SUMMARY_COLUMNS) for the printed table and the report: the
    report shows the same columns in the same order (teacher_kept as the note), and nothing else."""
    from icmil.report.build import COLUMN_LABELS, _rounds_table
    from icmil.run_summary import SUMMARY_COLUMNS, format_rounds

    shown = [c for c in SUMMARY_COLUMNS if c != "teacher_kept"]
    assert set(COLUMN_LABELS) <= set(SUMMARY_COLUMNS)
    row = {c: 0.5 for c in shown} | {"round": 1, "teacher_kept": False, "test_n": 4.0, "val_loss": 0.3}
    page = _rounds_table([row])
    header = re.findall(r"<th>(.*?)</th>", page)
    assert header == [COLUMN_LABELS.get(c, c) for c in shown] + ["note"]
    printed = format_rounds([row]).splitlines()[0].split()
    assert printed == ["round", "teacher_kept", *shown[1:]]  # the CLI table: the same list
    # A run with stage-2 selection by cross-validation shows the CV AUCs that decided whether the teacher stayed.
    assert "teacher CV AUC" in header and "selected CV AUC" in header


def test_report_files_are_local_and_complete(reported: Path) -> None:
    page = (reported / "report.html").read_text(encoding="utf-8")
    files = reported / "report_files"
    # Nothing from the network: every src/href is inside report_files/ or an in-page anchor.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith(("report_files/", "#")) for r in refs), refs
    assert "http://" not in page.replace("http://www.w3.org", "").replace(
        "http://schemas.microsoft.com/deepzoom/2008", ""
    )
    for ref in refs:
        if ref.startswith("report_files/"):
            assert (reported / ref).is_file(), ref
    assert (files / "openseadragon" / "LICENSE.txt").is_file()
    # A Deep Zoom pyramid per viewer slide, with the tiles the inline descriptor points to.
    data = json.loads(
        re.search(r'id="slides-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    )
    assert len(data) == 2
    for entry in data.values():
        image = entry["base"]["Image"]
        assert (reported / image["Url"] / "0" / "0_0.jpeg").is_file()
        assert {o["key"] for o in entry["overlays"]} == {"instance", "attention"}
    # The table holds the real round-0 metrics of this run.
    row = json.loads((reported / "round_0" / "metrics.json").read_text())
    assert f"<td>{row['val_auc']:.3f}</td>" in page or f"<td>{row['val_auc']:.0f}</td>" in page
    assert "No registration in this run" in page
    # The gallery shows the heatmaps of the run, and those slides are the zoomable ones.
    gallery = sorted(p.name for p in (reported / "round_0" / "head" / "heatmaps").glob("*.png"))
    assert sorted(p.name for p in (files / "heatmaps" / "round_0").glob("*.png")) == gallery
    assert sorted(f"{k}.png" for k in data) == gallery


def test_overlay_scores_match_the_head(reported: Path) -> None:
    """The viewer's instance overlay is the round's instance teacher on the slide's features, cell by cell."""
    import torch
    from PIL import Image

    from icmil.features import read_features
    from icmil.mil import load_mil_head
    from icmil.mil.data import patch_size_level0
    from icmil.report.deepzoom import colormap_rgba

    page = (reported / "report.html").read_text(encoding="utf-8")
    data = json.loads(
        re.search(r'id="slides-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    )
    sid = next(iter(data))
    bag = read_features(reported / "round_0" / "features" / f"{sid}.h5")
    head = load_mil_head(reported / "round_0" / "head").eval()
    with torch.no_grad():
        p = 1 - torch.softmax(head.instance_logits(torch.as_tensor(bag.features)), dim=1)[:, 0].numpy()
    overlay = np.asarray(Image.open(reported / "report_files" / "slides" / sid / "instance.png"))
    size = patch_size_level0(bag.coords, dict(bag.attrs))
    x, y = (bag.coords[0] // size).astype(int)
    cell = overlay[y * 8 + 4, x * 8 + 4]
    np.testing.assert_array_equal(cell, colormap_rgba(np.array([p[0]]))[0])
    assert overlay[..., 3].min() == 0  # outside tissue: transparent


def test_promotion_decision_and_teacher_kept_rows(run0: Path, tmp_path: Path) -> None:
    """The pipeline's summary layout: a registration block and a round whose fine-tuning kept the teacher
    (the summary here is written by the test around the run's real round-0 row)."""
    run = copy_run(run0, tmp_path / "run")
    row0 = json.loads((run / "round_0" / "metrics.json").read_text())
    row1 = {**row0, "round": 1.0, "finetune_best_step": 0.0, "finetune_teacher_val_auc": 0.9}
    summary = {
        "rounds": [row0, row1],
        "evaluation": row1,
        "registration": {
            "model": "icmil-slide-classifier",
            "version": "4",
            "promote": False,
            "reason": "margin",
        },
    }
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_run_report(run, max_viewer_slides=1).read_text(encoding="utf-8")
    assert "Not promoted: version 4 of icmil-slide-classifier" in page
    assert re.search(r'<tr class="kept" data-round="1">.*?<td>teacher kept</td></tr>', page)
    assert '<tr data-round="0">' in page


def test_report_of_nothing_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no finished round" in capsys.readouterr().err


def test_collect_finds_every_part(reported: Path) -> None:
    c = collect_run(reported)
    assert sorted(c.heads) == [0] and c.features[0] and c.encoders[0] and c.manifest is not None
    assert [r["round"] for r in c.rounds] == [0]


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no headless Chromium here: install Debian's `chromium` (apt-get install -y chromium; "
        "scripts/test.sh does this when run as root)"
    )


def _browse(url: str, tmp: Path, shot: Path, height: int = 1300) -> tuple[str, list[str]]:
    """Open ``url`` headless; returns the rendered DOM and the page's console lines; writes a screenshot."""
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=15000",
        f"--window-size=1280,{height}",
        f"--screenshot={shot}",
        "--dump-dom",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def _region(image: np.ndarray, rect: list[float]) -> np.ndarray:
    x, y, w, h = (round(v) for v in rect)
    return image[y + 2 : y + h - 2, x + 2 : x + w - 2, :3].astype(int)


def test_report_in_headless_chromium(reported: Path, tmp_path: Path) -> None:
    from PIL import Image

    url = (reported / "report.html").resolve().as_uri()
    dom, console = _browse(url, tmp_path, tmp_path / "report.png")
    errors = (
        json.loads(re.search(r"data-errors=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
        if ("data-errors=" in dom)
        else []
    )
    assert errors == [], errors
    bad = [c for c in console if re.search(r"error|uncaught|failed|refused", c, re.I)]
    assert bad == [], bad
    assert 'data-viewer="open"' in dom
    assert int(re.search(r'data-tiles-loaded="(\d+)"', dom).group(1)) > 0
    rects = json.loads(re.search(r"data-rects=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
    # Both the table and the viewer lie inside the screenshot.
    for key in ("rounds", "slide-viewer"):
        x, y, w, h = rects[key]
        assert y + h <= shot.shape[0] and x + w <= shot.shape[1], (key, rects[key], shot.shape)
    table = _region(shot, rects["rounds"])
    assert (table.sum(axis=2) < 200).mean() > 0.01  # dark text: the table is drawn
    # The same view without the overlay: the slide is drawn, and the heatmap changes a good part of it.
    _browse(url + "#layer=", tmp_path, tmp_path / "plain.png")
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    viewer, viewer_plain = _region(shot, rects["slide-viewer"]), _region(plain, rects["slide-viewer"])
    assert (viewer_plain.sum(axis=2) < 720).mean() > 0.2  # slide pixels, not a white box
    changed = (np.abs(viewer - viewer_plain).sum(axis=2) > 30).mean()
    assert changed > 0.05, changed
    keep = os.environ.get("ICMIL_REPORT_SCREENSHOT")
    if keep:  # docs/img/report.png is made this way
        shutil.copyfile(tmp_path / "report.png", keep)
