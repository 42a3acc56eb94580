"""K-fold cross-validation of a freshly trained head (the stage-2 selection signal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icmil.config import MILConfig
from icmil.mil.crossval import crossval_score, stratified_folds

CFG = MILConfig(head="abmil", hidden_dim=8, attention_dim=4, lr=1e-2)


def _bags(shift: float, n: int = 16, seed: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    g = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    bags = []
    for y in labels:
        bag = torch.randn(10, 6, generator=g)
        if y:
            bag[:3, 0] += shift  # a few "lesion" instances in positive bags
        bags.append(bag)
    return bags, labels


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_cover_every_slide_once_and_keep_both_classes(folds: int) -> None:
    labels = [0] * 7 + [1] * 5
    parts = stratified_folds(labels, folds, seed=3)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(12))
    for part in parts:
        assert {labels[i] for i in part} == {0, 1}
    assert [p.tolist() for p in stratified_folds(labels, folds, seed=3)] == [p.tolist() for p in parts]


def test_informative_features_score_high_and_noise_scores_low() -> None:
    good = crossval_score(*_bags(shift=4.0), CFG, n_classes=2, folds=4, epochs=8)
    noise = crossval_score(*_bags(shift=0.0), CFG, n_classes=2, folds=4, epochs=8)
    assert good.auc >= 0.9 and good.loss < noise.loss
    assert noise.auc < 0.8
    assert good.key() > noise.key()
    assert len(good.fold_aucs) == 4 and good.probs is not None and good.probs.shape == (16, 2)


def test_same_seed_same_score_and_inputs_untouched() -> None:
    bags, labels = _bags(shift=1.5)
    before = [b.clone() for b in bags]
    a = crossval_score(bags, labels, CFG, n_classes=2, folds=4, epochs=4, seed=5)
    b = crossval_score(bags, labels, CFG, n_classes=2, folds=4, epochs=4, seed=5)
    assert (a.auc, a.loss) == (b.auc, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(bags, before, strict=True))
