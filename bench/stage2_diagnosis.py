"""Why does (or doesn't) stage 2 improve the encoder? Follow one fine-tuning run step by step.

At every evaluation of stage 2 (step 0 = the teacher itself) the encoder being evaluated is judged four ways:

1. ``frozen_val_*`` — what stage-2 selection sees: the round's FROZEN bag head scoring the re-embedded
   validation slides;
2. ``frozen_test_auc`` — the same frozen head on the test slides (never used for selection; diagnosis only);
3. ``refit_*`` — what the product would get: every slide re-embedded with this encoder, a NEW bag head trained
   on it (the real ``train_mil_head``, the run's mil settings, ``--refit-seeds`` seeds), test AUC and the
   instance teacher's patch AUC, mean over seeds;
4. ``probe_patch_auc`` — what the features know about the lesions: a logistic regression trained on the
   training slides' patch labels (from the lesion boxes) scored on the test slides' patches.

(1) vs (3) separates "the encoder got worse" from "only its fit to the old head got worse"; (4) tells whether
the information is in the features at all. Writes ``OUT/diagnosis.json`` and ``OUT/diagnosis.md``.

Example:
    .venv/bin/python bench/stage2_diagnosis.py --run runs/ri/seed0/abmil/faithful --out runs/diag/faithful \\
        --lesions runs/realimage/lesions.json --set coupling.max_steps=40 --set coupling.eval_every=10
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.config import apply_overrides, config_from_dict, config_from_yaml
from icmil.coupling.finetune import finetune_encoder
from icmil.features import embed_manifest, load_encoder, read_features, save_encoder
from icmil.manifest import read_run_manifest
from icmil.mil import evaluate_mil_head, load_mil_head, train_mil_head
from icmil.mil.data import patch_size_level0
from icmil.mil.metrics import _binary_auc, patch_in_lesion
from icmil.stages import read_lesions


def linear_probe_auc(features_dir: Path, manifest: Any, lesions: dict[str, list[list[float]]]) -> float:
    """Patch AUC on test slides of a logistic regression fit on training slides' patch labels."""
    from sklearn.linear_model import LogisticRegression

    def patches(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for sid in manifest.split(split)["slide_id"].astype(str):
            path = features_dir / f"{sid}.h5"
            if sid not in lesions or not path.is_file():
                continue
            bag = read_features(path)
            size = patch_size_level0(bag.coords, bag.attrs)
            xs.append(np.asarray(bag.features))
            ys.append(patch_in_lesion(np.asarray(bag.coords), size, lesions[sid]))
        return np.concatenate(xs), np.concatenate(ys).astype(int)

    x_tr, y_tr = patches("train")
    x_te, y_te = patches("test")
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
    clf.fit((x_tr - mu) / sd, y_tr)
    return _binary_auc(y_te, clf.decision_function((x_te - mu) / sd))


def instance_probe_cv(bags: list[np.ndarray], labels: list[int], folds: int = 5, seed: int = 0) -> float:
    """Slide AUC of a label-free-at-patch-level probe: logistic regression on patches that inherit their
    slide's label, cross-validated by slide; a slide scores the mean of its top 10 % patches."""
    from sklearn.linear_model import LogisticRegression

    from icmil.mil.crossval import stratified_folds

    y = np.asarray(labels)
    scores = np.zeros(len(bags))
    for held in stratified_folds(y, folds, seed):
        tr = np.setdiff1d(np.arange(len(bags)), held)
        x = np.concatenate([bags[i] for i in tr])
        t = np.concatenate([np.full(len(bags[i]), y[i]) for i in tr])
        mu, sd = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit((x - mu) / sd, t)
        for i in held:
            z = np.sort(clf.decision_function((bags[i] - mu) / sd))[::-1]
            scores[i] = z[: max(1, len(z) // 10)].mean()
    return _binary_auc(y, scores)


def selection_signals(features_dir: Path, manifest: Any, mil_cfg: Any) -> dict[str, float]:
    """Candidate selection signals that need no test data: a head refit on train scored on val, K-fold CV of
    the head over train+val, and the instance probe's CV AUC over train+val."""
    from icmil.mil.crossval import crossval_score, fit_head

    def load(split: str) -> tuple[list[torch.Tensor], list[int]]:
        rows = manifest.split(split)
        bags, ys = [], []
        for sid, y in zip(rows["slide_id"].astype(str), rows["label_index"].astype(int), strict=True):
            path = features_dir / f"{sid}.h5"
            if path.is_file():
                bags.append(torch.from_numpy(np.asarray(read_features(path).features)))
                ys.append(int(y))
        return bags, ys

    tr_b, tr_y = load("train")
    va_b, va_y = load("val")
    head = fit_head(tr_b, tr_y, mil_cfg, 2, epochs=20, seed=0)
    with torch.no_grad():
        logits = torch.stack([head(b).logits.float().view(-1) for b in va_b])
    va_loss = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(va_y)))
    va_auc = _binary_auc(np.asarray(va_y), logits.softmax(-1)[:, 1].numpy())
    cv = crossval_score(tr_b + va_b, tr_y + va_y, mil_cfg, 2, folds=5, epochs=20, seed=0)
    probe = instance_probe_cv([b.numpy() for b in tr_b + va_b], tr_y + va_y)
    return {
        "refit1_val_auc": va_auc,
        "refit1_val_loss": va_loss,
        "cv_auc": cv.auc,
        "cv_loss": cv.loss,
        "inst_probe_cv_auc": probe,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run folder with a finished round_0")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lesions", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--refit-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--random-teacher",
        action="store_true",
        help="control: the teacher head keeps its input standardisation but gets random weights (knows nothing)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-signals",
        action="store_true",
        help="skip the selection-signal columns (refit-on-train, CV, probe CV)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    base = config_from_yaml((args.run / "config.yaml").read_text())
    cfg = config_from_dict(apply_overrides(base.model_dump(mode="json"), args.overrides))
    manifest_csv = args.run / "manifest.csv"
    manifest = read_run_manifest(cfg, manifest_csv)
    lesions = read_lesions(args.lesions) or {}
    tiles = args.run / "tiles"
    r0 = args.run / "round_0"
    encoder = load_encoder(r0 / "encoder")
    head = load_mil_head(r0 / "head")
    if args.random_teacher:
        from icmil.mil.train import head_from_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            fresh = head_from_config(cfg.mil, head.in_dim, head.n_classes)
        buffers = {k: v for k, v in head.state_dict().items() if "input_" in k}
        fresh.load_state_dict({**fresh.state_dict(), **buffers})
        fresh.classes = head.classes
        head = fresh.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def judge(step: int, enc: torch.nn.Module) -> None:
        t = time.perf_counter()
        work = args.out / f"step_{step:04d}"
        shutil.rmtree(work, ignore_errors=True)
        student = copy.deepcopy(enc).cpu().eval()
        save_encoder(student, work / "encoder")  # type: ignore[arg-type]
        feats = work / "features"
        embed_manifest(
            manifest, tiles, feats, load_encoder(work / "encoder"), cfg.embed, cache_dir=cfg.cache_dir
        )
        row: dict[str, Any] = {"step": step}
        frozen_test, _ = evaluate_mil_head(head, manifest, feats, "test")
        frozen_val, _ = evaluate_mil_head(head, manifest, feats, "val")
        row["frozen_val_auc"] = frozen_val["auc"]
        row["frozen_val_loss"] = frozen_val.get("loss")
        row["frozen_test_auc"] = frozen_test["auc"]
        refit = []
        for seed in args.refit_seeds:
            mil_cfg = cfg.mil.model_copy(update={"seed": seed, "bootstrap_samples": 0, "max_heatmaps": 0})
            res = train_mil_head(manifest, feats, work / f"head_seed{seed}", mil_cfg, lesions=lesions)
            pa = res.metrics.get("patch_auc", {}).get("test", {}).get("instance")
            refit.append(
                (res.metrics["val"]["auc"], res.metrics["test"]["auc"], res.metrics["test"]["loss"], pa)
            )
        arr = np.array(refit, dtype=float)
        row["refit_val_auc"], row["refit_test_auc"], row["refit_test_loss"], row["refit_patch_auc"] = (
            arr.mean(0).tolist()
        )
        row["refit_test_auc_per_seed"] = arr[:, 1].round(3).tolist()
        row["probe_patch_auc"] = linear_probe_auc(feats, manifest, lesions)
        if not args.no_signals:
            row.update(selection_signals(feats, manifest, cfg.mil))
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(feats, ignore_errors=True)  # keep the disk small; encoders and heads stay

    res = finetune_encoder(
        encoder, head, manifest, tiles, None, cfg, features_dir=r0 / "features", eval_callback=judge
    )
    hist = res.history
    evals = hist[hist["val_auc"].notna()][["step", "val_auc", "val_separation", "val_loss"]]
    by_step = {int(r.step): r for r in evals.itertuples()}
    for row in rows:
        e = by_step.get(int(row["step"]))
        if e is not None:
            row["frozen_val_separation"] = float(e.val_separation)
            row["selection_val_auc"] = float(e.val_auc)
    losses = hist[hist["loss"].notna()] if "loss" in hist else hist.iloc[0:0]
    out = {
        "run": str(args.run),
        "overrides": args.overrides,
        "rows": rows,
        "best_step": res.best_step,
        "train_loss_first_last": [
            losses.iloc[:5]["loss"].mean() if len(losses) else None,
            losses.iloc[-5:]["loss"].mean() if len(losses) else None,
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "diagnosis.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    cols = [
        "step",
        "frozen_val_auc",
        "frozen_test_auc",
        "refit_val_auc",
        "refit_test_auc",
        "refit_test_loss",
        "refit_patch_auc",
        "probe_patch_auc",
        *(
            ()
            if args.no_signals
            else ("refit1_val_auc", "refit1_val_loss", "cv_auc", "cv_loss", "inst_probe_cv_auc")
        ),
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
            + " |"
        )
    md = f"overrides: `{' '.join(args.overrides) or 'none'}`; selected step {res.best_step}\n\n" + "\n".join(
        lines
    )
    (args.out / "diagnosis.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
