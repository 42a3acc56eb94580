"""The stage-2 loss terms: values against hand-computed KL, and which parameters each term moves."""

from __future__ import annotations

import math

import pytest
import torch

from icmil.coupling.losses import coupling_losses, kl_per_sample, teacher_outputs
from icmil.coupling.teacher import make_teacher_student
from tests.coupling._standins import TinyEncoder, TinyHead


def _manual_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_kl_per_sample_matches_hand_computation() -> None:
    p = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]])
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, 0.5]])
    q = logits.softmax(-1)
    expected = [_manual_kl(p[i].tolist(), q[i].tolist()) for i in range(3)]
    got = kl_per_sample(p, logits)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # KL is not symmetric: the teacher-side distribution must be the first argument.
    reverse = _manual_kl(q[0].tolist(), p[0].tolist())
    assert got[0].item() != pytest.approx(reverse, abs=1e-4)


def _pair(seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    enc, head = TinyEncoder(), TinyHead()
    pair = make_teacher_student(enc, head)
    # Perturb the student so every term is non-zero.
    with torch.no_grad():
        for p in pair.student_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return pair


def test_loss_values_match_the_method_formulas() -> None:
    pair = _pair()
    x = torch.rand(7, 3, 8, 8)
    x_aug = torch.rand(7, 3, 8, 8)
    t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
    losses = coupling_losses(
        t, pair.student_encoder, pair.student_head, x_aug, weight_head=0.5, weight_trunk=0.5
    )

    te, th, se, sh = pair.teacher_encoder, pair.teacher_head, pair.student_encoder, pair.student_head
    with torch.no_grad():
        f_t = te(x)
        p_t = th.classifier(th.trunk(f_t)).softmax(-1)
        q_c = sh.classifier(sh.trunk(se(x_aug))).softmax(-1)
        q_w1 = sh.classifier(sh.trunk(f_t)).softmax(-1)
        p_w2 = th.trunk(f_t).softmax(-1)
        q_w2 = sh.trunk(f_t).softmax(-1)
    l_c = sum(_manual_kl(p_t[i].tolist(), q_c[i].tolist()) for i in range(7)) / 7
    l_w1 = sum(_manual_kl(p_t[i].tolist(), q_w1[i].tolist()) for i in range(7)) / 7
    l_w2 = sum(_manual_kl(p_w2[i].tolist(), q_w2[i].tolist()) for i in range(7)) / 7
    assert losses.consistency.item() == pytest.approx(l_c, rel=1e-4)
    assert losses.head_anchor.item() == pytest.approx(l_w1, rel=1e-4)
    assert losses.trunk_anchor.item() == pytest.approx(l_w2, rel=1e-4)
    assert losses.total.item() == pytest.approx(l_c + 0.5 * l_w1 + 0.5 * l_w2, rel=1e-4)
    assert min(l_c, l_w1, l_w2) > 1e-5  # the test is not vacuous


def test_identical_student_on_the_clean_view_has_zero_loss() -> None:
    torch.manual_seed(1)
    pair = make_teacher_student(TinyEncoder(), TinyHead())
    pair.student_encoder.eval()
    x = torch.rand(5, 3, 8, 8)
    t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
    losses = coupling_losses(t, pair.student_encoder, pair.student_head, x)
    assert losses.total.item() == pytest.approx(0.0, abs=1e-6)


def _grad_owners(pair, loss: torch.Tensor) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    for p in pair.student_parameters():
        p.grad = None
    loss.backward()

    def has(params) -> bool:  # type: ignore[no-untyped-def]
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    return {
        "encoder": has(pair.student_encoder.parameters()),
        "trunk": has(pair.student_head.trunk.parameters()),
        "head": has(pair.student_head.classifier.parameters()),
        "attention": has(pair.student_head.att.parameters()),
        "teacher": any(
            p.requires_grad or p.grad is not None
            for p in [*pair.teacher_encoder.parameters(), *pair.teacher_head.parameters()]
        ),
    }


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("total", {"encoder": True, "trunk": True, "head": True}),
        ("consistency", {"encoder": True, "trunk": True, "head": True}),
        ("head_anchor", {"encoder": False, "trunk": False, "head": True}),
        ("trunk_anchor", {"encoder": False, "trunk": True, "head": False}),
    ],
)
def test_each_term_moves_only_its_module(term: str, expected: dict[str, bool]) -> None:
    pair = _pair()
    x = torch.rand(6, 3, 8, 8)
    t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
    losses = coupling_losses(t, pair.student_encoder, pair.student_head, torch.rand(6, 3, 8, 8))
    owners = _grad_owners(pair, getattr(losses, term))
    assert {k: owners[k] for k in expected} == expected
    assert owners["attention"] is False  # the instance path never uses the attention branch
    assert owners["teacher"] is False
    assert t.logits.requires_grad is False and t.features.requires_grad is False


def test_target_override_and_weights_change_only_the_consistency_term() -> None:
    pair = _pair()
    x = torch.rand(4, 3, 8, 8)
    t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
    base = coupling_losses(t, pair.student_encoder, pair.student_head, x)
    hard = torch.tensor([[1.0, 0.0]] * 4)
    forced = coupling_losses(t, pair.student_encoder, pair.student_head, x, target_probs=hard)
    assert forced.head_anchor.item() == pytest.approx(base.head_anchor.item())
    assert forced.trunk_anchor.item() == pytest.approx(base.trunk_anchor.item())
    q = pair.student_head.instance_logits(pair.student_encoder(x)).softmax(-1).detach()
    assert forced.consistency.item() == pytest.approx(float(-q[:, 0].log().mean()), rel=1e-5)

    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    weighted = coupling_losses(t, pair.student_encoder, pair.student_head, x, sample_weights=w)
    per = kl_per_sample(t.probs, pair.student_head.instance_logits(pair.student_encoder(x))).detach()
    assert weighted.consistency.item() == pytest.approx(per[0].item() / 4, rel=1e-5)
    with pytest.raises(ValueError, match="sample_weights"):
        coupling_losses(t, pair.student_encoder, pair.student_head, x, sample_weights=torch.ones(3))


def test_teacher_is_a_frozen_copy_and_inputs_are_untouched() -> None:
    enc, head = TinyEncoder(), TinyHead()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    pair = make_teacher_student(enc, head)
    assert pair.teacher_encoder is not enc and pair.student_encoder is not enc
    assert not pair.teacher_encoder.training and not pair.teacher_head.training
    assert pair.student_encoder.training and pair.student_head.training
    assert all(p.requires_grad for p in pair.student_parameters())
    opt = torch.optim.Adam(pair.student_parameters(), lr=1e-2)
    x = torch.rand(4, 3, 8, 8)
    for _ in range(3):
        t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
        loss = coupling_losses(t, pair.student_encoder, pair.student_head, torch.flip(x, dims=[3])).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in pair.teacher_encoder.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(not torch.equal(v, before[k]) for k, v in pair.student_encoder.state_dict().items())
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_student_bn_keeps_running_statistics() -> None:
    from torch import nn

    class BNEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    enc = BNEncoder()
    for mode, moves in (("train", True), ("frozen", False)):
        pair = make_teacher_student(enc, TinyHead(), student_bn=mode)
        assert pair.student_encoder.training and pair.student_encoder.bn.training == moves
        before = pair.student_encoder.bn.running_mean.clone()
        x = torch.rand(8, 3, 8, 8) * 3
        t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
        loss = coupling_losses(t, pair.student_encoder, pair.student_head, x.flip(-1)).total
        loss.backward()
        assert (
            pair.student_encoder.conv.weight.grad is not None
            and pair.student_encoder.bn.weight.grad is not None
        )
        assert (not torch.equal(before, pair.student_encoder.bn.running_mean)) == moves
    with pytest.raises(ValueError, match="student_bn"):
        make_teacher_student(enc, TinyHead(), student_bn="bogus")


def test_feature_anchor_is_the_scaled_squared_distance_and_moves_only_the_encoder() -> None:
    pair = _pair(3)
    x, x_aug = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    t = teacher_outputs(pair.teacher_encoder, pair.teacher_head, x)
    with torch.no_grad():
        anchor = pair.teacher_encoder(x_aug)
    scale = torch.linspace(0.5, 2.0, anchor.shape[1])
    plain = coupling_losses(t, pair.student_encoder, pair.student_head, x_aug)
    anchored = coupling_losses(
        t,
        pair.student_encoder,
        pair.student_head,
        x_aug,
        anchor_features=anchor,
        anchor_scale=scale,
        weight_anchor=2.0,
    )
    with torch.no_grad():
        expected = (((pair.student_encoder(x_aug) - anchor) / scale) ** 2).mean().item()
    assert plain.feature_anchor is None and "loss_f" not in plain.as_floats()
    assert anchored.feature_anchor is not None
    assert anchored.feature_anchor.item() == pytest.approx(expected, rel=1e-5)
    assert anchored.total.item() == pytest.approx(plain.total.item() + 2.0 * expected, rel=1e-5)
    pair.student_encoder.zero_grad()
    pair.student_head.zero_grad()
    anchored.feature_anchor.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student_encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in pair.student_head.parameters())


def test_sharpened_targets_keep_the_ranking_and_move_towards_one_hot() -> None:
    from icmil.coupling.losses import sharpen

    p = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    assert torch.equal(sharpen(p, 1.0), p)
    s = sharpen(p, 0.5)
    assert torch.allclose(s.sum(-1), torch.ones(3))
    assert s[0, 0] > 0.6 and s[1, 1] > 0.8 and s[2, 0] == pytest.approx(0.5)
