"""Does ICMIL coupling help? Round 0 vs round k on the default synthetic cohort, per head, mean ± sd over seeds.

One synthetic cohort (SynthConfig defaults unless overridden) is generated and tiled once. For every seed, the
initial encoder (random tiny_cnn with BatchNorm statistics calibrated on training patches — a weak encoder; no
pretrained weights exist here) and its round-0 features are made once and shared by the heads; then for every
head, ``run_coupling`` runs rounds 0..K with the real stage functions. The seed sets the encoder init, the bag
head init/order, the stage-2 sampling/augmentation. Everything resumes: rerunning continues where it stopped.

Reported per head and round: slide-level test AUC and test cross-entropy, validation AUC, and the patch-level AUC
of the instance teacher against the lesion boxes (test slides, and all slides), mean ± sd over seeds, plus the
paired change from round 0. Writes ``OUT/evidence.json`` and ``OUT/evidence.md``; ``--update-doc`` replaces the
marked evidence section of docs/coupling.md.

Examples:
    .venv/bin/python bench/coupling_evidence.py --out runs/evidence                      # abmil + dtfd, 3 seeds
    .venv/bin/python bench/coupling_evidence.py --heads abmil --seeds 0 --rounds 1 --set coupling.max_steps=20
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.config import ICMILConfig, load_config
from icmil.coupling import run_coupling

DOC = Path(__file__).resolve().parents[1] / "docs" / "coupling.md"
START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"
METRICS = ("test_auc", "test_loss", "val_auc", "patch_auc_test", "patch_auc_all")

# Demo-scale settings (documented in docs/coupling.md): 40 epochs for the bag head as in configs/demo.yaml,
# a stage-2 budget that fits two shared CPU cores, eval every 10 steps.
DEFAULT_SETTINGS = (
    "encoder.name=tiny_cnn",
    "mil.epochs=40",
    "mil.patience=15",
    "mil.bootstrap_samples=0",
    "mil.max_heatmaps=0",
    "coupling.max_steps=40",
    "coupling.eval_every=10",
    "embed.num_workers=0",
    "coupling.num_workers=0",
)


def _config(
    run_dir: Path, manifest: Path, head: str, seed: int, rounds: int, extra: list[str]
) -> ICMILConfig:
    return load_config(
        None,
        [
            *DEFAULT_SETTINGS,
            f"run_dir={run_dir}",
            f"manifest={manifest}",
            f"mil.head={head}",
            f"seed={seed}",
            f"encoder.seed={seed}",
            f"mil.seed={seed}",
            f"coupling.seed={seed}",
            f"coupling.rounds={rounds}",
            *extra,
        ],
    )


def _share_round0(src: Path, dst: Path) -> None:
    """Give a new run the cohort's tiles and the seed's round-0 encoder + features (finished stages)."""
    dst.mkdir(parents=True, exist_ok=True)
    for rel in ("manifest.csv", "tiles", "round_0/encoder", "round_0/features"):
        s, d = src / rel, dst / rel
        if s.exists() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)


def _fmt(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}"


def aggregate(rows: list[dict[str, Any]], rounds: int) -> tuple[list[dict[str, Any]], str]:
    """Mean ± sd over seeds per (head, round), paired deltas vs round 0, and a markdown table."""
    df = pd.DataFrame(rows)
    out: list[dict[str, Any]] = []
    for (head, rnd), g in df.groupby(["head", "round"], sort=True):
        rec: dict[str, Any] = {"head": head, "round": int(rnd), "n_seeds": len(g)}
        base = df[(df["head"] == head) & (df["round"] == 0)].set_index("seed")
        for m in METRICS:
            vals = g[m].astype(float)
            rec[f"{m}_mean"], rec[f"{m}_sd"] = (
                float(vals.mean()),
                float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            )
            if rnd > 0:
                paired = (
                    g.set_index("seed")[m].astype(float) - base[m].astype(float).reindex(g["seed"]).values
                )
                rec[f"{m}_delta_mean"] = float(paired.mean())
                rec[f"{m}_delta_sd"] = float(paired.std(ddof=1)) if len(paired) > 1 else 0.0
        rec["finetune_best_step"] = [
            None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
            for v in g.get("finetune_best_step", pd.Series(dtype=float))
        ]
        out.append(rec)
    lines = [
        "| head | round | test AUC | test loss | val AUC | patch AUC (test) | patch AUC (all) | Δ test AUC | "
        "Δ patch AUC (test) | selected step per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out:
        d_auc = _fmt(r.get("test_auc_delta_mean"), r.get("test_auc_delta_sd", 0)) if r["round"] else "—"
        d_patch = (
            _fmt(r.get("patch_auc_test_delta_mean"), r.get("patch_auc_test_delta_sd", 0))
            if r["round"]
            else "—"
        )
        steps = (
            ", ".join("—" if s is None else str(s) for s in r["finetune_best_step"]) if r["round"] else "—"
        )
        lines.append(
            f"| {r['head']} | {r['round']} | {_fmt(r['test_auc_mean'], r['test_auc_sd'])} | "
            f"{_fmt(r['test_loss_mean'], r['test_loss_sd'])} | {_fmt(r['val_auc_mean'], r['val_auc_sd'])} | "
            f"{_fmt(r['patch_auc_test_mean'], r['patch_auc_test_sd'])} | "
            f"{_fmt(r['patch_auc_all_mean'], r['patch_auc_all_sd'])} | {d_auc} | {d_patch} | {steps} |"
        )
    return out, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"))
    ap.add_argument("--heads", nargs="+", default=["abmil", "dtfd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--synth", nargs="*", default=[], help="SynthConfig overrides, e.g. width=3072 (default: none)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=c")
    ap.add_argument("--update-doc", action="store_true", help=f"replace the evidence section of {DOC}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from icmil.slides import synthesize_cohort

    cohort_cfg = load_config(None, [f"synth.{kv}" for kv in args.synth])
    manifest = synthesize_cohort(args.out / "cohort", cohort_cfg.synth)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for seed in args.seeds:
        first_run: Path | None = None
        for head in args.heads:
            run_dir = args.out / f"seed{seed}" / head
            if first_run is not None:
                _share_round0(first_run, run_dir)
            elif seed != args.seeds[0]:
                # Tiles do not depend on the seed: reuse the first seed's.
                tiles_src = args.out / f"seed{args.seeds[0]}" / args.heads[0]
                for rel in ("manifest.csv", "tiles"):
                    if (tiles_src / rel).exists() and not (run_dir / rel).exists():
                        run_dir.mkdir(parents=True, exist_ok=True)
                        src = tiles_src / rel
                        (shutil.copytree if src.is_dir() else shutil.copy2)(src, run_dir / rel)
            cfg = _config(run_dir, manifest, head, seed, args.rounds, args.overrides)
            t = time.perf_counter()
            summary = run_coupling(cfg)
            timings[f"seed{seed}/{head}"] = round(time.perf_counter() - t, 1)
            first_run = first_run or run_dir
            for rec in summary.to_dict("records"):
                rows.append({"head": head, "seed": seed, **rec})
            print(f"seed {seed} {head}:\n{summary.to_string(index=False)}", flush=True)

    table, markdown = aggregate(rows, args.rounds)
    settings = [*DEFAULT_SETTINGS, *args.overrides]
    result = {
        "cohort": cohort_cfg.synth.model_dump(mode="json"),
        "settings": settings,
        "heads": args.heads,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "per_run": rows,
        "aggregate": table,
        "seconds_per_run": timings,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evidence.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    header = (
        f"Cohort: synthetic defaults ({cohort_cfg.synth.n_slides} slides {cohort_cfg.synth.width}x"
        f"{cohort_cfg.synth.height}, overrides: {args.synth or 'none'}); settings: `{' '.join(settings)}`; "
        f"seeds {args.seeds}; mean ± sd over seeds; Δ = paired change vs round 0.\n\n"
    )
    (args.out / "evidence.md").write_text(header + markdown + "\n")
    if args.update_doc and DOC.is_file():
        text = DOC.read_text()
        if START in text and END in text:
            pre, rest = text.split(START, 1)
            _, post = rest.split(END, 1)
            DOC.write_text(f"{pre}{START}\n{header}{markdown}\n{END}{post}")
    print(json.dumps({k: v for k, v in result.items() if k != "per_run"}, indent=2, default=str))
    print(markdown)


if __name__ == "__main__":
    main()
