"""Why is a round-0 bag head weak? Separate the data (are lesions visible in the features?) from the head.

On one coupling run's round-0 features (``RUN/manifest.csv`` + ``RUN/round_0/features`` + the cohort's
``lesions.json``) it measures:

* the features: mean and median per-dimension sd over the training patches;
* the data: a linear probe (L2 logistic regression on standardised features) trained on the TRAINING slides'
  patch labels (patch >= 50 % inside a lesion box) and scored on the val+test slides' patches (patch AUC), and
  its scores aggregated per held-out slide by max and by mean (slide AUC) — an upper-bound-style check that
  needs patch labels a MIL head never sees;
* the head: ``train_mil_head`` (the real training loop and selection) with and without
  ``mil.standardize_features``, per learning rate and seed: val/test slide AUC and the instance teacher's patch
  AUC on val and test slides.

Prints one JSON document and writes it to ``--out``. Example (docs/coupling.md, section 1b):
    .venv/bin/python bench/round0_diagnosis.py --run runs/evidence/seed0/abmil/faithful \\
        --lesions runs/evidence/cohort/lesions.json --out runs/round0_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.config import MILConfig
from icmil.manifest import read_manifest
from icmil.mil import BagStore, patch_in_lesion, patch_size_level0, train_mil_head
from icmil.mil.metrics import multiclass_auc
from icmil.stages import read_lesions


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return multiclass_auc(labels, np.stack([-scores, scores], axis=1))


def probe(store: BagStore, slides: Any, lesions: dict[str, Any], positive: str) -> dict[str, Any]:
    """Linear probe on patch labels: train slides -> val+test slides (patch AUC, max/mean slide AUC)."""
    from sklearn.linear_model import LogisticRegression

    feats, labels = {}, {}
    for sid in slides["slide_id"]:
        bag = store.load(sid)
        feats[sid] = bag.features.numpy()
        labels[sid] = patch_in_lesion(
            bag.coords, patch_size_level0(bag.coords, bag.attrs), lesions.get(sid, [])
        )
    train = [s for s, sp in zip(slides["slide_id"], slides["split"], strict=True) if sp == "train"]
    held = [s for s, sp in zip(slides["slide_id"], slides["split"], strict=True) if sp != "train"]
    x_train = np.concatenate([feats[s] for s in train])
    mean, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(
        (x_train - mean) / sd, np.concatenate([labels[s] for s in train])
    )
    scores = {s: clf.decision_function((feats[s] - mean) / sd) for s in held}
    slide_y = np.array(
        [
            int(lbl == positive)
            for s, lbl in zip(slides["slide_id"], slides["label"], strict=True)
            if s in scores
        ]
    )
    return {
        "feature_mean": float(x_train.mean()),
        "feature_median_sd": float(np.median(x_train.std(0))),
        "lesion_patches_per_positive_slide": sorted(int(labels[s].sum()) for s in labels if labels[s].any()),
        "probe_patch_auc_heldout": _auc(
            np.concatenate([labels[s] for s in held]).astype(int), np.concatenate([scores[s] for s in held])
        ),
        "probe_slide_auc_heldout_max": _auc(slide_y, np.array([scores[s].max() for s in held])),
        "probe_slide_auc_heldout_mean": _auc(slide_y, np.array([scores[s].mean() for s in held])),
    }


def heads(
    manifest: Any,
    features: Path,
    lesions: dict[str, Any],
    head: str,
    lrs: list[float],
    seeds: list[int],
    epochs: int,
    work: Path,
) -> list[dict[str, Any]]:
    """``train_mil_head`` on raw vs standardised inputs, per lr and seed (no early stopping)."""
    rows = []
    for standardize in (False, True):
        for lr in lrs:
            for seed in seeds:
                cfg = MILConfig(
                    head=head,
                    lr=lr,
                    seed=seed,
                    epochs=epochs,
                    patience=None,
                    standardize_features=standardize,
                    bootstrap_samples=0,
                    max_heatmaps=0,
                )
                out = work / f"{head}-std{int(standardize)}-lr{lr:g}-s{seed}"
                m = train_mil_head(manifest, features, out, cfg, lesions=lesions).metrics
                rows.append(
                    {
                        "standardize_features": standardize,
                        "lr": lr,
                        "seed": seed,
                        "best_epoch": m["best_epoch"],
                        "val_auc": m["val"]["auc"],
                        "val_loss": m["val"].get("loss"),
                        "test_auc": m["test"]["auc"],
                        "patch_auc_val": m["patch_auc"]["val"]["instance"],
                        "patch_auc_test": m["patch_auc"]["test"]["instance"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a coupling run folder with round_0/features")
    ap.add_argument("--lesions", type=Path, required=True, help="the cohort's lesions.json")
    ap.add_argument("--head", default="abmil")
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--positive", default="tumor", help="label of the positive class")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    manifest = read_manifest(args.run / "manifest.csv")
    lesions = read_lesions(args.lesions) or {}
    features = args.run / "round_0" / "features"
    result: dict[str, Any] = {"run": str(args.run), "head": args.head, "epochs": args.epochs}
    result["data"] = probe(BagStore(features), manifest.slides, lesions, args.positive)
    with tempfile.TemporaryDirectory() as tmp:
        result["heads"] = heads(
            manifest, features, lesions, args.head, args.lrs, args.seeds, args.epochs, Path(tmp)
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
