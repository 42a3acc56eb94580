"""The MLflow run hierarchy: one parent run per pipeline run, one child run per round and stage.

Every stage (local or in a Kubeflow pod) receives the parent run id and opens its child run by name
``round{r}/{stage}`` (``{stage}`` without a round) under that parent, so the whole pipeline lands in one tree.
A resumed stage finds and reuses its child run instead of creating a duplicate.

Tracking never costs training. A call that fails is retried with backoff (``tracking.retries``); if the
server stays unreachable the stage goes on "offline": calls are queued in memory and in a spool file
(``RUN/tracking-spool``), probed again every ``retry_backoff_max`` seconds, and flushed when the stage ends.
If the flush still fails, :class:`~icmil.errors.TrackingError` is raised AFTER the stage body finished (its
outputs are on disk); the spool is replayed by the next tracker that opens a stage under the same parent.

Example:
    >>> import tempfile
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, [f"run_dir={tempfile.mkdtemp()}"])
    >>> parent = start_parent_run(cfg, run_name="demo")            # doctest: +SKIP
    >>> tracker = tracker_for(cfg, parent)                          # doctest: +SKIP
    >>> with tracker.stage("train", round_index=0) as run:          # doctest: +SKIP
    ...     run.log_metrics({"train_loss": 0.7, "val_auc": 0.8}, step=1)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import TrackingError
from icmil.io import write_text_atomic
from icmil.log import get_logger
from icmil.redact import redact_text
from icmil.tracking.base import NullTracker, StageRun, StageTracker
from icmil.tracking.retry import RetryPolicy, configure_mlflow_http, is_transient
from icmil.tracking.uris import config_params, default_artifact_location, redact_uri, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from icmil.config import ICMILConfig

log = get_logger("tracking")

TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_KFP_RUN_ID = "icmil.kfp_run_id"
TAG_MANIFEST_DIGEST = "icmil.manifest_digest"
TAG_ENCODER_DIGEST = "icmil.encoder_digest"
TAG_CONFIG_DIGEST = "icmil.config_digest"
TAG_ROUND = "icmil.round"
TAG_STAGE = "icmil.stage"
TAG_RUN_KEY = "icmil.run_key"

# MLflow's per-request limits for log_batch.
_MAX_PARAMS, _MAX_TAGS, _MAX_METRICS = 100, 100, 1000


def child_run_name(name: str, round_index: int | None = None) -> str:
    """``round{r}/{name}`` for per-round stages, ``name`` otherwise.

    >>> child_run_name("train", 0), child_run_name("tile")
    ('round0/train', 'tile')
    """
    return name if round_index is None else f"round{round_index}/{name}"


def safe_key(key: Any) -> str:
    """A metric/param/tag name MLflow accepts (letters, digits, ``_ - . / : space``); others become ``_``.

    >>> safe_key("auc[test]")
    'auc_test_'
    """
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:250]


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- low-level MLflow calls


def _client(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id by name, creating it (artifacts beside a sqlite store) when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri)))
    except MlflowException as err:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise err from None
        return str(exp.experiment_id)


def _log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: list[Any] | None = None,
    params: list[Any] | None = None,
    tags: list[Any] | None = None,
) -> None:
    metrics, params, tags = metrics or [], params or [], tags or []
    for i in range(0, len(params), _MAX_PARAMS):
        _log_params_idempotent(client, run_id, params[i : i + _MAX_PARAMS])
    for i in range(0, len(tags), _MAX_TAGS):
        client.log_batch(run_id, tags=tags[i : i + _MAX_TAGS])
    for i in range(0, len(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS])


def _log_params_idempotent(client: MlflowClient, run_id: str, params: list[Any]) -> None:
    """Log params; re-logging an identical value (a resumed stage) is fine, a changed value is an error."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_batch(run_id, params=params)
        return
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
    existing = client.get_run(run_id).data.params
    changed = {
        p.key: (existing[p.key], p.value) for p in params if p.key in existing and existing[p.key] != p.value
    }
    if changed:
        detail = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise TrackingError(
            f"run {run_id}: params differ from the ones already logged ({detail}); a resumed stage must use "
            "the same settings — start a new pipeline run (new parent run) for new settings"
        )
    fresh = [p for p in params if p.key not in existing]
    if fresh:
        client.log_batch(run_id, params=fresh)


def _log_path(client: MlflowClient, run_id: str, path: str, artifact_path: str | None) -> None:
    p = Path(path)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path if artifact_path is not None else p.name)
    elif p.is_file():
        client.log_artifact(run_id, str(p), artifact_path)
    else:
        raise TrackingError(f"artifact to log does not exist: {p} (it must be written before it is logged)")


# --------------------------------------------------------------------------- stage run


class MlflowStageRun:
    """A child run. Logging calls are retried; during an outage they queue and the stage goes on."""

    def __init__(self, tracker: MlflowTracker, run_name: str, tags: dict[str, str]) -> None:
        self.tracker = tracker
        self.run_name = run_name
        self.run_id = ""
        self._open_tags = tags
        self._pending: list[dict[str, Any]] = []
        self._offline_since: float | None = None
        self._last_probe = 0.0
        self._outage: TrackingError | None = None
        # Calls MLflow rejected on their merits (not an outage): reported when the stage ends, never replayed.
        self._errors: list[str] = []

    # StageRun protocol ------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from icmil.tracking.uris import flatten_params

        self._submit({"op": "params", "params": {safe_key(k): v for k, v in flatten_params(params).items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {safe_key(k): float(v) for k, v in metrics.items()}
        self._submit({"op": "metrics", "metrics": values, "step": int(step or 0), "ts": _now_ms()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        # Absolute: the spool may be replayed by a process with another working directory.
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._submit({"op": "tags", "tags": {safe_key(k): redact_text(str(v)) for k, v in tags.items()}})

    # internals ----------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.tracker.client
        kind = op["op"]
        if kind == "open":
            self.run_id = self.tracker._open_child(self.run_name, op["tags"])
            return
        if not self.run_id:
            raise TrackingError(f"stage {self.run_name!r}: child run was never opened")
        if kind == "params":
            _log_batch(client, self.run_id, params=[Param(k, v) for k, v in op["params"].items()])
        elif kind == "metrics":
            ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            _log_batch(client, self.run_id, metrics=ms)
        elif kind == "tags":
            _log_batch(client, self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifact":
            _log_path(client, self.run_id, op["path"], op["artifact_path"])
        elif kind == "end":
            client.set_terminated(self.run_id, op["status"], end_time=op["ts"])
        else:
            raise TrackingError(f"unknown spooled tracking call {kind!r}")

    def _describe(self, op: dict[str, Any]) -> str:
        return f"MLflow {op['op']} for stage {self.run_name!r} at {redact_uri(self.tracker.tracking_uri)}"

    def _submit(self, op: dict[str, Any]) -> None:
        if self.offline:
            self._pending.append(op)
            self._spool_live()
            if time.monotonic() - self._last_probe >= self.tracker.retry.backoff_max:
                self._flush(attempts=1)
            return
        try:
            self.tracker.retry.call(lambda: self._apply(op), self._describe(op))
        except TrackingError as err:
            if not is_transient(err.__cause__ or err):
                self._reject(err)
                return
            self._go_offline(err)
            self._pending.append(op)
            self._spool_live()

    def _reject(self, err: TrackingError) -> None:
        # Never raised mid-stage: a logging call must not abort training. The stage's end reports it.
        self._errors.append(str(err))
        log.error("stage %r: %s (reported when the stage ends)", self.run_name, err)

    def _go_offline(self, err: TrackingError) -> None:
        self._offline_since = time.monotonic()
        self._last_probe = self._offline_since
        self._outage = err
        log.warning(
            "tracking unreachable (%s); stage %r continues and its tracking calls are queued in %s",
            err,
            self.run_name,
            self.tracker.spool_path(self.run_name),
        )

    def _flush(self, attempts: int | None = None) -> bool:
        """Replay queued calls in order; True when the queue is empty afterwards."""
        self._last_probe = time.monotonic()
        while self._pending:
            op = self._pending[0]
            try:
                self.tracker.retry.call(
                    functools.partial(self._apply, op), self._describe(op), attempts=attempts
                )
            except TrackingError as err:
                if is_transient(err.__cause__ or err):
                    self._outage = err
                    return False
                self._reject(err)
            self._pending.pop(0)
        if self.offline:
            log.info("tracking reachable again; stage %r caught up", self.run_name)
        self._offline_since = None
        self.tracker.clear_spool(self.run_name)
        return True

    def _spool_live(self) -> None:
        self.tracker.write_spool(self, live=True)


# --------------------------------------------------------------------------- tracker


class MlflowTracker:
    """:class:`~icmil.tracking.base.StageTracker` on MLflow: child runs under ``parent_run_id``.

    ``spool_dir`` keeps tracking calls made during an outage (default: a temp dir, i.e. lost with the
    process; :func:`tracker_for` uses ``RUN/tracking-spool``).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        *,
        retry: RetryPolicy | None = None,
        spool_dir: str | Path | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        if not parent_run_id:
            raise TrackingError("MlflowTracker needs a parent run id (start_parent_run(cfg) returns one)")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.retry = retry or RetryPolicy()
        self.spool_dir = (
            Path(spool_dir) if spool_dir else Path(tempfile.gettempdir()) / "icmil-tracking-spool"
        )
        self.tags = dict(tags or {})
        self.client = _client(tracking_uri)
        self._experiment_id: str | None = None
        self._replayed = False

    # StageTracker protocol ------------------------------------------------------------
    @contextlib.contextmanager
    def stage(
        self, name: str, round_index: int | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[StageRun]:
        """Open (or reuse) child run ``round{r}/{name}``; mark it FINISHED / FAILED when the block ends."""
        run_name = child_run_name(name, round_index)
        child_tags = {**self.tags, TAG_STAGE: name, **(tags or {})}
        if round_index is not None:
            child_tags[TAG_ROUND] = str(round_index)
        run = MlflowStageRun(self, run_name, child_tags)
        self._replay_other_spools(run_name)
        run._pending = self.read_spool(run_name)  # calls a previous attempt could not deliver
        run._pending.append({"op": "open", "tags": child_tags})
        if not run._flush():
            run._go_offline(run._outage or TrackingError("tracking unreachable"))
            run._spool_live()
        elif not run.run_id:
            # Nothing has run yet, so failing here costs nothing (e.g. a parent run id from another server).
            raise TrackingError(
                f"stage {run_name!r}: cannot open its child run under parent {self.parent_run_id} at "
                f"{redact_uri(self.tracking_uri)}: {'; '.join(run._errors)}"
            )
        failed: BaseException | None = None
        try:
            yield run
        except BaseException as err:
            failed = err
            raise
        finally:
            status = (
                "FINISHED"
                if failed is None
                else ("KILLED" if isinstance(failed, KeyboardInterrupt) else "FAILED")
            )
            run._pending.append({"op": "end", "status": status, "ts": _now_ms()})
            run._offline_since = None  # the final flush gets the full retry policy
            problems = []
            if not run._flush():
                self.write_spool(run, live=False)
                problems.append(
                    f"tracking at {redact_uri(self.tracking_uri)} failed ({run._outage}); "
                    f"{len(run._pending)} tracking call(s) are kept in {self.spool_path(run_name)} and are "
                    f"replayed by the next stage run under parent {self.parent_run_id} (rerun the same command)"
                )
            if run._errors:
                problems.append(f"MLflow rejected {len(run._errors)} call(s): {'; '.join(run._errors)}")
            if problems:
                message = (
                    f"stage {run_name!r}: the stage's outputs are complete on disk, but "
                    + " and ".join(problems)
                )
                if failed is None:
                    raise TrackingError(message) from run._outage
                log.error("%s", message)  # do not mask the stage's own error

    @contextlib.contextmanager
    def parent(self) -> Iterator[StageRun]:
        """The parent run for pipeline-level metrics and artifacts (left RUNNING: see :func:`end_parent_run`)."""
        run = MlflowStageRun(self, "<parent>", {})
        run.run_id = self.parent_run_id
        yield run
        if run._pending and not run._flush():
            raise TrackingError(
                f"parent run {self.parent_run_id}: tracking at {redact_uri(self.tracking_uri)} failed "
                f"({run._outage}); {len(run._pending)} call(s) were not recorded"
            )
        if run._errors:
            raise TrackingError(f"parent run {self.parent_run_id}: MLflow rejected {'; '.join(run._errors)}")

    def nested(self, run_id: str) -> MlflowTracker:
        """The same tracker (store, retry budget, spool, tags) with ``run_id`` as the parent of its stages."""
        return MlflowTracker(
            self.tracking_uri,
            self.experiment,
            run_id,
            retry=self.retry,
            spool_dir=self.spool_dir,
            tags=self.tags,
        )

    # child runs ----------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            parent = self.client.get_run(self.parent_run_id)
            self._experiment_id = str(parent.info.experiment_id)
        return self._experiment_id

    def find_child(self, run_name: str) -> str | None:
        """Id of the newest child run named ``run_name`` under the parent, or None."""
        name = run_name.replace("'", "\\'")
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and attributes.run_name = '{name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def _open_child(self, run_name: str, tags: Mapping[str, str]) -> str:
        existing = self.find_child(run_name)
        if existing:
            self.client.update_run(existing, status="RUNNING")
            log.info("stage %r resumes child run %s", run_name, existing)
            return existing
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={**tags, TAG_PARENT: self.parent_run_id}
        )
        return str(run.info.run_id)

    # spool -------------------------------------------------------------------------------------
    def spool_path(self, run_name: str, live: bool = False) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name)
        suffix = f".live-{os.getpid()}.json" if live else ".json"
        return self.spool_dir / self.parent_run_id / f"{safe}{suffix}"

    def write_spool(self, run: MlflowStageRun, live: bool) -> None:
        """Persist ``run``'s undelivered calls; a replaying process opens the child run by name first."""
        # "live" spools belong to a stage still running in this process: others must not replay them.
        ops = run._pending
        if not ops or ops[0]["op"] != "open":
            ops = [{"op": "open", "tags": run._open_tags}, *ops]
        path = self.spool_path(run.run_name, live=live)
        write_text_atomic(path, json.dumps({"run_name": run.run_name, "ops": ops}, default=_json_default))
        if not live:
            self.spool_path(run.run_name, live=True).unlink(missing_ok=True)

    def read_spool(self, run_name: str) -> list[dict[str, Any]]:
        path = self.spool_path(run_name)
        if not path.is_file():
            return []
        ops = list(json.loads(path.read_text(encoding="utf-8"))["ops"])
        log.info("stage %r: replaying %d tracking call(s) from %s", run_name, len(ops), path)
        return ops

    def clear_spool(self, run_name: str) -> None:
        self.spool_path(run_name).unlink(missing_ok=True)
        self.spool_path(run_name, live=True).unlink(missing_ok=True)

    def _replay_other_spools(self, current: str) -> None:
        """Deliver spools that finished stages left behind (once per tracker); failures keep them."""
        if self._replayed:
            return
        self._replayed = True
        folder = self.spool_dir / self.parent_run_id
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if ".live-" in path.name:
                continue
            run_name = json.loads(path.read_text(encoding="utf-8"))["run_name"]
            if run_name == current:
                continue  # the stage being opened replays its own spool into its reused child run
            run = MlflowStageRun(self, run_name, {})
            run._pending = self.read_spool(run_name)
            with contextlib.suppress(TrackingError):
                if not run._flush():
                    log.warning("spool %s not delivered yet (%s); kept", path, run._outage)


def _json_default(obj: Any) -> Any:
    return str(obj)


# --------------------------------------------------------------------------- parent run


def git_commit() -> str | None:
    """The source commit: ``$ICMIL_GIT_COMMIT`` (baked into images) or ``git rev-parse HEAD``; None if unknown."""
    env = os.environ.get("ICMIL_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def start_parent_run(
    cfg: ICMILConfig,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    kfp_run_id: str | None = None,
    manifest_digest: str | None = None,
    encoder_digest: str | None = None,
    resume: bool = True,
    run_key: str | None = None,
) -> str:
    """Create (or, with ``resume``, reuse) the parent run of one pipeline run; return its id.

    The run key is ``run_key`` when given (``icmil couple``: its run folder), else the KFP run id, else the run
    folder + config digest, so rerunning the same ``icmil run`` resumes into the same tree. Logs the resolved config as flat redacted params and as
    ``config.yaml``; tags the git commit, KFP run id and the manifest / encoder digests when known.

    Example:
        >>> run_id = start_parent_run(cfg, run_name="nightly", kfp_run_id="abc-123")   # doctest: +SKIP
    """
    from mlflow.entities import Param, RunTag

    from icmil.config import config_to_yaml
    from icmil.io import text_digest

    tracking_uri = resolve_tracking_uri(cfg)
    configure_mlflow_http(cfg.tracking)
    policy = RetryPolicy.from_config(cfg.tracking)
    client = _client(tracking_uri)
    where = redact_uri(tracking_uri)
    run_key = run_key or kfp_run_id or text_digest(str(Path(cfg.run_dir).resolve()), cfg.digest())
    all_tags = {
        TAG_RUN_KEY: run_key,
        TAG_CONFIG_DIGEST: cfg.digest(),
        **({TAG_KFP_RUN_ID: kfp_run_id} if kfp_run_id else {}),
        **({TAG_MANIFEST_DIGEST: manifest_digest} if manifest_digest else {}),
        **({TAG_ENCODER_DIGEST: encoder_digest} if encoder_digest else {}),
        **dict(tags or {}),
    }
    commit = git_commit()
    if commit and TAG_GIT_COMMIT not in all_tags:
        all_tags[TAG_GIT_COMMIT] = commit
    all_tags = {k: redact_text(str(v)) for k, v in all_tags.items()}  # e.g. a KFP error text quoting a URI

    exp_id = policy.call(
        lambda: get_or_create_experiment(client, cfg.tracking.experiment, tracking_uri),
        f"open experiment {cfg.tracking.experiment!r} at {where}",
    )
    run_id: str | None = None
    if resume:
        found = policy.call(
            lambda: client.search_runs(
                [exp_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{run_key}'", max_results=1
            ),
            f"look up parent run at {where}",
        )
        if found:
            existing = str(found[0].info.run_id)
            policy.call(
                lambda: client.update_run(existing, status="RUNNING"), f"reopen parent run at {where}"
            )
            log.info("resuming parent run %s (run key %s)", existing, run_key)
            run_id = existing
    if run_id is None:
        created = policy.call(
            lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags),
            f"create parent run at {where}",
        )
        run_id = str(created.info.run_id)
        log.info("parent run %s in experiment %r at %s", run_id, cfg.tracking.experiment, where)
        if where.startswith(
            ("http://", "https://")
        ):  # MLflow's own "View run" line is off (it shows secrets)
            log.info("view the run at %s/#/experiments/%s/runs/%s", where.rstrip("/"), exp_id, run_id)
    params = [Param(k, v) for k, v in config_params(cfg).items()]
    policy.call(lambda: _log_batch(client, run_id, params=params), f"log config params at {where}")
    policy.call(
        lambda: _log_batch(client, run_id, tags=[RunTag(k, v) for k, v in all_tags.items()]),
        f"tag parent run at {where}",
    )
    with tempfile.TemporaryDirectory(prefix="icmil-config-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_to_yaml(cfg), encoding="utf-8")  # redacted: credentials never reach MLflow
        policy.call(lambda: client.log_artifact(run_id, str(path)), f"log config.yaml at {where}")
    return run_id


def end_parent_run(cfg: ICMILConfig, parent_run_id: str, status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED (or FAILED / KILLED) once the last stage is done."""
    tracking_uri = resolve_tracking_uri(cfg)
    client = _client(tracking_uri)
    RetryPolicy.from_config(cfg.tracking).call(
        lambda: client.set_terminated(parent_run_id, status), f"end parent run at {redact_uri(tracking_uri)}"
    )


@contextlib.contextmanager
def parent_run(
    cfg: ICMILConfig, run_name: str, run_key: str, tags: Mapping[str, str] | None = None
) -> Iterator[StageTracker]:
    """A parent run for one process (``icmil couple``): start or resume it (by ``run_key``), yield the tracker
    of its child runs, end it FINISHED - or FAILED (KILLED on Ctrl-C) when the block raises.

    Example:
        >>> with parent_run(cfg, "couple demo", run_key="demo") as tracker:  # doctest: +SKIP
        ...     run_rounds(cfg, tracker)
    """
    run_id = start_parent_run(cfg, run_name=run_name, tags=tags, run_key=run_key)
    try:
        yield tracker_for(cfg, run_id)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            end_parent_run(cfg, run_id, status=status)
        except TrackingError as tracking_err:  # the stage's own error matters more
            log.error("could not mark parent run %s %s: %s", run_id, status, tracking_err)
        raise
    end_parent_run(cfg, run_id)


def tracker_for(cfg: ICMILConfig, parent_run_id: str | None) -> StageTracker:
    """The tracker a stage should log through: MLflow under ``parent_run_id``, or NullTracker when empty.

    Components receive the parent run id as a pipeline parameter; ``""`` means tracking is off.
    """
    if not parent_run_id:
        return NullTracker()
    configure_mlflow_http(cfg.tracking)
    return MlflowTracker(
        resolve_tracking_uri(cfg),
        cfg.tracking.experiment,
        parent_run_id,
        retry=RetryPolicy.from_config(cfg.tracking),
        spool_dir=Path(cfg.run_dir) / "tracking-spool",
    )
