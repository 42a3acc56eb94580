"""PNG plots for a trained head: ROC curves and attention heatmaps over the slide thumbnail (matplotlib Agg).

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> y = np.array([0, 1, 0, 1]); p = np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7]])
    >>> plot_roc({"test": (y, p)}, d / "roc.png").is_file()
    True
    >>> xy = np.array([[0, 0], [256, 0], [0, 256]])
    >>> plot_heatmap(xy, np.array([0.1, 0.9, 0.5]), 256, d / "h.png", title="s1").is_file()
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # headless: pipeline pods and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_curve

from icmil.io import atomic_path
from icmil.log import get_logger

log = get_logger("mil.plots")
THUMBNAIL_PX = 1024


def _save(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(out)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    out: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
) -> Path:
    """ROC curves, one per split name: ``{"val": (y_true, probs (n, C)), "test": ...}``.

    Binary: the curve of class 1. Multi-class: one one-vs-rest curve per class for each split.
    Splits whose labels hold a single class are listed in the legend as "undefined".
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for split, (y_true, probs) in curves.items():
        y = np.asarray(y_true).astype(int)
        p = np.asarray(probs, dtype=float)
        targets = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
        for c in targets:
            yc = (y == c).astype(int)
            name = split if len(targets) == 1 else f"{split} {classes[c] if classes else c}"
            if len(np.unique(yc)) < 2:
                ax.plot([], [], label=f"{name} (undefined: one class)")
                continue
            fpr, tpr, _ = roc_curve(yc, p[:, c])
            auc = float(np.trapezoid(tpr, fpr))
            ax.plot(fpr, tpr, lw=2, label=f"{name} AUC={auc:.3f}")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out)


def _thumbnail(slide_path: str | None, slide_id: str) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(RGB thumbnail, level-0 (width, height)) or None when the slide is not a readable local file here
    (remote ``s3://`` slides are not downloaded just for a picture)."""
    if not slide_path or slide_path.startswith("s3://") or not Path(slide_path).is_file():
        return None
    from icmil.slides import open_slide  # lazy: OpenSlide is only needed for pictures

    try:
        slide = open_slide(slide_path, slide_id)
        try:
            thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_PX, THUMBNAIL_PX)).convert("RGB"))
            dims = slide.dimensions
        finally:
            slide.close()
        return thumb, (int(dims[0]), int(dims[1]))
    except Exception as err:  # a heatmap must never fail training: fall back to a plain canvas
        log.warning("slide %r: no thumbnail for the heatmap (%s); drawing on a plain canvas", slide_id, err)
        return None


def plot_heatmap(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    out: str | os.PathLike[str],
    slide_path: str | None = None,
    slide_id: str = "",
    title: str = "",
    lesion_boxes: Sequence[Sequence[float]] | None = None,
    scale: Literal["minmax", "absolute", "rank"] = "minmax",
    label: str | None = None,
) -> Path:
    """Per-patch scores drawn over the slide thumbnail, or over a plain canvas sized to the coordinates when
    the slide is not readable here. Lesion boxes (level 0), if given, are outlined.

    ``scale``: ``minmax`` stretches the slide's own range to 0-1 (attention weights, which have no absolute
    scale); ``absolute`` draws probabilities as they are on a fixed 0-1 colour bar, so a normal slide stays
    cold; ``rank`` draws each patch's percentile rank within the slide. ``label`` names the colour bar.
    """
    xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    s = np.asarray(scores, dtype=float).reshape(-1)
    size = float(patch_size_level0)
    norm = _scaled(s, scale)
    thumb = _thumbnail(slide_path, slide_id)
    if thumb is not None:
        image, (width, height) = thumb
    else:
        image = None
        width = int(xy[:, 0].max() + size) if len(xy) else int(size)
        height = int(xy[:, 1].max() + size) if len(xy) else int(size)
    # One raster cell per patch position: an imshow of a NaN-filled grid draws 50k patches in one call.
    cols, rows = max(1, int(np.ceil(width / size))), max(1, int(np.ceil(height / size)))
    grid = np.full((rows, cols), np.nan)
    if len(xy):
        ci = np.clip((xy[:, 0] // size).astype(int), 0, cols - 1)
        ri = np.clip((xy[:, 1] // size).astype(int), 0, rows - 1)
        grid[ri, ci] = norm
    aspect = height / max(width, 1)
    fig, ax = plt.subplots(figsize=(8, max(2.0, 8 * aspect)))
    if image is not None:
        ax.imshow(image, extent=(0, width, height, 0))
    else:
        ax.add_patch(Rectangle((0, 0), width, height, color="0.95"))
    shown = ax.imshow(
        grid,
        extent=(0, cols * size, rows * size, 0),
        cmap="jet",
        alpha=0.5,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    for x0, y0, x1, y1 in lesion_boxes or []:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", lw=1.5))
    ax.set(xlim=(0, width), ylim=(height, 0), title=title or slide_id)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, fraction=0.03, label=label or _SCALE_LABELS[scale])
    return _save(fig, out)


_SCALE_LABELS = {
    "minmax": "score (min-max)",
    "absolute": "probability (absolute 0-1)",
    "rank": "percentile rank within the slide",
}


def _scaled(s: np.ndarray, scale: str) -> np.ndarray:
    """Scores mapped to 0-1 for the colour map (see :func:`plot_heatmap`)."""
    if scale == "absolute":
        return np.clip(s, 0.0, 1.0)
    if scale == "rank":
        if len(s) < 2:
            return np.full_like(s, 0.5)
        order = s.argsort(kind="stable").argsort(kind="stable")
        return order / (len(s) - 1)
    if scale != "minmax":
        raise ValueError(f"heatmap scale must be minmax, absolute or rank, not {scale!r}")
    span = s.max() - s.min() if len(s) else 0.0
    return (s - s.min()) / span if span > 0 else np.full_like(s, 0.5)
