"""Reading patches straight from a slide: one OpenSlide handle per process, batched reads, reopen on failure.

* :class:`PatchReader` reads patches of one slide at the tiles' read level and size, resizes them to the output
  patch size with OpenCV (``INTER_AREA``, no PIL per patch) and returns uint8 ``(B, 3, S, S)``. Runs of
  neighbouring coordinates (in the order given) are fetched with ONE ``read_region`` and cut up.
* Corrupt tiles: after the first failed tile read an OpenSlide handle is broken for good, so the reader reopens
  the slide and retries once. A patch that still fails is corrupt: :meth:`PatchReader.read` raises a
  :class:`SlideError` naming the slide, the level-0 coordinates and the cause; :meth:`PatchReader.read_checked`
  instead returns a validity mask and records the patch in :attr:`PatchReader.corrupt` (the embedding stage's
  ``on_corrupt_patch=skip`` mode). Either way the problem is visible, never silently swallowed.
* :func:`patch_loader` (sequential batches over one or many slides, for embedding) and
  :func:`patch_pair_loader` (random ``(slide, patch)`` pairs, for the coupling stage) are DataLoaders whose
  workers each open their own handles lazily (handles cannot be pickled). :class:`MultiSlideReader` gives
  the same random access in the current process.

Arrays come back as a ``(B, 3, S, S)`` view of an NHWC buffer: ``torch.from_numpy`` of it is already a
``channels_last`` tensor, so no transpose copy is made on the CPU.

Example:
    >>> reader = PatchReader("slide.tiff", read_tiles("tiles/slide.h5"))  # doctest: +SKIP
    >>> reader.read(reader.tiles.coords[:4]).shape  # doctest: +SKIP
    (4, 3, 256, 256)
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from icmil.errors import SlideError

OnCorrupt = Literal["error", "skip"]
# What a broken tile or handle raises: OpenSlideError from the C library, OSError from file access.
_READ_ERRORS: tuple[type[BaseException], ...] = (openslide.OpenSlideError, OSError)


class TileSpec(Protocol):
    """What a reader needs from ``icmil.slides.read_tiles(...)`` (the ``Tiles`` dataclass fits)."""

    @property
    def coords(self) -> np.ndarray: ...  # (N, 2) int64, level-0 top-left x, y

    @property
    def read_level(self) -> int: ...

    @property
    def read_size(self) -> int: ...

    @property
    def patch_size(self) -> int: ...


def _open(path: str, slide_id: str) -> openslide.OpenSlide:
    from icmil.slides.access import open_slide  # late: icmil.slides.__init__ may import this module

    return open_slide(path, slide_id)


class PatchReader:
    """Patches of one slide, read at ``tiles.read_level`` / ``tiles.read_size`` and resized to ``tiles.patch_size``.

    The handle opens lazily in the process that first reads (and again after a fork), so a reader can be
    built in the main process and handed to DataLoader workers.

    >>> reader = PatchReader("s1.tiff", tiles, slide_id="s1")  # doctest: +SKIP
    >>> patches = reader.read(tiles.coords[:8])  # uint8 (8, 3, S, S)  # doctest: +SKIP
    """

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        tiles: TileSpec,
        slide_id: str | None = None,
        *,
        merge_reads: int = 8,
    ) -> None:
        self.slide_path = str(slide_path)
        self.tiles = tiles
        self.slide_id = slide_id or getattr(tiles, "slide_id", None) or Path(self.slide_path).stem
        self.level = int(tiles.read_level)
        self.read_size = int(tiles.read_size)
        self.patch_size = int(tiles.patch_size)
        self.merge_reads = max(1, int(merge_reads))
        self.corrupt: list[tuple[int, int, str]] = []  # (x, y, cause) of patches that could not be read
        self.reopens = 0
        self._handle: openslide.OpenSlide | None = None
        self._pid = -1
        self._step = 0  # level-0 distance between neighbouring patches

    # -- handle management -------------------------------------------------------------------------------

    def _slide(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            self._check_unchanged()
            self._handle = _open(self.slide_path, self.slide_id)
            self._pid = os.getpid()
            if self.level >= self._handle.level_count:
                raise SlideError(
                    self.slide_id,
                    f"tiles ask for read level {self.level} but the slide has {self._handle.level_count} level(s)",
                    hint="the tiles file does not belong to this slide; re-run tiling",
                )
            self._step = round(self.read_size * float(self._handle.level_downsamples[self.level]))
        return self._handle

    def _check_unchanged(self) -> None:
        """The tiles were made for particular slide bytes; reading a replaced file would give wrong patches."""
        expected = str(getattr(self.tiles, "slide_digest", "") or "")
        if not expected or not os.path.exists(self.slide_path):
            return  # no digest recorded (foreign tiles), or missing: opening reports that
        from icmil.slides.access import slide_digest

        current = slide_digest(self.slide_path)
        if current != expected:
            raise SlideError(
                self.slide_id,
                f"the slide file {self.slide_path} changed after it was tiled (tiles record digest "
                f"{expected[:12]}..., the file now has {current[:12]}...)",
                hint="re-run tiling, which re-tiles changed slides, then the stages after it",
            )

    def reopen(self) -> None:
        """Drop the (possibly broken) handle and open the slide again."""
        self.close()
        self.reopens += 1
        self._slide()

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):  # a broken handle may fail to close; it is dropped anyway
                self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        # OpenSlide handles cannot be pickled: workers (spawn) reopen lazily.
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if "_handle" in self.__dict__:  # __init__ may have failed before the handle slot existed
            self.close()

    # -- reading -----------------------------------------------------------------------------------------

    def _region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at the read level; pixels outside the slide (alpha < 255) become white."""
        slide = self._slide()
        try:
            rgba = np.asarray(slide.read_region((int(x), int(y)), self.level, (int(w), int(h))))
        except _READ_ERRORS:
            # The handle is now broken for every later call: reopen, then retry exactly once.
            self.reopen()
            rgba = np.asarray(self._slide().read_region((int(x), int(y)), self.level, (int(w), int(h))))
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        # OpenSlide returns un-premultiplied RGBA with alpha 0 outside the scanned area: composite on white.
        a = alpha[..., None].astype(np.uint16)
        rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)

    def _runs(self, coords: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """Yield (start, stop, dx, dy): consecutive coords forming a straight row/column of neighbours."""
        n, step, i = len(coords), self._step, 0
        while i < n:
            j, dx, dy = i + 1, 0, 0
            if j < n and self.merge_reads > 1:
                d = coords[j] - coords[i]
                if (d[0] == step and d[1] == 0) or (d[0] == 0 and d[1] == step):
                    dx, dy = int(d[0]), int(d[1])
                    while (
                        j < n and j - i < self.merge_reads and (coords[j] - coords[j - 1] == (dx, dy)).all()
                    ):
                        j += 1
            yield i, j, dx, dy
            i = j

    def _put(self, out: np.ndarray, b: int, patch: np.ndarray) -> None:
        if self.read_size == self.patch_size:
            out[b] = patch
        else:
            out[b] = cv2.resize(patch, (self.patch_size, self.patch_size), interpolation=cv2.INTER_AREA)

    def _read_one(self, out: np.ndarray, b: int, x: int, y: int) -> str | None:
        """Read one patch into ``out[b]``; return the failure cause (after reopen + retry) or None."""
        try:
            self._put(out, b, self._region(x, y, self.read_size, self.read_size))
            return None
        except _READ_ERRORS as err:
            self.reopen()  # leave a working handle for the next patches
            return f"{type(err).__name__}: {err}"

    def read_checked(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read patches; corrupt ones are zero-filled, flagged False in the mask and recorded in :attr:`corrupt`.

        Returns ``(patches uint8 (B, 3, S, S), ok bool (B,))``. Raises ``SlideError`` only when the slide
        itself cannot be opened.
        """
        xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n, r, s = len(xy), self.read_size, self.patch_size
        nhwc = np.empty((n, s, s, 3), dtype=np.uint8)
        ok = np.ones(n, dtype=bool)
        self._slide()
        for start, stop, dx, dy in self._runs(xy):
            x0, y0 = int(xy[start, 0]), int(xy[start, 1])
            k = stop - start
            if k > 1:
                try:
                    region = self._region(x0, y0, r * k if dx else r, r * k if dy else r)
                except _READ_ERRORS:
                    self.reopen()
                    region = None  # some tile of the run is bad: fall back to single reads to find which
                if region is not None:
                    for j in range(k):
                        patch = region[:, j * r : (j + 1) * r] if dx else region[j * r : (j + 1) * r]
                        self._put(nhwc, start + j, patch)
                    continue
            for b in range(start, stop):
                cause = self._read_one(nhwc, b, int(xy[b, 0]), int(xy[b, 1]))
                if cause is not None:
                    ok[b] = False
                    nhwc[b] = 0
                    self.corrupt.append((int(xy[b, 0]), int(xy[b, 1]), cause))
        return nhwc.transpose(0, 3, 1, 2), ok

    def read(self, coords: np.ndarray) -> np.ndarray:
        """Read patches as uint8 ``(B, 3, S, S)``; a corrupt patch raises ``SlideError`` naming it."""
        patches, ok = self.read_checked(coords)
        if not ok.all():
            x, y, cause = self.corrupt[-int((~ok).sum())]
            raise corrupt_patch_error(self.slide_id, x, y, self.level, cause)
        return patches


def corrupt_patch_error(slide_id: str, x: int, y: int, level: int, cause: str) -> SlideError:
    """The error for a patch that failed after reopening the slide and retrying."""
    return SlideError(
        slide_id,
        f"patch at level-0 (x={x}, y={y}), read level {level}, is unreadable after reopening the slide: {cause}",
        hint="the slide file is corrupt there; re-export or re-scan it, or set embed.on_corrupt_patch=skip "
        "to drop and record such patches",
    )


# --------------------------------------------------------------------------- many slides, random access


@dataclass(frozen=True)
class SlideSource:
    """A picklable description of one slide to read from (local path + its tiles)."""

    slide_id: str
    slide_path: str
    tiles: Any  # a TileSpec (icmil.slides.Tiles)

    @property
    def n_patches(self) -> int:
        return len(self.tiles.coords)


class MultiSlideReader:
    """Random access to patches of many slides: keeps up to ``max_open`` handles (least recently used closed).

    >>> reader = MultiSlideReader(sources)  # doctest: +SKIP
    >>> reader.read_pairs([("s1", 0), ("s2", 17)]).shape  # (slide_id or index, patch index) pairs  # doctest: +SKIP
    (2, 3, 256, 256)
    """

    def __init__(self, sources: Sequence[SlideSource], max_open: int = 8, merge_reads: int = 8) -> None:
        self.sources = list(sources)
        self.index = {s.slide_id: i for i, s in enumerate(self.sources)}
        self.max_open, self.merge_reads = max(1, max_open), merge_reads
        self._readers: OrderedDict[int, PatchReader] = OrderedDict()

    def reader(self, slide: int | str) -> PatchReader:
        i = self.index[slide] if isinstance(slide, str) else int(slide)
        rd = self._readers.get(i)
        if rd is None:
            src = self.sources[i]
            rd = PatchReader(src.slide_path, src.tiles, src.slide_id, merge_reads=self.merge_reads)
            self._readers[i] = rd
            while len(self._readers) > self.max_open:
                _, old = self._readers.popitem(last=False)
                old.close()
        self._readers.move_to_end(i)
        return rd

    def read_pairs(self, pairs: Sequence[tuple[int | str, int]]) -> np.ndarray:
        """Patches for ``(slide, patch index)`` pairs, in the order given, as uint8 (B, 3, S, S)."""
        if not pairs:
            raise ValueError("read_pairs needs at least one (slide, patch index) pair")
        groups: dict[int, list[int]] = {}
        for pos, (slide, _) in enumerate(pairs):
            groups.setdefault(self.index[slide] if isinstance(slide, str) else int(slide), []).append(pos)
        out: np.ndarray | None = None
        for i, positions in groups.items():
            rd = self.reader(i)
            idx = np.array([int(pairs[p][1]) for p in positions])
            patches = rd.read(np.asarray(rd.tiles.coords)[idx])
            if out is None:
                out = np.empty((len(pairs), *patches.shape[1:]), dtype=np.uint8)
            out[positions] = patches
        assert out is not None
        return out

    def close(self) -> None:
        for rd in self._readers.values():
            rd.close()
        self._readers.clear()


# --------------------------------------------------------------------------- DataLoaders


@dataclass(frozen=True)
class _Chunk:
    slide: int
    start: int
    stop: int


@dataclass
class SlideBatches(Dataset[dict[str, Any]]):
    """Map-style dataset: item ``i`` is the ``i``-th batch of consecutive patches of one slide.

    Items are dicts (so ``pin_memory`` pins them): ``slide`` (index into ``sources``), ``start``, ``stop``,
    ``patches`` uint8 NHWC tensor ``(B, S, S, 3)`` (``.permute(0, 3, 1, 2)`` is a channels_last batch),
    ``ok`` bool ``(B,)``, ``error`` (``""`` or the reason the slide failed) and ``corrupt`` (list of
    ``(x, y, cause)``). Errors are returned, not raised, so one bad slide does not stop the loader.
    """

    sources: Sequence[SlideSource]
    batch_size: int
    on_corrupt: OnCorrupt = "error"
    merge_reads: int = 8
    max_open: int = 4
    chunks: list[_Chunk] = field(init=False)

    def __post_init__(self) -> None:
        self.chunks = [
            _Chunk(i, a, min(a + self.batch_size, src.n_patches))
            for i, src in enumerate(self.sources)
            for a in range(0, src.n_patches, self.batch_size)
        ]
        self._multi: MultiSlideReader | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_multi"] = None
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.chunks[i]
        if self._multi is None:
            self._multi = MultiSlideReader(self.sources, max_open=self.max_open, merge_reads=self.merge_reads)
        item: dict[str, Any] = {
            "slide": c.slide,
            "start": c.start,
            "stop": c.stop,
            "error": "",
            "corrupt": [],
        }
        s = int(self.sources[c.slide].tiles.patch_size)
        try:
            rd = self._multi.reader(c.slide)
            before = len(rd.corrupt)
            patches, ok = rd.read_checked(np.asarray(rd.tiles.coords)[c.start : c.stop])
            item["corrupt"] = rd.corrupt[before:]
            if not ok.all() and self.on_corrupt == "error":
                x, y, cause = item["corrupt"][0]
                item["error"] = str(corrupt_patch_error(rd.slide_id, x, y, rd.level, cause))
            item["patches"] = torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 2, 3, 1)))
            item["ok"] = torch.from_numpy(ok)
        except SlideError as err:
            item["error"] = str(err)
        except Exception as err:  # anything else from a third-party reader: report it against this slide
            item["error"] = str(SlideError(self.sources[c.slide].slide_id, f"{type(err).__name__}: {err}"))
        if "patches" not in item:
            item["patches"] = torch.zeros((0, s, s, 3), dtype=torch.uint8)
            item["ok"] = torch.zeros(0, dtype=torch.bool)
        return item


# No worker_init_fn: torch already sets one intra-op thread per DataLoader worker, and cv2.setNumThreads() in a
# forked child deadlocks once the parent has used OpenCV's thread pool (verified with opencv 4.x pthreads).


def patch_loader(
    sources: SlideSource | Sequence[SlideSource],
    batch_size: int = 128,
    num_workers: int = 2,
    *,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    on_corrupt: OnCorrupt = "error",
    merge_reads: int = 8,
) -> DataLoader[dict[str, Any]]:
    """Batches of consecutive patches over one or many slides, in order (see :class:`SlideBatches`).

    Each worker opens its own OpenSlide handles lazily; ``batch_size=None`` is passed to the DataLoader since
    the dataset already yields whole batches (one batched read per batch, no per-patch collate).

    >>> for item in patch_loader(SlideSource("s1", "s1.tiff", tiles), batch_size=64, num_workers=2):  # doctest: +SKIP
    ...     x = item["patches"].permute(0, 3, 1, 2)  # uint8 (B, 3, S, S), channels_last
    """
    srcs = [sources] if isinstance(sources, SlideSource) else list(sources)
    ds = SlideBatches(srcs, batch_size, on_corrupt=on_corrupt, merge_reads=merge_reads)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {
            "prefetch_factor": prefetch_factor,
            "persistent_workers": persistent_workers,
        }
    return DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory, **kwargs
    )


class PatchPairs(Dataset[tuple[torch.Tensor, int, int]]):
    """Single patches addressed by ``(slide index, patch index)`` pairs: item -> (uint8 (3, S, S), slide, index).

    For the coupling stage's random batches across slides; corrupt patches raise ``SlideError`` (a training
    batch must not contain zero-filled patches).
    """

    def __init__(self, sources: Sequence[SlideSource], pairs: np.ndarray, max_open: int = 8) -> None:
        self.sources = list(sources)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.max_open = max_open
        self._multi: MultiSlideReader | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_multi"] = None
        return state

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if self._multi is None:
            self._multi = MultiSlideReader(self.sources, max_open=self.max_open, merge_reads=1)
        slide, idx = int(self.pairs[i, 0]), int(self.pairs[i, 1])
        patch = self._multi.read_pairs([(slide, idx)])[0]
        return torch.from_numpy(np.ascontiguousarray(patch)), slide, idx


def all_pairs(sources: Sequence[SlideSource]) -> np.ndarray:
    """Every ``(slide index, patch index)`` pair of ``sources`` as an (N, 2) int64 array."""
    parts = [np.stack([np.full(s.n_patches, i), np.arange(s.n_patches)], 1) for i, s in enumerate(sources)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)


def patch_pair_loader(
    sources: Sequence[SlideSource],
    pairs: np.ndarray | None = None,
    batch_size: int = 100,
    num_workers: int = 2,
    *,
    shuffle: bool = True,
    seed: int = 0,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
) -> DataLoader[tuple[torch.Tensor, int, int]]:
    """Random batches of patches across slides: yields ``(uint8 (B, 3, S, S), slide idx (B,), patch idx (B,))``.

    ``pairs`` defaults to every patch of every source (:func:`all_pairs`); ``sampler`` (e.g. a class-balanced
    ``WeightedRandomSampler`` over ``pairs``) overrides ``shuffle``. Shuffling is seeded.

    >>> loader = patch_pair_loader(sources, batch_size=100, num_workers=2, seed=0)  # doctest: +SKIP
    >>> x, slide_idx, patch_idx = next(iter(loader))  # doctest: +SKIP
    """
    ds = PatchPairs(sources, all_pairs(sources) if pairs is None else pairs)
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {
            "prefetch_factor": prefetch_factor,
            "persistent_workers": persistent_workers,
        }
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        generator=gen,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **kwargs,
    )
