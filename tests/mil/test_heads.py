"""Every registered MIL head: shapes, gradients, checkpoints, determinism and the ICMIL identities."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from icmil.errors import ConfigError
from icmil.mil import create_mil_head, list_mil_heads, load_mil_head, save_mil_head
from icmil.mil.heads.nystrom import NystromAttention, iterative_pinv, landmark_means

IN_DIM = 24
HEADS = list_mil_heads()


def small(name: str) -> dict[str, Any]:
    """Small but structurally complete settings (TransMIL keeps 2 layers, PPEG, Nyström with landmarks)."""
    kw: dict[str, Any] = {"hidden_dim": 32}
    if name in ("abmil", "dtfd"):
        kw["attention_dim"] = 16
    if name == "transmil":
        kw.update(n_heads=4, landmarks=16)
    return kw


def make(name: str, n_classes: int = 2, seed: int = 0, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_mil_head(name, IN_DIM, n_classes, **{**small(name), **kw})


def test_registry_lists_the_four_heads() -> None:
    assert set(HEADS) >= {"maxpool", "abmil", "dtfd", "transmil"}
    with pytest.raises(ConfigError, match="unknown MIL head 'nope'"):
        create_mil_head("nope", 8, 2)
    with pytest.raises(
        ConfigError, match=r"unknown setting\(s\) \['no_such_option'\]; abmil accepts attention_dim"
    ):
        create_mil_head("abmil", 8, 2, no_such_option=1)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("n", [1, 7, 5000])
def test_forward_backward(name: str, n: int) -> None:
    head = make(name, n_classes=3).train()
    x = torch.randn(n, IN_DIM)
    out = head(x)
    assert out.logits.shape == (3,)
    assert torch.isfinite(out.logits).all()
    if out.attention is not None:
        assert out.attention.shape == (n,)
        assert float(out.attention.detach().sum()) == pytest.approx(1.0, abs=1e-4)
    loss = head.bag_loss(out, torch.tensor(2))
    loss.backward()
    grads = [p.grad for p in head.dimred.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)
    head.eval()
    with torch.no_grad():
        assert head.instance_embed(x).shape == (n, 32)
        assert head.instance_logits(x).shape == (n, 3)
        scores = head.attention_scores(x)
        assert scores is None or scores.shape == (n,)


@pytest.mark.parametrize("name", HEADS)
def test_bad_input_is_a_clear_error(name: str) -> None:
    head = make(name)
    with pytest.raises(ValueError, match=rf"\(N, {IN_DIM}\)"):
        head(torch.randn(4, IN_DIM + 1))
    with pytest.raises(ValueError, match="empty bag"):
        head(torch.randn(0, IN_DIM))


@pytest.mark.parametrize("name", HEADS)
def test_save_load_round_trip(name: str, tmp_path: Any) -> None:
    head = make(name).eval()
    head.classes = ["normal", "tumor"]
    save_mil_head(head, tmp_path / "h", extra={"note": "x"})
    again = load_mil_head(tmp_path / "h")
    assert not again.training and again.classes == ["normal", "tumor"]
    assert again.config() == head.config()
    x = torch.randn(50, IN_DIM)
    with torch.no_grad():
        assert torch.equal(head(x).logits, again(x).logits)
        assert torch.equal(head.instance_logits(x), again.instance_logits(x))


@pytest.mark.parametrize("name", HEADS)
def test_deterministic_under_a_seed(name: str) -> None:
    x, y = torch.randn(40, IN_DIM), torch.tensor(1)

    def one_step() -> torch.Tensor:
        head = make(name, seed=3).train()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        torch.manual_seed(11)  # training-time randomness (DTFD pseudo-bags)
        head.bag_loss(head(x), y).backward()
        opt.step()
        with torch.no_grad():
            return head.eval()(x).logits

    assert torch.equal(one_step(), one_step())


@pytest.mark.parametrize("name", [n for n in HEADS if create_mil_head(n, 4, 2).permutation_invariant])
def test_permutation_invariance(name: str) -> None:
    head = make(name).eval()
    x = torch.randn(300, IN_DIM)
    perm = torch.randperm(300)
    with torch.no_grad():
        a, b = head(x), head(x[perm])
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        if a.attention is not None:
            assert b.attention is not None
            torch.testing.assert_close(a.attention[perm], b.attention, rtol=1e-5, atol=1e-6)


def test_transmil_is_order_sensitive() -> None:
    # PPEG sees the bag order: documented as not permutation-invariant; make sure the flag tells the truth.
    head = make("transmil").eval()
    x = torch.randn(300, IN_DIM)
    with torch.no_grad():
        assert not torch.allclose(head(x).logits, head(x.flip(0)).logits, atol=1e-6)


@pytest.mark.parametrize("name", ["abmil", "dtfd"])
def test_icmil_identity_attention_heads(name: str) -> None:
    # Bag logit = sum_k a_k (W h_k + b): the head on one instance's DimRed feature is the instance teacher.
    # DTFD (AFS): tier-2 logit = W2 sum_k a2_k sum_i a1_i h_i + b2 = sum_i (a1_i a2_k(i)) (W2 h_i + b2).
    head = make(name, n_classes=3).eval()
    x = torch.randn(123, IN_DIM, dtype=torch.float64)
    head = head.double()
    with torch.no_grad():
        out = head(x)
        assert out.attention is not None
        torch.testing.assert_close(
            out.logits, out.attention @ head.instance_logits(x), rtol=1e-10, atol=1e-10
        )


def test_icmil_identity_maxpool() -> None:
    head = make("maxpool", n_classes=3).eval()
    x = torch.randn(77, IN_DIM)
    with torch.no_grad():
        assert torch.equal(head(x).logits, head.instance_logits(x).max(dim=0).values)


def test_dtfd_tier_blend_and_distill_options() -> None:
    x = torch.randn(60, IN_DIM)
    plain = make("dtfd").eval()
    blend = make("dtfd", tier_blend=True).eval()
    with torch.no_grad():
        h = plain.instance_embed(x)
        expected = 0.7 * plain.classifier2(h) + 0.3 * plain.classifier1(h)
        torch.testing.assert_close(blend.instance_logits(x), expected)
        s = plain.attention_scores(x)
        assert ((s > 0) & (s < 1)).all()
    for distill in ("maxs", "maxmins"):
        head = make("dtfd", distill=distill).train()
        out = head(x)
        assert out.extras["tier1_logits"].shape == (5, 2)
        head.bag_loss(out, torch.tensor(0)).backward()
    with pytest.raises(ConfigError, match="distill: Input should be 'afs', 'maxs' or 'maxmins'"):
        make("dtfd", distill="bogus")


def test_dtfd_tier2_is_fed_detached_features() -> None:
    head = make("dtfd").train()
    out = head(torch.randn(30, IN_DIM))
    # Tier-2 loss alone must not reach the trunk or tier-1 attention.
    torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([1])).backward()
    assert head.dimred[0].weight.grad is None and head.attention1.score.weight.grad is None
    assert head.attention2.score.weight.grad is not None


def test_transmil_teachers() -> None:
    head = make("transmil").eval()
    x = torch.randn(20, IN_DIM)
    with torch.no_grad():
        single = head.instance_logits(x)
        # The default teacher IS TransMIL on a bag of one patch, batched over patches.
        one_by_one = torch.stack([head(x[i : i + 1]).logits for i in range(20)])
        torch.testing.assert_close(single, one_by_one, rtol=1e-5, atol=1e-5)
    token = make("transmil", teacher="token_head").eval()
    with torch.no_grad():
        tokens = token.instance_logits(x)
        assert tokens.shape == (20, 2) and not torch.allclose(tokens, single)
    with pytest.raises(ConfigError, match="teacher: Input should be 'single_instance' or 'token_head'"):
        make("transmil", teacher="bogus")


def test_landmark_means_use_only_real_rows() -> None:
    t = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1)
    # 10 rows into 4 segments: sizes 3,2,3,2 (never a padding row).
    means = landmark_means(t, 4).flatten().tolist()
    assert means == pytest.approx([1.0, 3.5, 6.0, 8.5])


def test_iterative_pinv_inverts_a_well_conditioned_matrix() -> None:
    a = torch.softmax(
        torch.randn(3, 16, 16, dtype=torch.float64) * 4 + torch.eye(16, dtype=torch.float64) * 6, -1
    )
    torch.testing.assert_close(iterative_pinv(a, 20), torch.linalg.inv(a), rtol=1e-6, atol=1e-6)


def test_nystrom_matches_exact_attention() -> None:
    torch.manual_seed(0)
    attn = NystromAttention(dim=32, heads=2, dim_head=16, landmarks=64, residual_kernel=0).double()
    # Smooth sequence (neighbouring tokens similar): the regime the landmark approximation is built for.
    x = torch.cumsum(torch.randn(1, 256, 32, dtype=torch.float64) * 0.2, dim=1)
    approx = attn(x)
    attn.landmarks = 10_000  # n <= landmarks -> the exact path
    exact = attn(x)
    rel = float((approx - exact).detach().norm() / exact.detach().norm())
    assert rel < 0.05, rel
    # More landmarks, better approximation.
    attn.landmarks = 16
    coarse = float((attn(x) - exact).detach().norm() / exact.detach().norm())
    assert rel < coarse


@pytest.mark.parametrize("name", HEADS)
def test_input_standardization_is_part_of_the_trunk_and_saved(name: str, tmp_path: Any) -> None:
    head = make(name).eval()
    x = torch.randn(7, IN_DIM) * 0.1 + 5.0
    mean, std = x.mean(0), x.std(0)
    assert head.set_feature_standardization(mean, std) >= 1
    # Standardising the input by hand and using identity statistics gives the same trunk and bag outputs.
    plain = make(name).eval()
    z = (x - mean) / std
    torch.testing.assert_close(head.instance_embed(x), plain.instance_embed(z))
    torch.testing.assert_close(head(x).logits, plain(z).logits)
    again = load_mil_head(save_mil_head(head, tmp_path / name))
    torch.testing.assert_close(again(x).logits, head(x).logits)
    # Statistics are buffers: nothing trains them.
    assert all("input_" not in n for n, _ in head.named_parameters())


def test_head_saved_before_standardization_loads_as_identity(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    head = make("abmil").eval()
    directory = save_mil_head(head, tmp_path / "old")
    weights = directory / "weights.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if "input_" not in k}
    save_file(state, str(weights))
    x = torch.randn(5, IN_DIM)
    torch.testing.assert_close(load_mil_head(directory)(x).logits, head(x).logits)
