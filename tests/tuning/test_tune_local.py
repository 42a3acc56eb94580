"""tune_round in one process on sqlite: exact budget, pruning, outputs, resume, best params reach train_stage."""

from __future__ import annotations

import json

from optuna.trial import TrialState

from icmil.tuning import create_study, load_best_params, study_name_for, tune_round
from tests.tuning.conftest import tuning_cfg


def test_tune_round_sqlite_end_to_end(tmp_path, cohort):
    cfg = tuning_cfg(tmp_path / "run")
    out = tmp_path / "run" / "round_0" / "tune"
    # A known-good first trial, so the median pruner has a reference that the sampled bad learning rates miss.
    create_study(cfg, study_name_for(cfg, 0)).enqueue_trial({"lr": 0.05, "dropout": 0.0})
    result = tune_round(cfg, cohort, cohort.parent / "features", out, round_index=0)

    study = create_study(cfg, study_name_for(cfg, 0))
    trials = study.get_trials()
    assert len(trials) == 3 and result.n_complete + result.n_pruned == 3 and result.n_failed == 0
    assert sorted(t.number for t in trials) == list(range(3))
    assert result.n_pruned >= 1, [(t.number, t.params, t.intermediate_values) for t in trials]
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert len(t.intermediate_values) < cfg.tuning.epochs  # stopped before the last epoch
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    # The objective is the best validation AUC seen over the trial's epochs (what train_mil_head selects on).
    assert best.value == max(best.intermediate_values.values())
    assert result.best_value == best.value and result.best_params == best.params
    assert set(result.best_params) == {"lr", "dropout"}

    summary = json.loads((out / "best_params.json").read_text())
    assert summary["params"] == result.best_params and summary["objective"] == "val_auc"
    assert summary["counts"]["complete"] == result.n_complete
    assert {p.name for p in result.plots} >= {"optimization_history.png", "intermediate_values.png"}
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "trials.csv").read_text().count("\n") == 4  # header + one row per trial
    assert not list(out.glob("trials/*/checkpoint"))  # resumable state of trials is dropped

    # A rerun resumes the study: the budget is already spent, so no trial runs again.
    again = tune_round(cfg, cohort, cohort.parent / "features", out, round_index=0)
    assert len(create_study(cfg, study_name_for(cfg, 0)).get_trials()) == 3
    assert again.best_params == result.best_params

    # The best parameters reach the round's training step.
    from icmil.stages import train_stage

    params = load_best_params(out)
    head_dir = tmp_path / "run" / "round_0" / "head"
    train_stage(
        cfg.model_copy(update={"mil": cfg.mil.model_copy(update={"epochs": 1})}),
        cohort,
        cohort.parent / "features",
        head_dir,
        0,
        params=params,
    )
    trained = json.loads((head_dir / "metrics.json").read_text())["mil_config"]
    assert trained["lr"] == params["lr"] and trained["dropout"] == params["dropout"]
