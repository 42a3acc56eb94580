"""How the config reaches a bag head: its settings, its optimiser defaults and its stage-2 confidence exponent.

A head declares everything itself (:class:`~icmil.mil.base.MILHead`: constructor keyword arguments, class
attributes), so nothing here names a head. The config gives, from weakest to strongest:

1. the head's own defaults (its constructor's);
2. the shared trunk settings ``mil.hidden_dim``, ``mil.attention_dim``, ``mil.dropout`` — to every head that has
   a setting of that name;
3. ``mil.heads.<head>.<setting>`` — that head only (``--set mil.heads.dtfd.pseudo_bags=3``).

Unknown heads or settings under ``mil.heads`` are errors naming the key and what the head accepts. ``mil.lr`` /
``mil.weight_decay`` left null mean the head's ``default_lr`` / ``default_weight_decay``; ``coupling.beta.<head>``
left out means the head's ``confidence_beta``.

Example:
    >>> from icmil.config import MILConfig
    >>> head_settings(MILConfig(head="dtfd", heads={"dtfd": {"pseudo_bags": 3}}))["pseudo_bags"]
    3
    >>> head_settings(MILConfig(head="transmil", attention_dim=64))  # transmil has no attention_dim
    {'hidden_dim': 512, 'n_heads': 8, 'landmarks': 256, 'pinv_iterations': 6, 'residual_kernel': 33, 'dropout': 0.0, 'teacher': 'single_instance'}
    >>> confidence_beta("dtfd", {}), confidence_beta("dtfd", {"dtfd": 4.0})
    (2.0, 4.0)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from icmil.errors import ConfigError
from icmil.mil.base import MILHead, create_mil_head, list_mil_heads, mil_head_class

if TYPE_CHECKING:
    from icmil.config import MILConfig

# MILConfig fields given to every head that has a setting of the same name (the DimRed trunk and attention).
SHARED_SETTINGS = ("hidden_dim", "attention_dim", "dropout")


def check_head_settings(cfg: MILConfig) -> None:
    """Raise :class:`ConfigError` unless ``mil.head`` can be built with its settings (it is built once, tiny,
    so the head's own checks run too) and every ``mil.heads.<head>`` section names a registered head and only
    settings it has, with values of the right type.

    >>> from icmil.config import MILConfig
    >>> check_head_settings(MILConfig(heads={"dtfd": {"pseudo_bag": 3}}))
    Traceback (most recent call last):
    ...
    icmil.errors.ConfigError: mil.heads.dtfd: unknown setting(s) ['pseudo_bag']; dtfd accepts attention_dim, distill, dropout, hidden_dim, pseudo_bags, tier_blend
    """
    head_from_config(cfg, in_dim=1, n_classes=2)
    for name in cfg.heads:
        if name not in list_mil_heads():
            raise ConfigError(f"mil.heads.{name}: no MIL head {name!r}; registered heads: {list_mil_heads()}")
        head_settings(cfg, name)


def head_settings(cfg: MILConfig, name: str | None = None) -> dict[str, Any]:
    """The settings head ``name`` (default ``mil.head``) is built with: its defaults, the shared trunk settings it
    has, then ``mil.heads.<name>``; validated."""
    name = name or cfg.head
    cls = mil_head_class(name)
    accepted = cls.settings_model().model_fields
    shared = {k: getattr(cfg, k) for k in SHARED_SETTINGS if k in accepted}
    return cls.validate_settings({**shared, **cfg.heads.get(name, {})}, where=f"mil.heads.{name}")


def head_from_config(cfg: MILConfig, in_dim: int, n_classes: int) -> MILHead:
    """Build ``mil.head`` with :func:`head_settings` (what training builds).

    >>> from icmil.config import MILConfig
    >>> head_from_config(MILConfig(head="maxpool", hidden_dim=8), in_dim=4, n_classes=2).hparams
    {'hidden_dim': 8, 'dropout': 0.0}
    """
    return create_mil_head(cfg.head, in_dim, n_classes, **head_settings(cfg))


def optimizer_settings(cfg: MILConfig, name: str | None = None) -> tuple[float, float]:
    """``(lr, weight_decay)`` for head ``name`` (default ``mil.head``): the config's values, else the head's own."""
    cls = mil_head_class(name or cfg.head)
    lr = cfg.lr if cfg.lr is not None else cls.default_lr
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else cls.default_weight_decay
    return float(lr), float(weight_decay)


def confidence_beta(name: str, overrides: Mapping[str, float]) -> float:
    """β of stage 2's confidence weights for head ``name``: ``coupling.beta.<name>``, else the head's own."""
    if name in overrides:
        return float(overrides[name])
    return float(mil_head_class(name).confidence_beta)


def describe_heads() -> list[dict[str, Any]]:
    """One row per registered head: its settings with types and defaults, its optimiser and stage-2 defaults —
    what ``icmil heads`` prints."""
    rows = []
    for name in list_mil_heads():
        cls = mil_head_class(name)
        settings = {
            key: {"type": _type_name(field.annotation), "default": field.default}
            for key, field in cls.settings_model().model_fields.items()
        }
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        optimizer = cls.make_optimizer([torch.nn.Parameter(torch.zeros(1))], cls.default_lr, 0.0)
        inner = getattr(optimizer, "inner", None)
        rows.append(
            {
                "head": name,
                "summary": doc[0] if doc else "",
                "settings": settings,
                "optimizer": type(optimizer).__name__ + (f"({type(inner).__name__})" if inner else ""),
                "default_lr": cls.default_lr,
                "default_weight_decay": cls.default_weight_decay,
                "confidence_beta": cls.confidence_beta,
                "permutation_invariant": cls.permutation_invariant,
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None)
    return (
        str(text)
        if text and not str(annotation).startswith("typing.")
        else str(annotation).replace("typing.", "")
    )
