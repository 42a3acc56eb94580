"""A tiny synthetic run shared by the coupling and stage tests: built once per test session.

16 small synthetic slides, 64-px patches, random tiny_cnn (BatchNorm calibrated): tiling + round 0 take
seconds of compute, which keeps every end-to-end test of the coupling fast on two CPU cores.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from icmil.config import ICMILConfig, load_config

_BUILT: dict[tuple[str, ...], Path] = {}

BASE_OVERRIDES: tuple[str, ...] = (
    # 16 small slides (8 train / 4 val / 4 test); 64-px patches at 1 µm/px cover the same tissue as 128 px at
    # 20x for a sixteenth of the compute. Lesions at full contrast: with a near-chance round-0 head the
    # instance teacher has nothing to teach (see docs/coupling.md), and the end-to-end test needs a teacher
    # that is informative yet imperfect (round-0 patch AUC ~0.8 over seeds 3-5).
    "synth.n_slides=16",
    "synth.width=2048",
    "synth.height=1536",
    "synth.seed=3",
    "synth.lesion_contrast=1.0",
    "tiling.target_mpp=1.0",
    "tiling.patch_size=64",
    "encoder.name=tiny_cnn",
    "embed.num_workers=0",
    "embed.batch_size=256",
    "mil.epochs=8",
    "mil.patience=null",
    "mil.bootstrap_samples=0",
    "mil.max_heatmaps=0",
    "coupling.num_workers=0",
    "coupling.batch_size=32",
    "coupling.max_steps=10",
    "coupling.eval_every=5",
)


def tiny_config(run_dir: Path, extra: Sequence[str] = ()) -> ICMILConfig:
    """The tiny test config with ``run_dir`` and extra ``a.b=c`` overrides."""
    return load_config(None, [*BASE_OVERRIDES, f"run_dir={run_dir}", *extra])


def round0_run(root: Path, extra: Sequence[str] = ()) -> Path:
    """A run folder with the cohort, tiles and a finished round 0 (built once per settings, then copied)."""
    from icmil.rounds import LocalRun

    key = tuple(extra)
    if key not in _BUILT:
        base = root / f"round0-{len(_BUILT)}"
        run = LocalRun(tiny_config(base, [*extra, "coupling.rounds=0"]))
        run.tile()
        run.round(0)
        _BUILT[key] = base
    return _BUILT[key]


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a prepared run folder (tests then change it freely)."""
    shutil.copytree(src, dst)
    return dst
