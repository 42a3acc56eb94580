"""Search spaces, tuned-parameter plumbing, storage resolution and study naming (no training)."""

from __future__ import annotations

import json

import optuna
import pytest

from icmil.config import load_config
from icmil.errors import ConfigError
from icmil.tuning import (
    apply_params,
    best_params_of,
    create_study,
    load_best_params,
    resolve_storage,
    study_name_for,
    validate_space,
)
from icmil.tuning.space import suggest
from icmil.tuning.study import NoCompletedTrial


def test_default_spaces_are_valid_and_sampled_within_bounds():
    cfg = load_config(None)
    validate_space(cfg.tuning.mil_space, "mil")
    validate_space(cfg.tuning.coupling_space, "coupling")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = suggest(study.ask(), cfg.tuning.mil_space)
        assert set(params) == set(cfg.tuning.mil_space)
        for name, value in params.items():
            spec = cfg.tuning.mil_space[name]
            assert spec.low <= value <= spec.high
        assert isinstance(params["attention_dim"], int)
        apply_params(cfg, params)  # every sampled point is a valid MILConfig


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": {"low": 1e-5, "high": 1e-3}}, "not a tunable mil setting"),
        ({"lr": {"low": 1e-3, "high": 1e-5}}, "must be below high"),
        ({"dropout": {"low": 0.0, "high": 0.5, "log": True}}, "log-scale range needs low > 0"),
        ({"attention_dim": {"low": 8.5, "high": 64, "kind": "int"}}, "whole-number bounds"),
    ],
)
def test_bad_search_spaces_name_the_key(space, message):
    cfg = load_config(None, [f"tuning.mil_space={json.dumps(space)}"])
    with pytest.raises(ConfigError, match=message) as err:
        validate_space(cfg.tuning.mil_space, "mil")
    assert f"tuning.mil_space.{next(iter(space))}" in str(err.value)


def test_apply_params_overrides_only_the_named_fields():
    cfg = load_config(None, ["mil.head=abmil", "mil.epochs=7"])
    new = apply_params(cfg, {"lr": 3e-4, "dropout": 0.2, "attention_dim": 64})
    assert (new.mil.lr, new.mil.dropout, new.mil.attention_dim, new.mil.epochs) == (3e-4, 0.2, 64, 7)
    assert cfg.mil.lr is None  # the input config is untouched
    with pytest.raises(ConfigError, match="do not fit the mil section"):
        apply_params(cfg, {"lrr": 1.0})
    with pytest.raises(ConfigError, match="do not fit MILConfig"):
        apply_params(cfg, {"dropout": 1.5})
    coupled = apply_params(cfg, {"lr": 2e-5, "beta": 3.0, "max_steps": 120}, target="coupling")
    assert (coupled.coupling.lr, coupled.coupling.beta["abmil"], coupled.coupling.max_steps) == (
        2e-5,
        3.0,
        120,
    )
    assert coupled.coupling.beta == {"abmil": 3.0}  # other heads keep their own beta
    # A head's own settings: heads.<head>.<setting>, or the flat names older configs used.
    dtfd = apply_params(cfg, {"heads.dtfd.pseudo_bags": 3, "transmil_landmarks": 64, "dropout": 0.1})
    assert dtfd.mil.heads == {"dtfd": {"pseudo_bags": 3}, "transmil": {"landmarks": 64}}
    assert apply_params(dtfd, {"dtfd_pseudo_bags": 7}).mil.heads["dtfd"] == {"pseudo_bags": 7}  # tuned wins
    with pytest.raises(ConfigError, match="do not fit the mil section"):
        apply_params(cfg, {"heads.dtfd": 3})


def test_load_best_params_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="run `icmil tune`"):
        load_best_params(tmp_path)
    (tmp_path / "best_params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_best_params(tmp_path)
    (tmp_path / "best_params.json").write_text(json.dumps({"params": {"lr": 0.01}}))
    assert load_best_params(tmp_path) == {"lr": 0.01}
    assert load_best_params(tmp_path / "best_params.json") == {"lr": 0.01}


def test_storage_resolution_order(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    assert resolve_storage(cfg, environ={}) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    env = {"ICMIL_OPTUNA_STORAGE": "postgresql://optuna:pw@db:5432/optuna"}
    # The bare scheme gets the installed driver (SQLAlchemy 2.1 would pick psycopg 3 otherwise).
    assert resolve_storage(cfg, environ=env) == "postgresql+psycopg2://optuna:pw@db:5432/optuna"
    env2 = {"ICMIL_OPTUNA_STORAGE": "postgresql+psycopg2://optuna:pw@db:5432/optuna"}
    assert resolve_storage(cfg, environ=env2) == env2["ICMIL_OPTUNA_STORAGE"]
    cfg2 = load_config(None, [f"run_dir={tmp_path}", "tuning.storage=sqlite:////x/y.db"])
    assert resolve_storage(cfg2, environ=env) == "sqlite:////x/y.db"
    assert resolve_storage(cfg2, "sqlite:////z.db", environ=env) == "sqlite:////z.db"
    with pytest.raises(ConfigError, match="not a database URL") as err:
        resolve_storage(cfg, "user:secret@host/db", environ={})
    assert "secret" not in str(err.value)


def test_study_names_are_stable_per_run_folder_and_round(tmp_path):
    a = load_config(None, [f"run_dir={tmp_path / 'a'}"])
    b = load_config(None, [f"run_dir={tmp_path / 'b'}"])
    assert study_name_for(a, 0) == study_name_for(a, 0) != study_name_for(a, 1)
    assert study_name_for(a, 0) != study_name_for(b, 0)
    # Settings a trial depends on start a new study; the budget or the storage do not.
    more = load_config(
        None, [f"run_dir={tmp_path / 'a'}", "tuning.n_trials=50", "tuning.storage=sqlite:////x.db"]
    )
    assert study_name_for(more, 0) == study_name_for(a, 0)
    other = load_config(None, [f"run_dir={tmp_path / 'a'}", "tuning.epochs=3"])
    assert study_name_for(other, 0) != study_name_for(a, 0)
    assert study_name_for(a, 2, run_key="run 7/x") == "icmil-run-7-x-round2"


def test_best_params_of_an_empty_study_says_what_to_do(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    study = create_study(cfg, "empty")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    with pytest.raises(NoCompletedTrial, match="no completed trial"):
        best_params_of(study)
    # load_if_exists: a second handle sees the same study (and the sqlite file lives in the run folder).
    assert create_study(cfg, "empty")._study_id == study._study_id
    assert (tmp_path / "optuna.db").is_file()
