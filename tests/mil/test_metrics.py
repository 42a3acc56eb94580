"""Metrics against sklearn, thresholds chosen on validation only, bootstrap CI, patch-level AUC, plots, Lookahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from icmil.config import MILConfig
from icmil.mil import (
    Lookahead,
    bootstrap_auc_ci,
    build_optimizer,
    classification_metrics,
    multiclass_auc,
    patch_in_lesion,
    patch_level_auc,
    plot_heatmap,
    plot_roc,
    youden_threshold,
)
from icmil.mil.resume import flatten_state, unflatten_state


def test_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1).round(2)  # rounded: ties exercise the 1/2 rule
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, threshold=0.4)
    pred = (p1 >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    tpred = (p1 >= 0.4).astype(int)
    assert m["balanced_accuracy_at_threshold"] == pytest.approx(balanced_accuracy_score(y, tpred))
    assert m["f1_at_threshold"] == pytest.approx(f1_score(y, tpred))


def test_multiclass_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    # A class absent from y is left out of the macro AUC instead of making it undefined.
    keep = y != 2
    assert multiclass_auc(y[keep], probs[keep]) == pytest.approx(
        np.mean([roc_auc_score(y[keep] == c, probs[keep, c]) for c in (0, 1)])
    )


def test_single_class_auc_is_nan_not_an_error() -> None:
    m = classification_metrics([1, 1, 1], np.array([[0.2, 0.8]] * 3))
    assert np.isnan(m["auc"]) and m["accuracy"] == 1.0


def test_youden_threshold_separates_validation_data() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.35
    assert (
        classification_metrics(y, np.stack([1 - p, p], 1), threshold=t)["balanced_accuracy_at_threshold"]
        == 1.0
    )
    assert youden_threshold(np.ones(3), np.array([0.1, 0.5, 0.9])) == 0.5


def test_bootstrap_ci_is_seeded_and_brackets_the_auc() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(y * 0.4 + rng.random(80) * 0.6, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    ci = bootstrap_auc_ci(y, probs, n_boot=300, seed=5)
    assert ci == bootstrap_auc_ci(y, probs, n_boot=300, seed=5)
    assert ci != bootstrap_auc_ci(y, probs, n_boot=300, seed=6)
    assert ci[0] < roc_auc_score(y, p1) < ci[1] and ci[1] - ci[0] < 0.3
    assert all(np.isnan(bootstrap_auc_ci(np.ones(10), probs[:10], n_boot=50)))


def test_patch_in_lesion_half_area_rule_and_box_union() -> None:
    coords = np.array([[0, 0], [128, 0], [129, 0], [1000, 1000], [500, 500]])
    boxes = [[0, 0, 256, 256], [500, 500, 628, 756], [628, 500, 756, 756]]
    got = patch_in_lesion(coords, 256, boxes)
    # fully in; exactly 50 % in; just under 50 %; outside; two adjacent boxes covering it together
    assert got.tolist() == [True, True, False, False, True]


def test_patch_level_auc_pools_slides_and_skips_unknown_ones() -> None:
    scores = {"a": np.array([0.9, 0.2, 0.1]), "b": np.array([0.3, 0.8]), "c": np.array([0.0])}
    coords = {
        "a": np.array([[0, 0], [256, 0], [512, 0]]),
        "b": np.array([[0, 0], [256, 0]]),
        "c": np.array([[0, 0]]),
    }
    boxes = {"a": [[0, 0, 256, 256]], "b": [[256, 0, 512, 256]]}  # "c" has no ground truth: skipped
    assert patch_level_auc(scores, coords, 256, boxes) == 1.0
    # No lesion anywhere -> a single class -> NaN (not an error).
    assert np.isnan(patch_level_auc(scores, coords, {"a": 256, "b": 256}, {"a": [], "b": []}))
    with pytest.raises(ValueError, match="slide 'a'"):
        patch_level_auc({"a": np.zeros(2)}, coords, 256, boxes)


def test_plots_write_pngs(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 1, 0, 2])
    probs = np.eye(3)[y] * 0.6 + 0.4 / 3
    assert (
        plot_roc({"val": (y, probs), "test": (y, probs)}, tmp_path / "roc.png", ["a", "b", "c"])
        .stat()
        .st_size
    )
    xy = np.array([[0, 0], [256, 0], [0, 256], [512, 512]])
    out = plot_heatmap(xy, np.array([1.0, 2, 3, 4]), 256, tmp_path / "h.png", lesion_boxes=[[0, 0, 300, 300]])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lookahead_with_k1_alpha1_is_the_inner_optimiser_and_resumes_exactly() -> None:
    def run(make: str, steps: int, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4))
        inner = torch.optim.RAdam([p], lr=0.1)
        opt: torch.optim.Optimizer = Lookahead(inner, k=1, alpha=1.0) if make == "la1" else inner
        if make == "la":
            opt = Lookahead(inner, k=3, alpha=0.5)
        if state is not None:
            with torch.no_grad():
                p.copy_(state["p"])
            opt.load_state_dict(state["opt"])
        for _ in range(steps):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
        return p.detach().clone(), {"p": p.detach().clone(), "opt": opt.state_dict()}

    plain, _ = run("plain", 7)
    la1, _ = run("la1", 7)
    torch.testing.assert_close(plain, la1)
    full, _ = run("la", 8)
    _, half = run("la", 4)
    skeleton, tensors = flatten_state(half["opt"])  # through the checkpoint encoding
    half["opt"] = unflatten_state(skeleton, tensors)
    resumed, _ = run("la", 4, half)
    torch.testing.assert_close(full, resumed)
    assert not torch.allclose(full, plain)


def test_optimiser_defaults_follow_method_md() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    for head, lr in (("abmil", 2e-4), ("maxpool", 1e-4), ("dtfd", 1e-4)):
        opt = build_optimizer(head, p, MILConfig(head=head))
        assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == lr
        assert opt.param_groups[0]["weight_decay"] == 1e-4
    opt = build_optimizer("transmil", p, MILConfig(head="transmil"))
    assert isinstance(opt, Lookahead) and isinstance(opt.inner, torch.optim.RAdam)
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["weight_decay"] == 1e-5
    assert build_optimizer("abmil", p, MILConfig(lr=3e-3)).param_groups[0]["lr"] == 3e-3


def test_heatmap_uses_the_slide_thumbnail_when_readable(tmp_path: Path) -> None:
    from icmil.config import SynthConfig
    from icmil.mil.plots import _thumbnail
    from icmil.slides import write_synthetic_slide

    slide = tmp_path / "s.tiff"
    write_synthetic_slide(slide, SynthConfig(), seed=1, positive=False, width=1024, height=768)
    thumb = _thumbnail(str(slide), "s")
    assert thumb is not None and thumb[1] == (1024, 768) and thumb[0].ndim == 3
    assert _thumbnail(str(tmp_path / "missing.tiff"), "m") is None
    xy = np.array([[0, 0], [256, 256]])
    assert plot_heatmap(xy, np.array([0.0, 1.0]), 256, tmp_path / "h.png", slide_path=str(slide)).is_file()
