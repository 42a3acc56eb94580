"""How much does round 0 depend on luck? Bag-head selection rules compared on fixed features, over seeds.

On one run's round-0 features (``RUN/config.yaml``, ``RUN/manifest.csv``, ``RUN/round_0/features``) it trains the
bag head with the real training loop (:func:`icmil.mil.train_mil_head`) under several model-selection rules, once
per seed, and reports each rule's test AUC mean ± sd over the seeds (the spread is the point: a rule that holds on
a 12-slide validation split gives the same round 0 whatever the seed). Test slides never choose anything; they
are scored once after selection. Resumable: finished (head, rule, seed) results are kept in ``OUT/results.json``.

    .venv/bin/python bench/round0_selection.py --run runs/ri2/seed0/abmil/faithful --out runs/round0_selection \\
        --heads abmil dtfd --seeds 0 1 2 3 4 [--lesions runs/realimage/lesions.json] [--rules auc_p10 loss_min10]

Prints one JSON document (per head and rule: mean, sd, min, per-seed test AUC, best epochs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icmil.config import config_from_yaml
from icmil.io import write_json_atomic
from icmil.manifest import read_run_manifest
from icmil.mil import train_mil_head
from icmil.stages import read_lesions

# Rule name -> MILConfig fields. "p" = patience (epochs without improvement), "min" = min_epochs (no selection
# before it), "e" = epochs, "ema98" = selection on an exponential moving average of the weights (decay 0.98).
RULES: dict[str, dict[str, Any]] = {
    "auc_p10": {"selection": "auc", "patience": 10},  # the default before: best val AUC, patience 10
    "loss_p10": {"selection": "loss", "patience": 10},
    "loss_min10": {"selection": "loss", "patience": 10, "min_epochs": 10},  # today's default rule
    "ema98_loss_min10": {"selection": "loss", "patience": 10, "min_epochs": 10, "ema": 0.98},
    "last25": {"selection": "loss", "patience": None, "min_epochs": 25},
    "auc_e60_p20": {"selection": "auc", "epochs": 60, "patience": 20},
    "loss_e60_p20_min20": {"selection": "loss", "epochs": 60, "patience": 20, "min_epochs": 20},
    "ema98_loss_e60_p20_min20": {
        "selection": "loss",
        "epochs": 60,
        "patience": 20,
        "min_epochs": 20,
        "ema": 0.98,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run folder with round_0/features")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--heads", nargs="+", default=["abmil"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--epochs", type=int, default=25, help="epochs of the rules that do not set their own")
    ap.add_argument("--lesions", type=Path, help="lesions.json for the instance teacher's patch AUC")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = config_from_yaml((args.run / "config.yaml").read_text(encoding="utf-8"))
    manifest = read_run_manifest(cfg, args.run / "manifest.csv")
    lesions = read_lesions(args.lesions) if args.lesions else None
    results_file = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else {}
    )
    for head in args.heads:
        for rule in args.rules:
            for seed in args.seeds:
                key = f"{head}/{rule}/{seed}"
                if key in results:
                    continue
                update = {
                    "head": head,
                    "seed": seed,
                    "epochs": args.epochs,
                    "bootstrap_samples": 0,
                    "max_heatmaps": 0,
                    **RULES[rule],
                }
                mil_cfg = cfg.mil.model_copy(update=update)
                t = time.perf_counter()
                res = train_mil_head(
                    manifest, args.run / "round_0" / "features", args.out / key, mil_cfg, lesions=lesions
                )
                results[key] = {
                    "test_auc": res.metrics["test"]["auc"],
                    "val_auc": res.metrics["val"]["auc"],
                    "best_epoch": res.best_epoch,
                    "epochs_run": res.epochs_run,
                    "seconds": round(time.perf_counter() - t, 1),
                }
                write_json_atomic(results_file, results)
    summary: dict[str, Any] = {}
    for head in args.heads:
        for rule in args.rules:
            rows = [results[f"{head}/{rule}/{s}"] for s in args.seeds if f"{head}/{rule}/{s}" in results]
            auc = np.array([r["test_auc"] for r in rows], dtype=float)
            summary[f"{head}/{rule}"] = {
                "n_seeds": len(rows),
                "test_auc_mean": round(float(auc.mean()), 4),
                "test_auc_sd": round(float(auc.std(ddof=1)), 4) if len(auc) > 1 else None,
                "test_auc_min": round(float(auc.min()), 4),
                "test_auc": [round(float(a), 4) for a in auc],
                "best_epochs": [r["best_epoch"] for r in rows],
            }
    write_json_atomic(args.out / "summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
