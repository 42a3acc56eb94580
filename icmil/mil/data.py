"""Bags streamed from the per-slide HDF5 feature store, with a small LRU so a slide is not re-read at once.

Only ``cache_size`` bags are ever in memory (a Camelyon16 store of 50k x 1024 float32 bags is ~200 MB per
slide), so training scales with the largest slide, not with the cohort.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from icmil.features import write_features
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_features(d / "s1.h5", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), {})
    >>> store = BagStore(d, cache_size=2)
    >>> bag = store.load("s1")
    >>> tuple(bag.features.shape), store.missing(["s1", "s2"])["s2"].startswith("features file not found")
    ((3, 4), True)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from icmil.errors import FeatureStoreError
from icmil.features import read_features


@dataclass
class Bag:
    """One slide's bag: ``features`` (N, D) float32 tensor, ``coords`` (N, 2) level-0 top-left, file attrs."""

    slide_id: str
    features: torch.Tensor
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


def patch_size_level0(coords: np.ndarray, attrs: dict[str, Any]) -> float:
    """Patch edge in level-0 pixels: the ``patch_size_level0`` attr if present, else the grid step of the
    coordinates (patches are non-overlapping, so the smallest positive step along x or y), else the
    ``patch_size`` attr (correct when the slide is scanned at the target µm/px), else 256.
    """
    if attrs.get("patch_size_level0"):
        return float(attrs["patch_size_level0"])
    xy = np.asarray(coords).reshape(-1, 2)
    steps = []
    for axis in (0, 1):
        diffs = np.diff(np.unique(xy[:, axis]))
        diffs = diffs[diffs > 0]
        if len(diffs):
            steps.append(float(diffs.min()))
    if steps:
        return min(steps)
    return float(attrs.get("patch_size") or 256)


class BagStore:
    """Reads ``features_dir/<slide_id>.h5`` on demand and keeps the ``cache_size`` most recent bags.

    ``loaded`` lists every slide id read from disk, in order (tests use it to prove the test split is not
    read during model selection).
    """

    def __init__(self, features_dir: str | os.PathLike[str], cache_size: int = 4) -> None:
        self.features_dir = Path(features_dir)
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, Bag] = OrderedDict()
        self.loaded: list[str] = []
        # Slides whose file matched its checksum once: later epochs re-read them without hashing again.
        self._verified: set[str] = set()

    def path(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.h5"

    def load(self, slide_id: str) -> Bag:
        """The slide's bag (FeatureStoreError naming slide and file if it is missing or malformed)."""
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        path = self.path(slide_id)
        try:
            raw = read_features(path, verify=slide_id not in self._verified)
        except FeatureStoreError as err:
            raise FeatureStoreError(f"slide {slide_id!r}: {err}") from None
        if len(raw) == 0:
            raise FeatureStoreError(f"slide {slide_id!r}: {path} holds no patches (0 feature rows)")
        if not np.isfinite(raw.features).all():
            raise FeatureStoreError(
                f"slide {slide_id!r}: {path} contains NaN/inf features; re-embed this slide"
            )
        self._verified.add(slide_id)
        bag = Bag(slide_id, torch.from_numpy(raw.features), raw.coords, raw.attrs)
        self.loaded.append(slide_id)
        if self.cache_size:
            self._cache[slide_id] = bag
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return bag

    def shape(self, slide_id: str) -> tuple[int, int]:
        """(N, D) of the slide's features, read from the HDF5 header only."""
        path = self.path(slide_id)
        try:
            with h5py.File(path, "r") as h5:
                shape = h5["features"].shape
        except (OSError, KeyError) as err:
            raise FeatureStoreError(
                f"slide {slide_id!r}: cannot read features shape from {path}: {err}"
            ) from None
        if len(shape) == 3 and shape[0] == 1:  # TRIDENT/CLAM exports with a leading batch axis
            shape = shape[1:]
        if len(shape) != 2:
            raise FeatureStoreError(f"slide {slide_id!r}: {path} 'features' must be (N, D), got {shape}")
        return int(shape[0]), int(shape[1])

    def feature_dim(self, slide_id: str) -> int:
        """D of the slide's features, read from the HDF5 header only."""
        return self.shape(slide_id)[1]

    def unusable(self, slide_ids: Iterable[str]) -> dict[str, str]:
        """Slides that cannot be a bag, with a message naming the file: no features file, an unreadable
        one, or one with zero patches (a slide without tissue)."""
        ids = list(slide_ids)
        out = self.missing(ids)
        for sid in ids:
            if sid in out:
                continue
            try:
                n, _ = self.shape(sid)
            except FeatureStoreError as err:
                out[sid] = str(err)
                continue
            if n == 0:
                out[sid] = f"features file {self.path(sid)} holds no patches (0 rows; no tissue found?)"
        return out

    def feature_moments(self, slide_ids: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation over every patch of ``slide_ids`` (float64 sums, one
        bag in memory at a time), as float32 tensors ``(D,)`` — the statistics of the heads' input
        standardisation (:class:`icmil.mil.layers.DimRed`)."""
        total: torch.Tensor | None = None
        total_sq: torch.Tensor | None = None
        count = 0
        for sid in slide_ids:
            x = self.load(sid).features.to(torch.float64)
            s, sq = x.sum(0), (x * x).sum(0)
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += x.shape[0]
        if total is None or total_sq is None or count == 0:
            raise FeatureStoreError("feature statistics need at least one slide with patches")
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()

    def missing(self, slide_ids: Iterable[str]) -> dict[str, str]:
        """Slides whose features file does not exist, with a message naming the file."""
        out = {}
        for sid in slide_ids:
            path = self.path(sid)
            if not path.is_file():
                out[sid] = f"features file not found: {path} (embed this slide or drop it from the manifest)"
        return out
