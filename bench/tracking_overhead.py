"""Benchmark: what MLflow tracking costs a pipeline run; prints JSON figures.

Measures, on the embedded sqlite store (or ``--tracking-uri http://...`` for a server): creating the parent
run (config as params + artifact), opening/closing a stage's child run, one per-epoch ``log_metrics`` call,
saving + uploading the slide classifier (tiny_cnn encoder + AB-MIL head), registering it, the promotion gate,
and loading ``models:/NAME@champion`` + predicting one feature bag.

    $ .venv/bin/python bench/tracking_overhead.py [--tracking-uri URI] [--epochs 100]
    {"backend": "sqlite", "parent_run_s": ..., "stage_open_close_ms": ..., "log_metrics_ms": ..., ...}

Target: tracking adds well under 1 % to a training epoch (one log_metrics call per epoch: a few ms).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite in a temp run folder")
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()

    import numpy as np
    import torch

    from icmil.config import EncoderConfig, load_config
    from icmil.features import create_encoder, save_encoder, write_features
    from icmil.mil import create_mil_head, save_mil_head
    from icmil.registry import log_slide_classifier, predict_slides, promote, register_challenger
    from icmil.tracking import start_parent_run, tracker_for
    from icmil.tracking.uris import resolve_tracking_uri

    root = Path(tempfile.mkdtemp(prefix="icmil-bench-tracking-"))
    overrides = [f"run_dir={root / 'run'}", "tracking.experiment=bench"]
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    cfg = load_config(None, overrides)
    uri = resolve_tracking_uri(cfg)
    out: dict[str, object] = {"backend": uri.split(":", 1)[0], "epochs": args.epochs}

    t, c = time.perf_counter(), _cpu_s()
    parent = start_parent_run(cfg, run_name="bench")
    out["parent_run_s"] = round(time.perf_counter() - t, 3)
    out["parent_run_cpu_s"] = round(_cpu_s() - c, 3)

    tracker = tracker_for(cfg, parent)
    opens, logs = [], []
    for r in range(3):
        t = time.perf_counter()
        with tracker.stage("train", round_index=r) as run:
            opened = time.perf_counter()
            for epoch in range(args.epochs if r == 0 else 1):
                s = time.perf_counter()
                run.log_metrics(
                    {"train_loss": 1.0 / (epoch + 1), "val_auc": 0.5 + epoch / (2 * args.epochs)}, epoch
                )
                logs.append(time.perf_counter() - s)
            closing = time.perf_counter()
        opens.append((opened - t) + (time.perf_counter() - closing))
    out["stage_open_close_ms"] = round(1000 * statistics.median(opens), 1)
    out["log_metrics_ms_median"] = round(1000 * statistics.median(logs), 2)
    out["log_metrics_ms_p95"] = round(1000 * float(np.percentile(logs, 95)), 2)

    encoder = create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)
    save_encoder(encoder, root / "encoder")
    head = create_mil_head("abmil", in_dim=encoder.out_dim, n_classes=2)
    head.classes = ["normal", "tumor"]
    save_mil_head(head, root / "head")
    with tracker.stage("register") as run:
        t, c = time.perf_counter(), _cpu_s()
        model_uri = log_slide_classifier(
            root / "encoder", root / "head", cfg.tiling, None, run_id=run.run_id, tracking_uri=uri,
            out_dir=root / "model",
        )  # fmt: skip
        out["save_and_upload_model_s"] = round(time.perf_counter() - t, 3)
        out["save_and_upload_model_cpu_s"] = round(_cpu_s() - c, 3)
        out["model_mb"] = round(
            sum(f.stat().st_size for f in (root / "model").rglob("*") if f.is_file()) / 1e6, 2
        )
        t = time.perf_counter()
        register_challenger(model_uri, "bench-model", metrics={"test": {"auc": 0.8}}, tracking_uri=uri)
        out["register_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    promote("bench-model", "auc", "test", 0.0, 0.5, tracking_uri=uri)
    out["promote_s"] = round(time.perf_counter() - t, 3)

    rng = np.random.default_rng(0)
    n = 2000
    feats = root / "bag.h5"
    coords = np.stack([np.arange(n) % 50 * 256, np.arange(n) // 50 * 256], axis=1).astype(np.int64)
    write_features(feats, rng.normal(size=(n, encoder.out_dim)).astype(np.float32), coords,
                   {"encoder_digest": encoder.digest(), "slide_id": "bag"})  # fmt: skip
    torch.set_num_threads(2)
    t, c = time.perf_counter(), _cpu_s()
    table = predict_slides("models:/bench-model@champion", [feats], root / "pred", tracking_uri=uri)
    out["load_and_predict_one_bag_s"] = round(time.perf_counter() - t, 3)
    out["load_and_predict_one_bag_cpu_s"] = round(_cpu_s() - c, 3)
    out["bag_patches"] = n
    out["predict_ok"] = bool(table.loc[0, "error"] == "")
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
