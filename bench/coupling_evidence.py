"""Does ICMIL coupling help? Round 0 vs round k on the default synthetic cohort, per head, mean ± sd over seeds.

One synthetic cohort (SynthConfig defaults unless overridden) is generated and tiled once. For every seed, the
initial encoder (random tiny_cnn with BatchNorm statistics calibrated on training patches — a weak encoder; no
pretrained weights exist here) and its round-0 features are made once and shared by the heads; then for every
head, ``run_rounds`` runs rounds 0..K with the real stage functions. The seed sets the encoder init, the bag
head init/order, the stage-2 sampling/augmentation. Everything resumes: rerunning continues where it stopped.

Reported per head and round: slide-level test AUC and test cross-entropy, validation AUC, and the patch-level AUC
of the instance teacher against the lesion boxes (test slides, and all slides), mean ± sd over seeds, plus the
paired change from round 0. Writes ``OUT/evidence.json``, ``OUT/evidence.md`` and ``OUT/evidence.png`` (per head,
test AUC and patch AUC by round: a thin line per seed, the mean bold); ``--update-doc`` replaces the
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

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.config import ICMILConfig, load_config
from icmil.rounds import run_rounds

DOC = Path(__file__).resolve().parents[1] / "docs" / "coupling.md"


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- evidence:{section}:start -->", f"<!-- evidence:{section}:end -->"


METRICS = ("test_auc", "test_loss", "val_auc", "patch_auc_test", "patch_auc_all")

# Demo-scale settings (documented in docs/coupling.md): 40 epochs for the bag head as in configs/demo.yaml,
# a stage-2 budget that fits two shared CPU cores, eval every 10 steps.
# Named stage-2 variants (the method's faithful default and each improvement on its own).
VARIANTS: dict[str, tuple[str, ...]] = {
    "faithful": (),
    "confidence": ("coupling.confidence=true",),
    "per_slide_confidence": ("coupling.confidence=true", "coupling.per_slide_confidence=true"),
    "hard_negatives": ("coupling.hard_negatives=true",),
    "balanced": ("coupling.balanced_sampler=true",),
    "stain": ("coupling.stain_augment=true",),
    "stain_confidence": ("coupling.stain_augment=true", "coupling.confidence=true"),  # the two best, together
    "frozen_bn": ("coupling.student_bn=frozen",),
    "method_lr": (
        "coupling.lr=1e-5",
    ),  # the method's learning rate (meant for epochs over millions of patches)
    # Selection by the round's frozen head on the validation slides (the default before cross-validation).
    "frozen_head_selection": ("coupling.selection=val",),
    # Controls: a teacher that knows nothing (random head weights), and BatchNorm adaptation alone (the
    # weights barely move at lr 1e-9; the student's BatchNorm statistics still follow the training patches).
    "random_teacher": ("coupling.random_teacher=true",),
    "bn_only": ("coupling.lr=1e-9",),
    # The control for hard negatives: the slide labels' targets without what the teacher knows.
    "hard_negatives_random_teacher": ("coupling.hard_negatives=true", "coupling.random_teacher=true"),
    # Control: no coupling, the round-0 head trained as long as the extra rounds cost (see LONG_ROUND0).
    "long_round0": (),
    # Diagnostics: the same fine-tuning without selection (the last student is kept).
    "faithful_last": ("coupling.selection=last",),
    "hard_negatives_last": ("coupling.hard_negatives=true", "coupling.selection=last"),
}

# ``long_round0`` trains only round 0, with (rounds + 1) x the epochs and patience of the bag head, from the
# shared round-0 features; its result is reported in the last round's slot (same cost as the coupling rounds).
LONG_ROUND0 = "long_round0"

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


def run_config(
    run_dir: Path,
    manifest: Path,
    head: str,
    seed: int,
    rounds: int,
    extra: list[str],
    base_config: Path | None = None,
) -> ICMILConfig:
    """One evidence run's config: ``base_config`` (else the demo-scale defaults) with every seed set to ``seed``."""
    return load_config(
        base_config,
        [
            *(DEFAULT_SETTINGS if base_config is None else ()),
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


def _share(src: Path, dst: Path, parts: tuple[str, ...]) -> None:
    """Copy finished stage outputs of another run (same cohort/seed) so ``run_rounds`` skips them."""
    dst.mkdir(parents=True, exist_ok=True)
    for rel in parts:
        s, d = src / rel, dst / rel
        if s.exists() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)


def with_converged_rounds(records: list[dict[str, Any]], rounds: int, variant: str) -> list[dict[str, Any]]:
    """Rows for rounds 0..``rounds``: a run that stopped because a round kept its teacher (converged) keeps
    that model, so its last row stands for the rounds it did not run (``converged_at`` says from where).
    ``long_round0``'s single row goes to the last round's slot (it costs what the rounds cost)."""
    if variant == LONG_ROUND0:
        return [{**r, "round": rounds} for r in records if r["round"] == 0] if rounds > 0 else records
    out = list(records)
    if out and out[-1]["round"] < rounds:
        last = out[-1]
        out += [
            {**last, "round": k, "converged_at": last["round"]} for k in range(last["round"] + 1, rounds + 1)
        ]
    return out


def _fmt(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}"


def _coupled_variants(runs: pd.DataFrame) -> list[str]:
    """The variants that have rounds after the shared round 0, in the order they were run."""
    return list(dict.fromkeys(runs.loc[runs["round"] > 0, "variant"]))


def _paired_delta(runs: pd.DataFrame, base: pd.DataFrame, metric: str) -> pd.Series:
    """Per seed: ``metric`` of ``runs`` (one round, a ``seed`` column) minus the same seed's round 0 (``base``,
    indexed by seed)."""
    by_seed = runs.set_index("seed")[metric].astype(float)
    return by_seed - base[metric].astype(float).reindex(by_seed.index).values


def aggregate(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Mean ± sd over seeds per (head, variant, round), paired deltas vs the shared round 0, markdown table."""
    df = pd.DataFrame(rows)
    base_all = df[df["round"] == 0]
    out: list[dict[str, Any]] = []
    for head in dict.fromkeys(df["head"]):
        base = base_all[base_all["head"] == head].set_index("seed")
        groups = [("—", 0, base.reset_index())]
        for variant in _coupled_variants(df[df["head"] == head]):
            sub = df[(df["head"] == head) & (df["variant"] == variant) & (df["round"] > 0)]
            groups += [(variant, int(r), g) for r, g in sub.groupby("round", sort=True)]
        for variant, rnd, g in groups:
            rec: dict[str, Any] = {"head": head, "variant": variant, "round": rnd, "n_seeds": len(g)}
            for m in METRICS:
                vals = g[m].astype(float)
                rec[f"{m}_mean"] = float(vals.mean())
                rec[f"{m}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                if rnd > 0:
                    paired = _paired_delta(g, base, m)
                    rec[f"{m}_delta_mean"] = float(paired.mean())
                    rec[f"{m}_delta_sd"] = float(paired.std(ddof=1)) if len(paired) > 1 else 0.0
            rec["finetune_best_step"] = [
                None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                for v in g.get("finetune_best_step", pd.Series(dtype=float))
            ]
            out.append(rec)
    lines = [
        "| head | variant | round | test AUC | test loss | val AUC | patch AUC (test) | patch AUC (all) | "
        "Δ test AUC | Δ patch AUC (test) | Δ patch AUC (all) | selected step per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out:

        def delta(m: str, r: dict[str, Any] = r) -> str:
            return _fmt(r.get(f"{m}_delta_mean"), r.get(f"{m}_delta_sd", 0.0)) if r["round"] else "—"

        steps = (
            ", ".join("—" if v is None else str(v) for v in r["finetune_best_step"]) if r["round"] else "—"
        )
        lines.append(
            f"| {r['head']} | {r['variant']} | {r['round']} | {_fmt(r['test_auc_mean'], r['test_auc_sd'])} | "
            f"{_fmt(r['test_loss_mean'], r['test_loss_sd'])} | {_fmt(r['val_auc_mean'], r['val_auc_sd'])} | "
            f"{_fmt(r['patch_auc_test_mean'], r['patch_auc_test_sd'])} | "
            f"{_fmt(r['patch_auc_all_mean'], r['patch_auc_all_sd'])} | {delta('test_auc')} | "
            f"{delta('patch_auc_test')} | {delta('patch_auc_all')} | {steps} |"
        )
    return out, "\n".join(lines)


def per_seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per head, variant and seed, test AUC and patch AUC (test / all) from round 0 to the last."""
    df = pd.DataFrame(rows)
    lines = [
        "| head | variant | seed | test AUC by round | patch AUC (test) by round | patch AUC (all) by round |",
        "|---|---|---|---|---|---|",
    ]
    for head in dict.fromkeys(df["head"]):
        sub = df[df["head"] == head]
        base = sub[sub["round"] == 0].set_index("seed")
        for variant in _coupled_variants(sub):
            later = sub[(sub["variant"] == variant) & (sub["round"] > 0)]
            for seed, runs in later.groupby("seed"):
                runs = pd.concat([base.loc[[seed]].reset_index(), runs]).sort_values("round")
                cells = [
                    " → ".join(f"{v:.3f}" for v in runs[m].astype(float))
                    for m in ("test_auc", "patch_auc_test", "patch_auc_all")
                ]
                lines.append(f"| {head} | {variant} | {seed} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_evidence(rows: list[dict[str, Any]], path: Path) -> None:
    """Per head: test AUC and patch AUC (all slides) by round, one thin line per seed, the mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    heads = list(dict.fromkeys(df["head"]))
    panels = (("test_auc", "slide-level test AUC"), ("patch_auc_all", "patch-level AUC (all slides)"))
    fig, axes = plt.subplots(len(heads), 2, figsize=(9, 3.2 * len(heads)), squeeze=False)
    for i, head in enumerate(heads):
        sub = df[df["head"] == head]
        base = sub[sub["round"] == 0]
        for j, (metric, title) in enumerate(panels):
            ax = axes[i][j]
            for k, variant in enumerate(_coupled_variants(sub)):
                runs = pd.concat([base, sub[sub["variant"] == variant]])  # round 0 is shared by variants
                colour = f"C{k}"
                for _, seed_runs in runs.groupby("seed"):
                    seed_runs = seed_runs.sort_values("round")
                    ax.plot(seed_runs["round"], seed_runs[metric], color=colour, alpha=0.3, lw=1)
                mean = runs.groupby("round")[metric].mean()
                ax.plot(mean.index, mean.values, color=colour, lw=2.5, marker="o", label=f"{variant} (mean)")
            ax.set_title(f"{head}: {title}", fontsize=10)
            ax.set_xlabel("coupling round")
            ax.set_xticks(sorted(sub["round"].unique()))
            ax.set_ylim(0, 1.02)
            ax.axhline(0.5, color="grey", ls=":", lw=1)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variant_deltas(rows: list[dict[str, Any]], path: Path) -> None:
    """Per head: paired change from round 0 to the last round of each variant (bars: mean over seeds; dots:
    seeds) for slide-level test AUC and patch-level AUC (all slides) — the options side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    heads = list(dict.fromkeys(df["head"]))
    metrics = (("test_auc", "Δ test AUC"), ("patch_auc_all", "Δ patch AUC (all)"))
    fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 3.8), squeeze=False)
    for ax, head in zip(axes[0], heads, strict=True):
        sub = df[df["head"] == head]
        base = sub[sub["round"] == 0].set_index("seed")
        variants = _coupled_variants(sub)
        width = 0.8 / len(metrics)
        for j, (metric, label) in enumerate(metrics):
            for k, variant in enumerate(variants):
                runs = sub[(sub["variant"] == variant) & (sub["round"] > 0)]
                last = runs[runs["round"] == runs["round"].max()]
                delta = _paired_delta(last, base, metric).to_numpy()
                x = k + (j - (len(metrics) - 1) / 2) * width
                ax.bar(x, delta.mean(), width, color=f"C{j}", alpha=0.6, label=label if k == 0 else None)
                ax.scatter(np.full(delta.shape, x), delta, color=f"C{j}", s=12, zorder=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{head}: change after coupling (bars: mean, dots: seeds)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], out: Path, n_variants: int) -> None:
    """``evidence.png`` (metrics by round) and, with several variants, ``evidence_variants.png``."""
    plot_evidence(rows, out / "evidence.png")
    if n_variants > 1:
        plot_variant_deltas(rows, out / "evidence_variants.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"))
    ap.add_argument("--heads", nargs="+", default=["abmil", "dtfd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["faithful"],
        choices=sorted(VARIANTS),
        help="stage-2 variants to run (round 0 is shared between them)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--synth", nargs="*", default=[], help="SynthConfig overrides, e.g. width=3072 (default: none)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=c")
    ap.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="a cohort of your own (lesions.json beside it gives patch AUCs) instead of the synthetic one",
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        help="base config (e.g. configs/demo.yaml) instead of the bench's demo-scale settings",
    )
    ap.add_argument(
        "--reuse-round0",
        type=Path,
        default=None,
        help="an earlier evidence OUT whose finished round 0 (same cohort, seeds, heads) is copied",
    )
    ap.add_argument(
        "--update-doc",
        default=None,
        metavar="SECTION",
        help=f"replace the marked evidence section SECTION of {DOC}",
    )
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the plots from an existing OUT/evidence.json"
    )
    args = ap.parse_args()
    if args.replot:
        done = json.loads((args.out / "evidence.json").read_text())
        write_plots(done["per_run"], args.out, len(done["variants"]))
        print(f"plots redrawn in {args.out}")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from icmil.slides import synthesize_cohort

    cohort_cfg = load_config(None, [f"synth.{kv}" for kv in args.synth])
    if args.manifest is not None:
        manifest = args.manifest.resolve()
    else:
        manifest = synthesize_cohort(args.out / "cohort", cohort_cfg.synth)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    shared_tiles: Path | None = None
    for seed in args.seeds:
        seed_round0: Path | None = None  # encoder + features of this seed, shared by every head
        for head in args.heads:
            head_round0: Path | None = None  # + the round-0 head, shared by every variant
            for variant in args.variants:
                run_dir = args.out / f"seed{seed}" / head / variant
                reuse = args.reuse_round0 / f"seed{seed}" / head / "faithful" if args.reuse_round0 else None
                if (
                    head_round0 is None
                    and reuse is not None
                    and (reuse / "round_0" / "metrics.json").is_file()
                ):
                    head_round0 = reuse  # another evidence run already finished this seed's round 0
                extra = list(VARIANTS[variant])
                rounds = args.rounds
                if variant == LONG_ROUND0:
                    base_mil = run_config(
                        run_dir, manifest, head, seed, 0, list(args.overrides), args.config
                    ).mil
                    factor = args.rounds + 1
                    extra += [f"mil.epochs={base_mil.epochs * factor}"]
                    if base_mil.patience is not None:
                        extra += [f"mil.patience={base_mil.patience * factor}"]
                    rounds = 0
                    share_from = head_round0 or seed_round0
                    if share_from is not None:
                        _share(
                            share_from,
                            run_dir,
                            ("manifest.csv", "tiles", "round_0/encoder", "round_0/features"),
                        )
                elif head_round0 is not None:
                    _share(head_round0, run_dir, ("manifest.csv", "tiles", "round_0"))
                elif seed_round0 is not None:
                    _share(
                        seed_round0, run_dir, ("manifest.csv", "tiles", "round_0/encoder", "round_0/features")
                    )
                elif shared_tiles is not None:
                    _share(shared_tiles, run_dir, ("manifest.csv", "tiles"))
                cfg = run_config(
                    run_dir, manifest, head, seed, rounds, [*args.overrides, *extra], args.config
                )
                t = time.perf_counter()
                summary = run_rounds(cfg)
                timings[f"seed{seed}/{head}/{variant}"] = round(time.perf_counter() - t, 1)
                shared_tiles = shared_tiles or run_dir
                seed_round0 = seed_round0 or run_dir
                if variant != LONG_ROUND0:
                    head_round0 = head_round0 or run_dir
                for rec in with_converged_rounds(summary.to_dict("records"), args.rounds, variant):
                    if rec["round"] == 0 and variant != args.variants[0]:
                        continue  # round 0 is shared: count it once
                    rows.append({"head": head, "variant": variant, "seed": seed, **rec})
                print(f"seed {seed} {head} {variant}:\n{summary.to_string(index=False)}", flush=True)

    table, markdown = aggregate(rows)
    settings = [*(DEFAULT_SETTINGS if args.config is None else ()), *args.overrides]
    result = {
        "cohort": str(args.manifest)
        if args.manifest is not None
        else cohort_cfg.synth.model_dump(mode="json"),
        "config": str(args.config) if args.config is not None else None,
        "settings": settings,
        "heads": args.heads,
        "variants": {v: list(VARIANTS[v]) for v in args.variants},
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
    if args.manifest is not None:
        cohort_text = f"`{args.manifest}` (lesion boxes beside it)"
    else:
        cohort_text = (
            f"synthetic defaults ({cohort_cfg.synth.n_slides} slides {cohort_cfg.synth.width}x"
            f"{cohort_cfg.synth.height}, overrides: {args.synth or 'none'})"
        )
    base = f"`{args.config}` + " if args.config is not None else ""
    header = (
        f"Cohort: {cohort_text}; settings: {base}`{' '.join(settings)}`; "
        f"seeds {args.seeds}; mean ± sd over seeds; Δ = paired change vs round 0.\n\n"
    )
    markdown += "\n\nPer seed:\n\n" + per_seed_table(rows)
    (args.out / "evidence.md").write_text(header + markdown + "\n")
    write_plots(rows, args.out, len(args.variants))
    if args.update_doc and DOC.is_file():
        start, end = _markers(args.update_doc)
        text = DOC.read_text()
        if start in text and end in text:
            pre, rest = text.split(start, 1)
            _, post = rest.split(end, 1)
            DOC.write_text(f"{pre}{start}\n{header}{markdown}\n{end}{post}")
        else:
            print(f"{DOC} has no {start} ... {end} section; not updated", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "per_run"}, indent=2, default=str))
    print(markdown)


if __name__ == "__main__":
    main()
