"""Pretrain a `tiny_cnn` patch encoder on natural images: the stand-in for ImageNet weights on a machine with no
model hub.

ICMIL's regime is an encoder pretrained on a *related* task that never saw the slide labels (ImageNet ResNet-50
in the paper): informative for histology, but not tuned to it. This script makes such an encoder: the task is
"which picture is this crop from?" over 20 real photographs that ship inside packages — 18 from the pinned
scikit-image wheel (people, animals, objects, textures such as brick, grass and gravel, coins, a retina, an
astronomy field, an immunohistochemistry section, text) and scikit-learn's two sample photographs — with
random resized crops (8–100 % of the area), flips, 90° rotations, colour jitter and random grey-scale. It never
sees an H&E image, a slide, or a tumour/normal label. Crops are 256 px, the size the encoder meets in slides.

Output: ``OUT/tiny_cnn_natural.safetensors`` (the encoder's own key layout, what ``--set encoder.weights=FILE``
loads) and ``OUT/pretrain.json`` (settings, loss/accuracy curve, held-out crop accuracy, SHA-256 of the
weights, the images used).

Examples:
    .venv/bin/python bench/pretrain_encoder.py --out runs/pretrained                    # ~6 min on 2 cores
    .venv/bin/python bench/pretrain_encoder.py --out /tmp/pt --steps 50                   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realimage_cohort import _download_wheel

from icmil.config import EncoderConfig
from icmil.features import create_encoder
from icmil.io import atomic_path, write_json_atomic

SKIMAGE = ("scikit-image", "0.26.0")
SKIMAGE_IMAGES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
SIZE = 256


def load_images(cache: Path) -> dict[str, np.ndarray]:
    """``{name: uint8 (H, W, 3)}``: the scikit-image wheel's photographs plus scikit-learn's two."""
    from sklearn.datasets import load_sample_images

    wheel = _download_wheel(SKIMAGE[0], SKIMAGE[1], cache / "wheels")
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in SKIMAGE_IMAGES:
            buf = np.frombuffer(zf.read(f"skimage/data/{name}"), dtype=np.uint8)
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f"could not decode skimage/data/{name} from {wheel}")
            out[Path(name).stem] = np.ascontiguousarray(img[..., ::-1])
    samples = load_sample_images()
    for fname, img in zip(samples.filenames, samples.images, strict=True):
        out[Path(fname).stem] = np.ascontiguousarray(img)
    return out


def random_view(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random resized crop (8–100 % of the area, aspect 3/4–4/3) to 256 px, flips, rot90, colour jitter."""
    h, w = img.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 8 <= cw <= w and 8 <= ch <= h:
            break
    else:
        ch = cw = min(h, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = cv2.resize(img[y : y + ch, x : x + cw], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.integers(2):
        crop = crop[:, ::-1]
    f = crop.astype(np.float32) / 255.0
    if rng.random() < 0.2:
        f = np.repeat(f.mean(axis=2, keepdims=True), 3, axis=2)
    grey = f.mean(axis=2, keepdims=True)
    f = grey + (f - grey) * rng.uniform(0.6, 1.4)  # saturation
    f = (f - f.mean()) * rng.uniform(0.7, 1.3) + f.mean() * rng.uniform(0.7, 1.3)  # contrast, brightness
    f = f * (1.0 + rng.normal(0.0, 0.08, size=3))  # colour cast
    return np.clip(f * 255.0, 0, 255).astype(np.uint8)


def batch(
    rng: np.random.Generator, images: Sequence[np.ndarray], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(len(images), size=n)
    x = np.stack([random_view(rng, images[int(i)]) for i in labels])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "icmil-realimage")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    named = load_images(args.cache)
    names, images = list(named), list(named.values())

    encoder = create_encoder(EncoderConfig(name="tiny_cnn", seed=args.seed), quiet_random=True)
    classifier = torch.nn.Linear(encoder.out_dim, len(images))
    params = [*encoder.parameters(), *classifier.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    held_rng = np.random.default_rng(10_000 + args.seed)
    held = [batch(held_rng, images, 64) for _ in range(4)]  # fixed held-out crops (fresh random views)

    def held_out_accuracy() -> float:
        encoder.eval()
        with torch.inference_mode():
            hits = sum(int((classifier(encoder(x)).argmax(1) == y).sum()) for x, y in held)
        encoder.train()
        return hits / sum(len(y) for _, y in held)

    curve: list[dict[str, float]] = []
    t0, run_loss, run_acc = time.perf_counter(), 0.0, 0.0
    for step in range(1, args.steps + 1):
        x, y = batch(rng, images, args.batch_size)
        logits = classifier(encoder(x))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(1) == y).float().mean())
        if step % 100 == 0 or step == args.steps:
            k = 100 if step % 100 == 0 else step % 100
            point = {
                "step": step,
                "loss": run_loss / k,
                "train_acc": run_acc / k,
                "held_out_acc": held_out_accuracy(),
            }
            curve.append(point)
            print(f"[pretrain] {json.dumps(point)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            run_loss, run_acc = 0.0, 0.0

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "tiny_cnn_natural.safetensors"
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(target, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    write_json_atomic(
        args.out / "pretrain.json",
        {
            "weights": str(target),
            "sha256": sha,
            "task": "which of the images a random crop comes from (no histology, no slide labels)",
            "images": names,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "curve": curve,
            "held_out_acc": curve[-1]["held_out_acc"],
            "seconds": time.perf_counter() - t0,
        },
    )
    print(json.dumps({"weights": str(target), "sha256": sha, "held_out_acc": curve[-1]["held_out_acc"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
