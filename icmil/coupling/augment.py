"""The student's augmented view, batched on the device with torch ops (no PIL, no per-patch Python loop).

The method's view: horizontal flip, vertical flip (each with probability 0.5) and RandomResizedCrop back to
the patch size with area scale in ``crop_scale`` (0.5–1) and aspect ratio in 3/4–4/3. All three are one
affine map per patch, so the whole batch is resampled by a single ``affine_grid`` + ``grid_sample`` call
(bilinear), which runs equally on CPU and GPU. Optional stain/colour augmentation (an improvement, off by
default) perturbs the haematoxylin/eosin/DAB optical densities per patch (Tellez et al., 2018) and jitters
brightness/contrast/saturation — the appearance variation between labs that a patch embedder should ignore.

Input: uint8 or float ``(B, 3, S, S)``; output: float32 in [0, 1] of the same shape (the encoders accept
float input in [0, 1] and normalise inside).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    >>> y = student_view(x, crop_scale=(0.5, 1.0), generator=g)
    >>> tuple(y.shape), y.dtype, bool(y.min() >= 0 and y.max() <= 1)
    ((4, 3, 32, 32), torch.float32, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical-density space.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
    dtype=torch.float32,
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_EPS = 1.0 / 255.0


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float input is returned as float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _uniform(
    n: int, low: float, high: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def random_resized_crop_params(
    n: int,
    crop_scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch crop boxes as fractions of the patch: ``(width, height, x_center, y_center)``, each ``(n,)``.

    Same distribution as torchvision's RandomResizedCrop (area uniform in ``crop_scale``, log-uniform aspect
    ratio, up to ``attempts`` tries per patch, then the largest fitting box), but vectorised over the batch.
    """
    device = torch.device(device)
    width = torch.ones(n, device=device)
    height = torch.ones(n, device=device)
    pending = torch.ones(n, dtype=torch.bool, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        area = _uniform(n, crop_scale[0], crop_scale[1], device, generator)
        aspect = torch.exp(_uniform(n, log_lo, log_hi, device, generator))
        w = torch.sqrt(area * aspect)
        h = torch.sqrt(area / aspect)
        ok = pending & (w <= 1.0) & (h <= 1.0)
        width = torch.where(ok, w, width)
        height = torch.where(ok, h, height)
        pending &= ~ok
        if not bool(pending.any()):
            break
    # Any patch still pending keeps the full view (torchvision's fallback for square inputs).
    x_center = width / 2 + torch.rand(n, device=device, generator=generator) * (1 - width)
    y_center = height / 2 + torch.rand(n, device=device, generator=generator) * (1 - height)
    return width, height, x_center, y_center


def flip_and_crop(
    x: torch.Tensor,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random h-flip, v-flip and RandomResizedCrop (resized back to the input size) for each patch of a batch.

    One affine map per patch: ``grid = A · [u, v, 1]`` with the crop's half-size and centre in the
    normalised ``[-1, 1]`` frame and the flips as signs; bilinear sampling, ``align_corners=False``.
    """
    x = to_unit_float(x)
    n = x.shape[0]
    if n == 0:
        return x
    width, height, xc, yc = random_resized_crop_params(n, crop_scale, ratio, x.device, generator)
    hflip = torch.where(torch.rand(n, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
    vflip = torch.where(torch.rand(n, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = width * hflip
    theta[:, 1, 1] = height * vflip
    theta[:, 0, 2] = xc * 2 - 1
    theta[:, 1, 2] = yc * 2 - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # The grid stays inside the patch (crop within bounds), so the padding mode never shows.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False).clamp_(
        0, 1
    )


def stain_jitter(
    x: torch.Tensor,
    sigma: float = 0.05,
    color: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HED optical-density jitter (per patch, per stain: ``od·α + β``, α ∈ 1±σ, β ∈ ±σ) then brightness,
    contrast and saturation factors in ``1 ± color``. Input float in [0, 1]; output float in [0, 1].

    >>> y = stain_jitter(torch.full((2, 3, 4, 4), 0.5), sigma=0.0, color=0.0)
    >>> bool(torch.allclose(y, torch.full_like(y, 0.5), atol=1e-5))
    True
    """
    x = to_unit_float(x)
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device
    hed_from_rgb = _HED_FROM_RGB.to(dev)
    rgb_from_hed = _RGB_FROM_HED.to(dev)
    if sigma > 0:
        od = -torch.log(x.clamp(min=_OD_EPS))  # (B, 3, S, S) optical density per RGB channel
        hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
        alpha = _uniform(n * 3, 1 - sigma, 1 + sigma, dev, generator).view(n, 3, 1, 1)
        beta = _uniform(n * 3, -sigma, sigma, dev, generator).view(n, 3, 1, 1)
        od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, rgb_from_hed)
        x = torch.exp(-od.clamp(min=0)).clamp(0, 1)
    if color > 0:
        brightness = _uniform(n, 1 - color, 1 + color, dev, generator).view(n, 1, 1, 1)
        contrast = _uniform(n, 1 - color, 1 + color, dev, generator).view(n, 1, 1, 1)
        saturation = _uniform(n, 1 - color, 1 + color, dev, generator).view(n, 1, 1, 1)
        x = (x * brightness).clamp(0, 1)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = (
            (x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
        ).clamp(0, 1)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = ((x - gray) * saturation + gray).clamp(0, 1)
    return x


def student_view(
    x: torch.Tensor,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    stain: bool = False,
    stain_sigma: float = 0.05,
    color: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The student's view of a batch: flips + RandomResizedCrop (docs/method.md), plus stain/colour jitter if asked."""
    y = flip_and_crop(x, crop_scale=crop_scale, generator=generator)
    if stain:
        y = stain_jitter(y, sigma=stain_sigma, color=color, generator=generator)
    return y
