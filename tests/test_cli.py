"""The CLI is a thin wrapper: check argument wiring, exit codes and the resolved config it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from icmil.cli import build_parser, main


def test_every_stage_has_a_subcommand() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    expected = {
        "synth",
        "tile",
        "embed",
        "train",
        "evaluate",
        "couple",
        "run",
        "compile",
        "submit",
        "schedule",
    }
    expected |= {"tune", "promote", "predict", "config"}
    assert expected <= set(sub.choices)


def test_config_errors_exit_2_with_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "mil.epochs=-1"]) == 2
    assert "mil.epochs" in capsys.readouterr().err


def test_manifest_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("slide_id,label\na,tumor\n")
    assert main(["tile", "--manifest", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "missing column" in capsys.readouterr().err


def test_synth_then_tile_writes_outputs_and_config(tmp_path: Path) -> None:
    size = ["--set", "synth.width=1024", "--set", "synth.height=768"]
    assert main(["synth", str(tmp_path / "s"), "--slides", "2", "--seed", "3", *size]) == 0
    manifest = tmp_path / "s" / "manifest.csv"
    assert manifest.is_file()
    assert main(["tile", "--manifest", str(manifest), "--out", str(tmp_path / "t"), "--set", "seed=5"]) == 0
    assert (tmp_path / "t" / "status.csv").is_file()
    written = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert written["seed"] == 5 and written["tiling"]["patch_size"] == 256
