"""Benchmark: peak memory while embedding one 20000 x 20000 px slide; prints JSON.

The slide is written (streaming) and tiled first; the embedding then runs in a fresh process whose resident
memory — and that of its DataLoader workers — is sampled every 50 ms from /proc, so the figures are the
embedding's own: ``peak_main_rss_mb`` (the model process), ``peak_total_rss_mb`` (main + workers at the same
instant; shared pages such as the torch libraries are counted once per process, so this over-counts).

    $ .venv/bin/python bench/embed_memory.py [--size 20000] [--encoder tiny_cnn] [--workers 2]
    {"size": 20000, "encoder": "tiny_cnn", "patches": ..., "peak_main_rss_mb": ..., "peak_total_rss_mb": ...}

Target: < 3 GB. Features stream into the HDF5 file batch by batch and patches are never held for a whole
slide, so the peak does not grow with the slide.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class TreeSampler(threading.Thread):
    """Samples the RSS of this process and all its descendants until stopped."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_main, self.peak_total, self.max_procs = interval, 0, 0, 1
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            pids, frontier = [me], [me]
            while frontier:
                kids = [c for p in frontier for c in _children(p)]
                pids += kids
                frontier = kids
            main = _rss_kb(me)
            total = main + sum(_rss_kb(p) for p in pids[1:])
            self.peak_main, self.peak_total = max(self.peak_main, main), max(self.peak_total, total)
            self.max_procs = max(self.max_procs, len(pids))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _prepare(root: Path, size: int) -> dict[str, float]:
    from icmil.config import SynthConfig, TilingConfig
    from icmil.manifest import read_manifest
    from icmil.slides import tile_manifest, write_synthetic_slide

    start = time.perf_counter()
    path = root / "big.tiff"
    write_synthetic_slide(path, SynthConfig(), seed=1, positive=True, width=size, height=size)
    (root / "m.csv").write_text(f"slide_id,path,label,split\nbig,{path},tumor,train\n")
    tile_manifest(read_manifest(root / "m.csv"), root / "tiles", TilingConfig())
    return {
        "prepare_s": round(time.perf_counter() - start, 2),
        "slide_mb": round(path.stat().st_size / 2**20, 1),
    }


def _embed(root: Path, encoder_name: str, workers: int | None, batch_size: int) -> dict[str, object]:
    import torch

    from icmil.config import EmbedConfig, EncoderConfig
    from icmil.features import create_encoder, embed_manifest, resolve_device
    from icmil.features.embed import auto_num_workers
    from icmil.manifest import read_manifest

    sampler = TreeSampler()
    sampler.start()
    base_kb = _rss_kb(os.getpid())
    encoder = create_encoder(EncoderConfig(name=encoder_name), quiet_random=True)
    cfg = EmbedConfig(num_workers=workers, batch_size=batch_size)
    report = embed_manifest(read_manifest(root / "m.csv"), root / "tiles", root / "features", encoder, cfg)
    sampler.stop()
    device = resolve_device(cfg.device)
    return {
        "encoder": encoder_name,
        "device": str(device),
        "batch_size": batch_size,
        "num_workers": auto_num_workers(workers, device),
        "patches": report.n_embedded_patches,
        "embed_s": round(report.seconds, 2),
        "patches_per_s": round(report.patches_per_s, 1),
        "rss_before_mb": round(base_kb / 1024, 1),
        "peak_main_rss_mb": round(sampler.peak_main / 1024, 1),
        "peak_total_rss_mb": round(sampler.peak_total / 1024, 1),
        "processes": sampler.max_procs,
        "torch_threads": torch.get_num_threads(),
        "features_mb": round((root / "features" / "big.h5").stat().st_size / 2**20, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--encoder", default="tiny_cnn")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--step", choices=["all", "prepare", "embed"], default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("ICMIL_PROGRESS", "0")
    root = args.out or Path(tempfile.mkdtemp(prefix="icmil-bench-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        print(json.dumps(_prepare(root, args.size)))
        return
    if args.step == "embed":
        print(json.dumps(_embed(root, args.encoder, args.workers, args.batch_size)))
        return
    result: dict[str, object] = {"size": args.size}
    for step in ("prepare", "embed"):
        cmd = [
            sys.executable,
            __file__,
            "--step",
            step,
            "--out",
            str(root),
            "--size",
            str(args.size),
            "--encoder",
            args.encoder,
            "--batch-size",
            str(args.batch_size),
        ]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result |= json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
