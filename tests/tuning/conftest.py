"""Tiny feature cohorts and configs for the tuning tests (trials must take about a second each on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from icmil.config import ICMILConfig, load_config
from icmil.features import write_features


def make_cohort(root: Path, counts: tuple[int, int, int] = (8, 10, 2), dim: int = 16, seed: int = 0) -> Path:
    """Write ``root/features/<id>.h5`` + ``root/manifest.csv`` (resolved: split filled in); return the manifest.

    A tumour bag hides two instances shifted by 3 along four feature directions among 10-20 noise instances:
    a randomly initialised head ranks the 10 validation slides poorly (AUC 0.24-0.64 over head seeds 0-3),
    a head trained with a reasonable learning rate finds them within two epochs (0.6-1.0). So a trial with
    a tiny learning rate stays below the median of good trials and the pruner has something to prune.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        for j in range(count):
            sid = f"{split}{j:02d}"
            label = j % 2
            n = int(rng.integers(10, 20))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            if label:
                x[:2, :4] += 3.0
            coords = np.stack([np.arange(n), np.zeros(n)], axis=1) * 256
            write_features(root / "features" / f"{sid}.h5", x, coords, {"slide_id": sid, "patch_size": 256})
            rows.append(f"{sid},{sid}.tif,{'tumor' if label else 'normal'},{split}")
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def tuning_cfg(run_dir: Path, *overrides: str) -> ICMILConfig:
    """Small trials: an 8-d DimRed, 2 epochs, a search space wide enough that bad learning rates get pruned."""
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "mil.hidden_dim=8",
            "mil.attention_dim=8",
            "tuning.epochs=2",
            "tuning.n_trials=3",
            "tuning.pruner_startup_trials=1",
            "tuning.pruner_warmup_epochs=0",
            "tuning.heartbeat_interval=1",
            "tuning.heartbeat_grace_period=3",
            "tuning.mil_space={lr: {low: 1.0e-6, high: 0.1, log: true}, dropout: {low: 0.0, high: 0.5}}",
            "tracking.retries=2",
            "tracking.retry_backoff=0.05",
            "tracking.retry_backoff_max=0.2",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("tuning-cohort"))
