"""Shared test data for the slides tests: a tiny synthetic cohort and OpenSlide's own test slides."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from icmil.config import SynthConfig, TilingConfig

OPENSLIDE_SDIST = "openslide-python==1.4.7"
CACHE = Path.home() / ".cache" / "icmil-tests"

# Small slides keep the suite fast; 64-px patches still give dozens of patches per slide.
SMALL = {"width": 1024, "height": 768, "tissue_blobs": (1, 2), "tissue_coverage": 0.5}


def small_tiling(**kw: object) -> TilingConfig:
    """Tiling settings scaled to the tiny test slides (0.5 x 0.4 mm): 64-px patches at 1 µm/px, a 4 µm/px mask
    and area filters a tenth of the defaults (tissue pieces on such small slides are small)."""
    base: dict[str, object] = {
        "patch_size": 64,
        "target_mpp": 1.0,
        "mask_mpp": 4.0,
        "min_tissue_area_um2": 2_000,
        "min_hole_area_um2": 400,
        "max_failed_fraction": 1.0,
    }
    base.update(kw)
    return TilingConfig.model_validate(base)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-slide synthetic cohort (2 normal, 2 tumor; seed 4 gives every slide 17+ patches with
    :func:`small_tiling`); returns the manifest path. Treat as read-only."""
    from icmil.slides import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    return synthesize_cohort(
        out, SynthConfig(n_slides=4, seed=4, val_fraction=0.25, test_fraction=0.25, **SMALL)
    )


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """The test slides shipped in the openslide-python source distribution (downloaded once, then cached)."""
    target = CACHE / "openslide_python-1.4.7" / "tests" / "fixtures"
    if not (target / "small.svs").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        sdists = sorted(CACHE.glob("openslide_python-1.4.7.tar.gz"))
        if not sdists:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                OPENSLIDE_SDIST,
                "-d",
                str(CACHE),
                "-q",
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            sdists = sorted(CACHE.glob("openslide_python-1.4.7.tar.gz"))
            if result.returncode != 0 or not sdists:
                pytest.skip(
                    f"cannot download the {OPENSLIDE_SDIST} sdist (no package index?): {result.stderr[-300:]}"
                )
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if "/tests/fixtures/" in m.name and m.isfile()]
            tar.extractall(CACHE, members=members, filter="data")
    return target
