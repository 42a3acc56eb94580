"""Search spaces from the config, and how tuned values flow back into a config.

Keys of ``tuning.mil_space`` are :class:`~icmil.config.MILConfig` field names (``lr``, ``dropout``, ...) or a
head's own setting as ``heads.<head>.<setting>`` (e.g. ``heads.dtfd.pseudo_bags``), so a tuned value overrides
exactly that setting in the round's training step (:func:`apply_params`); the flat names of older configs
(``dtfd_pseudo_bags``) are still read. Keys of ``tuning.coupling_space`` are stage-2 settings: ``lr``,
``weight_decay``, ``max_steps`` (CouplingConfig fields) and ``beta`` (the confidence exponent of the configured
head, ``coupling.beta[mil.head]``).

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

from icmil.config import (
    COUPLING_KEYS,
    LEGACY_HEAD_KEYS,
    NOT_TUNABLE_MIL_KEYS,
    MILConfig,
    SearchSpace,
    apply_params,
)
from icmil.errors import ConfigError

if TYPE_CHECKING:
    import optuna

# apply_params lives with the config (stage functions apply tuned values too); it is part of this module's API.
__all__ = ["COUPLING_KEYS", "apply_params", "suggest", "validate_space"]


def _mil_key(name: str) -> str | None:
    """Why ``name`` is not a tunable mil setting, or None when it is."""
    if name.startswith("heads."):
        parts = name.split(".")
        if len(parts) != 3 or not all(parts):
            return "a head's setting is written heads.<head>.<setting>"
        from icmil.mil import list_mil_heads, mil_head_class

        head, setting = parts[1], parts[2]
        if head not in list_mil_heads():
            return f"no MIL head {head!r} (registered: {', '.join(list_mil_heads())})"
        accepted = sorted(mil_head_class(head).settings_model().model_fields)
        return (
            None
            if setting in accepted
            else f"{head} has no setting {setting!r} (it has {', '.join(accepted)})"
        )
    if name in LEGACY_HEAD_KEYS or (name in MILConfig.model_fields and name not in NOT_TUNABLE_MIL_KEYS):
        return None
    allowed = sorted(set(MILConfig.model_fields) - set(NOT_TUNABLE_MIL_KEYS))
    return f"not a tunable mil setting (choose from {', '.join(allowed)}, or heads.<head>.<setting>)"


def validate_space(space: Mapping[str, SearchSpace], target: str) -> None:
    """Raise :class:`ConfigError` naming the key when a search space cannot be sampled or applied."""
    field = f"tuning.{target}_space"
    if not space:
        raise ConfigError(f"{field} is empty: give at least one parameter to search")
    for name, spec in space.items():
        why = _mil_key(name) if target == "mil" else None
        if target != "mil" and name not in COUPLING_KEYS:
            why = f"not a tunable {target} setting (choose from {', '.join(sorted(COUPLING_KEYS))})"
        if why:
            raise ConfigError(f"{field}.{name}: {why}")
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
