"""Run, compile, submit and schedule the ICMIL pipeline — the functions behind ``icmil run | compile | submit |
schedule``.

``run_local`` executes the SAME pipeline object the cluster runs, through the KFP local runner
(``SubprocessRunner(use_venv=False)``: every task is a subprocess of this Python environment). Outputs land in
``RUN/kfp/<pipeline>-<timestamp>/<task>/<output>``; the run summary is copied to ``RUN/summary.json|csv``.
``submit`` / ``schedule`` talk to a Kubeflow Pipelines API server through ``kfp.Client`` (REST ``v2beta1``).

Example:
    $ icmil run configs/demo.yaml                      # local, synthetic slides when no manifest is given
    $ icmil compile -c configs/demo.yaml --out icmil.yaml
    $ KF_PIPELINES_TOKEN=... icmil submit -c cfg.yaml --host https://kfp.example.org
    $ icmil schedule -c cfg.yaml --host https://kfp.example.org --cron "0 0 3 * * 1"
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from icmil.config import ICMILConfig, dump_config
from icmil.errors import ConfigError, ICMILError
from icmil.io import atomic_path, text_digest, write_json_atomic
from icmil.log import get_logger
from icmil.run_summary import SUMMARY_FILES, SUMMARY_JSON, format_rounds

log = get_logger("pipeline")

TOKEN_ENV = "KF_PIPELINES_TOKEN"


# --------------------------------------------------------------------------------------------- compile
def compile_pipeline(cfg: ICMILConfig, out_path: str | os.PathLike[str]) -> Path:
    """Write the pipeline YAML for ``cfg`` (rounds unrolled, GPU placement and Secrets from ``cfg.pipeline``).

    >>> import tempfile
    >>> from icmil.config import load_config
    >>> path = compile_pipeline(load_config(None), tempfile.mkdtemp() + "/icmil.yaml")
    >>> path.name
    'icmil.yaml'
    """
    from kfp import compiler

    from icmil.mil import check_head_settings
    from icmil_kfp.pipelines.icmil_pipeline import build_pipeline

    check_head_settings(cfg.mil)  # a bad head setting fails here, not in the train task hours later
    out = Path(out_path)
    pipeline = build_pipeline(cfg)
    with atomic_path(out, suffix=".yaml") as tmp:
        compiler.Compiler().compile(pipeline, str(tmp))
    return out


# ------------------------------------------------------------------------------------------- local run
@dataclass
class RunSummary:
    """Where a local run put everything, and what it measured."""

    run_dir: Path
    pipeline_run_dir: Path
    tracking_uri: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    registration: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        data["pipeline_run_dir"] = str(self.pipeline_run_dir)
        return data


_INTERESTING = re.compile(
    r"(Executing task|finished with status|Pipeline .* finished|Traceback|Error|ERROR|WARNING| icmil\.)"
)


class _LogFilter(io.TextIOBase):
    """Everything to the log file; to the terminal only task starts/ends, icmil log lines and errors.

    The local runner echoes each task's whole executor input, which would bury the progress of a run. Every
    line is redacted (:func:`icmil.redact.redact_text`) before it reaches the file or the terminal: task logs
    hold third-party output too (MLflow, KFP), whose URLs may carry credentials.
    """

    def __init__(self, log_file: TextIO, terminal: TextIO) -> None:
        self._file = log_file
        self._terminal = terminal
        self._pending = ""
        self._in_traceback = False

    def write(self, text: str) -> int:
        from icmil.redact import redact_text

        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for raw in lines:
            line = redact_text(raw)
            self._file.write(line + "\n")
            stripped = line.strip()
            if stripped.startswith("Traceback"):
                self._in_traceback = True
            if self._in_traceback or _INTERESTING.search(line):
                self._terminal.write(stripped + "\n")
            if (
                self._in_traceback
                and stripped
                and not line.startswith((" ", "\t"))
                and "Traceback" not in line
            ):
                self._in_traceback = False
        return len(text)

    def flush(self) -> None:
        self._file.flush()
        self._terminal.flush()

    def close_pending(self) -> None:
        """Write an unfinished last line (a task that died mid-line)."""
        if self._pending:
            self.write("\n")


@contextlib.contextmanager
def _quiet_runner_output(log_path: Path, verbose: bool) -> Iterator[None]:
    from icmil.redact import RedactingStream

    if verbose:
        stream = RedactingStream(sys.stdout)
        try:
            with contextlib.redirect_stdout(stream):
                yield
        finally:
            stream.flush()
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with log_path.open("a", encoding="utf-8") as fh:
        filtered = _LogFilter(fh, terminal)
        try:
            with contextlib.redirect_stdout(filtered):
                yield
        finally:
            filtered.close_pending()


@contextlib.contextmanager
def _keep_builtin_print() -> Iterator[None]:
    """Put ``print`` back as it was. The KFP local runner indents each task's output by swapping
    ``builtins.print`` in and out (``kfp.local.logging_utils.indented_print``); tasks of a ``ParallelFor`` run in
    threads, their swaps interleave and leave an indenting ``print`` behind, which shifted every later line this
    process printed (``icmil run``'s summary and ``report:`` line) by four spaces."""
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the task subprocesses, restoring the previous values afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _new_run_folder(root: Path, before: set[str], name: str) -> Path:
    new = sorted(p for p in root.glob(f"{name}-*") if p.is_dir() and p.name not in before)
    if not new:
        raise ICMILError(f"the local pipeline run left no output folder under {root}")
    return new[-1]


def _index_outputs(run_folder: Path) -> dict[str, str]:
    """``task/output -> path`` for every output folder or file of the run (the map printed after a run)."""
    index: dict[str, str] = {}
    for executor_output in sorted(run_folder.rglob("executor_output.json")):
        task_dir = executor_output.parent
        label = task_dir.relative_to(run_folder).as_posix()
        for child in sorted(task_dir.iterdir()):
            if child.name != "executor_output.json":
                index[f"{label}/{child.name}"] = str(child)
    return index


def format_summary(summary: RunSummary) -> str:
    """The text ``icmil run`` prints: where things are, the per-round metrics table and the gate's decision."""
    lines = [
        f"run folder        {summary.run_dir}",
        f"pipeline outputs  {summary.pipeline_run_dir}",
        f"summary           {summary.run_dir / 'summary.json'} (+ summary.csv, summary.png, outputs.json)",
        f"MLflow            {summary.tracking_uri}",
        f"wall time         {summary.seconds:.0f} s",
        "",
    ]
    if summary.rounds:
        lines += [
            "per-round metrics (round 0 = frozen encoder; round k = after k ICMIL couplings):",
            format_rounds(summary.rounds),
            "",
        ]
    reg = summary.registration
    if reg:
        # The pre-check decides whether the promote task runs; that task re-checks and has the last word,
        # so the line below reads the registry's champion after the run.
        verdict = "challenger wins -> promote" if reg.get("promote") else "champion stays"
        lines.append(
            f"registered {reg.get('model')} v{reg.get('version')}; gate: {verdict} ({reg.get('reason', '')})"
        )
        if reg.get("champion"):
            lines.append(
                f"champion now       {reg.get('model')} v{reg['champion']} (models:/{reg.get('model')}@champion)"
            )
    wanted = re.compile(r"/(encoder|head|evaluation|summary|cohort)$")
    shown = {k: v for k, v in summary.outputs.items() if wanted.search(k)}
    if shown:
        lines += ["", "artifacts (task/output):"] + [f"  {k:<34} {v}" for k, v in shown.items()]
    return "\n".join(lines)


def run_local(cfg: ICMILConfig, *, verbose: bool | None = None, print_summary: bool = True) -> RunSummary:
    """Run the whole pipeline on this machine with the KFP local runner and return (and print) its summary.

    Synthesises slides when ``cfg.manifest`` is None, then tile → embed → coupling rounds → evaluate →
    register → promotion gate. MLflow goes to ``cfg.tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
    else ``sqlite:///RUN/mlflow.db``. Tiles and features are cached across runs of the same run folder (KFP
    local cache under ``RUN/kfp/.kfp_cache``). ``verbose`` (default ``$ICMIL_KFP_VERBOSE=1``) shows the local
    runner's full task logs; otherwise they go to ``RUN/kfp/pipeline.log``.

    Example:
        >>> from icmil.config import load_config
        >>> summary = run_local(load_config("configs/demo.yaml"))     # doctest: +SKIP
        >>> summary.rounds[-1]["val_auc"]                             # doctest: +SKIP
    """
    from kfp import local

    from icmil.mil import check_head_settings
    from icmil.tracking import resolve_tracking_uri
    from icmil.tracking.retry import configure_mlflow_http
    from icmil_kfp.pipelines.icmil_pipeline import build_pipeline

    check_head_settings(cfg.mil)
    started = time.monotonic()
    # One tracking budget for this process and the task processes it starts (they inherit the environment).
    configure_mlflow_http(cfg.tracking)
    run_dir = Path(cfg.run_dir).resolve()
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    if cfg.manifest and not cfg.manifest.startswith("s3://"):
        cfg = cfg.model_copy(update={"manifest": str(Path(cfg.manifest).resolve())})
    # A bad cohort fails here in seconds with its own message, not as a failed task inside the pipeline.
    from icmil.cohort import preflight_cohort

    preflight_cohort(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir)
    tracking_uri = resolve_tracking_uri(cfg)
    pipeline_root = run_dir / "kfp"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in pipeline_root.iterdir()}
    pipeline = build_pipeline(cfg, cluster=False)
    verbose = os.environ.get("ICMIL_KFP_VERBOSE", "0") == "1" if verbose is None else verbose

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=cfg.pipeline.enable_caching,
        raise_on_error=True,
    )
    log.info("running pipeline %r locally; outputs under %s", cfg.pipeline.pipeline_name, pipeline_root)
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    try:
        with (
            _environment(env),
            _keep_builtin_print(),
            _quiet_runner_output(pipeline_root / "pipeline.log", verbose),
            warnings.catch_warnings(),
        ):
            # The local runner ignores images, resources and Kubernetes settings by design: do not warn per task.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            pipeline() if cfg.manifest is None else pipeline(manifest=cfg.manifest)
    except RuntimeError as err:
        from icmil.redact import redact_text

        raise ICMILError(
            f"local pipeline run failed: {redact_text(_plain(str(err)))}. "
            f"Full task logs: {pipeline_root / 'pipeline.log'}"
        ) from None
    run_folder = _new_run_folder(pipeline_root, before, cfg.pipeline.pipeline_name)
    summary = _collect_summary(cfg, run_dir, run_folder, tracking_uri)
    summary.seconds = time.monotonic() - started
    write_json_atomic(run_dir / "outputs.json", summary.to_dict())
    if print_summary:
        print(format_summary(summary))
    return summary


def _plain(text: str) -> str:
    """Strip the local runner's ANSI colours from a message."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _collect_summary(cfg: ICMILConfig, run_dir: Path, run_folder: Path, tracking_uri: str) -> RunSummary:
    import shutil

    from icmil.tracking import redact_uri

    outputs = _index_outputs(run_folder)
    summary = RunSummary(
        run_dir=run_dir, pipeline_run_dir=run_folder, tracking_uri=redact_uri(tracking_uri), outputs=outputs
    )
    found = sorted(run_folder.rglob(f"summary/{SUMMARY_JSON}"))
    if not found:
        log.warning("the pipeline wrote no %s under %s", SUMMARY_JSON, run_folder)
        return summary
    data = json.loads(found[-1].read_text(encoding="utf-8"))
    summary.rounds = list(data.get("rounds", []))
    summary.evaluation = dict(data.get("evaluation", {}))
    summary.registration = dict(data.get("registration", {}))
    if summary.registration.get("model"):
        summary.registration["champion"] = _champion_version(cfg, str(summary.registration["model"]))
    # The run-folder contract (docs/architecture.md): RUN/summary.json, summary.csv, summary.png.
    for name in SUMMARY_FILES:
        src = found[-1].parent / name
        if src.is_file():
            with atomic_path(run_dir / name) as tmp:
                shutil.copyfile(src, tmp)
    return summary


def _champion_version(cfg: ICMILConfig, model: str) -> str | None:
    """Which version holds ``champion`` after the run (the promote task runs beside the report)."""
    try:
        from mlflow import MlflowClient

        from icmil.tracking import resolve_registry_uri, resolve_tracking_uri

        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg), registry_uri=resolve_registry_uri(cfg))
        return str(client.get_model_version_by_alias(model, "champion").version)
    except Exception:  # no champion yet, or the registry is unreachable: the summary says so by omission
        return None


# --------------------------------------------------------------------------------------- submit/schedule
_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
_NAMES = {
    "month": {
        m: i + 1
        for i, m in enumerate(
            ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
        )
    },
    "day of week": {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])},
}


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression: 6 fields, seconds first (``"0 0 3 * * 1"`` = Mondays 03:00:00).

    >>> validate_cron("0 30 2 * * *")
    '0 30 2 * * *'
    >>> validate_cron("30 2 * * *")
    Traceback (most recent call last):
    ...
    icmil.errors.ConfigError: cron '30 2 * * *' has 5 fields; Kubeflow Pipelines cron has 6, seconds first ...
    """
    fields = expression.split()
    if len(fields) == 5:
        raise ConfigError(
            f"cron {expression!r} has 5 fields; Kubeflow Pipelines cron has 6, seconds first "
            f"(second minute hour day-of-month month day-of-week). Did you mean '0 {expression}'?"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"cron {expression!r} has {len(fields)} fields; Kubeflow Pipelines cron needs exactly 6: "
            "second minute hour day-of-month month day-of-week, e.g. '0 0 3 * * 1' (Mondays 03:00)"
        )
    for value, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(expression, value, name, low, high)
    return expression


def _check_cron_field(expression: str, value: str, name: str, low: int, high: int) -> None:
    names = _NAMES.get(name, {})

    def number(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            raise ConfigError(f"cron {expression!r}: {name} field {value!r} has the invalid value {token!r}")
        n = int(token)
        # Day of week 7 is Sunday in many crons; robfig/cron (KFP) accepts 0-6 only.
        if not low <= n <= high:
            raise ConfigError(f"cron {expression!r}: {name} {n} is outside {low}-{high}")
        return n

    for part in value.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ConfigError(f"cron {expression!r}: {name} field {value!r} has an invalid step {step!r}")
        if base in ("*", "?"):
            if base == "?" and name not in ("day of month", "day of week"):
                raise ConfigError(f"cron {expression!r}: '?' is allowed only in day-of-month / day-of-week")
            continue
        start, _, end = base.partition("-")
        a = number(start)
        if end and number(end) < a:
            raise ConfigError(f"cron {expression!r}: {name} range {base!r} runs backwards")


@contextlib.contextmanager
def _kfp_errors(host: str) -> Iterator[None]:
    """Turn the KFP client's transport and HTTP errors into one clear message naming the host and the fix."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as err:
        hint = _HTTP_HINTS.get(
            int(err.status or 0), (err.body or "")[:300] if isinstance(err.body, str) else ""
        )
        raise ICMILError(
            f"Kubeflow Pipelines at {host} answered HTTP {err.status} {err.reason}: {hint}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as err:
        raise ICMILError(f"cannot reach Kubeflow Pipelines at {host}: {err}") from None


_HTTP_HINTS = {
    401: f"unauthorised: set ${TOKEN_ENV} (a bearer token for the KFP API)",
    403: "forbidden: the token's identity may not use this namespace/experiment",
    404: "not found: is the host the KFP API (e.g. http://ml-pipeline-ui.kubeflow or .../pipeline)?",
}


def _probe(host: str, token: str | None, timeout: float = 15.0) -> None:
    """One healthz request before kfp.Client, which retries a refused call for ~25 s before a vague error."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        raise ICMILError(
            f"Kubeflow Pipelines at {host} answered HTTP {err.code} {err.reason}: {_HTTP_HINTS.get(err.code, '')}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        raise ICMILError(
            f"cannot reach Kubeflow Pipelines at {host}: {getattr(err, 'reason', err)}"
        ) from None


def _client(host: str, namespace: str | None, token: str | None) -> Any:
    import kfp

    token = token or os.environ.get(TOKEN_ENV) or None
    _probe(host, token)
    kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    with contextlib.redirect_stdout(io.StringIO()):
        return kfp.Client(**kwargs)


def _check_params(cfg: ICMILConfig, params: Mapping[str, Any] | None) -> dict[str, Any]:
    allowed = {"manifest"} if cfg.manifest is not None else set()
    unknown = sorted(set(params or {}) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown pipeline parameter(s) {unknown}; this pipeline takes {sorted(allowed) or 'none'} "
            "(everything else is fixed by the config at compile time: change the config and resubmit)"
        )
    return dict(params or {})


def _upload(client: Any, cfg: ICMILConfig, package: Path, namespace: str | None) -> tuple[str, str]:
    """Upload the pipeline (first time) or a new version named by the YAML's content digest; reuse an
    identical version. Returns ``(pipeline_id, version_id)``."""
    name = cfg.pipeline.pipeline_name
    version_name = f"{name}-{text_digest(package.read_text(encoding='utf-8'))}"
    description = f"ICMIL pipeline; config digest {cfg.digest()}"
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        created = client.upload_pipeline(
            str(package), pipeline_name=name, description=description, namespace=namespace
        )
        pipeline_id = created.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        if not versions.pipeline_versions:
            raise ICMILError(
                f"Kubeflow Pipelines created pipeline {name!r} ({pipeline_id}) without a version"
            )
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    existing = client.list_pipeline_versions(
        pipeline_id,
        page_size=1,
        filter=json.dumps(
            {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": version_name}]}
        ),
    )
    if existing.pipeline_versions:
        return pipeline_id, existing.pipeline_versions[0].pipeline_version_id
    version = client.upload_pipeline_version(
        str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id, description=description
    )
    return pipeline_id, version.pipeline_version_id


@contextlib.contextmanager
def _compiled(cfg: ICMILConfig) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="icmil-kfp-") as tmp:
        yield compile_pipeline(cfg, Path(tmp) / f"{cfg.pipeline.pipeline_name}.yaml")


def submit(
    cfg: ICMILConfig,
    host: str,
    experiment: str = "icmil",
    params: Mapping[str, Any] | None = None,
    service_account: str | None = None,
    namespace: str | None = None,
    run_name: str | None = None,
    token: str | None = None,
) -> str:
    """Compile, upload (pipeline or new version) and start one run on a Kubeflow Pipelines host; return its id.

    ``token`` (default ``$KF_PIPELINES_TOKEN``) is sent as a bearer token. Caching is left to the compiled
    per-task settings (KFP's run-level ``enable_caching`` would also cache register/promote).

    Example:
        >>> run_id = submit(cfg, "https://kfp.example.org", experiment="icmil",
        ...                 service_account="icmil-pipeline-runner")             # doctest: +SKIP
    """
    values = _check_params(cfg, params)
    with _kfp_errors(host), _compiled(cfg) as package:
        client = _client(host, namespace, token)
        pipeline_id, version_id = _upload(client, cfg, package, namespace)
    with _kfp_errors(host), contextlib.redirect_stdout(io.StringIO()):
        exp = client.create_experiment(name=experiment, namespace=namespace)
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=run_name or f"{cfg.pipeline.pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            pipeline_id=pipeline_id,
            version_id=version_id,
            params=values,
            service_account=service_account,
        )
    log.info("submitted run %s (pipeline %s, version %s) to %s", run.run_id, pipeline_id, version_id, host)
    return str(run.run_id)


def schedule(
    cfg: ICMILConfig,
    host: str,
    cron: str,
    experiment: str = "icmil",
    name: str = "icmil-retraining",
    params: Mapping[str, Any] | None = None,
    service_account: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    max_concurrency: int = 1,
) -> str:
    """Create a recurring run (scheduled retraining) and return its id.

    ``cron`` has 6 fields, seconds first (``"0 0 3 * * 1"``: Mondays 03:00). At most ``max_concurrency`` runs
    at once (1: a slow run never overlaps the next); missed intervals are not caught up (``no_catchup``).
    Refuses to create a second schedule with the same name in the experiment.

    Example:
        >>> schedule(cfg, "https://kfp.example.org", cron="0 0 3 * * 1")      # doctest: +SKIP
    """
    validate_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
    values = _check_params(cfg, params)
    with _kfp_errors(host):
        return _schedule(
            cfg, host, cron, experiment, name, values, service_account, namespace, token, max_concurrency
        )


def _schedule(
    cfg: ICMILConfig,
    host: str,
    cron: str,
    experiment: str,
    name: str,
    values: dict[str, Any],
    service_account: str | None,
    namespace: str | None,
    token: str | None,
    max_concurrency: int,
) -> str:
    client = _client(host, namespace, token)
    with contextlib.redirect_stdout(io.StringIO()):
        exp = client.create_experiment(name=experiment, namespace=namespace)
    same_name = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    existing = client.list_recurring_runs(experiment_id=exp.experiment_id, filter=same_name)
    if existing.recurring_runs:
        raise ConfigError(
            f"a recurring run named {name!r} already exists in experiment {experiment!r} "
            f"(id {existing.recurring_runs[0].recurring_run_id}); delete or disable it first, or pass another --name"
        )
    with _compiled(cfg) as package:
        pipeline_id, version_id = _upload(client, cfg, package, namespace)
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name=name,
        description=f"scheduled ICMIL retraining ({cron})",
        cron_expression=cron,
        max_concurrency=max_concurrency,
        no_catchup=True,
        params=values,
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
        service_account=service_account,
    )
    log.info("recurring run %s (%s) created on %s", job.recurring_run_id, cron, host)
    return str(job.recurring_run_id)
