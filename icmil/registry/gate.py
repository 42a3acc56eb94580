"""The promotion gate: the ``champion`` alias moves to the ``challenger`` version only when it wins.

The gate (:func:`promote`) compares challenger and champion on the configured metric over the SAME
evaluation data (the version tags written by :func:`icmil.registry.versions.register_challenger`). When the data
digests differ the stored metrics are not comparable, and by default (``on_data_mismatch="reevaluate"``) both
models are scored again on the challenger's evaluation table; if that table is missing or unreadable — or with
``on_data_mismatch="refuse"`` — the promotion is refused with the reason. The challenger must beat the champion by
MORE than ``margin`` (a tie keeps the champion) and always reach ``floor``; with no champion yet, reaching the
floor is enough. Either outcome is written as tags on the challenger version; a rejection leaves every alias as
it was and raises :class:`~icmil.errors.PromotionRejected`.

Example:
    >>> promote("icmil", metric="auc", split="test", margin=0.01, floor=0.6)         # doctest: +SKIP
    PromotionResult(promoted=True, ...)
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pandas as pd

from icmil.errors import PromotionRejected, TrackingError
from icmil.log import get_logger
from icmil.registry.sources import (
    absolute_source,
    clients,
    registry_of,
    resolve_artifact_source,
    tracking_of,
)
from icmil.registry.versions import (
    CHALLENGER,
    CHAMPION,
    LOWER_IS_BETTER,
    TAG_PROMOTED_FROM,
    TAG_PROMOTION,
    TAG_PROMOTION_REASON,
    digest_tag,
    ensure_registered_model,
    metric_tag,
    read_eval_table,
    table_tag,
    version_by_alias,
)
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = get_logger("registry")


@dataclass
class PromotionResult:
    """What the gate decided and why (also written as tags on the challenger version)."""

    name: str
    promoted: bool
    reason: str
    metric: str
    split: str
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    floor: float
    registry_uri: str
    target_version: str | None = None  # the version now holding `champion` (differs across registries)
    reevaluated: bool = False
    dry_run: bool = False  # True: the decision only; no alias or tag was changed
    already_champion: bool = False

    def __str__(self) -> str:
        if self.already_champion:
            return f"ALREADY CHAMPION {self.name} v{self.challenger_version}: {self.reason}"
        if self.dry_run:
            verdict = "WOULD PROMOTE" if self.promoted else "WOULD NOT PROMOTE"
            return f"{verdict} {self.name} v{self.challenger_version}: {self.reason} (dry run: nothing was changed)"
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        return f"{verdict} {self.name} v{self.challenger_version}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric_value(mv: ModelVersion, split: str, metric: str) -> float | None:
    raw = (mv.tags or {}).get(metric_tag(split, metric))
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _beats(challenger: float, champion: float, margin: float, metric: str) -> bool:
    if metric in LOWER_IS_BETTER:
        return challenger < champion - margin
    return challenger > champion + margin


def _meets_floor(value: float, floor: float, metric: str) -> bool:
    # A floor only makes sense for "higher is better" metrics in [0, 1]; loss-like metrics skip it.
    return metric in LOWER_IS_BETTER or value >= floor


def _score_model(
    model_uri: str,
    table: pd.DataFrame,
    metric: str,
    tracking_uri: str,
    registry_uri: str,
    work_dir: Path,
) -> float:
    """Score a registered model on an evaluation table (slide_id, path, label) with the same metric code."""
    import numpy as np

    from icmil.mil.metrics import classification_metrics
    from icmil.registry.slide_classifier import as_slide_table, open_slide_classifier, prob_columns

    # The bundle is loaded by the installed icmil code (the model's stored Python file never runs here).
    with open_slide_classifier(model_uri, tracking_uri=tracking_uri, registry_uri=registry_uri) as model:
        classes = list(model.classes)
        unknown = sorted(set(table["label"].astype(str)) - set(classes))
        if unknown:
            raise TrackingError(f"evaluation labels {unknown} are not classes of {model_uri} ({classes})")
        slides = as_slide_table(table[["slide_id", "path"]].astype(str))
        pred = model.classify(slides, work_dir, heatmaps=False, outputs=False)
    failed = pred[pred["error"].astype(str) != ""]
    if len(failed):
        detail = "; ".join(f"{r.slide_id}: {r.error}" for r in failed.itertuples())
        raise TrackingError(f"re-evaluation of {model_uri} failed on {len(failed)} slide(s): {detail}")
    y = np.array([classes.index(str(v)) for v in table["label"]])
    probs = pred[prob_columns(classes)].to_numpy(dtype=float)
    value = classification_metrics(y, probs).get(metric)
    if value is None:
        raise TrackingError(f"metric {metric!r} is not computed by classification_metrics")
    return float(value)


class _DryRunDone(Exception):
    """Internal: a dry run reached its decision."""


def promote(
    name: str,
    metric: str = "auc",
    split: str = "test",
    margin: float = 0.0,
    floor: float = 0.5,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    target_registry_uri: str | None = None,
    *,
    on_data_mismatch: str = "reevaluate",
    retry: RetryPolicy | None = None,
    dry_run: bool = False,
) -> PromotionResult:
    """Move alias ``champion`` of ``name`` to the ``challenger`` version if it wins; else raise.

    ``target_registry_uri`` promotes into another registry (dev -> prod): the version is created there from
    the same artifact source, with the lineage tags, and gets ``champion`` there (compared with that
    registry's champion). Raises :class:`~icmil.errors.PromotionRejected` (aliases untouched, the reason
    tagged on the challenger, the :class:`PromotionResult` as ``err.result``) when the challenger loses,
    ties, misses the floor or cannot be compared.

    ``dry_run`` decides without changing anything and never raises :class:`PromotionRejected`: the result's
    ``promoted`` says whether the challenger would win. When the data differ it does not re-score (that is
    the real gate's job): it answers ``promoted=True`` with a reason saying the gate will re-score both.

    Example:
        >>> promote("icmil-slide-classifier", metric="auc", split="test", margin=0.01, floor=0.7)  # doctest: +SKIP
    """
    if on_data_mismatch not in ("reevaluate", "refuse"):
        raise TrackingError(f"on_data_mismatch must be 'reevaluate' or 'refuse', not {on_data_mismatch!r}")
    policy = retry or RetryPolicy()
    source = clients(tracking_uri, registry_uri)
    cross = bool(target_registry_uri) and target_registry_uri != registry_of(source)
    target = clients(tracking_uri, target_registry_uri) if cross else source
    src_where, dst_where = redact_uri(registry_of(source)), redact_uri(registry_of(target))

    challenger = policy.call(
        lambda: version_by_alias(source, name, CHALLENGER), f"read {name}@{CHALLENGER} from {src_where}"
    )
    if challenger is None:
        raise TrackingError(
            f"model {name!r} has no version with alias {CHALLENGER!r} in {src_where}: register one first "
            "(the pipeline's register step, or icmil.registry.register_challenger)"
        )
    champion = policy.call(
        lambda: version_by_alias(target, name, CHAMPION), f"read {name}@{CHAMPION} from {dst_where}"
    )
    result = PromotionResult(
        name=name,
        promoted=False,
        reason="",
        metric=metric,
        split=split,
        challenger_version=str(challenger.version),
        challenger_value=_metric_value(challenger, split, metric),
        champion_version=str(champion.version) if champion is not None else None,
        champion_value=_metric_value(champion, split, metric) if champion is not None else None,
        margin=margin,
        floor=floor,
        registry_uri=dst_where,
        dry_run=dry_run,
    )
    gate = _Gate(result, source, target, challenger, champion, on_data_mismatch, dry_run)
    try:
        if gate.already_champion(cross, src_where):
            return result
        gate.decide()
    except _DryRunDone:
        return result
    except PromotionRejected:
        _record(source, policy, name, challenger, result)
        log.warning("not promoting %s v%s: %s", name, challenger.version, result.reason)
        raise
    if dry_run:
        result.promoted = True
        return result

    # Win: move the alias (creating the version in the target registry first when promoting across).
    if cross:
        result.target_version = _create_in_target(source, target, challenger, policy, src_where, dst_where)
    else:
        result.target_version = str(challenger.version)
    target_version = result.target_version
    policy.call(
        lambda: target.set_registered_model_alias(name, CHAMPION, target_version),
        f"set {CHAMPION} at {dst_where}",
    )
    result.promoted = True
    _record(source, policy, name, challenger, result)
    if cross:
        _record(target, policy, name, None, result, version=target_version)
    log.info("promoted %s v%s to %s in %s: %s", name, challenger.version, CHAMPION, dst_where, result.reason)
    return result


@dataclass
class _Gate:
    """The comparison itself; raises PromotionRejected (or _DryRunDone) with the reason in ``result``."""

    result: PromotionResult
    source: MlflowClient
    target: MlflowClient
    challenger: ModelVersion
    champion: ModelVersion | None
    on_data_mismatch: str
    dry_run: bool

    def reject(self, reason: str) -> None:
        self.result.reason = reason
        if self.dry_run:
            raise _DryRunDone
        err = PromotionRejected(f"{self.result.name} v{self.challenger.version}: {reason}")
        err.result = self.result  # type: ignore[attr-defined]
        raise err

    def already_champion(self, cross: bool, src_where: str) -> bool:
        champ = self.champion
        if champ is None:
            return False
        same = (not cross and str(champ.version) == str(self.challenger.version)) or _same_origin(
            champ, self.challenger, src_where
        )
        if same:
            self.result.promoted = True
            self.result.already_champion = True
            self.result.reason = "the challenger already is the champion; nothing to do"
            self.result.target_version = str(champ.version)
        return same

    def decide(self) -> None:
        r = self.result
        metric, split, label = r.metric, r.split, f"{r.split} {r.metric}"
        chal = r.challenger_value
        if chal is None:
            self.reject(
                f"the challenger has no {label} (tag {metric_tag(split, metric)}): register it with metrics"
            )
        assert chal is not None
        champion = self.champion
        if champion is None:
            if not _meets_floor(chal, r.floor, metric):
                self.reject(
                    f"no champion yet and the challenger's {label} {chal:.4f} is below the floor {r.floor:.4f}"
                )
            r.reason = f"no champion yet; challenger {label} {chal:.4f} meets the floor {r.floor:.4f}"
            return
        chal_digest = (self.challenger.tags or {}).get(digest_tag(split))
        champ_digest = (champion.tags or {}).get(digest_tag(split))
        champ = r.champion_value
        if chal_digest is None or champ_digest is None or chal_digest != champ_digest or champ is None:
            chal, champ, label = self._rescore(chal_digest, champ_digest, label)
        if not _meets_floor(chal, r.floor, metric):
            self.reject(f"challenger {label} {chal:.4f} is below the floor {r.floor:.4f}")
        if not _beats(chal, champ, r.margin, metric):
            how = "ties" if chal == champ else "does not beat"
            self.reject(
                f"challenger {label} {chal:.4f} {how} champion v{champion.version} {champ:.4f} "
                f"(promotion needs more than the margin {r.margin:.4f})"
            )
        r.reason = (
            f"challenger {label} {chal:.4f} beats champion v{champion.version} {champ:.4f} "
            f"by more than the margin {r.margin:.4f}"
        )

    def _rescore(
        self, chal_digest: str | None, champ_digest: str | None, label: str
    ) -> tuple[float, float, str]:
        """Both models scored on the challenger's evaluation table (the stored metrics are not comparable)."""
        from mlflow.exceptions import MlflowException

        r, champion = self.result, self.champion
        assert champion is not None
        why = (
            "the evaluation data differ"
            if chal_digest and champ_digest and chal_digest != champ_digest
            else "the champion has no comparable record"
        )
        why += f" (challenger {chal_digest or 'no digest'}, champion {champ_digest or 'no digest'})"
        if self.on_data_mismatch == "refuse":
            self.reject(f"cannot compare {label}: {why}; on_data_mismatch=refuse")
        table_uri = (self.challenger.tags or {}).get(table_tag(r.split))
        if not table_uri:
            self.reject(
                f"cannot compare {label}: {why}, and the challenger has no evaluation table to re-score on"
            )
        assert table_uri is not None
        if self.dry_run:
            r.promoted, r.reason = (
                True,
                f"{why}: the gate will re-score both models on the challenger's table",
            )
            raise _DryRunDone
        try:
            with tempfile.TemporaryDirectory(prefix="icmil-reeval-") as tmp:
                table = read_eval_table(self.source, table_uri)
                tu = tracking_of(self.source)
                chal = _score_model(
                    f"models:/{r.name}/{self.challenger.version}",
                    table,
                    r.metric,
                    tu,
                    registry_of(self.source),
                    Path(tmp) / "challenger",
                )
                champ = _score_model(
                    f"models:/{r.name}/{champion.version}",
                    table,
                    r.metric,
                    tu,
                    registry_of(self.target),
                    Path(tmp) / "champion",
                )
        except (TrackingError, MlflowException, OSError) as err:
            self.reject(
                f"cannot compare {label}: {why}, and re-scoring on the challenger's table failed: {err}"
            )
            raise AssertionError("unreachable") from err
        r.challenger_value, r.champion_value, r.reevaluated = chal, champ, True
        return chal, champ, f"{label} (both re-scored on the challenger's {len(table)} slides, {chal_digest})"


def _create_in_target(
    source: MlflowClient,
    target: MlflowClient,
    challenger: ModelVersion,
    policy: RetryPolicy,
    src_where: str,
    dst_where: str,
) -> str:
    """Create the challenger's version in another registry from the same artifact source; return it.

    A tracking server refuses local ``file://`` sources (it cannot read this machine's disk): then, and
    only then, the model is uploaded to the target server first (experiment ``<name>-promotions``).
    """
    from mlflow.exceptions import MlflowException

    name = challenger.name
    art = absolute_source(str(challenger.source), tracking_of(source))
    tags = {**(challenger.tags or {}), TAG_PROMOTED_FROM: f"{src_where}#{name}/{challenger.version}"}
    policy.call(lambda: ensure_registered_model(target, name), f"create {name!r} at {dst_where}")
    try:
        created = policy.call(
            lambda: target.create_model_version(name, source=art, tags=tags),
            f"create a version of {name!r} at {dst_where}",
        )
        return str(created.version)
    except TrackingError as err:
        cause = err.__cause__
        refused = isinstance(cause, MlflowException) and cause.error_code == "INVALID_PARAMETER_VALUE"
        if not (refused and art.startswith("file:")):
            raise
    return _upload_and_create(target, name, art, tags, policy, dst_where)


def _upload_and_create(
    target: MlflowClient,
    name: str,
    local_source: str,
    tags: dict[str, str],
    policy: RetryPolicy,
    dst_where: str,
) -> str:
    from urllib.parse import unquote

    from mlflow import MlflowClient

    from icmil.tracking.mlflow_tracker import get_or_create_experiment

    # The upload goes to the target SERVER's tracking side (``target`` tracks into the source store).
    registry = registry_of(target)
    target = MlflowClient(tracking_uri=registry, registry_uri=registry)
    exp_id = policy.call(
        lambda: get_or_create_experiment(target, f"{name}-promotions", registry), f"experiment at {dst_where}"
    )
    run = policy.call(lambda: target.create_run(exp_id, run_name=f"promote-{name}"), f"run at {dst_where}")
    run_id = str(run.info.run_id)
    folder = unquote(urlsplit(local_source).path)
    policy.call(lambda: target.log_artifacts(run_id, folder, "slide_classifier"), f"upload to {dst_where}")
    policy.call(lambda: target.set_terminated(run_id), f"end run at {dst_where}")
    src = resolve_artifact_source(target, f"runs:/{run_id}/slide_classifier")
    created = policy.call(
        lambda: target.create_model_version(name, source=src, run_id=run_id, tags=tags),
        f"create a version of {name!r} at {dst_where}",
    )
    log.info("%s had a local source; uploaded it to %s (run %s)", name, dst_where, run_id)
    return str(created.version)


def _same_origin(champion: ModelVersion, challenger: ModelVersion, src_where: str) -> bool:
    """True when the target's champion was created from this very challenger version (cross-registry rerun)."""
    origin = (champion.tags or {}).get(TAG_PROMOTED_FROM)
    return origin == f"{src_where}#{champion.name}/{challenger.version}"


def _record(
    client: MlflowClient,
    policy: RetryPolicy,
    name: str,
    mv: ModelVersion | None,
    result: PromotionResult,
    version: str | None = None,
) -> None:
    """Write the gate's decision as tags on the version (best effort: a tagging outage must not flip it)."""
    version = version or (str(mv.version) if mv is not None else None)
    if version is None:
        return
    tags = {
        TAG_PROMOTION: "promoted" if result.promoted else "rejected",
        TAG_PROMOTION_REASON: result.reason[:4900],
        f"{TAG_PROMOTION}.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"{TAG_PROMOTION}.target": result.registry_uri,
        f"{TAG_PROMOTION}.champion_version": result.champion_version or "",
    }
    if result.reevaluated and result.challenger_value is not None:
        tags[f"{TAG_PROMOTION}.reevaluated.challenger"] = repr(result.challenger_value)
        tags[f"{TAG_PROMOTION}.reevaluated.champion"] = repr(result.champion_value)
    for key, value in tags.items():
        try:
            policy.call(
                functools.partial(client.set_model_version_tag, name, version, key, value),
                f"tag {name} v{version}",
            )
        except TrackingError as err:
            log.warning("could not record the promotion outcome on %s v%s: %s", name, version, err)
            return
