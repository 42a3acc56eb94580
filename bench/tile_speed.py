"""Benchmark: write a 20000 x 20000 px synthetic slide, then tile it; print JSON figures.

Each step runs in its own process so each peak RSS is that step's own (writing must stream: no whole-slide
array; tiling reads a thumbnail level, never level 0).

    $ .venv/bin/python bench/tile_speed.py [--size 20000] [--out DIR]
    {"size": 20000, "write_s": ..., "write_peak_rss_mb": ..., "slide_mb": ..., "tile_s": ..., ...}

Targets: tiling < 5 s; writing a few seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _cpu_s() -> float:
    # CPU time is the figure to compare on a shared machine, where wall time depends on the neighbours.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _write(path: Path, size: int) -> dict[str, float]:
    from icmil.config import SynthConfig
    from icmil.slides import write_synthetic_slide

    base = _peak_rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    boxes = write_synthetic_slide(path, SynthConfig(), seed=1, positive=True, width=size, height=size)
    return {
        "write_s": round(time.perf_counter() - start, 3),
        "write_cpu_s": round(_cpu_s() - cpu, 3),
        "write_peak_rss_mb": round(_peak_rss_mb(), 1),
        "write_rss_after_imports_mb": round(base, 1),
        "slide_mb": round(path.stat().st_size / 1e6, 1),
        "lesions": len(boxes),
    }


def _tile(path: Path) -> dict[str, float]:
    from icmil.config import TilingConfig
    from icmil.slides import tile_slide

    base = _peak_rss_mb()
    cfg = TilingConfig()
    start, cpu = time.perf_counter(), _cpu_s()
    info = tile_slide("bench", path, path.with_suffix(".h5"), cfg)
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu
    start = time.perf_counter()
    again = tile_slide("bench", path, path.with_suffix(".h5"), cfg)  # up to date: skipped
    return {
        "tile_s": round(seconds, 3),
        "tile_cpu_s": round(cpu, 3),
        "tile_skip_s": round(time.perf_counter() - start, 3),
        "skipped_second_run": again.skipped,
        "n_patches": info.n_patches,
        "tile_peak_rss_mb": round(_peak_rss_mb(), 1),
        "tile_rss_after_imports_mb": round(base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=20000, help="slide width = height in px")
    parser.add_argument("--out", type=Path, default=None, help="folder for the slide (default: a temp dir)")
    parser.add_argument("--step", choices=["write", "tile"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step is not None:  # child process
        path = args.out / "bench.tiff"
        result = _write(path, args.size) if args.step == "write" else _tile(path)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        figures: dict[str, object] = {"size": args.size}
        for step in ("write", "tile"):
            cmd = [sys.executable, __file__, "--step", step, "--size", str(args.size), "--out", str(out)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
