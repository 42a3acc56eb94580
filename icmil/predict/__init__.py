"""Prediction outputs of ``icmil predict``: which slides (inputs), how a class is decided (decision), and the
files written per slide (QuPath GeoJSON, ``prediction.json``, ``run_metadata.json``).

The model itself (loading a registered bundle, embedding, scoring) is ``icmil.registry.slide_classifier``.

Example:
    >>> from icmil.predict import expand_slide_inputs
    >>> expand_slide_inputs(["x/a.svs"])["slide_id"].tolist()
    ['a']
"""

from icmil.predict.decision import choose_threshold, decide, default_threshold, threshold_from_settings
from icmil.predict.inputs import check_slide_id, expand_slide_inputs, read_prediction_manifest
from icmil.predict.outputs import write_prediction_json, write_run_metadata
from icmil.predict.qupath import patch_features, tissue_features, validate_geojson, write_geojson

__all__ = [
    "check_slide_id",
    "choose_threshold",
    "decide",
    "default_threshold",
    "expand_slide_inputs",
    "patch_features",
    "read_prediction_manifest",
    "threshold_from_settings",
    "tissue_features",
    "validate_geojson",
    "write_geojson",
    "write_prediction_json",
    "write_run_metadata",
]
