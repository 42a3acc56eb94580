"""Pipeline overhead figures, printed as JSON: compile time and YAML size per round count, and the local
runner's cost per task (a no-op component that loads the project's component runtime, as every stage does).

    .venv/bin/python bench/pipeline_overhead.py [--tasks 6]
"""

# No `from __future__ import annotations`: KFP reads the component annotations as real types.

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from kfp import dsl, local

from icmil.config import load_config
from icmil_kfp.pipelines.runner import compile_pipeline


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def noop(i: int) -> int:
    from icmil_kfp.components import _runtime  # noqa: F401 - what every stage component imports first

    return i


def compile_figures(out: Path) -> list[dict[str, float]]:
    rows = []
    for rounds in (0, 1, 2, 3):
        t0 = time.perf_counter()
        path = compile_pipeline(load_config(None, [f"coupling.rounds={rounds}"]), out / f"r{rounds}.yaml")
        rows.append(
            {
                "rounds": rounds,
                "compile_s": round(time.perf_counter() - t0, 3),
                "yaml_kib": round(path.stat().st_size / 1024, 1),
            }
        )
    return rows


def local_task_overhead(out: Path, n_tasks: int) -> dict[str, float]:
    @dsl.pipeline(name="overhead")
    def chain():
        value = 0
        for _ in range(n_tasks):
            value = noop(i=value).output

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the runner echoes every task's executor input
        chain()
    seconds = time.perf_counter() - t0
    return {"tasks": n_tasks, "total_s": round(seconds, 2), "per_task_s": round(seconds / n_tasks, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result = {
            "compile": compile_figures(out),
            "local_runner": local_task_overhead(out, args.tasks),
            "load_average_1min": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
