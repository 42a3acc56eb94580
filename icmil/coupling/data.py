"""Patches for stage 2, read straight from the slides: training batches and the in-memory re-embedding of
validation slides used to select the student.

* :func:`slide_sources` turns manifest rows + the tiles folder into readable :class:`SlideSource` objects
  (a slide without tiles or that cannot be opened is reported and left out, as in embedding).
* :func:`build_pool` makes the :class:`PatchPool` of training patches and, when asked, what the frozen teacher
  thinks of each (from the round's features file: no patch is re-encoded).
* :class:`TrainBatches` is an ``IterableDataset`` of ready-made batches: each DataLoader worker owns a sampler
  (seeded by seed + worker id) and its own OpenSlide handles, so reading overlaps the model step.
* :class:`ValEmbedder` re-embeds the validation slides with the current student; the uint8 patches are kept
  in memory after the first pass when they fit ``cache_mb`` (every later evaluation then only runs the model).

Example:
    >>> sources, failures = slide_sources(manifest.split("train"), "run/tiles")  # doctest: +SKIP
    >>> pool = build_pool(sources, labels, head, features_dir="run/round_0/features")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from icmil.coupling.confidence import normalised_scores, raw_confidence_scores
from icmil.coupling.sampler import PatchPool, make_sampler
from icmil.errors import FeatureStoreError, ICMILError, SlideError
from icmil.log import get_logger
from icmil.mil.base import MILHead
from icmil.slides.patches import MultiSlideReader, SlideSource, patch_loader

log = get_logger("coupling")


@dataclass(frozen=True)
class CoordTiles:
    """A tiles record with a different set of coordinates (subsampled or restricted to embedded patches)."""

    coords: np.ndarray
    read_level: int
    read_size: int
    patch_size: int
    slide_id: str = ""


def with_coords(source: SlideSource, coords: np.ndarray) -> SlideSource:
    """The same slide restricted to ``coords`` (level-0 top-left, (N, 2))."""
    t = source.tiles
    tiles = CoordTiles(
        np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        int(t.read_level),
        int(t.read_size),
        int(t.patch_size),
        source.slide_id,
    )
    return SlideSource(source.slide_id, source.slide_path, tiles)


def slide_sources(
    rows: pd.DataFrame, tiles_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> tuple[list[SlideSource], dict[str, str]]:
    """Readable slides among ``rows`` (manifest rows): ``(sources, {slide_id: why it was left out})``."""
    from icmil.slides import localize, read_tiles

    tiles_root = Path(tiles_dir)
    cache = Path(cache_dir) if cache_dir is not None else None
    sources: list[SlideSource] = []
    failures: dict[str, str] = {}
    for row in rows.itertuples(index=False):
        sid = str(row.slide_id)
        path = tiles_root / f"{sid}.h5"
        try:
            if not path.is_file():
                raise SlideError(
                    sid, f"no tiles file {path}", hint="the slide failed tiling; see tiles/status.csv"
                )
            tiles = read_tiles(path)
            if len(tiles.coords) == 0:
                raise SlideError(sid, f"tiles file {path} holds no patches")
            local = localize(str(row.path), cache)
            sources.append(SlideSource(sid, str(local), tiles))
        except (ICMILError, OSError) as err:
            failures[sid] = str(err)
            log.warning("coupling: leaving out slide %r: %s", sid, err)
    return sources, failures


@torch.no_grad()
def teacher_scores_from_features(
    head: MILHead, features: np.ndarray, negative_class: int, device: torch.device, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of one slide: teacher P(not negative) and ã normalised within the slide, both (N,)."""
    scores, raw = [], []
    for start in range(0, len(features), chunk):
        f = torch.from_numpy(np.ascontiguousarray(features[start : start + chunk])).to(device)
        logits = head.instance_logits(f)
        scores.append((1.0 - logits.float().softmax(-1)[:, negative_class]).cpu())
        raw.append(raw_confidence_scores(head, f, logits, negative_class).cpu())
    raw_all = torch.cat(raw)
    return torch.cat(scores).numpy(), normalised_scores(raw_all).numpy()


def build_pool(
    sources: Sequence[SlideSource],
    labels: Mapping[str, int],
    head: MILHead | None = None,
    features_dir: str | os.PathLike[str] | None = None,
    *,
    encoder_digest: str | None = None,
    negative_class: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[PatchPool, list[SlideSource]]:
    """The training pool. With ``head`` + ``features_dir`` the pool uses the features' coordinates (so patches
    that failed embedding are left out) and carries the teacher's per-patch score and per-slide ã.

    ``encoder_digest``: the teacher encoder's digest; features made by another encoder are refused, because
    the teacher's view of a patch must come from the teacher itself. Returns the pool and the sources with
    coordinates aligned to it (pool row ``i`` reads ``sources[slide_index[i]].tiles.coords[patch_index[i]]``).
    """
    from icmil.features import read_features

    slide_ids: list[str] = []
    slide_labels: list[int] = []
    parts_slide: list[np.ndarray] = []
    parts_coords: list[np.ndarray] = []
    parts_score: list[np.ndarray] = []
    parts_conf: list[np.ndarray] = []
    aligned: list[SlideSource] = []
    dev = torch.device(device)
    for src in sources:
        coords = np.asarray(src.tiles.coords, dtype=np.int64)
        if head is not None and features_dir is not None:
            fpath = Path(features_dir) / f"{src.slide_id}.h5"
            if not fpath.is_file():
                log.warning(
                    "coupling: no features file %s; slide %r left out of the pool", fpath, src.slide_id
                )
                continue
            bag = read_features(fpath)
            have = bag.attrs.get("encoder_digest")
            if encoder_digest is not None and have is not None and str(have) != encoder_digest:
                raise FeatureStoreError(
                    f"{fpath} was embedded by encoder {have} but the teacher encoder is {encoder_digest}: the "
                    "features must come from the same round as the encoder and head being coupled"
                )
            coords = np.asarray(bag.coords, dtype=np.int64)
            score, conf = teacher_scores_from_features(head, bag.features, negative_class, dev)
            parts_score.append(score)
            parts_conf.append(conf)
        i = len(slide_ids)
        slide_ids.append(src.slide_id)
        slide_labels.append(int(labels[src.slide_id]))
        parts_slide.append(np.full(len(coords), i, dtype=np.int64))
        parts_coords.append(coords)
        aligned.append(with_coords(src, coords))
    if not slide_ids:
        raise ICMILError("coupling: no training slide has tiles (and features); nothing to fine-tune on")
    slide_index = np.concatenate(parts_slide)
    pool = PatchPool(
        slide_ids=slide_ids,
        slide_labels=np.asarray(slide_labels, dtype=np.int64),
        slide_index=slide_index,
        patch_index=np.concatenate([np.arange(len(c)) for c in parts_coords]).astype(np.int64),
        coords=np.concatenate(parts_coords),
        teacher_score=np.concatenate(parts_score) if parts_score else None,
        slide_confidence=np.concatenate(parts_conf) if parts_conf else None,
    )
    return pool, aligned


class TrainBatches(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Endless stream of ``(pool indices (B,), uint8 patches (B, 3, S, S))`` from the configured sampler."""

    def __init__(
        self,
        pool: PatchPool,
        sources: Sequence[SlideSource],
        batch_size: int,
        balanced: bool,
        seed: int,
        positive_fraction: float = 0.5,
        max_open: int = 16,
    ) -> None:
        self.pool, self.sources = pool, list(sources)
        self.batch_size, self.balanced, self.seed = batch_size, balanced, seed
        self.positive_fraction, self.max_open = positive_fraction, max_open

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sampler = make_sampler(
            self.pool, self.batch_size, self.balanced, self.seed * 1009 + worker, self.positive_fraction
        )
        reader = MultiSlideReader(self.sources, max_open=self.max_open, merge_reads=1)
        try:
            while True:
                idx = sampler.sample()
                pairs = list(
                    zip(self.pool.slide_index[idx].tolist(), self.pool.patch_index[idx].tolist(), strict=True)
                )
                patches = reader.read_pairs(pairs)
                yield torch.from_numpy(idx), torch.from_numpy(np.ascontiguousarray(patches))
        finally:
            reader.close()


def train_loader(dataset: TrainBatches, num_workers: int, pin_memory: bool) -> DataLoader[Any]:
    """DataLoader over ready-made batches (``batch_size=None``: no per-patch collate)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": 2, "persistent_workers": False}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


class ValEmbedder:
    """Re-embeds a fixed set of slides with a given encoder, in memory (features never touch the disk).

    ``max_patches`` caps the patches per slide (a fixed, seeded subset, the same at every evaluation).
    ``cache_mb``: keep the decoded uint8 patches after the first pass when they fit in this many MiB.
    """

    def __init__(
        self,
        sources: Sequence[SlideSource],
        batch_size: int,
        num_workers: int,
        device: torch.device,
        *,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        max_patches: int | None = None,
        cache_mb: float = 512.0,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.sources: list[SlideSource] = []
        for src in sources:
            coords = np.asarray(src.tiles.coords)
            if max_patches is not None and len(coords) > max_patches:
                keep = np.sort(rng.choice(len(coords), size=max_patches, replace=False))
                src = with_coords(src, coords[keep])
            self.sources.append(src)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        n_bytes = sum(s.n_patches * 3 * int(s.tiles.patch_size) ** 2 for s in self.sources)
        self._use_cache = n_bytes <= cache_mb * 2**20
        self._cache: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self.failures: dict[str, str] = {}

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.sources]

    def _batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        filling: list[tuple[int, torch.Tensor, torch.Tensor]] | None = [] if self._use_cache else None
        loader = patch_loader(
            self.sources,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            on_corrupt="skip",
        )
        for item in loader:
            slide = int(item["slide"])
            if item["error"]:
                self.failures[self.sources[slide].slide_id] = str(item["error"])
                continue
            entry = (slide, item["patches"], item["ok"])
            if filling is not None:
                filling.append(entry)
            yield entry
        if filling is not None:
            self._cache = filling

    @torch.no_grad()
    def embed(self, encoder: torch.nn.Module) -> dict[str, np.ndarray]:
        """``{slide_id: features (N, D) float32}`` for every slide that could be read."""
        was_training = encoder.training
        encoder.eval()
        parts: dict[int, list[np.ndarray]] = {}
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with autocast:
                for slide, patches, ok in self._batches():
                    if not bool(ok.any()):
                        continue
                    x = patches[ok].to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                    if not self.channels_last:
                        x = x.contiguous()
                    parts.setdefault(slide, []).append(encoder(x).float().cpu().numpy())
        finally:
            encoder.train(was_training)
        return {
            self.sources[i].slide_id: np.concatenate(chunks)
            for i, chunks in sorted(parts.items())
            if self.sources[i].slide_id not in self.failures
        }
