"""Stage-2 tuning plumbing: trial settings reach fine-tuning, evaluations are reported and pruned, the best
settings come back as stage-2 overrides.

``finetune_encoder`` itself (minutes of patch reading on real data) is replaced by a recorder whose validation
AUC is a known function of the learning rate; the real fine-tuning is tested in tests/coupling. Everything
around it here is real: study, sampler, pruner, teacher loading, best_params.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from optuna.trial import TrialState

from icmil.mil import create_mil_head, save_mil_head
from icmil.tuning import apply_params, create_study, load_best_params, study_name_for, tune_round
from tests.tuning.conftest import tuning_cfg


def _val_auc(lr: float, evaluation: int) -> float:
    # Learning rates near 3e-5 are best; each evaluation improves a little.
    import math

    return max(0.0, 0.95 - 0.12 * abs(math.log10(lr / 3e-5))) * (0.9 + 0.05 * evaluation)


def test_coupling_target_tunes_stage_two(tmp_path, cohort, monkeypatch):
    import icmil.coupling.finetune as finetune

    calls = []

    def fake_finetune(
        encoder,
        head,
        manifest,
        tiles_dir,
        out_dir,
        cfg,
        *,
        features_dir=None,
        run=None,
        step_callback=None,
        **_,
    ):
        calls.append(SimpleNamespace(cfg=cfg, head=head, tiles_dir=Path(tiles_dir), out_dir=Path(out_dir)))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "weights.safetensors").write_bytes(b"x")  # trial encoders must be dropped
        step_callback(0, {"cv_auc": 0.5, "val_loss": 0.7})  # the teacher: same for every trial
        best = 0.5
        for i, step in enumerate(
            range(cfg.coupling.eval_every, cfg.coupling.max_steps + 1, cfg.coupling.eval_every)
        ):
            step_callback(step - 1, {"loss": 0.1})  # a plain optimiser step: not reported
            auc = _val_auc(cfg.coupling.lr, i + 1)
            best = max(best, auc)
            step_callback(step, {"cv_auc": auc, "val_loss": 0.5})
        return SimpleNamespace(selected={"cv_auc": best, "val_loss": 0.5})

    monkeypatch.setattr(finetune, "finetune_encoder", fake_finetune)
    head_dir = save_mil_head(
        create_mil_head("abmil", 16, 2, hidden_dim=8, attention_dim=8), tmp_path / "head"
    )
    (tmp_path / "tiles").mkdir()
    cfg = tuning_cfg(
        tmp_path / "run",
        "encoder.name=tiny_cnn",
        "coupling.initial_bn_calibration=0",  # the stand-in tiles folder is empty: nothing to calibrate on
        "tuning.n_trials=4",
        "coupling.eval_every=2",
        "tuning.coupling_space={lr: {low: 1.0e-7, high: 1.0e-2, log: true}, beta: {low: 1, high: 8}, "
        "max_steps: {low: 4, high: 8, kind: int}}",
    )
    name = study_name_for(cfg, 1, target="coupling")
    assert name.endswith("-round1-coupling")
    create_study(cfg, name, target="coupling").enqueue_trial({"lr": 3e-5, "beta": 2.0, "max_steps": 8})
    out = tmp_path / "tune"
    result = tune_round(
        cfg,
        cohort,
        None,
        out,
        round_index=1,
        target="coupling",
        tiles_dir=tmp_path / "tiles",
        head_dir=head_dir,
    )

    trials = create_study(cfg, name).get_trials()
    assert len(trials) == 4 and result.n_complete + result.n_pruned == 4 and result.target == "coupling"
    for call, trial in zip(calls, trials, strict=True):
        # The trial's settings are what fine-tuning ran with; the teacher is the round's head.
        assert call.cfg.coupling.lr == trial.params["lr"]
        assert call.cfg.coupling.beta["abmil"] == trial.params["beta"]
        assert call.cfg.coupling.max_steps == trial.params["max_steps"]
        assert call.head.name == "abmil" and call.tiles_dir == tmp_path / "tiles"
        assert not list(call.out_dir.glob("*.safetensors"))
        # Reported steps are evaluations 1, 2, ... (not the teacher's step 0, not optimiser steps).
        assert list(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))
    assert result.n_pruned >= 1
    assert all(t.state == TrialState.PRUNED for t in trials if _val_auc(t.params["lr"], 1) < 0.5)
    assert result.best_params["lr"] == 3e-5 and result.best_value == pytest.approx(_val_auc(3e-5, 4))

    summary = json.loads((out / "best_params.json").read_text())
    assert summary["target"] == "coupling"
    tuned = apply_params(cfg, load_best_params(out), target="coupling")
    assert (tuned.coupling.lr, tuned.coupling.beta["abmil"], tuned.coupling.max_steps) == (3e-5, 2.0, 8)


def test_coupling_target_needs_the_round_folders(tmp_path, cohort):
    from icmil.errors import ConfigError

    cfg = tuning_cfg(tmp_path / "run")
    with pytest.raises(ConfigError, match="head_dir"):
        tune_round(cfg, cohort, None, tmp_path / "tune", target="coupling", tiles_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown tuning target"):
        tune_round(cfg, cohort, None, tmp_path / "tune", target="encoder")
