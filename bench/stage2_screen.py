"""Screen stage-2 options one at a time: the same round-1 fine-tuning from one finished run's round 0, once per
option, judged the way the product judges it (cross-validated AUC and loss of a bag head retrained on the
candidate's features, ``coupling.selection: cv``) at every evaluation.

Cheaper than a full evidence run (no re-embedding of the cohort, no retraining, no test slides: the test split is
never read) and made to compare options on the same teacher. Each option's stage-2 output goes to
``OUT/<option>/encoder`` (``finetune.json`` holds every evaluation); a finished option is not rerun.

    .venv/bin/python bench/stage2_screen.py --run runs/ri2/seed0/dtfd/faithful --out runs/stage2_screen/dtfd \\
        --config configs/demo.yaml --set encoder.weights=runs/pretrained/tiny_cnn_natural.safetensors \\
        --option anchor coupling.feature_anchor=1.0 --option lora8 coupling.lora_rank=8

``--option NAME KEY=VALUE...`` may repeat; ``faithful`` (no override) is always screened first. Prints one JSON
document: per option, the CV AUC / loss of the teacher and of each evaluated step, and the selected step.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch
from coupling_evidence import run_config  # the same config an evidence run of this seed uses

from icmil.io import write_json_atomic
from icmil.stages import finetune_stage


def _evaluations(encoder_dir: Path) -> dict[str, Any]:
    """The selection record of one stage-2 run: every evaluation's CV AUC/loss (``history.csv``), the pick."""
    record = json.loads((encoder_dir / "finetune.json").read_text(encoding="utf-8"))
    with (encoder_dir / "history.csv").open(encoding="utf-8", newline="") as fh:
        steps = [
            {"step": int(row["step"]), "cv_auc": float(row["cv_auc"]), "cv_loss": float(row["cv_loss"])}
            for row in csv.DictReader(fh)
            if row.get("cv_auc")
        ]
    return {"best_step": record["best_step"], "steps": steps, "seconds": record.get("seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run (manifest.csv, tiles/, round_0/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="the run's config file (e.g. configs/demo.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every option")
    ap.add_argument("--option", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = args.run
    base = json.loads((run / "round_0" / "head" / "config.json").read_text(encoding="utf-8"))
    seed = int(base["mil_config"]["seed"])
    options: dict[str, list[str]] = {"faithful": []}
    options.update({spec[0]: list(spec[1:]) for spec in args.option})
    report: dict[str, Any] = {}
    for name, extra in options.items():
        out = args.out / name
        done = out / "encoder" / "finetune.json"
        if not done.is_file():
            cfg = run_config(
                out, run / "manifest.csv", base["head"], seed, 1, [*args.overrides, *extra], args.config
            )
            t = time.perf_counter()
            finetune_stage(
                cfg,
                run / "manifest.csv",
                run / "tiles",
                run / "round_0" / "encoder",
                run / "round_0" / "head",
                run / "round_0" / "features",
                out / "encoder",
                1,
            )
            print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        report[name] = {"overrides": extra, **_evaluations(out / "encoder")}
        write_json_atomic(args.out / "screen.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
