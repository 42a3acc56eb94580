"""The ICMIL Kubeflow pipeline: one DAG, rounds unrolled at compile time from ``coupling.rounds``.

::

    open-run ─ prepare ─┬ ParallelFor shards: tile → embed-r0 ┬ merge-tiles
                        │                                     └ [tune-r0 ×workers] → train-head-r0
                        └ for r in 1..K: finetune-r{r} → ParallelFor shards: embed-r{r} → [tune-r{r}] → train-head-r{r}
    → evaluate → register → dsl.If(challenger wins): promote → report          (exit handler: close-run)

Design choices (see DESIGN.md "Pipeline DAG"):

* Data moves as artifacts (cohort folder, tiles, features, heads, encoders); small values as parameters (the
  shard rows, digests, the per-round metrics table, the registered version).
* The resolved config travels as a YAML string. Tasks that KFP may cache (prepare for a synthetic cohort,
  tile, embed, merge) get a *view* of it in which the sections they do not read are reset to defaults, so
  changing ``mil.lr`` does not invalidate tiles and features. Their other inputs are content keys (slide
  fingerprints inside the shard, upstream artifacts), and they never receive the MLflow parent run id (a new
  id per run would make every cache key new). Everything that talks to MLflow has caching off.
* An exit handler closes the MLflow parent run as FINISHED or FAILED. The exit task cannot take another
  task's output, so both ends find the parent run by the KFP run id.
* Secrets never enter the YAML: :func:`check_no_secrets` rejects a config with credentials in a URI, and
  ``icmil_kfp.pipelines.platform`` maps Kubernetes Secrets to environment variables by name.

Example:
    >>> from icmil.config import load_config
    >>> pipeline = build_pipeline(load_config(None, ["coupling.rounds=2"]))
    >>> pipeline.name
    'icmil'
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as real types.
from pathlib import PurePosixPath
from typing import Any

from kfp import dsl
from kfp.dsl.base_component import BaseComponent

from icmil.config import ICMILConfig, config_from_dict, config_to_yaml
from icmil.errors import ConfigError
from icmil_kfp.components.embed import embed
from icmil_kfp.components.encoder import initial_encoder
from icmil_kfp.components.evaluate import evaluate
from icmil_kfp.components.finetune import finetune
from icmil_kfp.components.merge import merge_shards
from icmil_kfp.components.prepare import prepare
from icmil_kfp.components.promote import promote
from icmil_kfp.components.register import register
from icmil_kfp.components.report import report
from icmil_kfp.components.run import close_run, open_run
from icmil_kfp.components.tile import tile
from icmil_kfp.components.train import train_head
from icmil_kfp.components.tune import tune_finish, tune_prepare, tune_worker
from icmil_kfp.pipelines.platform import place

# Sections each cacheable task reads; every other section is reset to its default in the config it receives.
# A "section.field" entry keeps one field of a section that is otherwise reset.
CACHE_VIEWS: dict[str, tuple[str, ...]] = {
    "prepare": ("synth",),
    # BatchNorm calibration of the initial encoder reads training patches (coupling.initial_bn_calibration).
    "encoder": ("encoder", "tiling", "coupling.initial_bn_calibration", "coupling.batch_size"),
    "tile": ("tiling",),
    "embed": ("tiling", "encoder", "embed"),
}
SECTIONS = ("synth", "tiling", "encoder", "embed", "mil", "coupling", "tracking", "tuning", "pipeline")


def check_no_secrets(cfg: ICMILConfig) -> None:
    """Refuse to compile a config that holds a credential: the YAML is uploaded to KFP and readable there.

    >>> from icmil.config import load_config
    >>> check_no_secrets(load_config(None, ["tuning.storage=postgresql://optuna:pw@db/optuna"]))
    Traceback (most recent call last):
    ...
    icmil.errors.ConfigError: tuning.storage holds a credential ('postgresql://***@db/optuna'); ...
    """
    from icmil.nested import flatten
    from icmil.redact import holds_credential, redact_text, redact_uri

    for field, value in flatten(cfg.model_dump(mode="json"), lists=True).items():
        if isinstance(value, str) and holds_credential(value):
            # The message shows the value as every log shows it: redacted (it is printed and may be logged).
            raise ConfigError(
                f"{field} holds a credential ({redact_text(redact_uri(value))!r}); "
                "a compiled pipeline must not contain secrets. Leave the value out of the config and provide it "
                "through the environment from a Kubernetes Secret (MLFLOW_TRACKING_URI in "
                f"pipeline.mlflow_secret={cfg.pipeline.mlflow_secret!r}, ICMIL_OPTUNA_STORAGE for tuning storage)."
            )


def stage_config(cfg: ICMILConfig, stage: str) -> ICMILConfig:
    """The config a task of ``stage`` receives: for cacheable stages, only the sections it reads are kept.

    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["mil.lr=0.001", "tiling.patch_size=128"])
    >>> view = stage_config(cfg, "tile")
    >>> view.tiling.patch_size, view.mil.lr
    (128, None)
    """
    keep = CACHE_VIEWS.get(stage)
    if keep is None:
        return cfg
    data = cfg.model_dump(mode="json")
    defaults = config_from_dict({}).model_dump(mode="json")
    for section in SECTIONS:
        if section in keep:
            continue
        fields = [k.split(".", 1)[1] for k in keep if k.startswith(f"{section}.")]
        data[section] = {**defaults[section], **{f: data[section][f] for f in fields}}
    return config_from_dict(data, f"<{stage} view>")


def cluster_config(cfg: ICMILConfig) -> ICMILConfig:
    """Paths that must be valid inside a pod: with a feature-store PVC, the slide cache lives on it."""
    p = cfg.pipeline
    if p.feature_store_pvc and cfg.cache_dir is None:
        cache = str(PurePosixPath(p.feature_store_mount) / "slide-cache")
        return config_from_dict({**cfg.model_dump(mode="json"), "cache_dir": cache}, "<cluster config>")
    return cfg


def _tuning(cfg: ICMILConfig, full: str, r: int, parent: Any, cohort: Any, features: Any) -> Any:
    """Round ``r``'s study: prepare → ParallelFor of workers (one merged features folder) → finish; returns
    the ``best_params`` artifact for the round's training step."""
    from icmil_kfp.pipelines.platform import use_optuna_storage

    workers = cfg.tuning.workers
    # On a cluster the study must live in a shared database: its URL comes from a Secret (never the YAML).
    storage_secret = cfg.tuning.storage_secret if cfg.tuning.storage is None else None

    def tuned_task(task: Any, name: str, stage: str) -> Any:
        place(task.set_display_name(name), cfg, stage)
        return use_optuna_storage(task, storage_secret) if storage_secret else task

    study = tuned_task(
        tune_prepare(
            config_yaml=full,
            round_index=r,
            parent_run_id=parent,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            workers=workers,
        ),
        f"tune-prepare-r{r}",
        "tune-prepare",
    )
    merged = merge_shards(parts=dsl.Collected(features))
    place(merged.set_display_name(f"merge-features-r{r}"), cfg, "merge", tracked=False)
    # One item per worker (study name + parent run id inside): see components/tune.py for why.
    with dsl.ParallelFor(study.output, parallelism=workers, name=f"tune-workers-r{r}") as assignment:
        worker = tuned_task(
            tune_worker(
                config_yaml=full,
                round_index=r,
                assignment=assignment,
                cohort=cohort,
                features=merged.outputs["merged"],
            ),
            f"tune-worker-r{r}",
            "tune",
        )
    finished = tune_finish(
        config_yaml=full,
        round_index=r,
        parent_run_id=parent,
        workers_done=dsl.Collected(worker.outputs["Output"]),
    )
    tuned_task(finished, f"tune-finish-r{r}", "tune-finish")
    return finished.outputs["best"]


def build_pipeline(cfg: ICMILConfig, cluster: bool = True) -> BaseComponent:
    """The pipeline for this config (rounds, tuning and placement are fixed at compile time).

    Its only runtime parameter is ``manifest`` (present when the config names one): a scheduled retraining
    can point the same compiled pipeline at a newer manifest. ``cluster=False`` (the local runner) keeps the
    config's paths as they are instead of moving the slide cache onto the feature-store volume.
    """
    check_no_secrets(cfg)
    if cluster:
        cfg = cluster_config(cfg)
    # The exact text (check_no_secrets above guarantees it holds no credential to redact).
    full = config_to_yaml(cfg, redact=False)
    views = {stage: config_to_yaml(stage_config(cfg, stage), redact=False) for stage in CACHE_VIEWS}
    synthetic = cfg.manifest is None
    rounds = cfg.coupling.rounds
    p = cfg.pipeline

    def body(manifest: str) -> None:
        closer = close_run(config_yaml=full, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        place(closer.set_display_name("close-run"), cfg, "close")
        with dsl.ExitHandler(closer, name="icmil-run"):
            opened = open_run(
                config_yaml=full,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            place(opened.set_display_name("open-run"), cfg, "open-run")
            parent = opened.output

            prep = prepare(config_yaml=views["prepare"], manifest=manifest, n_shards=p.shards)
            # A synthetic cohort is a pure function of the config: cacheable. A manifest may change in place.
            place(
                prep.set_display_name("prepare"), cfg, "prepare", cache=synthetic, slides=True, tracked=False
            )
            cohort = prep.outputs["cohort"]
            shards = prep.outputs["Output"]
            # Synthetic slides live in the cohort artifact; a manifest's slides are reached by path / s3://.
            slide_source = {"cohort": cohort} if synthetic else {}

            def embed_shard(shard: Any, round_index: int, tiles: Any, encoder: Any) -> Any:
                # One shard's embedding with round ``round_index``'s encoder (content-addressed: cached).
                task = embed(
                    config_yaml=views["embed"],
                    shard=shard,
                    round_index=round_index,
                    tiles=tiles,
                    encoder=encoder,
                    **slide_source,
                )
                name = f"embed-r{round_index}"
                place(task.set_display_name(name), cfg, "embed", cache=True, slides=True, tracked=False)
                return task

            # The round-0 encoder: from the config alone (in parallel with tiling), or - with BatchNorm
            # calibration on training patches - after tiling, from the tiles.
            calibrate = cfg.coupling.initial_bn_calibration > 0
            if not calibrate:
                first = initial_encoder(config_yaml=views["encoder"])
                place(first.set_display_name("encoder-r0"), cfg, "encoder", cache=True, tracked=False)
                encoder = first.outputs["encoder"]

            with dsl.ParallelFor(shards, parallelism=p.shards, name="shards-r0") as shard:
                tiled = tile(config_yaml=views["tile"], shard=shard, **slide_source)
                place(tiled.set_display_name("tile"), cfg, "tile", cache=True, slides=True, tracked=False)
                if not calibrate:
                    embedded = embed_shard(shard, 0, tiled.outputs["tiles"], encoder)
            merged_tiles = merge_shards(parts=dsl.Collected(tiled.outputs["tiles"]))
            place(merged_tiles.set_display_name("merge-tiles"), cfg, "merge", cache=True, tracked=False)

            if calibrate:
                first = initial_encoder(
                    config_yaml=views["encoder"], cohort=cohort, tiles=merged_tiles.outputs["merged"]
                )
                place(
                    first.set_display_name("encoder-r0"),
                    cfg,
                    "encoder",
                    cache=True,
                    slides=True,
                    tracked=False,
                )
                encoder = first.outputs["encoder"]
                with dsl.ParallelFor(shards, parallelism=p.shards, name="shards-embed-r0") as shard:
                    embedded = embed_shard(shard, 0, merged_tiles.outputs["merged"], encoder)

            features = embedded.outputs["features"]
            history: Any = "[]"
            head: Any = None
            evaluated: Any = None
            for r in range(rounds + 1):
                if r > 0:
                    coupled = finetune(
                        config_yaml=full,
                        round_index=r,
                        parent_run_id=parent,
                        cohort=cohort,
                        tiles=merged_tiles.outputs["merged"],
                        previous_encoder=encoder,
                        head=head,
                        features=dsl.Collected(features),
                    )
                    place(coupled.set_display_name(f"finetune-r{r}"), cfg, "finetune", slides=True)
                    encoder = coupled.outputs["encoder"]
                    with dsl.ParallelFor(shards, parallelism=p.shards, name=f"shards-r{r}") as shard:
                        embedded = embed_shard(shard, r, merged_tiles.outputs["merged"], encoder)
                    features = embedded.outputs["features"]

                tuned: dict[str, Any] = {}
                if cfg.tuning.enabled:
                    tuned = {"tuned": _tuning(cfg, full, r, parent, cohort, features)}

                trained = train_head(
                    config_yaml=full,
                    round_index=r,
                    parent_run_id=parent,
                    cohort=cohort,
                    features=dsl.Collected(features),
                    **tuned,
                )
                place(trained.set_display_name(f"train-head-r{r}"), cfg, "train")
                head = trained.outputs["head"]

                evaluated = evaluate(
                    config_yaml=full,
                    round_index=r,
                    parent_run_id=parent,
                    history_json=history,
                    cohort=cohort,
                    features=dsl.Collected(features),
                    head=head,
                    **({"encoder": encoder} if r > 0 else {}),
                )
                place(evaluated.set_display_name(f"evaluate-r{r}"), cfg, "evaluate")
                history = evaluated.outputs["history_json"]

            registered = register(
                config_yaml=full,
                parent_run_id=parent,
                cohort=cohort,
                encoder=encoder,
                head=head,
                evaluation=evaluated.outputs["evaluation"],
            )
            place(registered.set_display_name("register"), cfg, "register")

            with dsl.If(registered.outputs["Output"] == True, name="challenger-wins"):  # noqa: E712
                promoted = promote(config_yaml=full, parent_run_id=parent)
                place(promoted.set_display_name("promote"), cfg, "promote")

            reported = report(
                config_yaml=full,
                parent_run_id=parent,
                history_json=history,
                registration=registered.outputs["registration"],
            )
            place(reported.set_display_name("report"), cfg, "report")

    description = (
        f"ICMIL: {rounds} coupling round(s) of {cfg.mil.head} on {cfg.encoder.name}"
        f"{', tuned' if cfg.tuning.enabled else ''}; promotion by {cfg.tracking.promotion_split} "
        f"{cfg.tracking.promotion_metric}; cohort: {'synthetic' if synthetic else 'manifest'}."
    )
    if synthetic:
        # No runtime parameter: a synthetic cohort is defined by the config alone (so prepare may be cached).

        def icmil_pipeline():  # no return annotation: KFP would read it as a pipeline output
            body("")

        return dsl.pipeline(name=p.pipeline_name, description=description)(icmil_pipeline)

    def icmil_pipeline_manifest(manifest: str = cfg.manifest or ""):
        body(manifest)

    return dsl.pipeline(name=p.pipeline_name, description=description)(icmil_pipeline_manifest)
