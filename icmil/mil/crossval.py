"""How good a bag head can features make? K-fold cross-validation of a freshly trained head, in memory.

Stage 2 changes the encoder, and the bag head is retrained on the new features afterwards. Scoring a student
encoder with the round's FROZEN head mostly measures how far its features moved away from what that head was
trained on (on real images we measured the frozen head's validation loss rising 0.68 -> 4.4 while a head
refit on the same student's features gained test AUC), and a dozen validation slides give an AUC in coarse,
noisy steps. This module answers the question stage 3 will actually ask: train the configured head on K-1
folds of the labelled (train + val) slides and score the held-out fold, pooled over folds — more slides
behind each estimate, and every candidate judged by the same folds, seeds and epochs.

Heads here train for a fixed number of epochs (there is no inner validation split to stop on) with the
configured optimiser, input standardisation from the training folds' patches, one slide per step.

Example:
    >>> import torch
    >>> from icmil.config import MILConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> bags = [torch.randn(8, 4, generator=g) + (i % 2) for i in range(12)]
    >>> cfg = MILConfig(head="abmil", hidden_dim=8, attention_dim=4, lr=1e-2)
    >>> res = crossval_score(bags, [i % 2 for i in range(12)], cfg, n_classes=2, folds=3, epochs=5)
    >>> res.auc > 0.9, len(res.fold_aucs)
    (True, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from icmil.config import MILConfig
from icmil.mil.base import MILHead
from icmil.mil.metrics import multiclass_auc


@dataclass
class CrossValScore:
    """Pooled out-of-fold AUC and mean cross-entropy (lower is better), plus per-fold AUCs."""

    auc: float
    loss: float
    fold_aucs: list[float] = field(default_factory=list)
    probs: np.ndarray | None = None

    def key(self) -> tuple[float, float]:
        """Ranking key (bigger is better): AUC, then lower loss; NaN counts as worst."""
        auc = -math.inf if math.isnan(self.auc) else self.auc
        loss = math.inf if math.isnan(self.loss) else self.loss
        return (auc, -loss)

    def as_dict(self, prefix: str = "cv_") -> dict[str, float]:
        return {f"{prefix}auc": self.auc, f"{prefix}loss": self.loss}


def stratified_folds(labels: Sequence[int] | np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Indices of ``folds`` held-out sets, stratified by label, seeded (every class spread over the folds).

    >>> [f.tolist() for f in stratified_folds([0, 0, 1, 1], 2, seed=0)]
    [[0, 2], [1, 3]]
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(idx):
            parts[(offset + j) % folds].append(int(i))
        offset += len(idx)
    return [np.sort(np.asarray(p, dtype=int)) for p in parts if p]


def fit_head(
    bags: Sequence[torch.Tensor],
    labels: Sequence[int],
    cfg: MILConfig,
    n_classes: int,
    epochs: int,
    seed: int,
) -> MILHead:
    """Train ``cfg.head`` on in-memory bags for ``epochs`` epochs (standardised with these bags' patches)."""
    from icmil.mil.optim import build_optimizer
    from icmil.mil.train import _epoch_seed, head_from_config

    in_dim = int(bags[0].shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = head_from_config(cfg, in_dim, n_classes)
        if cfg.standardize_features:
            cat = torch.cat(list(bags)).double()
            head.set_feature_standardization(cat.mean(0).float(), cat.std(0, unbiased=False).float())
        optimizer = build_optimizer(cfg.head, head.parameters(), cfg)
        head.train()
        for epoch in range(1, epochs + 1):
            torch.manual_seed(_epoch_seed(seed, epoch))
            order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(len(bags))
            for i in order:
                out = head(bags[i])
                loss = head.bag_loss(out, torch.tensor(int(labels[i])))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
                optimizer.step()
    return head.eval()


@torch.no_grad()
def _predict(head: MILHead, bags: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # heads with random pseudo-bags: a deterministic score
        return torch.stack([head(b).logits.float().view(-1) for b in bags])


def crossval_score(
    bags: Sequence[torch.Tensor],
    labels: Sequence[int],
    cfg: MILConfig,
    n_classes: int,
    folds: int = 5,
    epochs: int = 20,
    seed: int = 0,
) -> CrossValScore:
    """K-fold cross-validated slide AUC and cross-entropy of ``cfg.head`` trained on ``bags`` (see the module
    docstring). Same ``seed`` -> same folds, initialisations and orders: candidates are compared fairly."""
    from icmil.mil.train import intra_op_threads

    y = np.asarray(labels, dtype=int)
    logits = torch.zeros(len(bags), n_classes)
    fold_aucs: list[float] = []
    with intra_op_threads(1):
        for k, held in enumerate(stratified_folds(y, folds, seed)):
            train_idx = np.setdiff1d(np.arange(len(bags)), held)
            head = fit_head(
                [bags[i] for i in train_idx], y[train_idx].tolist(), cfg, n_classes, epochs, seed + k
            )
            logits[held] = _predict(head, [bags[i] for i in held])
            fold_probs = logits[held].softmax(-1).numpy()
            fold_aucs.append(multiclass_auc(y[held], fold_probs))
    probs = logits.softmax(-1).numpy()
    loss = float(F.cross_entropy(logits, torch.as_tensor(y)).item()) if len(y) else float("nan")
    return CrossValScore(multiclass_auc(y, probs), loss, fold_aucs, probs)
