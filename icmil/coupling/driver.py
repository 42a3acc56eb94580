"""The round driver (``icmil couple``): tiles, round 0, then K rounds of fine-tune → re-embed → retrain →
evaluate, resuming stage by stage.

Run folder (docs/architecture.md, "Run folder layout")::

    RUN/config.yaml, RUN/manifest.csv          resolved config and manifest (the one split of the run)
    RUN/synth/                                 synthetic cohort when no manifest is given (+ lesions.json)
    RUN/tiles/                                 tiling output
    RUN/round_0/encoder/                       the initial encoder, materialised once
    RUN/round_k/encoder/                       round k's fine-tuned encoder (k >= 1) + finetune.json, history.csv
    RUN/round_k/features/, RUN/round_k/head/   re-embedded features, retrained bag head
    RUN/round_k/metrics.json                   round k's evaluation (marks the round as finished)
    RUN/summary.csv, summary.json, summary.png metrics by round

Round k+1's teacher is round k's encoder + round k's head (and round k's features give the teacher's per-patch
view without re-encoding). A rerun of the same command continues from the last finished stage; asking for
more rounds on a finished run adds them. Changing a setting that changes results is refused (the message names
the settings), because mixing rounds made with different settings would make the summary meaningless.

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config("configs/demo.yaml", ["run_dir=runs/couple", "coupling.rounds=2"])  # doctest: +SKIP
    >>> run_coupling(cfg)[["round", "test_auc", "patch_auc_test"]]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from icmil.config import ICMILConfig, config_to_yaml
from icmil.errors import ConfigError
from icmil.io import atomic_path, write_json_atomic, write_text_atomic
from icmil.log import get_logger
from icmil.stages import (
    METRICS_FILE,
    embed_stage,
    encoder_stage,
    evaluate_stage,
    finetune_stage,
    read_marker,
    tile_stage,
    train_stage,
)
from icmil.tracking.base import NullTracker, StageTracker

log = get_logger("coupling")

# Settings that do not change any result: they may differ between a run and its resumption.
RESUME_FREE_PREFIXES = (
    "coupling.rounds",
    "coupling.force_rounds",
    "run_dir",
    "cache_dir",
    "tracking.",
    "pipeline.",
    "tuning.storage",
    "tuning.workers",
    "embed.num_workers",
    "embed.batch_size",
    "embed.prefetch_factor",
    "embed.merge_reads",
    "embed.device",
    "coupling.num_workers",
    "coupling.device",
)

SUMMARY_COLUMNS = [
    "round",
    "teacher_kept",
    "val_auc",
    "test_auc",
    "test_accuracy",
    "test_f1",
    "test_loss",
    "patch_auc_test",
    "patch_auc_all",
    "finetune_best_step",
    "finetune_teacher_val_auc",
    "finetune_selected_val_auc",
    "finetune_teacher_cv_auc",
    "finetune_selected_cv_auc",
]


def round_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"round_{k}"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_conflicts(
    old: Mapping[str, Any], new: Mapping[str, Any], coupling_started: bool = True
) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring :data:`RESUME_FREE_PREFIXES`.

    Stage-2 settings (``coupling.*`` except the round-0 encoder's ``initial_bn_calibration``) only matter once
    a round >= 1 has started: with ``coupling_started=False`` they may change.

    >>> config_conflicts({"seed": 0, "coupling": {"rounds": 1}}, {"seed": 1, "coupling": {"rounds": 3}})
    ['seed']
    >>> config_conflicts({"coupling": {"lr": 1e-5}}, {"coupling": {"lr": 1e-3}}, coupling_started=False)
    []
    """
    a, b = _flatten(old), _flatten(new)
    defaults = _flatten(ICMILConfig().model_dump(mode="json"))
    keys = sorted(set(a) | set(b))
    # A setting added to the config after the run started is absent from its config.yaml: at its default it
    # reproduces what the run did.
    out = [
        k
        for k in keys
        if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)) and not k.startswith(RESUME_FREE_PREFIXES)
    ]
    if not coupling_started:
        out = [k for k in out if not k.startswith("coupling.") or k == "coupling.initial_bn_calibration"]
    return out


def prepare_run(cfg: ICMILConfig) -> tuple[Path, Path | None]:
    """Create/verify ``RUN/config.yaml`` and ``RUN/manifest.csv`` (synthesising a cohort when no manifest is
    given). Returns ``(manifest_csv, lesions_json or None)``. The split is decided once: an existing resolved
    manifest is reused as is."""
    from icmil.cohort import prepare_cohort

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "config.yaml"
    new = cfg.model_dump(mode="json")
    if cfg_path.is_file():
        old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        started = any(p.is_dir() and p.name != "round_0" for p in run.glob("round_*"))
        conflicts = config_conflicts(old, new, coupling_started=started)
        if conflicts:
            shown = ", ".join(
                f"{k}: {_flatten(old).get(k)!r} -> {_flatten(new).get(k)!r}" for k in conflicts[:8]
            )
            raise ConfigError(
                f"{run} holds a run made with different settings ({shown}); resuming would mix results. "
                "Use a new run folder (--out) or restore those settings."
            )
    write_text_atomic(cfg_path, config_to_yaml(cfg))

    manifest_csv = run / "manifest.csv"
    if not manifest_csv.is_file():
        prepare_cohort(cfg, run, n_shards=1)
    else:
        log.info("reusing the resolved manifest %s (the split is fixed for the run)", manifest_csv)
    lesions = None
    if cfg.manifest is None:
        lesions = run / "synth" / "lesions.json"
    else:
        candidate = Path(cfg.manifest).parent / "lesions.json"
        lesions = candidate if not cfg.manifest.startswith("s3://") else None
    return manifest_csv, lesions if lesions is not None and lesions.is_file() else None


def model_round(run: Path, k: int) -> int:
    """The round whose features and head round ``k`` uses: ``k`` itself, or — when round ``k`` kept its
    teacher — the round it reused (followed back to a round that trained its own head)."""
    seen = set()
    while k not in seen:
        seen.add(k)
        m = read_marker(round_dir(run, k) / METRICS_FILE)
        if m is None or not m.get("teacher_kept"):
            return k
        k = int(m["reused_from_round"])
    return k


def run_round(
    cfg: ICMILConfig,
    run: Path,
    manifest_csv: Path,
    k: int,
    tracker: StageTracker,
    lesions_json: Path | None,
) -> dict[str, Any]:
    """All stages of round ``k`` (0: embed + train + evaluate; k >= 1: fine-tune first).

    When stage 2 keeps the teacher (no student beat it on validation), the round's encoder is the previous
    one, so re-embedding and retraining would reproduce the previous round: the round instead records the
    previous round's metrics with ``teacher_kept: true`` and ``reused_from_round`` (no embedding, no training).
    """
    tiles = run / "tiles"
    here = round_dir(run, k)
    if k == 0:
        encoder_stage(cfg, manifest_csv, tiles, here / "encoder", tracker)
    else:
        src = model_round(run, k - 1)
        prev = round_dir(run, src)
        ft = finetune_stage(
            cfg,
            manifest_csv,
            tiles,
            round_dir(run, k - 1) / "encoder",
            prev / "head",
            prev / "features",
            here / "encoder",
            k,
            tracker,
        )
        if int(ft.get("best_step", -1)) == 0:
            return kept_teacher_round(cfg, run, k, src, ft, tracker)
    embed_stage(cfg, manifest_csv, tiles, here / "encoder", here / "features", k, tracker=tracker)
    train_stage(cfg, manifest_csv, here / "features", here / "head", k, tracker, lesions_json=lesions_json)
    return evaluate_stage(
        cfg,
        manifest_csv,
        here / "features",
        here / "head",
        here,
        k,
        tracker,
        lesions_json=lesions_json,
        finetune_dir=here / "encoder" if k else None,
    )


def kept_teacher_round(
    cfg: ICMILConfig, run: Path, k: int, src: int, finetune: Mapping[str, Any], tracker: StageTracker
) -> dict[str, Any]:
    """Round ``k``'s evaluation when stage 2 kept the teacher: round ``src``'s metrics, marked as such."""
    marker = round_dir(run, k) / METRICS_FILE
    done = read_marker(marker)
    if done is not None:
        return done
    previous = read_marker(round_dir(run, src) / METRICS_FILE) or {}
    record = {
        **{key: v for key, v in previous.items() if key not in ("stage", "round", "seconds", "finished_at")},
        "stage": "evaluate",
        "round": k,
        "teacher_kept": True,
        "reused_from_round": src,
        "finetune_best_step": 0,
        "finetune_teacher_val_auc": (finetune.get("teacher") or {}).get("val_auc"),
        "finetune_selected_val_auc": (finetune.get("selected") or {}).get("val_auc"),
        "finetune_teacher_cv_auc": (finetune.get("teacher") or {}).get("cv_auc"),
        "finetune_selected_cv_auc": (finetune.get("selected") or {}).get("cv_auc"),
        "finetune_patches_per_s": finetune.get("patches_per_s"),
        "config_digest": cfg.digest(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    log.info(
        "round %d: stage 2 kept the teacher (no student beat it on validation); round %d's features and head "
        "stand for this round — nothing re-embedded or retrained",
        k,
        src,
    )
    with tracker.stage("evaluate", k) as stage_run:
        stage_run.set_tags({"teacher_kept": "true", "reused_from_round": str(src)})
        stage_run.log_metrics({"teacher_kept": 1.0}, step=k)
    write_json_atomic(marker, record)
    return record


def run_coupling(cfg: ICMILConfig, tracker: StageTracker | None = None) -> pd.DataFrame:
    """Run (or resume) ICMIL in ``cfg.run_dir`` for ``cfg.coupling.rounds`` rounds; returns the summary table
    (one row per round: val/test slide metrics, instance-teacher patch AUC, fine-tuning selection)."""
    tracker = tracker if tracker is not None else NullTracker()
    run = Path(cfg.run_dir)
    manifest_csv, lesions_json = prepare_run(cfg)
    tile_stage(cfg, manifest_csv, run / "tiles", tracker=tracker)
    for k in range(cfg.coupling.rounds + 1):
        rec = run_round(cfg, run, manifest_csv, k, tracker, lesions_json)
        if rec.get("teacher_kept") and not cfg.coupling.force_rounds and k < cfg.coupling.rounds:
            log.info(
                "round %d kept its teacher: converged, rounds %d-%d not run (coupling.force_rounds=true runs them)",
                k,
                k + 1,
                cfg.coupling.rounds,
            )
            break
    summary = write_summary(run, cfg.coupling.rounds)
    with tracker.parent() as parent:
        for row in summary.to_dict("records"):
            parent.log_metrics(
                {
                    f"round_{k}": float(v)
                    for k, v in row.items()
                    if isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                    and k != "round"
                },
                step=int(row["round"]),
            )
        for name in ("summary.csv", "summary.json", "summary.png"):
            if (run / name).is_file():
                parent.log_artifact(run / name)
    return summary


def summary_table(run: Path, rounds: int) -> pd.DataFrame:
    """One row per finished round, from ``round_k/metrics.json``."""
    rows = []
    for k in range(rounds + 1):
        m = read_marker(round_dir(run, k) / METRICS_FILE)
        if m is None:
            continue
        row = {"round": k, **{c: m.get(c) for c in SUMMARY_COLUMNS if c != "round"}}
        row["teacher_kept"] = bool(m.get("teacher_kept", False))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def write_summary(run: Path, rounds: int) -> pd.DataFrame:
    """``summary.csv``, ``summary.json`` and ``summary.png`` (metrics by round) in the run folder."""
    table = summary_table(run, rounds)
    write_text_atomic(run / "summary.csv", table.to_csv(index=False))
    write_json_atomic(run / "summary.json", json.loads(table.to_json(orient="records")))
    plot_summary(table, run / "summary.png")
    return table


def plot_summary(table: pd.DataFrame, out: Path) -> Path:
    """Line plot of slide AUC (val, test) and instance-teacher patch AUC by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for col, label in (
        ("val_auc", "val slide AUC"),
        ("test_auc", "test slide AUC"),
        ("patch_auc_test", "test patch AUC (instance teacher)"),
        ("patch_auc_all", "all-slides patch AUC"),
    ):
        if col in table and table[col].notna().any():
            ax.plot(table["round"], table[col].astype(float), marker="o", label=label)
    ax.set_xlabel("round (0 = before coupling)")
    ax.set_ylabel("AUC")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(list(table["round"]) if len(table) else [0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ICMIL metrics by round")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
