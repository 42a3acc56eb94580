"""Synthetic whole-slide images: pyramidal tiled TIFFs with H&E-like tissue and sparse lesions.

The cohort is a realistic MIL problem in miniature: tissue is a few uneven pieces on a light background,
stained pink (eosin) with purple nuclei (haematoxylin); a positive (``tumor``) slide holds a few small lesions
whose nuclei are somewhat larger, darker, more varied in size and a little sparser than normal ones, scaled by
``SynthConfig.lesion_contrast``. Nuclear area, hence mean colour, barely changes, so a frozen random encoder
separates slides imperfectly while a trained patch embedder can learn the texture difference.

Writing streams: geometry lives on a coarse grid (one cell per ``grid`` level-0 px) and texture in a periodic
atlas per slide (period ``ATLAS`` = 2048 px, 1 mm at 0.5 µm/px); each 256-px tile of each level is composed
from these on demand, compressed and handed to tifffile, so no whole-slide array is ever held in memory. Tiles
that depend only on their atlas position (tissue or lesion interior) are byte-identical and compressed once.
Lower levels are drawn directly at their resolution from downsampled atlases, not by shrinking level 0.

Example:
    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> manifest = synthesize_cohort(out, SynthConfig(n_slides=2, width=1024, height=768))
    >>> manifest.name, sorted(p.name for p in (out / "slides").iterdir())
    ('manifest.csv', ['slide_000.tiff', 'slide_001.tiff'])
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from icmil.config import SynthConfig
from icmil.io import atomic_path, text_digest, write_json_atomic, write_text_atomic
from icmil.log import get_logger

TILE = 256
LEVEL_DOWNSAMPLE = 4
ATLAS = 2048  # texture period in level-0 px (1 mm at 0.5 µm/px); divisible by every level downsample used
MIN_ATLAS = 512  # small test slides get a smaller (cheaper) atlas
MIN_LEVEL_SIDE = 256  # stop adding pyramid levels once a level's long side would be shorter than this
ZLIB_LEVEL = 1  # deflate level 1: ~3x faster than the default 6 for ~10 % larger files
LABELS = ("normal", "tumor")
# Optical density per unit stain (R, G, B): haematoxylin from Ruifrok & Johnston; eosin made a little bluer
# (absorbing more blue) so the stroma is pink rather than magenta.
_H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_OD = np.array([0.09, 0.85, 0.30], dtype=np.float32)

log = get_logger("slides.synth")


# --------------------------------------------------------------------------------------------- geometry
@dataclass
class SlideLayout:
    """Geometry of one synthetic slide: tissue and lesion fields on a coarse grid (positive = inside)."""

    width: int
    height: int
    grid: int  # level-0 px per grid cell
    tissue: np.ndarray  # float32 (gh, gw)
    lesion: np.ndarray  # float32 (gh, gw); all negative for a normal slide
    boxes: list[list[int]] = field(default_factory=list)  # level-0 [x0, y0, x1, y1] per lesion


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = rng.standard_normal(shape).astype(np.float32)
    k = int(2 * round(3 * sigma) + 1)
    smooth = np.asarray(cv2.GaussianBlur(noise, (k, k), sigma, borderType=cv2.BORDER_REFLECT), np.float32)
    return smooth / max(float(smooth.std()), 1e-6)


def _blob_field(
    gx: np.ndarray, gy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float, wobble: np.ndarray
) -> np.ndarray:
    """1 - rho / r(phi) for an ellipse whose radius wobbles with angle (Fourier terms): > 0 inside."""
    c, s = math.cos(theta), math.sin(theta)
    un = ((gx - cx) * c + (gy - cy) * s) / a
    vn = (-(gx - cx) * s + (gy - cy) * c) / b
    rho = np.sqrt(un * un + vn * vn).astype(np.float32)
    # cos(k phi + p) = Re(z^k e^{ip}) with z = e^{i phi}: powers of a complex array instead of arctan2 + cos.
    z = ((un + 1j * vn) / np.maximum(rho, 1e-6)).astype(np.complex64)
    r = np.ones_like(rho)
    zk = z.copy()
    for amp, phase in wobble:
        zk = zk * z  # starts at k = 2
        r += (amp * (zk * np.complex64(complex(math.cos(phase), math.sin(phase))))).real
    return 1.0 - rho / np.maximum(r, 0.2)


def make_layout(
    cfg: SynthConfig, rng: np.random.Generator, width: int, height: int, positive: bool
) -> SlideLayout:
    """Draw tissue pieces (and lesions for a positive slide) on a coarse grid of at most ~2048 cells a side."""
    grid = max(16, math.ceil(max(width, height) / 2048))
    gw, gh = math.ceil(width / grid), math.ceil(height / grid)
    # Cell centres in level-0 px.
    gx = (np.arange(gw, dtype=np.float32)[None, :] + 0.5) * grid
    gy = (np.arange(gh, dtype=np.float32)[:, None] + 0.5) * grid

    n_blobs = int(rng.integers(cfg.tissue_blobs[0], cfg.tissue_blobs[1] + 1))
    area_each = cfg.tissue_coverage * width * height / n_blobs
    # The blob outlines are smooth: evaluate them on a 4x coarser grid and upsample (4-16x cheaper).
    coarse = 4 if gw * gh > 65536 else 1
    cw, ch = math.ceil(gw / coarse), math.ceil(gh / coarse)
    cxs = (np.arange(cw, dtype=np.float32)[None, :] + 0.5) * grid * coarse
    cys = (np.arange(ch, dtype=np.float32)[:, None] + 0.5) * grid * coarse
    tissue: np.ndarray = np.full((ch, cw), -1.0, dtype=np.float32)
    for _ in range(n_blobs):
        aspect = float(rng.uniform(1.0, 2.2))
        size = float(rng.uniform(0.7, 1.3))
        a = math.sqrt(area_each * size * aspect / math.pi)
        b = a / aspect
        cx = float(rng.uniform(0.15, 0.85)) * width
        cy = float(rng.uniform(0.15, 0.85)) * height
        wobble = np.stack([rng.uniform(0, 0.18, 5) / np.arange(1, 6) ** 0.5, rng.uniform(0, 2 * np.pi, 5)], 1)
        theta = float(rng.uniform(0, np.pi))
        for r0 in range(0, ch, 256):  # row blocks keep the temporaries small on large grids
            rows = tissue[r0 : r0 + 256]
            np.maximum(rows, _blob_field(cxs, cys[r0 : r0 + 256], cx, cy, a, b, theta, wobble), out=rows)
    if coarse > 1:
        # Resize to the padded size so cell centres line up, then crop to the grid.
        tissue = cv2.resize(tissue, (cw * coarse, ch * coarse), interpolation=cv2.INTER_LINEAR)[:gh, :gw]
        tissue = np.ascontiguousarray(tissue)
    # Ragged edges and a few tears/holes: multi-scale noise added to the smooth blob field.
    tissue += 0.10 * _smooth_noise(rng, (gh, gw), sigma=max(1.0, 300 / grid))
    tissue += 0.05 * _smooth_noise(rng, (gh, gw), sigma=max(0.7, 60 / grid))

    lesion = np.full((gh, gw), -1.0, dtype=np.float32)
    boxes: list[list[int]] = []
    if positive:
        n_les = int(rng.integers(cfg.lesions_per_slide[0], cfg.lesions_per_slide[1] + 1))
        inside = np.argwhere(tissue > 0.3)
        if len(inside) == 0:
            inside = np.argwhere(tissue > 0)
        for _ in range(max(n_les, 1) if len(inside) else 0):
            cy_i, cx_i = inside[int(rng.integers(len(inside)))]
            cx, cy = (cx_i + 0.5) * grid, (cy_i + 0.5) * grid
            r = float(rng.uniform(cfg.lesion_radius_px[0], cfg.lesion_radius_px[1]))
            aspect = float(rng.uniform(1.0, 1.5))
            wobble = np.stack([rng.uniform(0, 0.15, 4) / np.arange(1, 5), rng.uniform(0, 2 * np.pi, 4)], 1)
            # Evaluate the lesion only in a window around it: it is small compared with the slide.
            reach = int(2 * r * math.sqrt(aspect) / grid) + 2
            wy0, wx0 = max(0, cy_i - reach), max(0, cx_i - reach)
            wy1, wx1 = min(gh, cy_i + reach + 1), min(gw, cx_i + reach + 1)
            one = _blob_field(
                gx[:, wx0:wx1], gy[wy0:wy1], cx, cy, r * math.sqrt(aspect), r / math.sqrt(aspect), 0.0, wobble
            )
            one[tissue[wy0:wy1, wx0:wx1] <= 0] = -1.0
            cells = np.argwhere(one > 0)
            if len(cells) == 0:
                continue
            window = lesion[wy0:wy1, wx0:wx1]
            np.maximum(window, np.maximum(one, -1.0), out=window)
            origin = np.array([wy0, wx0])
            (y0, x0), (y1, x1) = cells.min(0) + origin, cells.max(0) + 1 + origin
            boxes.append(
                [int(x0 * grid), int(y0 * grid), min(int(x1 * grid), width), min(int(y1 * grid), height)]
            )
    return SlideLayout(width, height, grid, tissue, lesion, boxes)


# ---------------------------------------------------------------------------------------------- texture
def _periodic_noise(rng: np.random.Generator, size: int, period_cells: int) -> np.ndarray:
    """Smooth noise that tiles seamlessly with period ``size`` (low-pass filtered in the Fourier domain)."""
    n = max(8, size // period_cells)
    freq = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2
    spectrum = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) * np.exp(-freq / (2 * 0.2**2))
    small = np.real(np.fft.ifft2(spectrum)).astype(np.float32)
    small /= max(float(small.std()), 1e-6)
    # Wrap-pad one cell so the bilinear upsampling is periodic too, then crop one period.
    scale = size / n
    padded = np.pad(small, 1, mode="wrap")
    big = cv2.resize(padded, (round((n + 2) * scale),) * 2, interpolation=cv2.INTER_LINEAR)
    off = round(scale)
    return big[off : off + size, off : off + size]


def _nuclei(
    rng: np.random.Generator,
    size: int,
    radius: float,
    density: float,
    stain: float,
    density_map: np.ndarray,
    spread: float = 0.18,
) -> np.ndarray:
    """Haematoxylin optical density of randomly placed elliptical nuclei, drawn with wrap-around."""
    canvas = np.zeros((size, size), dtype=np.float32)
    n = rng.poisson(density * size * size / 1e4)
    xy = rng.uniform(0, size, (n, 2))
    # Thin out nuclei where the (periodic) density map is low: cellular and sparse regions alternate.
    keep = rng.uniform(0, 1, n) < np.clip(
        0.8 + 0.3 * density_map[xy[:, 1].astype(int), xy[:, 0].astype(int)], 0, 1
    )
    xy = xy[keep]
    radii = radius * rng.lognormal(0.0, spread, len(xy))
    ecc = rng.uniform(0.6, 1.0, len(xy))
    angles = rng.uniform(0, 180, len(xy))
    values = stain * rng.uniform(0.75, 1.15, len(xy))
    for (x, y), r, e, ang, val in zip(xy, radii, ecc, angles, values, strict=True):
        axes = (max(1, round(r)), max(1, round(r * e)))
        for dx in (-size, 0, size) if (x < r + 2 or x > size - r - 2) else (0,):
            for dy in (-size, 0, size) if (y < r + 2 or y > size - r - 2) else (0,):
                cv2.ellipse(canvas, (round(x + dx), round(y + dy)), axes, float(ang), 0, 360, float(val), -1)
    # Soft edges and chromatin granularity.
    return np.asarray(cv2.GaussianBlur(canvas, (3, 3), 0.8, borderType=cv2.BORDER_REFLECT), np.float32)


@dataclass
class TextureAtlas:
    """Per-level periodic RGB textures of normal and lesion tissue, plus the background colour."""

    normal: list[np.ndarray]  # per level: uint8 (A_l + TILE, A_l + TILE, 3), wrap-padded for slicing
    lesion: list[np.ndarray]
    period: list[int]  # A_l per level
    background: np.ndarray  # uint8 (3,)


def atlas_size(width: int, height: int) -> int:
    """Texture period: ``ATLAS`` px, or for a small slide its long side rounded up to 512 px (cheaper to draw;
    still divisible by every level downsample such a slide has)."""
    side = max(width, height)
    return int(min(ATLAS, max(MIN_ATLAS, -(-side // 512) * 512)))


def make_atlas(
    cfg: SynthConfig, rng: np.random.Generator, n_levels: int, positive: bool, size: int = ATLAS
) -> TextureAtlas:
    """Stain a periodic texture once per slide (haematoxylin + eosin, Beer-Lambert) and downsample it per level."""
    jitter = cfg.stain_jitter
    h_vec = _H_OD * (1 + rng.uniform(-jitter, jitter, 3).astype(np.float32))
    e_vec = _E_OD * (1 + rng.uniform(-jitter, jitter, 3).astype(np.float32))
    strength = float(rng.uniform(1 - jitter, 1 + jitter))
    # In-place arithmetic throughout: each 2048^2 float field is 16 MB.
    density_map = _periodic_noise(rng, size, 48)  # cellular vs sparse areas, ~0.1 mm across
    eosin = density_map * np.float32(0.10)
    eosin += np.float32(0.50)
    eosin += _periodic_noise(rng, size, 12) * np.float32(0.12)  # fibres
    grain = _periodic_noise(rng, size, 3)
    eosin += grain * np.float32(0.05)
    np.clip(eosin, 0.05, None, out=eosin)
    eosin *= np.float32(strength)
    # Small clear spaces (vessels, fat, retraction) where a mid-scale noise peaks.
    eosin[_periodic_noise(rng, size, 24) > 2.2] *= np.float32(0.15)
    grain *= np.float32(0.15)
    grain += np.float32(0.85)  # chromatin granularity inside nuclei
    nuclei_seed = int(rng.integers(2**31))

    def stain(h: np.ndarray) -> np.ndarray:
        h *= grain
        channels = []
        for c in range(3):  # Beer-Lambert per channel: one float temporary at a time
            od = cv2.addWeighted(h, -float(h_vec[c]), eosin, -float(e_vec[c]), 0.0)
            channels.append(np.clip(cv2.exp(od) * 255.0, 0, 255).astype(np.uint8))
        return cv2.merge(channels)

    normal = stain(
        _nuclei(
            np.random.default_rng(nuclei_seed),
            size,
            cfg.nucleus_radius_px,
            cfg.nucleus_density,
            1.1 * strength,
            density_map,
        )
    )
    lesion = normal
    if positive:
        c = cfg.lesion_contrast
        lesion = stain(
            _nuclei(
                np.random.default_rng(nuclei_seed + 1),
                size,
                # Geometric interpolation: at contrast c each factor is scale**c (1 at c = 0).
                cfg.nucleus_radius_px * cfg.lesion_nucleus_scale**c,
                cfg.nucleus_density * cfg.lesion_density_scale**c,
                1.1 * strength * (1 + cfg.lesion_darkening) ** c,
                density_map,
                spread=0.18 + c * cfg.lesion_pleomorphism,
            )
        )
    grey = float(rng.uniform(232, 246))
    background = np.clip([grey + rng.uniform(-3, 3) for _ in range(3)], 0, 255).astype(np.uint8)

    def pyramid(img: np.ndarray) -> list[np.ndarray]:
        out = []
        for level in range(n_levels):
            a = max(1, size // LEVEL_DOWNSAMPLE**level)
            small = img if a == size else cv2.resize(img, (a, a), interpolation=cv2.INTER_AREA)
            out.append(np.pad(small, ((0, TILE), (0, TILE), (0, 0)), mode="wrap"))  # slice without wrapping
        return out

    normals = pyramid(normal)
    lesions = normals if lesion is normal else pyramid(lesion)
    periods = [max(1, size // LEVEL_DOWNSAMPLE**level) for level in range(n_levels)]
    return TextureAtlas(normals, lesions, periods, background)


# ------------------------------------------------------------------------------------------- tile writer
def level_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level: downsample 4 per level while the level's long side stays >= 256 px.

    At 0.5 µm/px level 2 is 8 µm/px, the usual tissue-mask resolution.

    >>> level_shapes(6144, 4096)
    [(6144, 4096), (1536, 1024), (384, 256)]
    """
    shapes = [(width, height)]
    while True:
        w, h = shapes[-1]
        nw, nh = w // LEVEL_DOWNSAMPLE, h // LEVEL_DOWNSAMPLE
        if max(nw, nh) < MIN_LEVEL_SIDE or min(nw, nh) < 1 or LEVEL_DOWNSAMPLE ** len(shapes) >= ATLAS:
            return shapes
        shapes.append((nw, nh))


class _TileComposer:
    """Builds the compressed bytes of one tile of one level from the layout and the atlas.

    Deflate dominates the cost, so tiles that depend only on their atlas position (pure background, tissue
    interior, lesion interior) are compressed once and reused; only tiles crossing a tissue or lesion
    boundary are composed and compressed individually. Every tile is a pure function of (seed, level, x, y).
    """

    def __init__(self, layout: SlideLayout, atlas: TextureAtlas) -> None:
        self.layout = layout
        self.atlas = atlas
        self.background = np.ascontiguousarray(np.broadcast_to(atlas.background, (TILE, TILE, 3)))
        self.background_bytes = zlib.compress(self.background.tobytes(), ZLIB_LEVEL)
        self._cache: dict[tuple[int, int, int, bool], bytes] = {}

    def _field(self, grid_field: np.ndarray, x0: int, y0: int, d: int) -> np.ndarray:
        g = self.layout.grid
        # Inverse affine map: tile pixel (j, i) -> grid coordinate of its centre.
        m = np.array(
            [[d / g, 0, (x0 + 0.5 * d) / g - 0.5], [0, d / g, (y0 + 0.5 * d) / g - 0.5]], dtype=np.float64
        )
        return cv2.warpAffine(
            grid_field,
            m,
            (TILE, TILE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def tile(self, level: int, tx: int, ty: int) -> bytes:
        d = LEVEL_DOWNSAMPLE**level
        x0, y0 = tx * TILE * d, ty * TILE * d
        g = self.layout.grid
        # Look at the coarse cells under the tile first: most tiles are pure background or pure tissue.
        cx0, cy0 = max(0, x0 // g - 1), max(0, y0 // g - 1)
        cx1, cy1 = (x0 + TILE * d) // g + 2, (y0 + TILE * d) // g + 2
        t_cells = self.layout.tissue[cy0:cy1, cx0:cx1]
        if t_cells.size == 0 or float(t_cells.max()) <= 0:
            return self.background_bytes
        l_cells = self.layout.lesion[cy0:cy1, cx0:cx1]
        l_max = float(l_cells.max()) if l_cells.size else -1.0
        period = self.atlas.period[level]
        sx, sy = (tx * TILE) % period, (ty * TILE) % period
        interior = float(t_cells.min()) > 0 and (l_max <= 0 or float(l_cells.min()) > 0)
        key = (level, sx, sy, l_max > 0)
        if interior and key in self._cache:
            return self._cache[key]
        source = self.atlas.lesion if l_max > 0 and interior else self.atlas.normal
        out = source[level][sy : sy + TILE, sx : sx + TILE].copy()
        if not interior:
            # cv2.copyTo with a uint8 mask is several times faster than boolean-index assignment.
            if l_max > 0:
                inside = (self._field(self.layout.lesion, x0, y0, d) > 0).view(np.uint8)
                cv2.copyTo(self.atlas.lesion[level][sy : sy + TILE, sx : sx + TILE], inside, out)
            outside = (self._field(self.layout.tissue, x0, y0, d) <= 0).view(np.uint8)
            cv2.copyTo(self.background, outside, out)
        data = zlib.compress(out.tobytes(), ZLIB_LEVEL)
        if interior:
            self._cache[key] = data
        return data


def _level_tiles(
    composer: _TileComposer, level: int, shape: tuple[int, int], pool: ThreadPoolExecutor
) -> Iterator[bytes]:
    w, h = shape
    nx, ny = math.ceil(w / TILE), math.ceil(h / TILE)
    positions = [(tx, ty) for ty in range(ny) for tx in range(nx)]
    chunk = 64  # bounded look-ahead: at most this many compressed tiles wait in memory
    for i in range(0, len(positions), chunk):
        yield from pool.map(lambda p: composer.tile(level, p[0], p[1]), positions[i : i + chunk])


def write_synthetic_slide(
    path: str | os.PathLike[str],
    cfg: SynthConfig,
    seed: int,
    positive: bool,
    *,
    width: int | None = None,
    height: int | None = None,
    mpp: float | None = None,
    blank: bool = False,
    workers: int = 2,
) -> list[list[int]]:
    """Write one pyramidal tiled TIFF (one page per level, 256-px zlib tiles, µm/px in the resolution tags).

    ``mpp=None`` uses ``cfg.mpp``; ``mpp=0`` writes no resolution (a slide without µm/px, for tests);
    ``blank=True`` writes background only (a slide without tissue). Returns the level-0 lesion boxes.

    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.tiff"
    >>> write_synthetic_slide(p, SynthConfig(), seed=1, positive=False, width=1024, height=1024)
    []
    """
    width = width or cfg.width
    height = height or cfg.height
    mpp = cfg.mpp if mpp is None else mpp
    rng = np.random.default_rng(seed)
    shapes = level_shapes(width, height)
    layout = make_layout(cfg, rng, width, height, positive and not blank)
    if blank:
        layout.tissue[:] = -1.0
    atlas = make_atlas(cfg, rng, len(shapes), bool(layout.boxes), atlas_size(width, height))
    composer = _TileComposer(layout, atlas)
    with (
        atomic_path(path, suffix=".tiff") as tmp,
        ThreadPoolExecutor(max(1, workers)) as pool,
        tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tif,
    ):
        for level, (w, h) in enumerate(shapes):
            d = LEVEL_DOWNSAMPLE**level
            res: dict[str, object] = {}
            if mpp > 0:
                px_per_cm = 1e4 / (mpp * d)
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                _level_tiles(composer, level, (w, h), pool),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,
                metadata=None,
                software=False,
                **res,  # type: ignore[arg-type]
            )
    return layout.boxes


# ------------------------------------------------------------------------------------------------ cohort
def synthesize_cohort(out_dir: str | os.PathLike[str], cfg: SynthConfig) -> Path:
    """Write ``cfg.n_slides`` synthetic slides, ``manifest.csv`` and ``lesions.json`` under ``out_dir``.

    Labels are ``normal`` / ``tumor`` (about ``cfg.positive_fraction`` positives, at least one of each); the
    split is stratified and seeded. A rerun with the same settings keeps slides already written.

    >>> import tempfile
    >>> from icmil.config import SynthConfig
    >>> m = synthesize_cohort(tempfile.mkdtemp(), SynthConfig(n_slides=2, width=768, height=512))
    >>> m.read_text().splitlines()[0]
    'slide_id,path,label,split'
    """
    from icmil.manifest import _stratified_split  # the project's one split rule (imports pandas: lazily)

    out = Path(out_dir)
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.model_dump(mode="json")
    # The split fractions only change manifest.csv, not the slides: changing them must not redraw every slide.
    digest = text_digest(
        {k: v for k, v in settings.items() if not k.endswith("_fraction") or k == "positive_fraction"},
        "synth-v1",
    )
    stamp = out / "synth.json"
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    reuse = previous.get("digest") == digest

    rng = np.random.default_rng(cfg.seed)
    n_pos = min(max(1, round(cfg.n_slides * cfg.positive_fraction)), cfg.n_slides - 1)
    positive = np.zeros(cfg.n_slides, dtype=bool)
    positive[rng.choice(cfg.n_slides, n_pos, replace=False)] = True
    slide_seeds = rng.integers(0, 2**31, cfg.n_slides)
    ids = [f"slide_{i:03d}" for i in range(cfg.n_slides)]
    splits = _stratified_split(positive.astype(int), cfg.seed, cfg.val_fraction, cfg.test_fraction)

    lesions: dict[str, list[list[int]]] = dict(previous.get("lesions", {})) if reuse else {}
    for sid, pos, sseed in zip(ids, positive, slide_seeds, strict=True):
        target = slides_dir / f"{sid}.tiff"
        if reuse and target.is_file() and sid in lesions:
            continue
        lesions[sid] = write_synthetic_slide(target, cfg, int(sseed), bool(pos))
        # Record progress after every slide so an interrupted run resumes where it stopped.
        write_json_atomic(stamp, {"digest": digest, "settings": settings, "lesions": lesions})
        log.info("wrote %s (%s, %d lesions)", target.name, LABELS[int(pos)], len(lesions[sid]))

    rows = ["slide_id,path,label,split"]
    rows += [
        f"{sid},slides/{sid}.tiff,{LABELS[int(pos)]},{split}"
        for sid, pos, split in zip(ids, positive, splits, strict=True)
    ]
    write_json_atomic(out / "lesions.json", {sid: lesions[sid] for sid in ids})
    write_json_atomic(stamp, {"digest": digest, "settings": settings, "lesions": lesions})
    return write_text_atomic(out / "manifest.csv", "\n".join(rows) + "\n")


# -------------------------------------------------------------------------------------- test helpers
def corrupt_tile(path: str | os.PathLike[str], level: int, tile_index: int) -> tuple[int, int]:
    """Overwrite one tile's compressed bytes in place with garbage (for tests of reopen-after-failure).

    ``tile_index`` counts tiles row by row within the level's page. Returns the tile's (x, y) at that
    level in px. Reading that tile through OpenSlide then raises ``OpenSlideError``.

    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.tiff"
    >>> _ = write_synthetic_slide(p, SynthConfig(), seed=1, positive=False, width=1024, height=1024)
    >>> corrupt_tile(p, level=0, tile_index=5)
    (256, 256)
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        assert isinstance(page, tifffile.TiffPage)
        offset = int(page.dataoffsets[tile_index])
        count = int(page.databytecounts[tile_index])
        per_row = math.ceil(page.imagewidth / page.tilewidth)
        xy = ((tile_index % per_row) * page.tilewidth, (tile_index // per_row) * page.tilelength)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        # Not a valid zlib header: the decoder fails on the first byte.
        fh.write(b"\xff\x00" * (count // 2) + b"\xff" * (count % 2))
    return xy
