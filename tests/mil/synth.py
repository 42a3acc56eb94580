"""Tiny synthetic feature cohorts written in the feature-store layout (for the MIL tests only).

Negative bags hold Gaussian noise; a bag of class k >= 1 gets 1-3 "lesion" instances shifted along that
class's own feature directions. Lesion instances sit in one corner block of the patch grid, and
``lesions.json``-style boxes cover exactly those patches, so patch-level AUC can be checked too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icmil.features import write_features

PATCH = 256


def make_cohort(
    root: Path,
    n_per_split: dict[str, int] | None = None,
    dim: int = 16,
    n_classes: int = 2,
    shift: float = 3.0,
    lesion_instances: tuple[int, int] = (1, 3),
    seed: int = 0,
) -> tuple[Path, Path, dict[str, list[list[float]]]]:
    """Write ``root/features/<id>.h5`` and ``root/manifest.csv``; return (manifest, features dir, lesion boxes)."""
    rng = np.random.default_rng(seed)
    n_per_split = n_per_split or {"train": 40, "val": 12, "test": 16}
    feats_dir = root / "features"
    rows, lesions = [], {}
    names = ["normal", "tumor"] if n_classes == 2 else [f"c{k}" for k in range(n_classes)]
    i = 0
    for split, count in n_per_split.items():
        for j in range(count):
            sid = f"{split}{j:03d}"
            label = j % n_classes
            n = int(rng.integers(20, 60))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            side = int(np.ceil(np.sqrt(n)))
            cells = rng.permutation(side * side)[:n]
            coords = np.stack([cells % side, cells // side], axis=1) * PATCH
            boxes: list[list[float]] = []
            if label:
                k = int(rng.integers(lesion_instances[0], lesion_instances[1] + 1))
                # Lesion instances: the k patches closest to the top-left corner (one box around them).
                lesion = np.argsort(coords.sum(axis=1), kind="stable")[:k]
                dims = slice(4 * (label - 1), 4 * label)
                x[lesion, dims] += shift
                for c in coords[lesion]:
                    boxes.append([float(c[0]), float(c[1]), float(c[0] + PATCH), float(c[1] + PATCH)])
            write_features(feats_dir / f"{sid}.h5", x, coords, {"slide_id": sid, "patch_size": PATCH})
            rows.append(f"{sid},slides/{sid}.tiff,{names[label]},{split}")
            lesions[sid] = boxes
            i += 1
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    return manifest, feats_dir, lesions
