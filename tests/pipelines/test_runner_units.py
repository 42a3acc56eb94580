"""Local-runner plumbing without the heavy pipeline: failures, the exit handler's MLflow bookkeeping, output."""

# No `from __future__ import annotations`: KFP reads the test component's annotations as real types.
import io
import re
from pathlib import Path

import pytest
from kfp import dsl

from icmil.config import load_config
from icmil.errors import ICMILError
from icmil_kfp.pipelines import runner


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def explode(message: str):
    raise RuntimeError(message)


def test_a_failing_task_fails_run_local_with_the_task_and_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dsl.pipeline(name="icmil")
    def broken():
        explode(message="bad slide store")

    monkeypatch.setattr("icmil_kfp.pipelines.icmil_pipeline.build_pipeline", lambda cfg, cluster=True: broken)
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(
        ICMILError, match=r"local pipeline run failed: .*Inner task failed: 'explode'.*pipeline\.log"
    ):
        runner.run_local(cfg, print_summary=False)
    log = (tmp_path / "kfp" / "pipeline.log").read_text()
    assert "bad slide store" in log  # the task's traceback is in the full log
    assert (tmp_path / "config.yaml").is_file()


def test_run_local_leaves_print_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KFP's local runner swaps builtins.print per task (indented_print); two ParallelFor threads interleave the
    swaps and leave an indenting print behind. run_local puts print back (else its summary and `report:` line
    came out indented by four spaces)."""
    import builtins

    from kfp.local import logging_utils

    def two_threads_interleaving():
        first, second = logging_utils.indented_print(), logging_utils.indented_print()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # restores first's indenting print, not the original
        assert builtins.print is not original

    original = builtins.print
    monkeypatch.setattr(
        "icmil_kfp.pipelines.icmil_pipeline.build_pipeline",
        lambda cfg, cluster=True: two_threads_interleaving,
    )
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(ICMILError, match="left no output folder"):
        runner.run_local(cfg, print_summary=False)
    assert builtins.print is original


def test_log_filter_shows_progress_and_errors_but_not_executor_dumps() -> None:
    log, terminal = io.StringIO(), io.StringIO()
    out = runner._LogFilter(log, terminal)
    out.write("12:00:00.1 - INFO - Executing task 'tile'\n")
    out.write('    {"executorInput": {"inputs": {"parameterValues": {"config_yaml": "run_dir: x"}}}}\n')
    out.write("    12:00:01 INFO icmil.tiling: tiled 3 slides\n")
    out.write("    Traceback (most recent call last):\n      File 'x.py', line 1\n    ValueError: boom\n")
    out.write("12:00:02.0 - ERROR - Task 'tile' finished with status FAILURE\npartial")
    shown = terminal.getvalue()
    assert "Executing task 'tile'" in shown and "tiled 3 slides" in shown and "ValueError: boom" in shown
    assert "executorInput" not in shown and "partial" not in shown
    # Whole lines reach the file (each redacted as a whole); an unfinished last line when the run ends.
    assert "executorInput" in log.getvalue() and not log.getvalue().endswith("partial")
    out.close_pending()
    assert log.getvalue().endswith("partial\n")


def test_format_summary_prints_locations_table_and_decision(tmp_path: Path) -> None:
    s = runner.RunSummary(
        run_dir=tmp_path,
        pipeline_run_dir=tmp_path / "kfp" / "icmil-1",
        tracking_uri="sqlite:///x.db",
        rounds=[
            {"round": 0, "val_auc": 0.71, "test_auc": 0.7},
            {"round": 1.0, "val_auc": 0.8, "test_auc": 0.75},
        ],
        registration={
            "model": "icmil-slide-classifier",
            "version": "3",
            "promote": False,
            "reason": "ties",
            "champion": "2",
        },
        outputs={"train-head-2/head": "/x/head", "tile/tiles": "/x/tiles"},
        seconds=12.0,
    )
    text = runner.format_summary(s)
    assert str(tmp_path) in text and "sqlite:///x.db" in text
    table = text.split("per-round metrics", 1)[1]
    assert re.search(r"round\s+val_auc\s+test_auc", table)
    assert re.search(r"\n\s*1\s+0\.8000\s+0\.7500\n", table)  # rounds print as integers
    assert "v3; gate: champion stays (ties)" in text and "models:/icmil-slide-classifier@champion" in text
    assert "/x/head" in text and "/x/tiles" not in text
