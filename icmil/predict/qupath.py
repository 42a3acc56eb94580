"""Per-slide GeoJSON that QuPath imports as is: the tissue contour as an annotation and one square detection
per patch with its scores as measurements.

Coordinates are level-0 pixels with y pointing down (QuPath's image space). Each patch is a
``"objectType": "detection"`` Feature whose ``properties.measurements`` (a name -> number map) QuPath shows in
its measurement table and can colour by (Measure > Show measurement maps). The tissue is one
``"objectType": "annotation"`` MultiPolygon classified ``Tissue`` (holes kept). The collection is checked against
the GeoJSON specification with the ``geojson`` library before it is written.

Example:
    >>> import numpy as np, tempfile, pathlib, json
    >>> feats = patch_features(np.array([[0, 0], [256, 0]]), 256, {"tumor probability": np.array([0.1, 0.9])})
    >>> mask = np.zeros((8, 8), bool); mask[2:6, 2:6] = True
    >>> out = write_geojson(pathlib.Path(tempfile.mkdtemp()) / "s.geojson", tissue_features(mask, 64.0) + feats)
    >>> [f["properties"]["objectType"] for f in json.loads(out.read_text())["features"]]
    ['annotation', 'detection', 'detection']
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icmil.io import write_text_atomic

TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}


def _ring_area(ring: Sequence[Sequence[float]]) -> float:
    """Signed shoelace area (positive = counter-clockwise in the coordinates' own axes)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def _closed(points: np.ndarray, ccw: bool) -> list[list[float]] | None:
    """A closed linear ring (first == last) with the requested winding, or None when degenerate."""
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in points]
    if len(ring) < 3:
        return None
    ring.append(ring[0])
    area = _ring_area(ring)
    if area == 0:
        return None
    if (area > 0) != ccw:
        ring.reverse()
    return ring


def patch_features(
    coords: np.ndarray, patch_size_level0: float, measurements: Mapping[str, np.ndarray | None]
) -> list[dict[str, Any]]:
    """One square detection per patch (top-left ``coords``, side ``patch_size_level0``) with its measurements;
    non-finite values are left out (JSON has no NaN)."""
    xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    s = float(patch_size_level0)
    values = {k: np.asarray(v, dtype=float).reshape(-1) for k, v in measurements.items() if v is not None}
    for name, v in values.items():
        if len(v) != len(xy):
            raise ValueError(f"measurement {name!r} has {len(v)} values for {len(xy)} patches")
    features = []
    for i, (x, y) in enumerate(xy):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        ring = [[round(a, 2), round(b, 2)] for a, b in ring]
        if _ring_area(ring) < 0:
            ring.reverse()
        props = {
            "objectType": "detection",
            "name": f"patch {i}",
            "measurements": {k: float(v[i]) for k, v in values.items() if math.isfinite(float(v[i]))},
        }
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}
        )
    return features


def tissue_features(mask: np.ndarray, downsample: float | tuple[float, float]) -> list[dict[str, Any]]:
    """The tissue mask's outline (holes included) as one QuPath annotation, in level-0 pixels.

    ``downsample`` is the level-0 px per mask px (one number or (x, y)). An empty mask gives no feature.
    """
    import cv2

    dx, dy = (downsample, downsample) if isinstance(downsample, (int, float)) else downsample
    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    polygons: list[list[list[list[float]]]] = []
    children: dict[int, list[int]] = {}
    for i, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent >= 0:
            children.setdefault(int(parent), []).append(i)

    def scaled(contour: np.ndarray) -> np.ndarray:
        # Contours trace pixel centres: the outline of mask pixel (c, r) spans (c .. c+1) * downsample.
        pts = contour.reshape(-1, 2).astype(float) + 0.5
        return np.column_stack([pts[:, 0] * dx, pts[:, 1] * dy])

    for i, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent >= 0:
            continue
        outer = _closed(scaled(contours[i]), ccw=True)
        if outer is None:
            continue
        holes = [h for j in children.get(i, []) if (h := _closed(scaled(contours[j]), ccw=False)) is not None]
        polygons.append([outer, *holes])
    if not polygons:
        return []
    return [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": polygons},
            "properties": {"objectType": "annotation", "name": "Tissue", "classification": TISSUE_CLASS},
        }
    ]


def validate_geojson(collection: Mapping[str, Any], where: str = "GeoJSON") -> None:
    """Check ``collection`` against the GeoJSON specification with the ``geojson`` library (ValueError if not)."""
    import geojson

    obj = geojson.loads(json.dumps(collection))
    if not isinstance(obj, geojson.FeatureCollection):
        raise ValueError(f"{where}: not a FeatureCollection")
    if not obj.is_valid:
        raise ValueError(f"{where}: invalid GeoJSON: {obj.errors()}")
    for i, feature in enumerate(obj["features"]):
        if not feature.is_valid or not feature["geometry"].is_valid:
            raise ValueError(
                f"{where}: feature {i} is invalid: {feature.errors() or feature['geometry'].errors()}"
            )


def write_geojson(path: str | os.PathLike[str], features: Sequence[Mapping[str, Any]]) -> Path:
    """Validate and write a FeatureCollection atomically; returns the path."""
    collection = {"type": "FeatureCollection", "features": list(features)}
    validate_geojson(collection, str(path))
    return write_text_atomic(path, json.dumps(collection, separators=(",", ":")))
