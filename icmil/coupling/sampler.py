"""Which patches stage 2 trains on: the pool of training-slide patches and the two samplers over it.

The pool holds every tile of every TRAINING slide (the one slide split of the run; the fine-tuning stage
checks that no other split's slide is in it). Per patch it may also carry what the frozen teacher thinks of it, computed once per
round from that round's features (which the teacher encoder itself produced, so no patch is re-encoded):

* ``teacher_score`` — the teacher's probability of "not the negative class" (balanced sampler);
* ``slide_confidence`` — ã normalised within the patch's slide (option ``per_slide_confidence``).

Samplers: :class:`UniformSampler` (faithful: random patches, a fresh permutation each pass over the pool) and
:class:`BalancedSampler` (improvement: a fixed share of each batch from patches the teacher calls positive).

Example:
    >>> import numpy as np
    >>> pool = PatchPool(
    ...     slide_ids=["a", "b"], slide_labels=np.array([0, 1]), slide_index=np.array([0, 0, 1, 1, 1]),
    ...     patch_index=np.array([0, 1, 0, 1, 2]), coords=np.zeros((5, 2), np.int64),
    ...     teacher_score=np.array([0.1, 0.2, 0.9, 0.3, 0.8]))
    >>> s = BalancedSampler(pool, batch_size=4, positive_fraction=0.5, seed=0)
    >>> int(pool.teacher_score[s.sample()].round().sum())  # half of the batch from the 2 positives
    2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icmil.log import get_logger

log = get_logger("coupling")


@dataclass
class PatchPool:
    """Every training patch: ``slide_index`` into ``slide_ids`` and level-0 ``coords`` per patch."""

    slide_ids: list[str]
    slide_labels: np.ndarray  # (n_slides,) label index
    slide_index: np.ndarray  # (N,) int
    patch_index: np.ndarray  # (N,) int, row in the slide's (aligned) coordinates
    coords: np.ndarray  # (N, 2) int64
    teacher_score: np.ndarray | None = None  # (N,) float, P(not negative) from the teacher
    slide_confidence: np.ndarray | None = None  # (N,) float in [0, 1], ã normalised per slide

    def __post_init__(self) -> None:
        n = len(self.slide_index)
        if self.coords.shape != (n, 2) or self.patch_index.shape != (n,):
            raise ValueError(
                f"coords must be ({n}, 2) and patch_index ({n},), got {self.coords.shape}, {self.patch_index.shape}"
            )
        for name in ("teacher_score", "slide_confidence"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise ValueError(f"{name} must be ({n},), got {arr.shape}")

    def __len__(self) -> int:
        return len(self.slide_index)

    def patch_labels(self, indices: np.ndarray) -> np.ndarray:
        """The slide label of each sampled patch."""
        return self.slide_labels[self.slide_index[indices]]

    def positives(self, fallback_fraction: float = 0.05) -> np.ndarray:
        """Indices of patches the teacher calls positive (score > 0.5). If there are none — a weak teacher is
        often under-confident — the top ``fallback_fraction`` by score stand in, so balancing still means
        "the patches the teacher finds most tumour-like"."""
        if self.teacher_score is None:
            raise ValueError("the pool has no teacher scores; build it with the round's features")
        pos = np.flatnonzero(self.teacher_score > 0.5)
        if len(pos) == 0 and len(self.teacher_score):
            k = max(1, round(fallback_fraction * len(self.teacher_score)))
            pos = np.argsort(-self.teacher_score, kind="stable")[:k]
            log.warning(
                "balanced sampler: the teacher calls no training patch positive; using its top %d patches "
                "by score instead",
                k,
            )
        return pos


class UniformSampler:
    """Batches of distinct random patches; a fresh permutation of the pool on every pass (faithful ICMIL)."""

    def __init__(self, pool: PatchPool, batch_size: int, seed: int = 0) -> None:
        if len(pool) == 0:
            raise ValueError("the patch pool is empty: no training slide has tiles")
        self.n = len(pool)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._order = self.rng.permutation(self.n)
        self._pos = 0

    def sample(self) -> np.ndarray:
        out: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:
            if self._pos >= self.n:
                self._order = self.rng.permutation(self.n)
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)


class BalancedSampler:
    """``positive_fraction`` of each batch from teacher-positive patches, the rest from the others.

    Tumour patches are a few per cent of a cohort's patches; a uniform batch of 100 then holds almost no
    positive instance to distil. Each group is sampled without replacement within a batch when it is large
    enough, with replacement otherwise.
    """

    def __init__(
        self, pool: PatchPool, batch_size: int, positive_fraction: float = 0.5, seed: int = 0
    ) -> None:
        if len(pool) == 0:
            raise ValueError("the patch pool is empty: no training slide has tiles")
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size
        pos = pool.positives()
        mask = np.zeros(len(pool), dtype=bool)
        mask[pos] = True
        self.pos = pos
        self.neg = np.flatnonzero(~mask)
        self.n_pos = round(batch_size * positive_fraction) if len(self.neg) else batch_size
        if len(self.pos) == 0:
            self.n_pos = 0

    def _draw(self, group: np.ndarray, k: int) -> np.ndarray:
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        return self.rng.choice(group, size=k, replace=len(group) < k)

    def sample(self) -> np.ndarray:
        idx = np.concatenate(
            [self._draw(self.pos, self.n_pos), self._draw(self.neg, self.batch_size - self.n_pos)]
        )
        self.rng.shuffle(idx)
        return idx.astype(np.int64)


def make_sampler(
    pool: PatchPool, batch_size: int, balanced: bool, seed: int, positive_fraction: float = 0.5
) -> UniformSampler | BalancedSampler:
    """The sampler the config asks for."""
    if balanced:
        return BalancedSampler(pool, batch_size, positive_fraction=positive_fraction, seed=seed)
    return UniformSampler(pool, batch_size, seed=seed)
