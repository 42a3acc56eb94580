"""The feature store: one HDF5 file per slide in the CLAM/TRIDENT layout, written atomically.

Layout: ``features`` (N x D float32, chunks ``(min(1024, N), D)`` — row-at-a-time chunks read ~10x slower),
``coords`` (N x 2 int64, level-0 top-left ``x, y``), and file attrs ``encoder_name``, ``encoder_digest``,
``slide_id``, ``slide_digest``, ``tiles_digest``, ``patch_size``, ``target_mpp``, ``settings_digest`` and
``content_sha256`` (the features and coords as written; :func:`verify_features` checks it before a finished
file is reused).
Files made by CLAM or TRIDENT (no attrs, sometimes a leading batch axis) read fine with :func:`read_features`.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s1.h5"
    >>> _ = write_features(p, np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), {"slide_id": "s1"})
    >>> bag = read_features(p)
    >>> bag.features.shape, bag.attrs["slide_id"], bag.slide_id
    ((3, 4), 's1', 's1')
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from icmil.errors import FeatureStoreError
from icmil.io import atomic_path

# Keys whose equality makes an existing features file reusable (see icmil.features.embed).
CACHE_KEYS = ("slide_digest", "tiles_digest", "encoder_digest", "settings_digest")
# File attr holding the SHA-256 of the features and coords as written (see :func:`verify_features`).
CHECKSUM_ATTR = "content_sha256"
_VERIFY_ROWS = 1024  # rows hashed per read when verifying: one HDF5 chunk


class _ContentHash:
    """SHA-256 of a features file's content: the features and coords rows in order, and their shapes."""

    def __init__(self) -> None:
        self._features = hashlib.sha256()
        self._coords = hashlib.sha256()
        self.rows = 0

    def update(self, features: np.ndarray, coords: np.ndarray) -> None:
        self._features.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
        self._coords.update(np.ascontiguousarray(coords, dtype="<i8").tobytes())
        self.rows += len(features)

    def hexdigest(self, dim: int) -> str:
        text = f"icmil-features-content/1|{self.rows}|{dim}|{self._features.hexdigest()}|{self._coords.hexdigest()}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FeatureBag:
    """One slide's features: ``features`` (N, D) float32, ``coords`` (N, 2) int64, ``attrs`` (may be empty)."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        """The slide id from the attrs, else the file stem (CLAM files carry no attrs)."""
        sid = self.attrs.get("slide_id")
        if sid:
            return str(sid)
        return self.path.stem if self.path is not None else ""

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _chunks(n: int, dim: int) -> tuple[int, int]:
    # (min(1024, N), D): whole rows, ~10x faster to read than row-at-a-time chunks. Resizable datasets need
    # a chunk shape even when empty (a slide whose patches were all skipped), hence the max(1, ...).
    return (max(1, min(1024, n)), max(1, dim))


def _set_attrs(h5: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            continue  # HDF5 has no null; absent means unknown
        h5.attrs[key] = value


def write_features(
    path: str | os.PathLike[str], features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]
) -> Path:
    """Write a features file atomically (temp file + rename) in the CLAM/TRIDENT layout; returns the path."""
    feats = np.asarray(features, dtype=np.float32)
    xy = np.asarray(coords, dtype=np.int64)
    if feats.ndim != 2 or xy.ndim != 2 or xy.shape[1] != 2 or len(feats) != len(xy):
        raise FeatureStoreError(
            f"{path}: features must be (N, D) and coords (N, 2) with the same N; got {feats.shape} and {xy.shape}"
        )
    with FeatureWriter(path, n_max=len(feats), dim=feats.shape[1], attrs=attrs) as writer:
        writer.append(feats, xy)
    return Path(path)


class FeatureWriter:
    """Streams one slide's features into a temp HDF5 file; :meth:`commit` renames it into place.

    Rows are appended batch by batch (a slide's features never have to fit in memory at once); the final
    size may be smaller than ``n_max`` when patches were skipped. Leaving the ``with`` block without a commit
    (an exception) removes the temp file, so a half-written slide never looks finished.
    """

    def __init__(self, path: str | os.PathLike[str], n_max: int, dim: int, attrs: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.n_max, self.dim, self.n = int(n_max), int(dim), 0
        self._attrs = dict(attrs)
        self._hash = _ContentHash()
        self._cm: contextlib.AbstractContextManager[Path] = atomic_path(self.path, suffix=".h5")
        tmp = self._cm.__enter__()
        try:
            self._h5 = h5py.File(tmp, "w")
            chunks = _chunks(self.n_max, self.dim)
            # Resizable so skipped patches can shrink the dataset; chunks are fixed at (min(1024, N), D).
            self._feats = self._h5.create_dataset(
                "features",
                shape=(self.n_max, self.dim),
                maxshape=(None, self.dim),
                dtype="float32",
                chunks=chunks,
            )
            self._coords = self._h5.create_dataset(
                "coords",
                shape=(self.n_max, 2),
                maxshape=(None, 2),
                dtype="int64",
                chunks=_chunks(self.n_max, 2),
            )
        except BaseException as err:
            self._cm.__exit__(type(err), err, err.__traceback__)
            raise
        self._open = True

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        k = len(features)
        if k == 0:
            return
        if self.n + k > self.n_max:
            raise FeatureStoreError(f"{self.path}: more rows than announced ({self.n + k} > {self.n_max})")
        feats = np.asarray(features, dtype=np.float32)
        xy = np.asarray(coords, dtype=np.int64)
        self._feats[self.n : self.n + k] = feats
        self._coords[self.n : self.n + k] = xy
        self._hash.update(feats, xy)
        self.n += k

    def commit(self, extra_attrs: Mapping[str, Any] | None = None) -> Path:
        """Trim to the rows written, set attrs, close and rename into place."""
        if self.n < self.n_max:
            self._feats.resize((self.n, self.dim))
            self._coords.resize((self.n, 2))
        checksum = {CHECKSUM_ATTR: self._hash.hexdigest(self.dim)}
        _set_attrs(self._h5, self._attrs | dict(extra_attrs or {}) | checksum)
        self._h5.close()
        self._open = False
        self._cm.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the temp file (the target, if it existed before, is untouched)."""
        if self._open:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._open = False
            err = FeatureStoreError("aborted")
            with contextlib.suppress(FeatureStoreError):
                self._cm.__exit__(FeatureStoreError, err, None)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and self._open:
            self.commit()
        elif self._open:
            self.abort()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_feature_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the attrs of a features file (cheap: no data read). ``FeatureStoreError`` if unreadable."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as h5:
            return {k: _decode(v) for k, v in h5.attrs.items()}
    except (OSError, KeyError) as err:
        raise FeatureStoreError(f"features file {p} is not a readable HDF5 file: {err}") from None


def verify_features(path: str | os.PathLike[str]) -> None:
    """Check a features file against the checksum stored when it was written; ``FeatureStoreError`` if it
    does not match (flipped bits, a truncated or edited file) or the file has no checksum to check.

    Reads the whole file, chunk by chunk: use it before trusting a finished output, not on every read.

    >>> import numpy as np, tempfile, pathlib
    >>> p = write_features(pathlib.Path(tempfile.mkdtemp()) / "s.h5", np.ones((2, 3)), np.zeros((2, 2)), {})
    >>> verify_features(p)
    """
    p = Path(path)
    try:
        with h5py.File(p, "r") as h5:
            stored = h5.attrs.get(CHECKSUM_ATTR)
            if stored is None:
                raise FeatureStoreError(
                    f"features file {p} has no content checksum, so it cannot be verified"
                )
            feats, coords = h5["features"], h5["coords"]
            content = _ContentHash()
            for start in range(0, feats.shape[0], _VERIFY_ROWS):
                stop = start + _VERIFY_ROWS
                content.update(feats[start:stop], coords[start:stop])
            actual = content.hexdigest(int(feats.shape[1]))
    except FeatureStoreError:
        raise
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise FeatureStoreError(f"features file {p} cannot be read: {type(err).__name__}: {err}") from None
    if _decode(stored) != actual:
        raise FeatureStoreError(
            f"features file {p} is corrupt: its content does not match the checksum stored when it was written"
        )


def read_features(path: str | os.PathLike[str], *, verify: bool = True) -> FeatureBag:
    """Read a features file written here, by CLAM (``features`` (N, D) or (1, N, D), ``coords``) or TRIDENT.

    Missing ``coords`` (CLAM ``.pt``-style exports turned into HDF5) become an all ``-1`` array with a note
    in attrs; a file without ``features`` raises ``FeatureStoreError`` naming the file and what was found.
    A file written here is checked against its content checksum unless ``verify=False`` (for a reader that
    re-reads a file it has already verified, such as the bag store's later epochs).
    """
    p = Path(path)
    if not p.is_file():
        raise FeatureStoreError(f"features file not found: {p} (run `icmil embed` for this slide)")
    try:
        with h5py.File(p, "r") as h5:
            if "features" not in h5:
                raise FeatureStoreError(
                    f"{p} has no 'features' dataset (found {sorted(h5.keys())}); expected the CLAM/TRIDENT layout"
                )
            feats = np.asarray(h5["features"][()], dtype=np.float32)
            coords = np.asarray(h5["coords"][()]) if "coords" in h5 else None
            attrs = {k: _decode(v) for k, v in h5.attrs.items()}
            if coords is not None:
                # CLAM keeps the patch level / size on the coords dataset itself.
                for k, v in h5["coords"].attrs.items():
                    attrs.setdefault(f"coords_{k}" if k in attrs else k, _decode(v))
    except OSError as err:
        raise FeatureStoreError(f"features file {p} is not a readable HDF5 file: {err}") from None
    # TRIDENT and some CLAM exports keep a leading batch axis of size 1.
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2:
        raise FeatureStoreError(f"{p}: 'features' must be (N, D), got shape {feats.shape}")
    if coords is None:
        coords = np.full((len(feats), 2), -1, dtype=np.int64)
        attrs["coords_missing"] = True
    coords = coords.astype(np.int64, copy=False)
    if coords.shape != (len(feats), 2):
        raise FeatureStoreError(f"{p}: coords shape {coords.shape} does not match features {feats.shape}")
    stored = attrs.get(CHECKSUM_ATTR)
    if verify and stored is not None:
        # Files written here carry a content checksum: every reader (training, evaluation, stage 2) checks it,
        # so flipped bytes that still decode as plausible numbers never train a head silently.
        content = _ContentHash()
        content.update(feats, coords)
        if content.hexdigest(int(feats.shape[1])) != stored:
            raise FeatureStoreError(
                f"features file {p} is corrupt: its content does not match the checksum stored when it was "
                "written; run `icmil embed` again (it re-embeds a corrupt file)"
            )
    return FeatureBag(features=feats, coords=coords, attrs=attrs, path=p)
