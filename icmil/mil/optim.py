"""The bag head's optimiser, and Lookahead (Zhang et al., NeurIPS 2019).

Each head owns its optimiser and its defaults (:class:`~icmil.mil.base.MILHead`: ``make_optimizer``,
``default_lr``, ``default_weight_decay``): Adam with lr 2e-4 (AB-MIL) or 1e-4 (max-pooling, DTFD) and weight
decay 1e-4; Lookahead(RAdam) with lr 2e-4 and weight decay 1e-5 for TransMIL, as in its paper. ``cfg.lr`` /
``cfg.weight_decay`` (None = the head's defaults) override them for any head.

Example:
    >>> import torch
    >>> from icmil.config import MILConfig
    >>> opt = build_optimizer("transmil", [torch.nn.Parameter(torch.zeros(2))], MILConfig(head="transmil"))
    >>> type(opt).__name__, opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
    ('Lookahead', 0.0002, 1e-05)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from icmil.config import MILConfig
from icmil.mil.base import mil_head_class
from icmil.mil.settings import optimizer_settings


class Lookahead(torch.optim.Optimizer):
    """Wraps an inner optimiser: every ``k`` inner steps, slow weights move ``alpha`` of the way to the fast
    weights and the fast weights restart from them.

    It shares ``param_groups`` with the inner optimiser (so lr schedulers and ``clip_grad`` see the same
    groups) and checkpoints both the inner state and the slow weights through ``state_dict``.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.inner = inner
        self.k, self.alpha = k, alpha
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = inner.state
        self._slow: list[torch.Tensor] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        self._steps = 0

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.inner.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            for p, slow in zip(self._params(), self._slow, strict=True):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "slow": list(self._slow), "steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        with torch.no_grad():
            for slow, saved in zip(self._slow, state_dict["slow"], strict=True):
                slow.copy_(saved)
        self._steps = int(state_dict["steps"])


def build_optimizer(head: str, params: Iterable[torch.nn.Parameter], cfg: MILConfig) -> torch.optim.Optimizer:
    """The optimiser of the registered head ``head``, with ``cfg.lr`` / ``cfg.weight_decay`` or its defaults."""
    lr, weight_decay = optimizer_settings(cfg, head)
    return mil_head_class(head).make_optimizer(params, lr=lr, weight_decay=weight_decay)
