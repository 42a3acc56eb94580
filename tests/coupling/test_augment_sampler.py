"""Batched student view, confidence weights and the patch samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icmil.coupling.augment import flip_and_crop, random_resized_crop_params, stain_jitter, student_view
from icmil.coupling.confidence import (
    confidence_weights,
    minmax_normalise,
    normalised_scores,
    raw_confidence_scores,
)
from icmil.coupling.sampler import BalancedSampler, PatchPool, UniformSampler
from tests.coupling._standins import TinyHead


def test_crop_params_follow_the_requested_scale() -> None:
    g = torch.Generator().manual_seed(0)
    w, h, xc, yc = random_resized_crop_params(4000, (0.5, 1.0), generator=g)
    area = w * h
    assert float(area.min()) >= 0.5 - 1e-6 and float(area.max()) <= 1.0 + 1e-6
    assert float((w / h).min()) >= 3 / 4 - 1e-4 and float((w / h).max()) <= 4 / 3 + 1e-4
    # The box stays inside the patch.
    assert float((xc - w / 2).min()) >= -1e-6 and float((xc + w / 2).max()) <= 1 + 1e-6
    assert float((yc - h / 2).min()) >= -1e-6 and float((yc + h / 2).max()) <= 1 + 1e-6
    # Not degenerate: areas spread over the range.
    assert float(area.std()) > 0.05


def test_full_crop_without_flip_is_identity_and_flips_are_exact() -> None:
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    y = flip_and_crop(x, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    ref = x.float() / 255
    matches = {"id": 0, "h": 0, "v": 0, "hv": 0}
    for i in range(len(x)):
        for name, cand in (
            ("id", ref[i]),
            ("h", ref[i].flip(-1)),
            ("v", ref[i].flip(-2)),
            ("hv", ref[i].flip(-1).flip(-2)),
        ):
            if torch.allclose(y[i], cand, atol=1e-5):
                matches[name] += 1
                break
    assert sum(matches.values()) == len(x)
    assert all(v > 0 for v in matches.values())  # each flip combination occurs


def test_crop_zooms_into_the_patch() -> None:
    # A patch with a bright border: a crop of half the area (seen at full size) shows less border.
    x = torch.zeros(32, 3, 32, 32)
    x[:, :, :2, :] = 1
    x[:, :, -2:, :] = 1
    x[:, :, :, :2] = 1
    x[:, :, :, -2:] = 1
    y = flip_and_crop(x, crop_scale=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    assert float(y.mean()) < float(x.mean())


def test_student_view_is_deterministic_under_a_generator_and_bounded() -> None:
    x = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    a = student_view(x, stain=True, generator=torch.Generator().manual_seed(5))
    b = student_view(x, stain=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_stain_jitter_changes_colour_but_not_structure() -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 0.6 + 0.2
    y = stain_jitter(x, sigma=0.1, color=0.1, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(x, y, atol=1e-3)
    # Per-patch spatial pattern is preserved (high correlation of grey levels).
    gx, gy = x.mean(1).flatten(1), y.mean(1).flatten(1)
    for i in range(len(x)):
        c = torch.corrcoef(torch.stack([gx[i], gy[i]]))[0, 1]
        assert float(c) > 0.8
    same = stain_jitter(x, sigma=0.0, color=0.0)
    assert torch.allclose(same, x)


def test_confidence_weights() -> None:
    a = minmax_normalise(torch.tensor([2.0, 4.0, 3.0]))
    assert a.tolist() == pytest.approx([0.0, 1.0, 0.5])
    w = confidence_weights(a, beta=6.0)
    assert w.tolist() == pytest.approx([1.0, 1.0, 0.0])
    # A constant batch carries no confidence signal.
    assert confidence_weights(minmax_normalise(torch.ones(4)), 2.0).tolist() == [0.0] * 4
    # Two tiers (DTFD): each normalised, then multiplied.
    two = normalised_scores(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]]))
    assert two.tolist() == pytest.approx([0.0, 0.5, 0.5])


def test_raw_scores_use_attention_or_fall_back_to_teacher_probability() -> None:
    head = TinyHead()
    f = torch.randn(5, 6)
    logits = head.instance_logits(f)
    torch.testing.assert_close(raw_confidence_scores(head, f, logits), head.attention_scores(f).detach())

    class NoAttention(TinyHead):
        def attention_scores(self, features):  # type: ignore[no-untyped-def,override]
            return None

    noatt = NoAttention()
    got = raw_confidence_scores(noatt, f, logits, negative_class=0)
    torch.testing.assert_close(got, 1 - logits.detach().softmax(-1)[:, 0])


def _pool(scores: list[float] | None = None, n: int = 10) -> PatchPool:
    return PatchPool(
        slide_ids=["a", "b"],
        slide_labels=np.array([0, 1]),
        slide_index=np.array([0] * (n // 2) + [1] * (n - n // 2)),
        patch_index=np.array(list(range(n // 2)) + list(range(n - n // 2))),
        coords=np.zeros((n, 2), np.int64),
        teacher_score=None if scores is None else np.array(scores),
    )


def test_uniform_sampler_visits_every_patch_once_per_pass() -> None:
    s = UniformSampler(_pool(n=10), batch_size=5, seed=0)
    seen = np.concatenate([s.sample(), s.sample()])
    assert sorted(seen.tolist()) == list(range(10))
    batch = s.sample()
    assert len(batch) == 5 and len(set(batch.tolist())) == 5
    big = UniformSampler(_pool(n=4), batch_size=10, seed=0).sample()
    assert len(big) == 10 and set(big.tolist()) == {0, 1, 2, 3}


def test_balanced_sampler_balances_teacher_positive_patches() -> None:
    scores = [0.9, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 0.05, 0.2, 0.1]
    s = BalancedSampler(_pool(scores), batch_size=20, positive_fraction=0.5, seed=0)
    batch = s.sample()
    assert len(batch) == 20 and int((batch == 0).sum()) == 10
    # No teacher-positive patch at all: the top scores stand in.
    low = BalancedSampler(_pool([0.1 * i / 10 for i in range(10)]), batch_size=10, seed=0)
    assert set(low.pos.tolist()) == {9}
    with pytest.raises(ValueError, match="teacher scores"):
        BalancedSampler(_pool(None), batch_size=4)
