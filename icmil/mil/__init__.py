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
from icmil.mil.base import BagOutput, MILHead, create_mil_head, list_mil_heads, register_mil_head
from icmil.mil.checkpoint import load_mil_head, read_head_config, save_mil_head

__all__ = [
    "BagOutput",
    "MILHead",
    "create_mil_head",
    "list_mil_heads",
    "load_mil_head",
    "read_head_config",
    "register_mil_head",
    "save_mil_head",
]
