"""Bag classifiers (stage 1 of ICMIL): the head registry, checkpoints, training, metrics and plots.

Example:
    >>> import torch
    >>> from icmil.mil import create_mil_head, list_mil_heads
    >>> list_mil_heads()
    ['abmil', 'dtfd', 'maxpool', 'transmil']
    >>> head = create_mil_head("dtfd", in_dim=16, n_classes=2, hidden_dim=8, attention_dim=4)
    >>> tuple(head.instance_logits(torch.randn(4, 16)).shape)
    (4, 2)
"""

from icmil.mil import heads as _heads  # noqa: F401  (registers the built-in heads)
from icmil.mil.base import (
    BagOutput,
    MILHead,
    create_mil_head,
    list_mil_heads,
    mil_head_class,
    register_mil_head,
)
from icmil.mil.checkpoint import load_mil_head, read_head_config, save_mil_head
from icmil.mil.data import Bag, BagStore, patch_size_level0
from icmil.mil.evaluate import evaluate_mil_head, predict_slides
from icmil.mil.metrics import (
    bootstrap_auc_ci,
    classification_metrics,
    multiclass_auc,
    patch_in_lesion,
    patch_level_auc,
    youden_threshold,
)
from icmil.mil.optim import Lookahead, build_optimizer
from icmil.mil.plots import plot_heatmap, plot_roc
from icmil.mil.settings import check_head_settings, confidence_beta, head_from_config, head_settings
from icmil.mil.train import TrainResult, train_mil_head

__all__ = [
    "Bag",
    "BagOutput",
    "BagStore",
    "Lookahead",
    "MILHead",
    "TrainResult",
    "bootstrap_auc_ci",
    "build_optimizer",
    "check_head_settings",
    "classification_metrics",
    "confidence_beta",
    "create_mil_head",
    "evaluate_mil_head",
    "head_from_config",
    "head_settings",
    "list_mil_heads",
    "load_mil_head",
    "mil_head_class",
    "multiclass_auc",
    "patch_in_lesion",
    "patch_level_auc",
    "patch_size_level0",
    "plot_heatmap",
    "plot_roc",
    "predict_slides",
    "read_head_config",
    "register_mil_head",
    "save_mil_head",
    "train_mil_head",
    "youden_threshold",
]
