"""Image preprocessing with plain torch ops (torchvision is unavailable beside this CPU torch).

``F.interpolate(mode="bicubic", antialias=True)`` follows PIL's bicubic filter closely, which is what Prismatic's
``TVF.resize`` applies to PIL images upstream; outputs differ from PIL by rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def to_float_batch(images: Any) -> torch.Tensor:
    """Accept HWC uint8 arrays/tensors (one, a list, or a BHWC batch; PIL images too) -> float BCHW in [0, 1]."""
    if isinstance(images, (list, tuple)):
        return torch.cat([to_float_batch(im) for im in images], dim=0)
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        images = np.asarray(images)  # PIL.Image and friends
    t = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected HWC or BHWC images with 1/3/4 channels, got shape {tuple(t.shape)}")
    t = t[..., :3] if t.shape[-1] >= 3 else t.expand(*t.shape[:-1], 3)
    t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float().clamp(0.0, 1.0)


def center_crop_area(x: torch.Tensor, area_fraction: float) -> torch.Tensor:
    """Keep the central crop with ``area_fraction`` of the area (same aspect), e.g. 0.9 for LIBERO fine-tunes."""
    if not 0.0 < area_fraction <= 1.0:
        raise ValueError("area_fraction must be in (0, 1]")
    h, w = x.shape[-2:]
    s = math.sqrt(area_fraction)
    ch, cw = max(1, round(h * s)), max(1, round(w * s))
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def resize_bicubic(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bicubic resize with antialiasing, clamped back to [0, 1] (bicubic overshoots)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)


def resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Plain bilinear resize (no antialias), like OpenCV ``INTER_LINEAR`` used by GR00T's ``VideoResize``."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False).clamp(0, 1)


def letterbox(x: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Pad to a square with a constant colour (``fill`` in the image's [0, 1] scale)."""
    h, w = x.shape[-2:]
    side = max(h, w)
    out = torch.empty(x.shape[0], 3, side, side, dtype=x.dtype)
    out[:] = torch.tensor(fill, dtype=x.dtype).view(1, 3, 1, 1)
    top, left = (side - h) // 2, (side - w) // 2
    out[..., top : top + h, left : left + w] = x
    return out


def resize_shorter_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)`` with an int size: the shorter side becomes ``size``, the longer one
    ``int(size * long / short)`` (truncated, as torchvision computes it), aspect otherwise kept."""
    h, w = x.shape[-2:]
    if h <= w:
        hw = (size, int(size * w / h))
    else:
        hw = (int(size * h / w), size)
    return resize_bicubic(x, hw)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` for an image at least ``size`` on each side: offsets are
    ``int(round((side - size) / 2))`` (Python rounding, as torchvision computes them)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def letterbox_pad_symmetric(x: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Prismatic's ``LetterboxPad``: the same ``int((max_side - side) / 2)`` border on both sides of the
    shorter dimension with a constant colour (``fill`` in [0, 1]). An odd difference leaves the result one pixel
    short of square, exactly as upstream; the resize + centre crop that follows squares it."""
    h, w = x.shape[-2:]
    side = max(h, w)
    ph, pw = int((side - h) / 2), int((side - w) / 2)
    out = torch.empty(x.shape[0], 3, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    out[:] = torch.tensor(fill, dtype=x.dtype).view(1, 3, 1, 1)
    out[..., ph : ph + h, pw : pw + w] = x
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
