"""The ICMIL Kubeflow pipeline: one DAG built from the round wiring (:mod:`icmil.rounds.wiring`), the same
description ``icmil couple`` runs, with rounds unrolled at compile time from ``coupling.rounds``.

::

    open-run ─ prepare ─ ParallelFor shards: tile [→ embed-r0] ─ merge-tiles ─ [encoder-r0 → shards: embed-r0]
    round 0:  [tune-r0] → train-head-r0 → evaluate-r0
    round k:  finetune-rk → dsl.If(student wins):  shards: embed-rk → [tune-rk] → train-head-rk → evaluate-rk
                                                    → round k+1, or the end
                            dsl.Else (teacher kept): keep-teacher-rk → round k+1 if coupling.force_rounds,
                                                    else the end (converged: later rounds never start)
    the end:  register → dsl.If(challenger wins): promote → report                 (exit handler: close-run)

Design choices:

* A round that keeps its teacher must not re-embed or retrain, and the rounds after it use the model round's
  head and features. KFP's ``dsl.OneOf`` would merge the two branches' artifacts back, but the local runner
  supports it for parameters only ("Expected 1 artifact in ArtifactSelectorSpec"), so instead each branch
  carries on with its own round k+1 (and its own end: register, promote, report). Without
  ``coupling.force_rounds`` a kept teacher ends its branch, so K rounds compile to K+1 ends; with it every
  round branches (2^K ends: keep ``coupling.rounds`` small then).
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
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kfp import dsl
from kfp.dsl.base_component import BaseComponent

from icmil.config import ICMILConfig, config_from_dict, config_to_yaml
from icmil.errors import ConfigError
from icmil.rounds.wiring import (
    COHORT,
    ENCODER,
    EVALUATION,
    FEATURES,
    HEAD,
    TILES,
    Lineage,
    Stage,
    finetune_stage,
    initial_encoder_stage,
    kept_round,
    next_round_runs,
    trained_round,
)
from icmil_kfp.components.embed import embed
from icmil_kfp.components.encoder import initial_encoder
from icmil_kfp.components.evaluate import evaluate
from icmil_kfp.components.finetune import finetune
from icmil_kfp.components.keep import keep_teacher
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
    "encoder": (
        "encoder",
        "tiling",
        "coupling.initial_bn_calibration",
        "coupling.calibrate_pretrained_bn",
        "coupling.batch_size",
    ),
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


# The round's feature shards merged into one artifact (a pipeline-only output: see _Dag.merges_features).
MERGED_FEATURES = "merged-features"


@dataclass
class _Branch:
    """What one path through the ``teacher kept?`` conditions has made: the lineage and the per-round table."""

    lineage: Lineage[Any]
    history: Any = "[]"  # a JSON string, or the last evaluate / keep-teacher task's output

    def fork(self) -> "_Branch":
        return _Branch(self.lineage.branch(), self.history)


class _Dag:
    """The DAG of one config, built inside the ``@dsl.pipeline`` function: the run-level tasks, the rounds of
    :mod:`icmil.rounds.wiring` (one task builder per stage: :data:`TASKS`), and the end of each branch."""

    def __init__(self, cfg: ICMILConfig) -> None:
        self.cfg = cfg
        # The exact text (check_no_secrets guarantees it holds no credential to redact).
        self.full = config_to_yaml(cfg, redact=False)
        self.views = {stage: config_to_yaml(stage_config(cfg, stage), redact=False) for stage in CACHE_VIEWS}
        self.synthetic = cfg.manifest is None
        # Set while building: the MLflow parent run id, the cohort artifact and prepare's shard list.
        self.parent: Any = None
        self.cohort: Any = None
        self.shards: Any = None

    @property
    def slide_source(self) -> dict[str, Any]:
        """Synthetic slides live in the cohort artifact; a manifest's slides are reached by path / s3://."""
        return {"cohort": self.cohort} if self.synthetic else {}

    # ------------------------------------------------------------------------------------ the whole run
    def body(self, manifest: str) -> None:
        """open-run, the cohort, round 0 and every later round, inside the exit handler that closes the run."""
        closer = close_run(config_yaml=self.full, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        place(closer.set_display_name("close-run"), self.cfg, "close")
        with dsl.ExitHandler(closer, name="icmil-run"):
            opened = open_run(
                config_yaml=self.full,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            place(opened.set_display_name("open-run"), self.cfg, "open-run")
            self.parent = opened.output
            self.finish_round(0, _Branch(self.cohort_and_first_encoder(manifest)), kept=False)

    def cohort_and_first_encoder(self, manifest: str) -> Lineage[Any]:
        """prepare → ParallelFor shards: tile → merge-tiles, and round 0's encoder.

        Without BatchNorm calibration the encoder needs no tiles (:func:`initial_encoder_stage` uses none): it
        is built beside tiling, and round 0's embedding runs inside the tile loop, each shard as soon as it is
        tiled. With calibration the encoder reads the merged tiles and round 0 embeds in a loop of its own.
        """
        cfg, p = self.cfg, self.cfg.pipeline
        prep = prepare(config_yaml=self.views["prepare"], manifest=manifest, n_shards=p.shards)
        # A synthetic cohort is a pure function of the config: cacheable. A manifest may change in place.
        place(
            prep.set_display_name("prepare"), cfg, "prepare", cache=self.synthetic, slides=True, tracked=False
        )
        self.cohort, self.shards = prep.outputs["cohort"], prep.outputs["Output"]
        lineage: Lineage[Any] = Lineage({COHORT: self.cohort})
        first = initial_encoder_stage(cfg)
        fused = not first.uses
        if fused:
            self.run_stage(first, 0, _Branch(lineage))
        with dsl.ParallelFor(self.shards, parallelism=p.shards, name="shards-r0") as shard:
            tiled = tile(config_yaml=self.views["tile"], shard=shard, **self.slide_source)
            place(tiled.set_display_name("tile"), cfg, "tile", cache=True, slides=True, tracked=False)
            if fused:
                embedded = self.embed_one(
                    shard, 0, tiled.outputs["tiles"], lineage.rounds[0].outputs[ENCODER]
                )
                lineage.add(0, FEATURES, embedded.outputs["features"])
        merged = merge_shards(parts=dsl.Collected(tiled.outputs["tiles"]))
        place(merged.set_display_name("merge-tiles"), cfg, "merge", cache=True, tracked=False)
        lineage.run[TILES] = merged.outputs["merged"]
        if not fused:
            self.run_stage(first, 0, _Branch(lineage))
        return lineage

    # ------------------------------------------------------------------------------------------ rounds
    def run_stage(self, stage: Stage, k: int, branch: _Branch) -> Any:
        """The task(s) of ``stage`` in round ``k``, its inputs resolved through the lineage; returns the task."""
        inputs = {arg: branch.lineage.resolve(use, k) for arg, use in stage.uses}
        task = TASKS[stage.name](self, k, inputs, branch)
        branch.lineage.add(k, stage.output, task.outputs[OUTPUT_KEYS[stage.name]])
        return task

    def coupling_round(self, k: int, branch: _Branch) -> None:
        """Round ``k >= 1``: stage 2, then one branch per outcome, each carrying on by itself."""
        coupled = self.run_stage(finetune_stage(), k, branch)
        with dsl.If(coupled.outputs["Output"] == False, name=f"student-wins-r{k}"):  # noqa: E712
            self.finish_round(k, branch.fork(), kept=False)
        with dsl.Else(name=f"teacher-kept-r{k}"):
            self.finish_round(k, branch.fork(), kept=True)

    def finish_round(self, k: int, branch: _Branch, kept: bool) -> None:
        """The rest of round ``k`` after its encoder, then round ``k + 1`` or the end of the run."""
        made = branch.lineage.rounds[k].outputs
        for stage in kept_round(k) if kept else trained_round(self.cfg, k):
            if stage.output not in made:  # round 0's features when its embedding ran inside the tile loop
                self.run_stage(stage, k, branch)
            if stage.output == FEATURES and self.merges_features(k):
                self.merge_features(k, branch)
        branch.lineage.close_round(k, kept)
        if next_round_runs(self.cfg, k, kept):
            self.coupling_round(k + 1, branch)
        else:
            self.end(branch)

    def merges_features(self, k: int) -> bool:
        """Whether round ``k``'s feature shards are also merged into one artifact: for the tune workers (a
        ParallelFor cannot take a collected list), and - with ``coupling.force_rounds`` - for a stage 2 two or
        more rounds later behind a kept teacher (KFP 2.17 cannot pass a collected list into a condition)."""
        return self.cfg.tuning.enabled or (
            self.cfg.coupling.force_rounds and k + 2 <= self.cfg.coupling.rounds
        )

    def merge_features(self, k: int, branch: _Branch) -> None:
        merged = merge_shards(parts=dsl.Collected(branch.lineage.rounds[k].outputs[FEATURES]))
        place(merged.set_display_name(f"merge-features-r{k}"), self.cfg, "merge", tracked=False)
        branch.lineage.add(k, MERGED_FEATURES, merged.outputs["merged"])

    def end(self, branch: _Branch) -> None:
        """register → dsl.If(challenger wins): promote → report, for the model this branch delivers."""
        cfg, final = self.cfg, branch.lineage.final_model()
        registered = register(
            config_yaml=self.full,
            parent_run_id=self.parent,
            cohort=self.cohort,
            encoder=final[ENCODER],
            head=final[HEAD],
            evaluation=final[EVALUATION],
        )
        place(registered.set_display_name("register"), cfg, "register")
        with dsl.If(registered.outputs["Output"] == True, name="challenger-wins"):  # noqa: E712
            promoted = promote(config_yaml=self.full, parent_run_id=self.parent)
            place(promoted.set_display_name("promote"), cfg, "promote")
        reported = report(
            config_yaml=self.full,
            parent_run_id=self.parent,
            history_json=branch.history,
            registration=registered.outputs["registration"],
        )
        place(reported.set_display_name("report"), cfg, "report")

    # ---------------------------------------------------------------------------- one builder per stage
    def encoder_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        """Round 0's encoder: from the config alone, or (BatchNorm calibration) from the cohort's tiles."""
        calibrated = {"cohort": self.cohort, "tiles": inputs["tiles"]} if inputs else {}
        task = initial_encoder(config_yaml=self.views["encoder"], **calibrated)
        place(
            task.set_display_name("encoder-r0"),
            self.cfg,
            "encoder",
            cache=True,
            slides=bool(inputs),
            tracked=False,
        )
        return task

    def embed_one(self, shard: Any, k: int, tiles: Any, encoder: Any) -> Any:
        """One shard's embedding with round ``k``'s encoder (content-addressed: cached)."""
        task = embed(
            config_yaml=self.views["embed"],
            shard=shard,
            round_index=k,
            tiles=tiles,
            encoder=encoder,
            **self.slide_source,
        )
        place(task.set_display_name(f"embed-r{k}"), self.cfg, "embed", cache=True, slides=True, tracked=False)
        return task

    def embed_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        """The round's embedding, one task per shard (the per-shard output; consumers collect it)."""
        loop = f"shards-r{k}" if k else "shards-embed-r0"
        with dsl.ParallelFor(self.shards, parallelism=self.cfg.pipeline.shards, name=loop) as shard:
            return self.embed_one(shard, k, inputs["tiles"], inputs["encoder"])

    def finetune_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        task = finetune(
            config_yaml=self.full,
            round_index=k,
            parent_run_id=self.parent,
            cohort=self.cohort,
            tiles=inputs["tiles"],
            previous_encoder=inputs["encoder"],
            head=inputs["head"],
            **self.model_features(k, inputs, branch),
        )
        place(task.set_display_name(f"finetune-r{k}"), self.cfg, "finetune", slides=True)
        return task

    def model_features(self, k: int, inputs: dict[str, Any], branch: _Branch) -> dict[str, Any]:
        """Stage 2's view of the model round's features: the shards, or - when the model round lies behind
        a kept teacher, outside this branch - its merged features (see :meth:`merges_features`)."""
        model = branch.lineage.model_round(k - 1)
        if model < k - 1:
            return {"merged_features": branch.lineage.rounds[model].outputs[MERGED_FEATURES]}
        return {"features": dsl.Collected(inputs["features"])}

    def tune_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        """Round ``k``'s study: prepare → ParallelFor of workers (one merged features folder) → finish (the
        task whose ``best`` artifact holds the round's best settings)."""
        from icmil_kfp.pipelines.platform import use_optuna_storage

        cfg, workers = self.cfg, self.cfg.tuning.workers
        # On a cluster the study must live in a shared database: its URL comes from a Secret (never the YAML).
        storage_secret = cfg.tuning.storage_secret if cfg.tuning.storage is None else None

        def tuned_task(task: Any, name: str, stage: str) -> Any:
            place(task.set_display_name(name), cfg, stage)
            return use_optuna_storage(task, storage_secret) if storage_secret else task

        study = tuned_task(
            tune_prepare(
                config_yaml=self.full,
                round_index=k,
                parent_run_id=self.parent,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                workers=workers,
            ),
            f"tune-prepare-r{k}",
            "tune-prepare",
        )
        features = branch.lineage.rounds[k].outputs[MERGED_FEATURES]
        # One item per worker (study name + parent run id inside): see components/tune.py for why.
        with dsl.ParallelFor(study.output, parallelism=workers, name=f"tune-workers-r{k}") as assignment:
            worker = tuned_task(
                tune_worker(
                    config_yaml=self.full,
                    round_index=k,
                    assignment=assignment,
                    cohort=self.cohort,
                    features=features,
                ),
                f"tune-worker-r{k}",
                "tune",
            )
        finished = tune_finish(
            config_yaml=self.full,
            round_index=k,
            parent_run_id=self.parent,
            workers_done=dsl.Collected(worker.outputs["Output"]),
        )
        return tuned_task(finished, f"tune-finish-r{k}", "tune-finish")

    def train_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        tuned = {"tuned": inputs["tuned"]} if "tuned" in inputs else {}
        task = train_head(
            config_yaml=self.full,
            round_index=k,
            parent_run_id=self.parent,
            cohort=self.cohort,
            features=dsl.Collected(inputs["features"]),
            **tuned,
        )
        place(task.set_display_name(f"train-head-r{k}"), self.cfg, "train")
        return task

    def evaluate_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        finetuned = {"encoder": inputs["finetune"]} if "finetune" in inputs else {}
        task = evaluate(
            config_yaml=self.full,
            round_index=k,
            parent_run_id=self.parent,
            history_json=branch.history,
            cohort=self.cohort,
            features=dsl.Collected(inputs["features"]),
            head=inputs["head"],
            **finetuned,
        )
        place(task.set_display_name(f"evaluate-r{k}"), self.cfg, "evaluate")
        branch.history = task.outputs["history_json"]
        return task

    def keep_task(self, k: int, inputs: dict[str, Any], branch: _Branch) -> Any:
        task = keep_teacher(
            config_yaml=self.full,
            round_index=k,
            parent_run_id=self.parent,
            history_json=branch.history,
            model_evaluation=inputs["evaluation"],
            encoder=inputs["finetune"],
        )
        place(task.set_display_name(f"keep-teacher-r{k}"), self.cfg, "evaluate")
        branch.history = task.outputs["history_json"]
        return task


# Stage name (icmil.rounds.wiring) -> its task builder, and the task output that is the stage's output. The
# local driver has the same table with folders (icmil.rounds.driver.LOCAL_STAGES).
TASKS = {
    "encoder": _Dag.encoder_task,
    "finetune": _Dag.finetune_task,
    "embed": _Dag.embed_task,
    "tune": _Dag.tune_task,
    "train": _Dag.train_task,
    "evaluate": _Dag.evaluate_task,
    "keep-teacher": _Dag.keep_task,
}
OUTPUT_KEYS = {
    "encoder": "encoder",
    "finetune": "encoder",
    "embed": "features",
    "tune": "best",
    "train": "head",
    "evaluate": "evaluation",
    "keep-teacher": "evaluation",
}


def build_pipeline(cfg: ICMILConfig, cluster: bool = True) -> BaseComponent:
    """The pipeline for this config (rounds, tuning and placement are fixed at compile time).

    Its only runtime parameter is ``manifest`` (present when the config names one): a scheduled retraining
    can point the same compiled pipeline at a newer manifest. ``cluster=False`` (the local runner) keeps the
    config's paths as they are instead of moving the slide cache onto the feature-store volume.
    """
    check_no_secrets(cfg)
    if cluster:
        cfg = cluster_config(cfg)
    dag, p = _Dag(cfg), cfg.pipeline
    description = (
        f"ICMIL: {cfg.coupling.rounds} coupling round(s) of {cfg.mil.head} on {cfg.encoder.name}"
        f"{', tuned' if cfg.tuning.enabled else ''}; promotion by {cfg.tracking.promotion_split} "
        f"{cfg.tracking.promotion_metric}; cohort: {'synthetic' if dag.synthetic else 'manifest'}."
    )
    if dag.synthetic:
        # No runtime parameter: a synthetic cohort is defined by the config alone (so prepare may be cached).

        def icmil_pipeline():  # no return annotation: KFP would read it as a pipeline output
            dag.body("")

        return dsl.pipeline(name=p.pipeline_name, description=description)(icmil_pipeline)

    def icmil_pipeline_manifest(manifest: str = cfg.manifest or ""):
        dag.body(manifest)

    return dsl.pipeline(name=p.pipeline_name, description=description)(icmil_pipeline_manifest)
