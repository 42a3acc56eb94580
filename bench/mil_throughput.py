"""MIL head throughput and peak memory on this machine: bags/s for training and inference per head and bag size.

Each (head, bag size) runs in its own subprocess so the peak RSS (``ru_maxrss``; tracemalloc does not see
torch's allocator) belongs to that configuration alone. Heads use their default (paper) sizes; features are
random ``N x D`` float32. A training step is forward + loss + backward + grad clip + optimiser step (the
optimiser of the method (docs/method.md), e.g. Lookahead(RAdam) for TransMIL); inference is an eval-mode forward under
``torch.inference_mode``; ``teacher`` is ``instance_logits`` over every instance of the bag (stage 2's cost).

Usage:
    .venv/bin/python bench/mil_throughput.py                       # all heads, N = 1k, 10k, 50k, D = 1024
    .venv/bin/python bench/mil_throughput.py --heads transmil --sizes 50000 --reps 2
Prints one JSON document: {"machine": ..., "results": [{head, n_instances, train_bags_per_s, ...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, reps: int, budget_s: float) -> float:  # type: ignore[no-untyped-def]
    """Mean seconds per call after one warm-up call; stops early once ``budget_s`` is spent (>= 1 timed call)."""
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return sum(times) / len(times)


def worker(head_name: str, n: int, dim: int, reps: int, budget_s: float, threads: int) -> dict:
    import torch

    from icmil.config import MILConfig
    from icmil.mil import create_mil_head
    from icmil.mil.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_start = _rss_mb()
    features = torch.randn(n, dim)
    head = create_mil_head(head_name, dim, 2)
    opt = build_optimizer(head_name, head.parameters(), MILConfig(head=head_name))
    label = torch.tensor(1)
    rss_ready = _rss_mb()

    def train_step() -> None:
        head.train()
        out = head(features)
        loss = head.bag_loss(out, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
        opt.step()

    def infer() -> None:
        head.eval()
        with torch.inference_mode():
            head(features)

    def teacher() -> None:
        head.eval()
        with torch.inference_mode():
            head.instance_logits(features)

    t_train = _timed(train_step, reps, budget_s)
    t_infer = _timed(infer, reps, budget_s)
    t_teacher = _timed(teacher, reps, budget_s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "head": head_name,
        "n_instances": n,
        "dim": dim,
        "params": sum(p.numel() for p in head.parameters()),
        "train_s_per_bag": round(t_train, 4),
        "train_bags_per_s": round(1 / t_train, 3),
        "infer_s_per_bag": round(t_infer, 4),
        "infer_bags_per_s": round(1 / t_infer, 3),
        "teacher_instances_per_s": round(n / t_teacher, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_model_and_input_mb": round(rss_ready, 1),
        "peak_rss_mb": round(peak, 1),
        "threads": threads,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="*", default=None, help="default: every registered head")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1_000, 10_000, 50_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0, help="time cap per measured phase")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--memory-limit-gb", type=float, default=8.0, help="flag configurations above this peak RSS"
    )
    ap.add_argument("--worker", nargs=2, metavar=("HEAD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        head, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(head, n, args.dim, args.reps, args.budget_s, args.threads)))
        return 0

    if args.heads is None:
        sys.path.insert(0, str(ROOT))
        from icmil.mil import list_mil_heads

        args.heads = list_mil_heads()
    results = []
    for head in args.heads:
        for n in args.sizes:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                head,
                str(n),
                "--dim",
                str(args.dim),
                "--reps",
                str(args.reps),
                "--budget-s",
                str(args.budget_s),
                "--threads",
                str(args.threads),
            ]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                results.append(
                    {"head": head, "n_instances": n, "error": proc.stderr.strip().splitlines()[-1:]}
                )
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["within_memory_limit"] = row["peak_rss_mb"] <= args.memory_limit_gb * 1024
                results.append(row)
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    print(
        json.dumps(
            {"machine": machine, "memory_limit_gb": args.memory_limit_gb, "results": results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
