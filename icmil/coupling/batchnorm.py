"""BatchNorm statistics of a randomly initialised encoder, calibrated on the cohort's own training patches.

Why: a freshly initialised BatchNorm layer holds running statistics (mean 0, variance 1) that have nothing to do
with its input, so in eval mode (embedding) a random encoder's features come out badly scaled — for tiny_cnn on
the synthetic slides about 100x smaller than their batch-normalised values, with patch-to-patch variation 10x
smaller still. The bag head then barely trains, and stage 2 is dominated by the gap between the student (train
mode: batch statistics) and the teacher (eval mode: running statistics) instead of by the coupling loss.
Pretrained encoders do not have this problem (their statistics come from real images). Calibrating the
statistics — a label-free forward pass in train mode over random training patches with a cumulative average —
turns "broken" into "weak": the weights stay random.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> n = calibrate_batchnorm(net, [torch.rand(8, 3, 6, 6) * 5 for _ in range(3)])
    >>> n, bool(net[1].running_mean.abs().sum() > 0), net.training
    (3, True, False)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset and re-estimate every BatchNorm layer's running statistics as the plain average over ``batches``
    (uint8 or float patch tensors); weights are untouched. Returns the number of batches used; the encoder
    is left in eval mode."""
    layers = batchnorm_layers(encoder)
    if not layers:
        encoder.eval()
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    encoder.train()
    n = 0
    try:
        for x in batches:
            encoder(x)
            n += 1
    finally:
        for m, mom in zip(layers, momenta, strict=True):
            m.momentum = mom
        encoder.eval()
    return n
