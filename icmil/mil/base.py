"""The bag-classifier interface (:class:`MILHead`), its output (:class:`BagOutput`) and the head registry.

Every head exposes two faces:

* the **bag classifier** (stage 1): ``forward(features (N, D)) -> BagOutput`` with slide logits ``(C,)``;
* the **instance teacher** (stage 2, docs/method.md): ``instance_embed`` (the DimRed trunk, ``(N, H)``),
  ``instance_classify`` (the head applied to single instances, ``(N, C)``), their composition
  ``instance_logits`` and ``attention_scores`` (raw, pre-softmax per-instance scores for the TMI
  confidence weights).

Heads register themselves by name, timm-style, so tests and the CLI can iterate over every head. A head owns its
hyper-parameters: its constructor's keyword arguments (with their types and defaults) ARE its settings
(:meth:`MILHead.settings_model` turns them into a validated model; unknown keys are an error naming the head and
what it accepts), and class attributes give its optimiser defaults (``default_lr``, ``default_weight_decay``,
:meth:`MILHead.make_optimizer`) and its confidence exponent for stage 2 (``confidence_beta``). Adding a head is
one file in ``icmil/mil/heads/`` (and its test): see :mod:`icmil.mil.settings` for how a config reaches it.

Example:
    >>> import torch
    >>> head = create_mil_head("abmil", in_dim=16, n_classes=2, hidden_dim=8, attention_dim=4)
    >>> out = head(torch.randn(5, 16))
    >>> tuple(out.logits.shape), tuple(out.attention.shape), tuple(head.instance_logits(torch.randn(5, 16)).shape)
    ((2,), (5,), (5, 2))
    >>> "transmil" in list_mil_heads()
    True
"""

from __future__ import annotations

import inspect
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from icmil.errors import ConfigError
from icmil.mil.layers import DimRed


@dataclass
class BagOutput:
    """What a head returns for one bag.

    ``logits``: slide logits ``(C,)``. ``attention``: per-instance pooling weights ``(N,)`` summing to 1, or
    None when the head has none. ``extras``: anything the head's own loss needs (e.g. DTFD tier-1 logits).
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MILHead(nn.Module, ABC):
    """Base class of every bag classifier.

    Subclasses set ``name`` (the registry key) and ``permutation_invariant`` (whether reordering the
    instances of a bag leaves the eval-mode output unchanged), build their layers in ``__init__`` from
    keyword arguments with defaults (their settings: typed, so the config can be checked before training),
    and record those arguments in ``self.hparams`` so :func:`icmil.mil.save_mil_head` can rebuild them.

    The class attributes below are the head's defaults where the config leaves them open (``mil.lr`` /
    ``mil.weight_decay`` null, no ``coupling.beta.<head>``); override them on the subclass.
    """

    name: ClassVar[str] = ""
    permutation_invariant: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-4
    default_weight_decay: ClassVar[float] = 1e-4
    # β of the confidence weights |2a-1|^β that stage 2's TMI variant puts on each patch (coupling.confidence).
    confidence_beta: ClassVar[float] = 6.0
    _settings_model: ClassVar[type[pydantic.BaseModel] | None] = None

    def __init__(self, in_dim: int, n_classes: int, **hparams: Any) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2:
            raise ConfigError(
                f"MIL head {self.name!r}: in_dim must be >= 1 and n_classes >= 2, got {in_dim}, {n_classes}"
            )
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.hparams: dict[str, Any] = dict(hparams)
        # Class names in label-index order; filled in by training and saved with the weights.
        self.classes: list[str] | None = None

    @abstractmethod
    def forward(self, features: torch.Tensor) -> BagOutput:
        """Classify one bag: ``features (N, in_dim)`` -> :class:`BagOutput` with ``logits (C,)``."""

    @abstractmethod
    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        """The DimRed trunk applied to each instance: ``(N, in_dim) -> (N, H)``."""

    @abstractmethod
    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        """The bag head applied to single instances' trunk features: ``(N, H) -> (N, C)`` logits."""

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The instance teacher: ``instance_classify(instance_embed(features))``, ``(N, C)`` logits."""
        return self.instance_classify(self.instance_embed(features))

    def set_feature_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> int:
        """Fix the input standardisation of every :class:`~icmil.mil.layers.DimRed` trunk in this head to the
        training patches' per-dimension ``mean``/``std``; returns how many trunks took them (0: a user head
        without a DimRed, whose inputs then stay as they are).

        >>> head = create_mil_head("abmil", 2, 2, hidden_dim=4, attention_dim=4)
        >>> head.set_feature_standardization(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
        1
        """
        trunks = [m for m in self.modules() if isinstance(m, DimRed)]
        for trunk in trunks:
            trunk.set_standardization(mean, std)
        return len(trunks)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor | None:
        """Raw (pre-softmax) per-instance scores ``(N,)`` for the confidence variant, or None."""
        return None

    @classmethod
    def make_optimizer(
        cls, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """The optimiser this head trains with (Adam; heads whose paper used another override this)."""
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    @classmethod
    def settings_model(cls) -> type[pydantic.BaseModel]:
        """The head's settings as a pydantic model (unknown keys forbidden), read from ``__init__``'s keyword
        arguments: their annotations are the types, their defaults the defaults.

        >>> sorted(mil_head_class("abmil").settings_model().model_fields)
        ['attention_dim', 'dropout', 'hidden_dim']
        """
        if cls.__dict__.get("_settings_model") is None:
            cls._settings_model = _settings_from_signature(cls)
        model = cls.__dict__["_settings_model"]
        assert model is not None
        return model  # type: ignore[no-any-return]

    @classmethod
    def validate_settings(cls, values: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
        """``values`` checked against :meth:`settings_model` and completed with the defaults; a
        :class:`ConfigError` names ``where`` (default: the head), each bad key, and what the head accepts.

        >>> mil_head_class("dtfd").validate_settings({"pseudo_bags": 3})["pseudo_bags"]
        3
        """
        model = cls.settings_model()
        where = where or f"MIL head {cls.name!r}"
        accepted = sorted(model.model_fields)
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{where}: unknown setting(s) {unknown}; {cls.name or cls.__name__} accepts "
                f"{', '.join(accepted) or 'none'}"
            )
        try:
            return model.model_validate(dict(values)).model_dump()
        except pydantic.ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise ConfigError(f"{where}: {problems}") from None

    def bag_loss(self, out: BagOutput, label: torch.Tensor) -> torch.Tensor:
        """Training loss of one bag (cross-entropy on the slide logits; heads may add auxiliary terms).

        ``label`` is a 0-d long tensor holding the class index.
        """
        return F.cross_entropy(out.logits.unsqueeze(0), label.view(1))

    def config(self) -> dict[str, Any]:
        """Everything :func:`create_mil_head` needs to rebuild this head (JSON-serialisable)."""
        return {
            "head": self.name,
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "kwargs": dict(self.hparams),
            "classes": self.classes,
        }

    @staticmethod
    def _check_bag(features: torch.Tensor, in_dim: int, who: str) -> None:
        if features.dim() != 2 or features.shape[1] != in_dim:
            raise ValueError(f"{who}: expected features of shape (N, {in_dim}), got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError(f"{who}: empty bag (0 instances); a slide needs at least one patch")


def _settings_from_signature(cls: type[MILHead]) -> type[pydantic.BaseModel]:
    params = [
        p
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.name not in ("in_dim", "n_classes") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional:
        raise ConfigError(f"MIL head {cls.__name__}: settings must be keyword arguments, not {positional}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation naming something only a type checker sees: no type check for the rest
        hints = {}
    fields: dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default) for p in params
    }
    config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return pydantic.create_model(f"{cls.__name__}Settings", __config__=config, **fields)


H = TypeVar("H", bound=type[MILHead])
_REGISTRY: dict[str, type[MILHead]] = {}


def register_mil_head(name: str) -> Callable[[H], H]:
    """Class decorator: register a :class:`MILHead` subclass under ``name``.

    >>> @register_mil_head("my_head")  # doctest: +SKIP
    ... class MyHead(MILHead): ...
    """

    def deco(cls: H) -> H:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"MIL head {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        cls.settings_model()  # a constructor that cannot declare settings fails here, at import
        _REGISTRY[name] = cls
        return cls

    return deco


def list_mil_heads() -> list[str]:
    """Names of every registered head, sorted."""
    return sorted(_REGISTRY)


def mil_head_class(name: str) -> type[MILHead]:
    """The registered class of ``name`` (ConfigError listing the registered names if unknown)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown MIL head {name!r}; registered heads: {list_mil_heads()} (mil.head)")
    return _REGISTRY[name]


def create_mil_head(name: str, in_dim: int, n_classes: int, **kw: Any) -> MILHead:
    """Build a registered head. ``kw`` are the head's own settings (checked: unknown keys and values of the
    wrong type are a :class:`ConfigError` saying what the head accepts).

    >>> create_mil_head("maxpool", 8, 3, hidden_dim=4).n_classes
    3
    """
    cls = mil_head_class(name)
    return cls(in_dim=in_dim, n_classes=n_classes, **cls.validate_settings(kw))
