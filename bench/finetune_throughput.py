"""Stage-2 fine-tuning throughput: patches/s of one ICMIL training step (teacher forward on the clean batch +
batched augmentation + student forward/backward + Adam), per encoder, on this machine's device.

Also (``--round-cost``) the cost of one full coupling round relative to round 0, measured on a tiny synthetic
run with the real stage functions: round 0 = embed + train; round k = fine-tune + re-embed + retrain.

Prints one JSON object. Examples:
    .venv/bin/python bench/finetune_throughput.py                       # tiny_cnn + resnet50_trunc, 2 threads
    .venv/bin/python bench/finetune_throughput.py --encoders tiny_cnn --round-cost
    .venv/bin/python bench/finetune_throughput.py --device cuda --batch-size 100   # on a GPU box (AMP bf16)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.config import EncoderConfig, load_config
from icmil.coupling.augment import student_view
from icmil.coupling.losses import coupling_losses, teacher_outputs
from icmil.coupling.teacher import make_teacher_student
from icmil.features import create_encoder
from icmil.mil import create_mil_head


def step_throughput(
    encoder_name: str,
    batch_size: int,
    patch_size: int,
    steps: int,
    warmup: int,
    device: str,
    amp: bool,
    channels_last: bool,
) -> dict[str, Any]:
    dev = torch.device(device)
    enc = create_encoder(EncoderConfig(name=encoder_name), quiet_random=True)
    head = create_mil_head("abmil", enc.out_dim, 2)
    pair = make_teacher_student(enc, head).to(dev, channels_last=channels_last)
    opt = torch.optim.Adam(list(pair.student_parameters()), lr=1e-5, weight_decay=1e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    x_cpu = torch.randint(0, 256, (batch_size, 3, patch_size, patch_size), dtype=torch.uint8)
    amp_dtype = torch.bfloat16 if (amp and dev.type == "cuda") else None

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=amp_dtype)

    def one_step() -> None:
        x = x_cpu.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
        xs = student_view(x, generator=gen)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = coupling_losses(t, pair.student_encoder, pair.student_head, xs).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        one_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    seconds = time.perf_counter() - t0

    # Model-only forward (what embedding costs per patch) for the ratio "one training patch = N embeddings".
    enc_eval = pair.teacher_encoder
    with torch.inference_mode(), autocast():
        for _ in range(warmup):
            enc_eval(x_cpu.to(dev))
        sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            enc_eval(x_cpu.to(dev))
        sync()
        fwd_seconds = time.perf_counter() - t1
    return {
        "encoder": encoder_name,
        "batch_size": batch_size,
        "patch_size": patch_size,
        "steps": steps,
        "train_patches_per_s": round(steps * batch_size / seconds, 1),
        "seconds_per_step": round(seconds / steps, 4),
        "embed_patches_per_s": round(steps * batch_size / fwd_seconds, 1),
        "train_cost_in_embeddings": round(fwd_seconds and seconds / fwd_seconds, 2),
        "amp_dtype": str(amp_dtype) if amp_dtype else None,
        "channels_last": channels_last,
    }


def round_cost(threads: int) -> dict[str, Any]:
    """Tiny synthetic run (tiny_cnn, abmil, 1 round) with the real stage functions; seconds per stage."""
    from icmil.rounds import run_rounds
    from icmil.stages import METRICS_FILE, read_marker

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"run_dir={tmp}/run",
                "encoder.name=tiny_cnn",
                "synth.n_slides=12",
                "synth.width=3072",
                "synth.height=2048",
                "mil.epochs=20",
                "mil.patience=10",
                "coupling.rounds=1",
                "coupling.max_steps=40",
                "coupling.eval_every=20",
                "coupling.batch_size=100",
                "coupling.num_workers=0",
                "embed.num_workers=0",
                "mil.bootstrap_samples=0",
            ],
        )
        t0 = time.perf_counter()
        run_rounds(cfg)
        total = time.perf_counter() - t0
        run = Path(tmp) / "run"
        sec: dict[str, float] = {}
        for k in (0, 1):
            r = run / f"round_{k}"
            for stage, path in (
                ("finetune", r / "encoder" / "stage.json"),
                ("embed", r / "features" / "stage.json"),
                ("train", r / "head" / "stage.json"),
                ("evaluate", r / METRICS_FILE),
            ):
                m = read_marker(path)
                if m is not None and not (k == 0 and stage == "finetune"):
                    sec[f"round{k}_{stage}_s"] = float(m["seconds"])
        ft = read_marker(run / "round_1" / "encoder" / "stage.json") or {}
        round0 = sec.get("round0_embed_s", 0) + sec.get("round0_train_s", 0)
        round1 = sec.get("round1_finetune_s", 0) + sec.get("round1_embed_s", 0) + sec.get("round1_train_s", 0)
        return {
            "setup": "12 slides 3072x2048, tiny_cnn, abmil, 40 fine-tune steps x 100 patches, eval every 20",
            "threads": threads,
            "total_s": round(total, 1),
            **{k: round(v, 2) for k, v in sec.items()},
            "finetune_train_s": ft.get("train_seconds"),
            "finetune_eval_s": ft.get("eval_seconds"),
            "finetune_patches_per_s_with_reading": ft.get("patches_per_s"),
            "round_k_over_round_0": round(round1 / round0, 2) if round0 else None,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=["tiny_cnn", "resnet50_trunc"])
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 CPU, 30 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument(
        "--round-cost", action="store_true", help="also time one full round on a tiny synthetic run"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    steps = args.steps or (30 if device.startswith("cuda") else 5)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "results": [],
    }
    for name in args.encoders:
        # resnet50_trunc is ~40x the FLOPs of tiny_cnn: fewer CPU steps keep the bench under a few minutes.
        n = steps if (name == "tiny_cnn" or device.startswith("cuda")) else max(2, steps // 2)
        bs = (
            args.batch_size if (name == "tiny_cnn" or device.startswith("cuda")) else min(args.batch_size, 32)
        )
        out["results"].append(
            step_throughput(
                name, bs, args.patch_size, n, args.warmup, device, not args.no_amp, not args.no_channels_last
            )
        )
    if args.round_cost:
        out["round_cost"] = round_cost(args.threads)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
