"""The one nested-dict walker (icmil.nested) and the users that replaced their own copies of it."""

from __future__ import annotations

import math

from icmil.nested import flatten, join, leaves
from icmil.redact import holds_credential
from icmil.stages import _numeric
from icmil.tracking.uris import flatten_params
from icmil_kfp.components._runtime import metadata

DATA = {
    "test": {"auc": 0.9, "ci": [0.8, 1.0], "n": 4, "nan": math.nan},
    "head": "abmil",
    "ok": True,
    "empty": {},
    "uris": [{"db": "postgresql://u:pw@db/x"}],
}


def test_flatten_options() -> None:
    assert flatten(DATA) == {
        "test.auc": 0.9,
        "test.ci": [0.8, 1.0],
        "test.n": 4,
        "test.nan": DATA["test"]["nan"],
        "head": "abmil",
        "ok": True,
        "uris": [{"db": "postgresql://u:pw@db/x"}],
    }
    assert "empty" in flatten(DATA, keep_empty=True) and flatten(DATA, keep_empty=True)["empty"] == {}
    assert flatten(DATA, lists=True)["uris[0].db"] == "postgresql://u:pw@db/x"
    assert flatten(DATA, lists=True)["test.ci[1]"] == 1.0
    assert list(flatten({"a": {"b": 1}}, sep="_")) == ["a_b"]
    assert flatten({}) == {} and list(leaves({"a": {}})) == []
    assert join(("a", 0, "b"), "/") == "a[0]/b"


def test_every_user_flattens_alike() -> None:
    # Tracker metrics: finite numbers, keys joined by "_".
    assert _numeric(DATA) == {"test_auc": 0.9, "test_n": 4.0}
    # KFP metadata: scalars, non-finite floats as None, lists and empty mappings left out.
    assert metadata(DATA) == {"test.auc": 0.9, "test.n": 4, "test.nan": None, "head": "abmil", "ok": True}
    # MLflow params: every leaf as text, empty mappings and lists as JSON, credentials redacted.
    params = flatten_params(DATA)
    assert params["test.ci"] == "[0.8, 1.0]" and params["empty"] == "{}" and params["ok"] == "True"
    assert params["uris"] == '[{"db": "postgresql://***@db/x"}]'
    assert flatten_params({"tracking": {"password": "x", "mlflow_secret": "icmil-mlflow"}}) == {
        "tracking.password": "***",
        "tracking.mlflow_secret": "icmil-mlflow",
    }


def test_holds_credential_is_the_one_check_for_a_credential_in_a_value() -> None:
    for value in (
        "postgresql://optuna:pw@db/optuna",
        "postgresql+psycopg2://u:@db/x",
        "s3://b/k?X-Amz-Signature=abc",
        "http://mlflow:5000/api?token=t0k3n&x=1",
        "https://h/p?api_key=k",
    ):
        assert holds_credential(value), value
    for value in (
        "postgresql://optuna@db/optuna",
        "icmil-optuna",
        "s3://b/k?x=1",
        "http://h/?token=",
        "a:b@c",
    ):
        assert not holds_credential(value), value
