"""The ``icmil`` command: one subcommand per stage, each a thin wrapper over the library function of that stage.

Every subcommand takes ``--config FILE`` and repeated ``--set a.b=value`` overrides; the resolved config is written
next to the output (credentials redacted). Errors the project raises on purpose (``ICMILError``) print one clear
message and exit 2 (``PromotionRejected`` exits 3 so schedulers can tell "kept the champion" from a crash); every
message, and the traceback of an unexpected crash (exit 1), passes :func:`icmil.redact.redact_text`.
``icmil predict`` prints the table of what succeeded and what failed, then exits 0 when the failures stay within
``--max-failed-fraction`` and 2 otherwise.

Example:
    $ icmil synth runs/slides --slides 8 --seed 0
    $ icmil tile --manifest runs/slides/manifest.csv --out runs/tiles
    $ icmil run configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from icmil.config import ICMILConfig, dump_config, load_config
from icmil.errors import ICMILError, PromotionRejected
from icmil.log import get_logger

log = get_logger("cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML config (defaults: icmil/config.py)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set mil.head=dtfd (repeatable)",
    )


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> ICMILConfig:
    from icmil.redact import register_secret

    cfg = load_config(args.config, [*extra, *args.overrides])
    # Credentials given in the config or on the command line are removed from every later output by value too.
    for value in (cfg.tracking.tracking_uri, cfg.tracking.registry_uri, cfg.tuning.storage, cfg.manifest):
        register_secret(value)
    for flag in ("tracking_uri", "target_registry"):
        register_secret(getattr(args, flag, None))
    return cfg


def _checked_heads(cfg: ICMILConfig) -> ICMILConfig:
    """``cfg`` after checking its bag-head settings (``mil.head``, ``mil.heads.*``) against the registered heads."""
    from icmil.mil import check_head_settings

    check_head_settings(cfg.mil)
    return cfg


def _manifest(cfg: ICMILConfig, path: Path) -> Any:
    from icmil.manifest import read_run_manifest

    manifest = read_run_manifest(cfg, path)
    for why in manifest.rejected.values():  # each names its CSV line
        log.warning("manifest %s", why)
    return manifest


def _stores(args: argparse.Namespace, cfg: ICMILConfig, command: str, needs_registry: bool = True) -> Any:
    """Tracking/registry URIs for a registry command, MLflow's client put on the ``tracking.*`` budget, and a
    sqlite registry that does not exist refused (a read must never create one)."""
    from icmil.tracking.retry import configure_mlflow_http, describe_budget
    from icmil.tracking.uris import redact_uri, require_existing_store, resolve_store_uris

    configure_mlflow_http(cfg.tracking)
    stores = resolve_store_uris(
        cfg, getattr(args, "tracking_uri", None), str(args.config) if args.config else None
    )
    if needs_registry:
        require_existing_store(stores.registry_uri, stores.registry_origin, command)
        log.info(
            "%s: registry %s (from %s); %s",
            command,
            redact_uri(stores.registry_uri),
            stores.registry_origin.split(" (")[0],
            describe_budget(cfg.tracking),
        )
    return stores


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from icmil.slides import synthesize_cohort

    extra = (
        [f"synth.n_slides={args.slides}", f"synth.seed={args.seed}"]
        if args.slides
        else [f"synth.seed={args.seed}"]
    )
    cfg = _config(args, extra)
    manifest = synthesize_cohort(args.out, cfg.synth)
    dump_config(cfg, args.out)
    print(f"wrote {cfg.synth.n_slides} synthetic slides; manifest: {manifest}")
    return 0


def cmd_tile(args: argparse.Namespace) -> int:
    from icmil.slides import tile_manifest

    cfg = _config(args)
    manifest = _manifest(cfg, args.manifest)
    report = tile_manifest(manifest, args.out, cfg.tiling, cache_dir=cfg.cache_dir)
    dump_config(cfg, args.out)
    print(report)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from icmil.features import create_encoder, embed_manifest, load_encoder

    cfg = _config(args)
    manifest = _manifest(cfg, args.manifest)
    encoder = load_encoder(args.encoder) if args.encoder else create_encoder(cfg.encoder)
    report = embed_manifest(manifest, args.tiles, args.out, encoder, cfg.embed, cache_dir=cfg.cache_dir)
    dump_config(cfg, args.out)
    print(report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from icmil.mil import train_mil_head

    cfg = _checked_heads(_config(args, [f"mil.head={args.head}"] if args.head else []))
    manifest = _manifest(cfg, args.manifest)
    lesions = json.loads(args.lesions.read_text()) if args.lesions else None
    result = train_mil_head(manifest, args.features, args.out, cfg.mil, lesions=lesions)
    dump_config(cfg, args.out)
    print(result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from icmil.mil import evaluate_mil_head, load_mil_head

    cfg = _config(args)
    manifest = _manifest(cfg, args.manifest)
    metrics, predictions = evaluate_mil_head(
        load_mil_head(args.head_dir), manifest, args.features, args.split
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        predictions.to_csv(args.out / f"predictions_{args.split}.csv", index=False)
    _print_json(metrics)
    return 0


def cmd_couple(args: argparse.Namespace) -> int:
    from icmil.cohort import MANIFEST_NAME, preflight_cohort
    from icmil.rounds import couple
    from icmil.run_summary import format_rounds

    extra = [f"run_dir={args.out}"]
    if args.manifest:
        extra.append(f"manifest={args.manifest}")
    if args.rounds is not None:
        extra.append(f"coupling.rounds={args.rounds}")
    cfg = _checked_heads(_config(args, extra))
    if not (Path(cfg.run_dir) / MANIFEST_NAME).is_file():
        # Before the run folder is made: after fixing the manifest or a setting, the rerun starts clean.
        preflight_cohort(cfg)
    summary = couple(cfg, track=not args.no_tracking)
    print(format_rounds(summary.to_dict("records")))
    if not args.no_tracking:
        from icmil.tracking import redact_uri, resolve_tracking_uri

        print(f"MLflow: {redact_uri(resolve_tracking_uri(cfg))}")
    _print_report(cfg.run_dir)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from icmil_kfp.pipelines.runner import run_local

    extra = [f"run_dir={args.out}"] if args.out else []
    cfg = load_config(args.config_file, [*extra, *args.overrides])
    summary = run_local(cfg)  # checks the head settings before anything runs
    _print_report(summary.run_dir)
    return 0


def _print_report(run_dir: Any) -> None:
    from icmil.report import write_run_report

    print(f"report: {write_run_report(run_dir)}")


def cmd_report(args: argparse.Namespace) -> int:
    from icmil.report import write_run_report

    path = write_run_report(args.run_dir, max_viewer_slides=args.slides)
    print(f"report: {path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from icmil_kfp.pipelines.runner import compile_pipeline

    cfg = _config(args)
    path = compile_pipeline(cfg, args.out)
    print(f"compiled pipeline: {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from icmil_kfp.pipelines.runner import submit

    cfg = _config(args)
    run_id = submit(
        cfg,
        host=args.host,
        experiment=args.experiment,
        namespace=args.namespace,
        service_account=args.service_account,
        run_name=args.run_name,
    )
    print(f"submitted run {run_id}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from icmil_kfp.pipelines.runner import schedule

    cfg = _config(args)
    job_id = schedule(
        cfg,
        host=args.host,
        cron=args.cron,
        experiment=args.experiment,
        namespace=args.namespace,
        service_account=args.service_account,
        name=args.name,
    )
    print(f"created recurring run {job_id} ({args.cron})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from icmil.tuning import tune_round

    cfg = _checked_heads(_config(args))
    result = tune_round(
        cfg,
        manifest_csv=args.manifest,
        features_dir=args.features,
        out_dir=args.out,
        round_index=args.round,
        study_name=args.study,
        n_trials=args.trials,
        target=args.target,
        tiles_dir=args.tiles,
        head_dir=args.head_dir,
        encoder_dir=args.encoder,
    )
    print(result)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from icmil.registry import promote_with_config

    cfg = _config(args)
    stores = _stores(args, cfg, "promote")
    result = promote_with_config(
        cfg,
        model=args.model,
        tracking_uri=stores.tracking_uri,
        registry_uri=stores.registry_uri,
        target_registry_uri=args.target_registry,
        dry_run=args.dry_run,
    )
    print(result)
    return 0


PREDICT_TABLE_COLUMNS = ("slide_id", "status", "predicted_label", "n_patches", "error")


def format_prediction_table(table: Any, out_dir: Path) -> str:
    """What ``icmil predict`` prints: one row per slide (succeeded and failed), then where the outputs are."""
    probs = [c for c in table.columns if str(c).startswith("prob_")]
    cols = [c for c in PREDICT_TABLE_COLUMNS[:3] if c in table.columns] + probs
    cols += [c for c in PREDICT_TABLE_COLUMNS[3:] if c in table.columns]
    shown = table[cols].copy()
    if "error" in shown:
        shown["error"] = [e if len(str(e)) <= 120 else str(e)[:117] + "..." for e in shown["error"]]
    failed = int((table["status"] != "ok").sum()) if "status" in table else 0
    lines = [
        shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"),
        "",
        f"{len(table) - failed} of {len(table)} slide(s) predicted, {failed} failed",
        f"outputs: {out_dir}/predictions.csv, {out_dir}/run_metadata.json, "
        f"{out_dir}/slides/<slide_id>/ (prediction.json, <slide_id>.geojson, heatmap.png)",
    ]
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from icmil.errors import ConfigError, check_failure_fraction
    from icmil.registry import run_predictions
    from icmil.tracking import RetryPolicy

    cfg = _config(args)
    if not args.slides and not args.manifest:
        raise ConfigError("nothing to predict: give slide paths, globs, s3:// URIs or --manifest CSV")
    registry = args.model.startswith(("models:/", "runs:/"))
    stores = _stores(args, cfg, "predict", needs_registry=registry)
    table, limit = run_predictions(
        args.model,
        [str(s) for s in args.slides] + ([str(args.manifest)] if args.manifest else []),
        args.out,
        tracking_uri=stores.tracking_uri,
        registry_uri=stores.registry_uri,
        heatmaps=not args.no_heatmaps,
        heatmap_scale=args.heatmap_scale,
        retry=RetryPolicy.from_config(cfg.tracking),
        arguments={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
    )
    print(format_prediction_table(table, args.out))
    failures = {str(r.slide_id): str(r.error) for r in table.itertuples() if str(r.error)}
    limit = limit if args.max_failed_fraction is None else args.max_failed_fraction
    check_failure_fraction("predict", failures, len(table), limit)  # exit 2 past the limit (table printed)
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from icmil.features.catalog import encoder_catalog, format_catalog

    rows = encoder_catalog(_config(args).encoder)
    if args.json:
        _print_json(rows)
    else:
        print(format_catalog(rows))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from icmil.config import config_to_yaml

    print(config_to_yaml(_checked_heads(_config(args))), end="")  # redacted, like every written config
    return 0


def format_heads(rows: Sequence[dict[str, Any]]) -> str:
    """What ``icmil heads`` prints: per head, its settings (``mil.heads.<head>.<setting>``) and defaults."""
    lines = []
    for row in rows:
        lines.append(f"{row['head']}: {row['summary']}")
        lines.append(
            f"  {row['optimizer']}, lr {row['default_lr']:g}, weight decay {row['default_weight_decay']:g} "
            f"(mil.lr, mil.weight_decay); stage-2 confidence beta {row['confidence_beta']:g} "
            f"(coupling.beta.{row['head']})"
        )
        for key, spec in row["settings"].items():
            lines.append(f"  mil.heads.{row['head']}.{key}: {spec['type']} = {spec['default']!r}")
    return "\n".join(lines)


def cmd_heads(args: argparse.Namespace) -> int:
    from icmil.mil.settings import describe_heads

    rows = describe_heads()
    if args.json:
        _print_json(rows)
    else:
        print(format_heads(rows))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icmil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "write a synthetic cohort of pyramidal TIFF slides + manifest + lesion boxes")
    p.add_argument("out", type=Path)
    p.add_argument("--slides", type=int, default=None, help="number of slides (default: synth.n_slides)")
    p.add_argument("--seed", type=int, default=0)

    p = add("tile", cmd_tile, "tissue mask + patch grid per slide -> tiles HDF5 + status table")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = add("embed", cmd_embed, "embed every tiled slide -> one features HDF5 per slide")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--tiles", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--encoder", type=Path, default=None, help="saved encoder folder (default: encoder.* config)"
    )

    p = add("train", cmd_train, "train a MIL bag head on features; writes metrics, ROC and heatmaps")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--head", default=None, help="a registered bag head, see `icmil heads` (default: mil.head)"
    )
    p.add_argument("--lesions", type=Path, default=None, help="lesions.json for patch-level evaluation")

    p = add("evaluate", cmd_evaluate, "evaluate a trained bag head on one split")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--head-dir", type=Path, required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", type=Path, default=None)

    p = add(
        "couple",
        cmd_couple,
        "run ICMIL rounds in this process: embed, [tune], train, fine-tune, re-embed, ... (resumable, tracked)",
    )
    p.add_argument("--manifest", type=Path, default=None, help="default: synthesise a cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--no-tracking",
        action="store_true",
        help="record nothing in MLflow (default: track like `icmil run`: tracking.tracking_uri, "
        "$MLFLOW_TRACKING_URI, else sqlite RUN/mlflow.db)",
    )

    p = sub.add_parser("run", help="run the whole Kubeflow pipeline locally (KFP local runner)")
    p.add_argument("config_file", type=Path, nargs="?", default=None)
    p.add_argument("--out", type=Path, default=None, help="run folder (overrides run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="(re)write RUN/report.html from a run folder (offline, self-contained)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--slides", type=int, default=4, help="slides in the zoomable viewer (default 4)")
    p.set_defaults(func=cmd_report)

    p = add("compile", cmd_compile, "compile the pipeline to a Kubeflow YAML")
    p.add_argument("--out", type=Path, default=Path("icmil_pipeline.yaml"))

    for name, func, help_ in (
        ("submit", cmd_submit, "upload the pipeline and start a run on a Kubeflow Pipelines host"),
        ("schedule", cmd_schedule, "create a recurring (retraining) run on a Kubeflow Pipelines host"),
    ):
        p = add(name, func, help_)
        p.add_argument("--host", required=True, help="KFP API URL, e.g. http://ml-pipeline.kubeflow:8888")
        p.add_argument("--experiment", default="icmil")
        p.add_argument("--namespace", default=None)
        p.add_argument("--service-account", default=None)
        if name == "submit":
            p.add_argument("--run-name", default=None)
        else:
            p.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * 1'")
            p.add_argument("--name", default="icmil-retraining")

    p = add("tune", cmd_tune, "Optuna study for one round's bag head (objective: validation AUC)")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--study", default=None, help="study name (default: derived from run folder and round)")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument(
        "--target", default="mil", choices=["mil", "coupling"], help="bag head or stage-2 fine-tuning"
    )
    p.add_argument("--tiles", type=Path, default=None, help="tiles folder (target=coupling)")
    p.add_argument("--head-dir", type=Path, default=None, help="teacher bag head (target=coupling)")
    p.add_argument("--encoder", type=Path, default=None, help="teacher encoder folder (target=coupling)")

    p = add("promote", cmd_promote, "move alias champion to the challenger if it wins (exit 3 if not)")
    p.add_argument("--model", default=None, help="registered model name (default: tracking.registered_model)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--target-registry", default=None, help="promote into another registry (dev -> prod)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the gate would decide ('WOULD PROMOTE'); change nothing",
    )

    p = add(
        "predict",
        cmd_predict,
        "predict slides with a registered model, e.g. models:/NAME@champion (exit 0: every slide predicted, or "
        "failures within max_failed_fraction; exit 2: more failed, or the model could not be loaded; the table "
        "of what succeeded and what failed is printed either way)",
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a folder"
    )
    p.add_argument(
        "slides", nargs="*", help="slide files, globs ('slides/*.svs'), s3:// URIs, .h5 features, .csv"
    )
    p.add_argument(
        "--manifest", type=Path, default=None, help="CSV with a path column (slide_id, mpp optional)"
    )
    p.add_argument("--out", type=Path, default=Path("predictions"))
    p.add_argument("--tracking-uri", default=None)
    p.add_argument(
        "--heatmap-scale",
        choices=["absolute", "rank"],
        default="absolute",
        help="absolute: patch probabilities on a fixed 0-1 scale (default); rank: percentile within the slide",
    )
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    p.add_argument(
        "--max-failed-fraction",
        type=float,
        default=None,
        help="exit 2 when more slides fail (default: the model's tiling.max_failed_fraction; 0 = any failure)",
    )

    p = add(
        "encoders", cmd_encoders, "list the encoder presets, their dimensions and whether weights are here"
    )
    p.add_argument("--json", action="store_true", help="print every field of every preset as JSON")

    p = sub.add_parser(
        "heads", help="list the bag heads, their settings (mil.heads.<head>.<setting>) and their defaults"
    )
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    p.set_defaults(func=cmd_heads)

    add("config", cmd_config, "print the resolved config (defaults + file + overrides)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icmil`` console script."""
    from icmil.redact import redact_text

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PromotionRejected as err:
        print(f"icmil {args.command}: not promoted: {redact_text(str(err))}", file=sys.stderr)
        return 3
    except ICMILError as err:
        print(f"icmil {args.command}: error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"icmil {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: the traceback is for us, but it must not carry a credential either
        import traceback

        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
