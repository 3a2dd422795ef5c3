"""The pixel conventions every image model in mmgen shares: float tensors ``(B, 3, H, W)`` in
``[-1, 1]``, uint8 ``0..255`` on disk and on screen, PIL images at the edges."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> float in [-1, 1], the range every tokenizer and detokenizer reads."""
    return x.float() / 127.5 - 1.0


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> uint8 (0..255), clamped and rounded: the inverse of :func:`uint8_to_unit`."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def through_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels as they come back from an 8-bit image: what a user sees, and what evaluation scores."""
    return ((x + 1) * 127.5).round() / 127.5 - 1


def pil_to_tensor(images: Sequence, size: tuple[int, int]) -> torch.Tensor:
    """PIL images -> ``(B, 3, H, W)`` float in [-1, 1], resized to ``size`` = (width, height)."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if img.size != tuple(size):
            img = img.resize(tuple(size), PILImage.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
    return uint8_to_unit(torch.stack(out))


def tensor_to_pil(x: torch.Tensor) -> list:
    """``(B, 3, H, W)`` in [-1, 1] -> PIL images."""
    arr = unit_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
    return [PILImage.fromarray(a) for a in arr]
