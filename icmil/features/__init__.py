"""Patch embedding: encoder registry over timm, streaming embedding of tiled slides, the HDF5 feature store.

Example:
    >>> from icmil.config import EncoderConfig
    >>> from icmil.features import create_encoder, list_encoders
    >>> "resnet50_trunc" in list_encoders() and "tiny_cnn" in list_encoders()
    True
"""

from icmil.features.embed import EmbedReport, embed_manifest, embed_settings_digest, resolve_device
from icmil.features.encoders import (
    PatchEncoder,
    RandomWeightsWarning,
    create_encoder,
    list_encoders,
    load_encoder,
    load_weights_file,
    register_encoder,
    save_encoder,
)
from icmil.features.store import FeatureBag, FeatureWriter, read_feature_attrs, read_features, write_features

__all__ = [
    "EmbedReport",
    "FeatureBag",
    "FeatureWriter",
    "PatchEncoder",
    "RandomWeightsWarning",
    "create_encoder",
    "embed_manifest",
    "embed_settings_digest",
    "list_encoders",
    "load_encoder",
    "load_weights_file",
    "read_feature_attrs",
    "read_features",
    "register_encoder",
    "resolve_device",
    "save_encoder",
    "write_features",
]
