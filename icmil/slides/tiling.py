"""The tiling stage: per slide a tissue mask and a patch grid, written as a CLAM-style tiles HDF5.

Output per slide (``out_dir/<slide_id>.h5``): dataset ``coords`` (N x 2 int64, level-0 top-left x, y) with
attrs ``patch_level`` (the level patches are read from), ``patch_size`` (output edge), ``read_size`` (edge read
at that level), ``slide_mpp``, ``target_mpp``, ``slide_path`` (as given in the manifest), ``slide_id``,
``slide_digest``, ``settings_digest``, ``content_sha256`` (checked by :func:`read_tiles`; a corrupt file is
tiled again) plus CLAM's ``downsample``, ``level_dim`` and ``name``. Next to it ``<slide_id>.png``, a small
overlay of the tissue mask and kept patches for eyeballing the tiling. ``status.csv`` lists every manifest row:
ok / error, patch count, error text, seconds.

Work per slide is bounded before any pixel is read (:func:`check_dimensions`): a header claiming more pixels
than the file can hold is a corrupt slide, and the mask never reads a level above ``tiling.mask_max_pixels``.
Temporary files left in the output folder by a killed run are removed first.

Example:
    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig, TilingConfig
    >>> from icmil.manifest import read_manifest
    >>> from icmil.slides.synth import synthesize_cohort
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> m = read_manifest(synthesize_cohort(d / "synth", SynthConfig(n_slides=2, width=2048, height=1536)))
    >>> report = tile_manifest(m, d / "tiles", TilingConfig())
    >>> report.n_ok, read_tiles(d / "tiles" / "slide_000.h5").patch_size
    (2, 256)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pandas as pd

from icmil.config import TilingConfig
from icmil.errors import FeatureStoreError, SlideError, check_failure_fraction
from icmil.io import atomic_path, remove_stale_temp_files, text_digest, write_text_atomic
from icmil.log import get_logger, progress
from icmil.manifest import Manifest
from icmil.slide_ids import slide_file
from icmil.slides.access import localize, open_slide, slide_digest, slide_mpp
from icmil.slides.grid import LevelChoice, choose_read_level, patch_grid
from icmil.slides.mask import Thumbnail, read_thumbnail, tissue_mask

log = get_logger("slides.tiling")

TILES_FORMAT = "icmil-tiles-v1"
CHECKSUM_ATTR = "content_sha256"
OVERLAY_SIDE = 512  # px, longest side of the overlay PNG
STATUS_COLUMNS = ["slide_id", "status", "n_patches", "error", "seconds", "skipped"]


@dataclass(frozen=True)
class Tiles:
    """One slide's patch grid as read back from its tiles HDF5."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    read_level: int
    read_size: int
    patch_size: int
    slide_mpp: float
    target_mpp: float
    slide_path: str
    slide_digest: str
    slide_id: str
    settings_digest: str = ""
    level_downsample: float = 1.0  # of read_level

    @property
    def size_level0(self) -> int:
        """Patch edge in level-0 px."""
        return max(1, round(self.read_size * self.level_downsample))


@dataclass(frozen=True)
class TileInfo:
    """What :func:`tile_slide` did for one slide."""

    slide_id: str
    path: Path
    n_patches: int
    seconds: float
    skipped: bool
    choice: LevelChoice | None = None


@dataclass
class TilingReport:
    """Outcome of :func:`tile_manifest`: the status table (one row per manifest row) and where it is."""

    status: pd.DataFrame
    status_path: Path
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return int((self.status["status"] == "ok").sum())

    @property
    def n_failed(self) -> int:
        return int((self.status["status"] == "error").sum())

    @property
    def n_skipped(self) -> int:
        return int(self.status["skipped"].sum())

    def __str__(self) -> str:
        lines = [
            f"tiled {len(self.status)} slides: {self.n_ok} ok ({self.n_skipped} already up to date), "
            f"{self.n_failed} failed, {int(self.status['n_patches'].sum())} patches; status: {self.status_path}"
        ]
        lines += [f"  - {why}" for why in self.failures.values()]
        return "\n".join(lines)


# Work bounds: they change a grid only for slides that reach them, so at their defaults they stay out of the
# key (tiles made before the bounds existed stay valid).
_BOUND_FIELDS = ("mask_max_pixels", "max_pixels_per_byte")
# Attrs covered by the tiles checksum, besides the coordinates: everything that says where to read.
_CHECKED_ATTRS = (
    "patch_level",
    "read_size",
    "patch_size",
    "level_downsample",
    "slide_mpp",
    "target_mpp",
    "slide_id",
    "slide_digest",
    "settings_digest",
)


def tiling_settings_digest(cfg: TilingConfig, mpp_override: float | None = None) -> str:
    """Key of every setting that changes the patch grid (``max_failed_fraction`` does not)."""
    defaults = TilingConfig()
    changed = {f for f in _BOUND_FIELDS if getattr(cfg, f) != getattr(defaults, f)}
    exclude = {"max_failed_fraction", *(set(_BOUND_FIELDS) - changed)}
    settings = cfg.model_dump(mode="json", exclude=exclude)
    override = (
        None if mpp_override is None or not math.isfinite(mpp_override) else round(float(mpp_override), 9)
    )
    return text_digest(TILES_FORMAT, settings, override)


def tiles_checksum(coords: np.ndarray, attrs: dict[str, object]) -> str:
    """SHA-256 of a patch grid: the coordinates and every attr that says where and how to read them."""
    h = hashlib.sha256(b"icmil-tiles-content/1|")
    h.update(np.ascontiguousarray(coords, dtype="<i8").tobytes())
    h.update(json.dumps([repr(attrs[k]) for k in _CHECKED_ATTRS]).encode())
    return h.hexdigest()


def read_tiles(path: str | os.PathLike[str]) -> Tiles:
    """Read a tiles HDF5 written by :func:`tile_slide` (raises ``FeatureStoreError`` if missing or malformed,
    or when its content does not match the checksum stored at tiling).

    >>> read_tiles("/no/such/tiles.h5")
    Traceback (most recent call last):
    ...
    icmil.errors.FeatureStoreError: tiles file not found: /no/such/tiles.h5 (run the tile stage first)
    """
    p = Path(path)
    if not p.is_file():
        raise FeatureStoreError(f"tiles file not found: {p} (run the tile stage first)")
    try:
        with h5py.File(p, "r") as f:
            ds = f["coords"]
            a = ds.attrs
            coords = np.asarray(ds[:], dtype=np.int64).reshape(-1, 2)
            tiles = Tiles(
                coords=coords,
                read_level=int(a["patch_level"]),
                read_size=int(a["read_size"]),
                patch_size=int(a["patch_size"]),
                slide_mpp=float(a["slide_mpp"]),
                target_mpp=float(a["target_mpp"]),
                slide_path=str(a["slide_path"]),
                slide_digest=str(a["slide_digest"]),
                slide_id=str(a["slide_id"]),
                settings_digest=str(a.get("settings_digest", "")),
                level_downsample=float(a.get("level_downsample", 1.0)),
            )
            stored = a.get(CHECKSUM_ATTR)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise FeatureStoreError(
            f"tiles file {p} is not a valid tiles HDF5 ({type(err).__name__}: {err})"
        ) from None
    if stored is not None:
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        if stored != tiles_checksum(tiles.coords, _checked_attrs(tiles)):
            raise FeatureStoreError(
                f"tiles file {p} is corrupt: its content does not match the checksum stored at tiling"
            )
    return tiles


def _checked_attrs(tiles: Tiles) -> dict[str, object]:
    return {
        "patch_level": tiles.read_level,
        "read_size": tiles.read_size,
        "patch_size": tiles.patch_size,
        "level_downsample": tiles.level_downsample,
        "slide_mpp": tiles.slide_mpp,
        "target_mpp": tiles.target_mpp,
        "slide_id": tiles.slide_id,
        "slide_digest": tiles.slide_digest,
        "settings_digest": tiles.settings_digest,
    }


def _write_tiles(
    out_path: Path,
    coords: np.ndarray,
    *,
    slide_id: str,
    slide_path: str,
    digest: str,
    settings: str,
    choice: LevelChoice,
    patch_size: int,
    mpp: float,
    target_mpp: float,
    level_dim: tuple[int, int],
    level0_size: tuple[int, int],
) -> None:
    with atomic_path(out_path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2))
        attrs = {
            "patch_level": choice.level,
            "patch_size": patch_size,
            "read_size": choice.read_size,
            "slide_mpp": mpp,
            "target_mpp": target_mpp,
            "slide_path": slide_path,
            "slide_id": slide_id,
            "slide_digest": digest,
            "settings_digest": settings,
            # CLAM's attrs, so CLAM/TRIDENT tooling can read the grid too.
            "downsample": np.array([choice.downsample_level0] * 2, dtype=np.float64),
            "level_dim": np.array(level_dim, dtype=np.int64),
            "downsampled_level_dim": np.array(level_dim, dtype=np.int64),
            "name": slide_id,
            "level_downsample": choice.downsample_level0,
            "patch_size_level0": choice.size_level0,
            "level0_size": np.array(level0_size, dtype=np.int64),
            "format": TILES_FORMAT,
        }
        # The same Python types read_tiles gives back, so the checksum is computed on identical values.
        checked = {
            "patch_level": int(choice.level),
            "read_size": int(choice.read_size),
            "patch_size": int(patch_size),
            "level_downsample": float(choice.downsample_level0),
            "slide_mpp": float(mpp),
            "target_mpp": float(target_mpp),
            "slide_id": str(slide_id),
            "slide_digest": str(digest),
            "settings_digest": str(settings),
        }
        attrs[CHECKSUM_ATTR] = tiles_checksum(coords.astype(np.int64), checked)
        for key, value in attrs.items():
            ds.attrs[key] = value


def _write_overlay(
    path: Path, thumb: Thumbnail, mask: np.ndarray, coords: np.ndarray, size_level0: int
) -> None:
    """Thumbnail with the tissue outline (green) and kept patches (blue boxes) for a visual check."""
    h, w = mask.shape
    scale = min(1.0, OVERLAY_SIDE / max(h, w))
    ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
    img = cv2.resize(thumb.rgb, (ow, oh), interpolation=cv2.INTER_AREA) if scale < 1 else thumb.rgb.copy()
    small = cv2.resize(mask.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    bgr = np.ascontiguousarray(img[..., ::-1])
    fx, fy = ow / (w * thumb.downsample[0]), oh / (h * thumb.downsample[1])
    for x, y in coords:
        p0 = (int(x * fx), int(y * fy))
        p1 = (int((x + size_level0) * fx) - 1, int((y + size_level0) * fy) - 1)
        cv2.rectangle(bgr, p0, p1, (200, 90, 0), 1)
    cv2.drawContours(bgr, contours, -1, (0, 170, 0), 1)
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"could not write {path}")


def _existing_matches(out_path: Path, digest: str, settings: str) -> int | None:
    """Patch count of an existing tiles file made from the same slide bytes and settings, else None."""
    if not out_path.is_file():
        return None
    try:
        tiles = read_tiles(out_path)
    except FeatureStoreError as err:
        log.warning("%s; tiling the slide again", err)
        return None
    if tiles.slide_digest == digest and tiles.settings_digest == settings:
        return len(tiles.coords)
    return None


def _bytes_on_disk(path: Path) -> int:
    if path.is_dir():  # a DICOM-WSI folder
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def check_dimensions(slide: openslide.OpenSlide, path: Path, slide_id: str, cfg: TilingConfig) -> None:
    """Refuse, in milliseconds, a slide whose header promises more pixels than its file can hold, or that has
    no level small enough to read whole for the tissue mask (no pyramid): both would otherwise cost minutes
    of reading before ending as "no tissue found".

    >>> class Lying:  # a 196 kB file claiming 60000 x 60000 px
    ...     dimensions, level_dimensions = (60000, 60000), ((60000, 60000),)
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "x.tiff"; _ = f.write_bytes(b"0" * 196_000)
    >>> check_dimensions(Lying(), f, "x", TilingConfig())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    icmil.errors.SlideError: slide 'x': corrupt slide: ... claims 60000x60000 px (3.6 Gpx) but holds 196 kB ...
    """
    w, h = slide.dimensions
    size = _bytes_on_disk(path)
    if size > 0 and w * h / size > cfg.max_pixels_per_byte:
        raise SlideError(
            slide_id,
            f"corrupt slide: {path} claims {w}x{h} px ({w * h / 1e9:.1f} Gpx) but holds {size / 1e3:.0f} kB "
            f"({w * h / size:.0f} px per byte; a scan stores at least 1 byte per {cfg.max_pixels_per_byte:.0f} "
            "px, even of blank glass): the file is truncated or its header is wrong",
            "re-export or re-copy the slide; tiling.max_pixels_per_byte sets this limit",
        )
    lw, lh = min(slide.level_dimensions, key=lambda d: d[0] * d[1])
    if lw * lh > cfg.mask_max_pixels:
        raise SlideError(
            slide_id,
            f"{path} has no pyramid level small enough for the tissue mask: its smallest level is {lw}x{lh} px "
            f"({lw * lh / 1e6:.0f} Mpx, limit tiling.mask_max_pixels = {cfg.mask_max_pixels / 1e6:.0f} Mpx)",
            "convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave IN OUT.tiff --tile --pyramid "
            "--compression jpeg`) or raise tiling.mask_max_pixels",
        )


def tile_slide(
    slide_id: str,
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    cfg: TilingConfig,
    mpp_override: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TileInfo:
    """Tissue mask + patch grid of one slide -> ``out_path`` (tiles HDF5) and an overlay PNG beside it.

    Skips the work when ``out_path`` already holds the grid of the same slide bytes with the same settings.
    Raises :class:`SlideError` for anything wrong with the slide (missing, unreadable, no µm/px, no tissue).

    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig, TilingConfig
    >>> from icmil.slides.synth import write_synthetic_slide
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_synthetic_slide(d / "s.tiff", SynthConfig(), seed=3, positive=False, width=2048, height=2048)
    >>> info = tile_slide("s", d / "s.tiff", d / "s.h5", TilingConfig())
    >>> info.n_patches > 0, tile_slide("s", d / "s.tiff", d / "s.h5", TilingConfig()).skipped
    (True, True)
    """
    start = time.perf_counter()
    out = Path(out_path)
    overlay = out.with_suffix(".png")
    local = localize(path, cache_dir, slide_id)
    slide = open_slide(local, slide_id)
    try:
        digest = slide_digest(local)
        settings = tiling_settings_digest(cfg, mpp_override)
        existing = _existing_matches(out, digest, settings)
        if existing is not None and overlay.is_file():
            return TileInfo(slide_id, out, existing, time.perf_counter() - start, skipped=True)

        check_dimensions(slide, local, slide_id, cfg)
        mpp = slide_mpp(slide, slide_id, mpp_override)
        choice = choose_read_level(slide.level_downsamples, mpp, cfg.target_mpp, cfg.patch_size)
        try:
            thumb = read_thumbnail(slide, mpp, cfg.mask_mpp, max_pixels=cfg.mask_max_pixels)
        except Exception as err:  # OpenSlideError on a corrupt tile; the message is all we can add
            raise SlideError(
                slide_id,
                f"reading the thumbnail of {local} failed: {type(err).__name__}: {err}",
                "the slide is corrupt or truncated; re-export or re-copy it",
            ) from None
        mask = tissue_mask(thumb.rgb, cfg, thumb.mpp)
        if not mask.any():
            raise SlideError(
                slide_id,
                f"no tissue found in {local}",
                "check the slide is not blank; lower tiling.saturation_threshold for faint stains",
            )
        coords = patch_grid(
            mask, thumb.downsample, slide.dimensions, choice.size_level0, cfg.min_tissue_fraction
        )
        if len(coords) == 0:
            raise SlideError(
                slide_id,
                f"tissue found but no {cfg.patch_size}-px patch at {cfg.target_mpp} µm/px is at least "
                f"{cfg.min_tissue_fraction:.0%} tissue",
                "lower tiling.min_tissue_fraction or tiling.patch_size",
            )
        _write_tiles(
            out,
            coords,
            slide_id=slide_id,
            slide_path=str(path),
            digest=digest,
            settings=settings,
            choice=choice,
            patch_size=cfg.patch_size,
            mpp=mpp,
            target_mpp=cfg.target_mpp,
            level_dim=slide.level_dimensions[choice.level],
            level0_size=slide.dimensions,
        )
        _write_overlay(overlay, thumb, mask, coords, choice.size_level0)
    finally:
        slide.close()
    return TileInfo(slide_id, out, len(coords), time.perf_counter() - start, skipped=False, choice=choice)


def _mpp_override(value: object) -> float | None:
    """The manifest's optional ``mpp`` cell as a float, or None when empty (NaN)."""
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _status_name(shard: str | int | None, slide_ids: list[str] | None) -> str:
    if shard is not None:
        return f"status-{shard}.csv"
    if slide_ids is not None:
        # Shards running side by side must not overwrite one status file.
        return f"status-{text_digest(sorted(slide_ids))[:8]}.csv"
    return "status.csv"


def tile_manifest(
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    cfg: TilingConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    slide_ids: list[str] | None = None,
    *,
    shard: str | int | None = None,
) -> TilingReport:
    """Tile every slide of the manifest (or the shard ``slide_ids``) into ``out_dir``.

    A failing slide is recorded and the others go on; rows the manifest itself rejected (duplicate id,
    unknown label...) are reported as failures too. The status table is written to ``out_dir/status.csv``
    (``status-<shard>.csv`` for a shard) before :class:`~icmil.errors.StageFailed` is raised when more than
    ``cfg.max_failed_fraction`` of the slides failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temp_files(out):
        log.info("removed %s, a temporary file left by an interrupted run", stale)
    rows = manifest.slides
    wanted = None if slide_ids is None else [str(s) for s in slide_ids]
    if wanted is not None:
        rows = rows[rows["slide_id"].isin(wanted)]
    records: list[dict[str, object]] = []
    failures: dict[str, str] = {}

    # Manifest rows that were rejected while reading the CSV are failures of this stage as well.
    known = set(manifest.slides["slide_id"])
    for sid, why in sorted(manifest.errors.items()):
        if wanted is None or sid in wanted:
            failures[sid] = f"manifest: {why}"
    if wanted is not None:
        for sid in wanted:
            if sid not in known and sid not in manifest.errors:
                failures[sid] = "not in the manifest"
    for sid, why in failures.items():
        records.append(
            {
                "slide_id": sid,
                "status": "error",
                "n_patches": 0,
                "error": why,
                "seconds": 0.0,
                "skipped": False,
            }
        )

    for row in progress(rows.itertuples(index=False), desc="tile", total=len(rows)):
        sid = str(row.slide_id)
        mpp = _mpp_override(row.mpp)
        start = time.perf_counter()
        try:
            info = tile_slide(
                sid, str(row.path), slide_file(out, sid, ".h5"), cfg, mpp_override=mpp, cache_dir=cache_dir
            )
        except SlideError as err:
            failures[sid] = str(err)
            log.warning("%s", err)
            records.append(
                {
                    "slide_id": sid,
                    "status": "error",
                    "n_patches": 0,
                    "error": str(err),
                    "seconds": round(time.perf_counter() - start, 3),
                    "skipped": False,
                }
            )
            continue
        except Exception as err:  # an unexpected failure on one slide must not lose the others
            why = f"slide {sid!r}: unexpected {type(err).__name__}: {err}"
            failures[sid] = why
            log.exception("tiling %s failed unexpectedly", sid)
            records.append(
                {
                    "slide_id": sid,
                    "status": "error",
                    "n_patches": 0,
                    "error": why,
                    "seconds": round(time.perf_counter() - start, 3),
                    "skipped": False,
                }
            )
            continue
        records.append(
            {
                "slide_id": sid,
                "status": "ok",
                "n_patches": info.n_patches,
                "error": "",
                "seconds": round(info.seconds, 3),
                "skipped": info.skipped,
            }
        )

    status = pd.DataFrame.from_records(records, columns=STATUS_COLUMNS)
    status_path = write_text_atomic(out / _status_name(shard, wanted), status.to_csv(index=False))
    report = TilingReport(status=status, status_path=status_path, failures=failures)
    log.info(
        "tiled %d slides (%d skipped as up to date), %d failed; status: %s",
        report.n_ok,
        report.n_skipped,
        report.n_failed,
        status_path,
    )
    check_failure_fraction("tile", failures, len(status), cfg.max_failed_fraction)
    return report
