"""Search spaces from the config, and how tuned values flow back into a config.

Keys of ``tuning.mil_space`` are :class:`~icmil.config.MILConfig` field names, so a tuned value overrides exactly
the field of the same name in the round's training step (:func:`apply_params`). Keys of
``tuning.coupling_space`` are stage-2 settings: ``lr``, ``weight_decay``, ``max_steps`` (CouplingConfig fields)
and ``beta`` (the confidence exponent of the configured head, ``coupling.beta[mil.head]``).

Example:
    >>> from icmil.config import ICMILConfig
    >>> cfg = ICMILConfig()
    >>> new = apply_params(cfg, {"lr": 3e-4, "attention_dim": 64})
    >>> new.mil.lr, new.mil.attention_dim, cfg.mil.lr is None
    (0.0003, 64, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from icmil.config import CouplingConfig, ICMILConfig, MILConfig, SearchSpace
from icmil.errors import ConfigError

if TYPE_CHECKING:
    import optuna

COUPLING_KEYS = ("lr", "weight_decay", "max_steps", "beta")


def validate_space(space: Mapping[str, SearchSpace], target: str) -> None:
    """Raise :class:`ConfigError` naming the key when a search space cannot be sampled or applied."""
    allowed = set(MILConfig.model_fields) if target == "mil" else set(COUPLING_KEYS)
    field = f"tuning.{target}_space"
    if not space:
        raise ConfigError(f"{field} is empty: give at least one parameter to search")
    for name, spec in space.items():
        if name not in allowed:
            raise ConfigError(
                f"{field}.{name}: not a tunable {target} setting (choose from {', '.join(sorted(allowed))})"
            )
        if not spec.low < spec.high:
            raise ConfigError(f"{field}.{name}: low ({spec.low}) must be below high ({spec.high})")
        if spec.log and spec.low <= 0:
            raise ConfigError(f"{field}.{name}: a log-scale range needs low > 0 (got {spec.low})")
        if spec.kind == "int" and (spec.low != math.floor(spec.low) or spec.high != math.floor(spec.high)):
            raise ConfigError(f"{field}.{name}: an int range needs whole-number bounds")


def suggest(trial: optuna.Trial, space: Mapping[str, SearchSpace]) -> dict[str, Any]:
    """Ask ``trial`` for one value per search-space entry (sorted by name, so every worker asks alike)."""
    params: dict[str, Any] = {}
    for name in sorted(space):
        spec = space[name]
        if spec.kind == "int":
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return params


def apply_params(cfg: ICMILConfig, params: Mapping[str, Any], target: str = "mil") -> ICMILConfig:
    """A copy of ``cfg`` with tuned ``params`` written into ``cfg.mil`` (or the stage-2 settings), validated.

    This is how ``best_params.json`` reaches the round's training step: ``train_stage(..., params=...)`` calls
    it. Unknown keys and out-of-range values raise :class:`ConfigError` naming the key.
    """
    if target == "mil":
        unknown = set(params) - set(MILConfig.model_fields)
        if unknown:
            raise ConfigError(f"tuned parameters {sorted(unknown)} are not MILConfig fields")
        data = cfg.mil.model_dump() | dict(params)
        try:
            mil = MILConfig.model_validate(data)
        except Exception as err:
            raise ConfigError(f"tuned parameters {dict(params)} do not fit MILConfig: {err}") from None
        return cfg.model_copy(update={"mil": mil})
    if target == "coupling":
        unknown = set(params) - set(COUPLING_KEYS)
        if unknown:
            raise ConfigError(f"tuned parameters {sorted(unknown)} are not stage-2 settings {COUPLING_KEYS}")
        data = cfg.coupling.model_dump()
        for key, value in params.items():
            if key == "beta":
                data["beta"] = {**data["beta"], cfg.mil.head: float(value)}
            else:
                data[key] = value
        try:
            coupling = CouplingConfig.model_validate(data)
        except Exception as err:
            raise ConfigError(f"tuned parameters {dict(params)} do not fit CouplingConfig: {err}") from None
        return cfg.model_copy(update={"coupling": coupling})
    raise ConfigError(f"unknown tuning target {target!r} (mil or coupling)")
