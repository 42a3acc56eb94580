"""What a coupling round costs after stage 2 when the teacher is kept (a no-op round) vs when a student wins, in
the local pipeline (KFP local runner); prints JSON.

Runs the pipeline twice on one config (default ``configs/demo.yaml`` with one round), each in a fresh run folder:

* ``full``:  ``coupling.selection=last`` - the last student always replaces the teacher, so round 1 re-embeds
  every slide, [tunes,] retrains the bag head and evaluates it;
* ``noop``:  ``coupling.train_blocks=0`` - stage 2 trains no encoder layer, so no student can beat the teacher
  and round 1 only records round 0's evaluation (the keep-teacher task).

From each run's task log (``RUN/kfp/pipeline.log``): ``after_stage2_s`` = from stage 2 finishing to the first
task of the run's end (register) starting - everything round 1 does after its fine-tuning, scheduling included.

    .venv/bin/python bench/noop_round.py [--config configs/demo.yaml] [--set key=value ...] [--keep DIR]

Target: a no-op round's work after stage 2 costs < 5 % of a full round's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

VARIANTS = {"full": ["coupling.selection=last"], "noop": ["coupling.train_blocks=0"]}
_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - \w+ - (Executing task|Task) '([^']+)'( finished)?")


def task_times(log: Path) -> list[tuple[float, str, str]]:
    """``(seconds since the first line, "start" | "end", task)`` for every task start and finish in the log."""
    out: list[tuple[float, str, str]] = []
    first: dt.datetime | None = None
    for raw in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", raw))
        if not match:
            continue
        at = dt.datetime.strptime(match[1], "%H:%M:%S.%f")
        first = first or at
        seconds = (at - first).total_seconds() % 86400  # a run across midnight
        out.append((seconds, "end" if match[4] else "start", match[3]))
    return out


def after_stage2(events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Seconds from round 1's stage 2 finishing to the end (register) starting, and stage 2's own time."""
    ft_start = next(t for t, kind, name in events if kind == "start" and name.startswith("finetune"))
    ft_end = next(t for t, kind, name in events if kind == "end" and name.startswith("finetune"))
    end = next(
        t for t, kind, name in events if kind == "start" and name.startswith("register") and t > ft_end
    )
    tasks = sorted({name for t, kind, name in events if kind == "start" and ft_end < t < end})
    return {"stage2_s": round(ft_end - ft_start, 2), "after_stage2_s": round(end - ft_end, 2), "tasks": tasks}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run folders here (default: removed)"
    )
    args = parser.parse_args()

    from icmil.config import load_config
    from icmil_kfp.pipelines.runner import run_local

    root = args.keep or Path(tempfile.mkdtemp(prefix="icmil-bench-noop-"))
    out: dict[str, object] = {"config": str(args.config), "overrides": args.overrides}
    for variant, extra in VARIANTS.items():
        run_dir = root / variant
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                "coupling.rounds=1",
                *extra,
                f"run_dir={run_dir}",
                "pipeline.enable_caching=false",
            ],
        )
        t = time.perf_counter()
        summary = run_local(cfg, print_summary=False)
        measured = after_stage2(task_times(run_dir / "kfp" / "pipeline.log"))
        kept = [bool(r.get("teacher_kept")) for r in summary.rounds]
        out[variant] = {**measured, "wall_s": round(time.perf_counter() - t, 1), "teacher_kept": kept}
    full, noop = out["full"], out["noop"]
    assert isinstance(full, dict) and isinstance(noop, dict)
    out["noop_over_full_after_stage2"] = round(noop["after_stage2_s"] / full["after_stage2_s"], 4)
    out["load_average_1min"] = os.getloadavg()[0]
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
