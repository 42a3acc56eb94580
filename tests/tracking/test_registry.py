"""Registry and promotion gate on sqlite stores: challenger/champion aliases, margin, floor, data digests,
re-evaluation on the challenger's evaluation table, and promotion into a second registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from icmil.errors import PromotionRejected, TrackingError
from icmil.registry import (
    CHALLENGER,
    CHAMPION,
    evaluation_digest,
    log_slide_classifier,
    predict_slides,
    promote,
    register_challenger,
)
from icmil.registry.versions import TAG_PROMOTION, TAG_PROMOTION_REASON
from icmil.tracking import start_parent_run
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import resolve_tracking_uri
from tests.tracking.helpers import CLASSES, fresh_sqlite, make_cfg

FAST = RetryPolicy(retries=1, backoff=0.01)


@dataclass
class Store:
    uri: str
    models: list[str]  # runs:/ URIs of two logged slide classifiers (different heads, same encoder)
    eval_table: pd.DataFrame  # feature files + labels both models can score
    root: Path


@pytest.fixture(scope="module")
def store(tiny_model_parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Store:
    from icmil.features import load_encoder, write_features

    p = tiny_model_parts
    root = tmp_path_factory.mktemp("registry")
    cfg = make_cfg(root / "run")
    uri = resolve_tracking_uri(cfg)
    parent = start_parent_run(cfg, run_name="registry-tests")
    client = MlflowClient(uri)
    models = []
    for k in (0, 1):
        run_id = client.create_run(
            client.get_run(parent).info.experiment_id, run_name=f"register{k}"
        ).info.run_id
        models.append(
            log_slide_classifier(
                p["encoder"], p[f"head{k}"], cfg.tiling, CLASSES, run_id=run_id, tracking_uri=uri, retry=FAST
            )
        )
    # Feature bags made "by" the bundled encoder (its digest in the attrs), so both models accept them.
    encoder = load_encoder(p["encoder"])
    digest, dim = encoder.digest(), encoder.out_dim
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        label = CLASSES[i % 2]
        path = root / "feats" / f"s{i}.h5"
        feats = rng.normal(size=(12, dim)).astype(np.float32) + (0.8 if label == "tumor" else 0.0)
        coords = np.stack([np.arange(12) * 64, np.zeros(12)], axis=1).astype(np.int64)
        write_features(path, feats, coords, {"encoder_digest": digest, "slide_id": f"s{i}"})
        rows.append({"slide_id": f"s{i}", "path": str(path), "label": label})
    return Store(uri, models, pd.DataFrame(rows), root)


def _register(
    store: Store, name: str, k: int, auc: float, table: pd.DataFrame | None = None, **kw: object
) -> str:
    return register_challenger(
        store.models[k],
        name,
        {"git": "abc"},
        metrics={"test": {"auc": auc, "accuracy": 0.5}},
        eval_tables={"test": store.eval_table if table is None else table},
        tracking_uri=store.uri,
        retry=FAST,
        **kw,  # type: ignore[arg-type]
    )


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def _gate(store: Store, name: str, **kw: object):  # type: ignore[no-untyped-def]
    args = {
        "metric": "auc",
        "split": "test",
        "margin": 0.02,
        "floor": 0.6,
        "tracking_uri": store.uri,
        "retry": FAST,
    }
    return promote(name, **{**args, **kw})  # type: ignore[arg-type]


def test_first_version_needs_the_floor_then_wins_loses_and_ties(store: Store) -> None:
    client = MlflowClient(store.uri)
    name = "gate"
    v1 = _register(store, name, 0, auc=0.55, parent_run_id="parent-1")
    assert _alias(client, name, CHALLENGER) == v1
    mv = client.get_model_version(name, v1)
    assert mv.tags["icmil.metric.test.auc"] == "0.55" and mv.tags["icmil.parent_run_id"] == "parent-1"
    assert mv.tags["icmil.data_digest.test"] == evaluation_digest(store.eval_table)
    assert mv.tags["icmil.eval_table.test"].startswith("runs:/")
    assert mv.tags["git"] == "abc"

    # No champion yet, below the floor: rejected, nothing moves, the reason is recorded on the version.
    with pytest.raises(PromotionRejected, match="below the floor") as err:
        _gate(store, name)
    assert err.value.result.promoted is False  # type: ignore[attr-defined]
    assert _alias(client, name, CHAMPION) is None
    tags = client.get_model_version(name, v1).tags
    assert tags[TAG_PROMOTION] == "rejected" and "floor" in tags[TAG_PROMOTION_REASON]

    # Meets the floor: first champion.
    v2 = _register(store, name, 0, auc=0.70)
    result = _gate(store, name)
    assert result.promoted and result.target_version == v2 and _alias(client, name, CHAMPION) == v2
    assert client.get_model_version(name, v2).tags[TAG_PROMOTION] == "promoted"
    # Promoting again is a no-op, not an error.
    assert _gate(store, name).reason.startswith("the challenger already is the champion")

    # Better by more than the margin: champion moves. A dry run first: same decision, nothing changes.
    v3 = _register(store, name, 1, auc=0.80)
    preview = _gate(store, name, dry_run=True)
    assert preview.promoted and "beats champion" in preview.reason and _alias(client, name, CHAMPION) == v2
    assert TAG_PROMOTION not in client.get_model_version(name, v3).tags
    result = _gate(store, name)
    assert result.promoted and result.champion_version == v2 and _alias(client, name, CHAMPION) == v3

    # Better, but not by more than the margin: rejected (a dry run says so without raising).
    v4 = _register(store, name, 0, auc=0.81)
    assert not _gate(store, name, dry_run=True).promoted
    with pytest.raises(PromotionRejected, match="does not beat"):
        _gate(store, name)
    # A tie keeps the champion, even with margin 0.
    _register(store, name, 0, auc=0.80)
    with pytest.raises(PromotionRejected, match="ties"):
        _gate(store, name, margin=0.0)
    # Worse: rejected.
    _register(store, name, 0, auc=0.60)
    with pytest.raises(PromotionRejected, match="does not beat"):
        _gate(store, name)
    assert _alias(client, name, CHAMPION) == v3
    assert client.get_model_version(name, v4).tags[TAG_PROMOTION] == "rejected"


def test_no_challenger_is_a_clear_error(store: Store) -> None:
    with pytest.raises(TrackingError, match="no version with alias 'challenger'"):
        _gate(store, "never-registered")


def test_different_evaluation_data_refused_or_reevaluated(store: Store, tmp_path: Path) -> None:
    client = MlflowClient(store.uri)
    name = "mismatch"
    # Champion scored on the first 4 slides, with a (recorded) AUC it will never reach on the full table.
    _register(store, name, 0, auc=0.99, table=store.eval_table.iloc[:4])
    champion = _gate(store, name).target_version
    challenger = _register(store, name, 1, auc=0.75)

    with pytest.raises(PromotionRejected, match="evaluation data differ"):
        _gate(store, name, on_data_mismatch="refuse")
    assert "re-score both" in _gate(store, name, dry_run=True).reason
    assert _alias(client, name, CHAMPION) == champion

    # Re-evaluation scores both models on the challenger's table with the real model code.
    expected = {}
    for version in (challenger, champion):
        pred = predict_slides(
            f"models:/{name}/{version}",
            store.eval_table,
            tmp_path / version,
            tracking_uri=store.uri,
            heatmaps=False,
        )
        from icmil.mil.metrics import classification_metrics

        y = [CLASSES.index(v) for v in store.eval_table["label"]]
        expected[version] = classification_metrics(y, pred[["prob_normal", "prob_tumor"]].to_numpy())["auc"]
    try:
        result = _gate(store, name, margin=0.0, floor=0.0)
        assert result.promoted and _alias(client, name, CHAMPION) == challenger
    except PromotionRejected as err:
        result = err.result  # type: ignore[attr-defined]
        assert _alias(client, name, CHAMPION) == champion
    assert result.reevaluated
    assert result.challenger_value == pytest.approx(expected[challenger])
    assert result.champion_value == pytest.approx(expected[champion])
    assert result.promoted == (expected[challenger] > expected[champion])


def test_promotion_into_another_registry(store: Store, tmp_path: Path) -> None:
    prod = fresh_sqlite(tmp_path / "prod" / "mlflow.db")
    name = "cross"
    version = _register(store, name, 0, auc=0.7)
    result = _gate(store, name, target_registry_uri=prod)
    assert result.promoted and result.target_version == "1"
    prod_client = MlflowClient(prod)
    mv = prod_client.get_model_version_by_alias(name, CHAMPION)
    dev_mv = MlflowClient(store.uri).get_model_version(name, version)
    assert mv.source == dev_mv.source  # same artifact source, no copy
    assert mv.tags["icmil.metric.test.auc"] == "0.7" and mv.tags["icmil.promoted_from"].endswith(
        f"#{name}/{version}"
    )
    # The dev registry has no champion: only prod moved.
    assert _alias(MlflowClient(store.uri), name, CHAMPION) is None
    # Promoting the same challenger again is a no-op; a weaker challenger is compared with PROD's champion.
    assert "already" in _gate(store, name, target_registry_uri=prod).reason
    _register(store, name, 1, auc=0.65)
    with pytest.raises(PromotionRejected, match="does not beat champion v1"):
        _gate(store, name, target_registry_uri=prod)
    # The prod champion loads from the prod registry alone and predicts.
    table = predict_slides(
        f"models:/{name}@{CHAMPION}",
        store.eval_table.iloc[:2],
        tmp_path / "p",
        tracking_uri=prod,
        heatmaps=False,
    )
    assert table["error"].eq("").all() and table["prob_tumor"].between(0, 1).all()
