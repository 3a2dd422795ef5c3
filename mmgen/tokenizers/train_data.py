"""The images an image-tokenizer trainer learns from, and the picture of how well it does.

Every image item of Doc shards (``inputs``), image folders (``image_dirs``) and, optionally, freshly
drawn scenes (``synthetic_images``, :func:`synthetic_scenes`), held in memory as uint8 at
``resolution`` (non-square images are centre-cropped).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw

from mmgen.data.doc import BadRecord, Image
from mmgen.data.shards import read_docs
from mmgen.errors import MediaError, MMGenError
from mmgen.tokenizers.train_config import TokenizerTrainConfig
from mmgen.utils.pixels import tensor_to_pil
from mmgen.world import random_scene, render, render_side

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# The built-in flat-shapes drawer (synthetic_source: shapes).
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 130, 190),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if kind == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(kind)


def random_shapes_image(rng: random.Random, width: int = 64, height: int | None = None):
    """A flat background with 1-3 flat-coloured shapes in distinct cells of a 3x3 grid, small or
    large: the look of ShapesWorld renders, for training data and tests without the world module."""
    height = height or width
    colors = list(PALETTE)
    bg = rng.choice(colors)
    img = PILImage.new("RGB", (width, height), PALETTE[bg])
    draw = ImageDraw.Draw(img)
    cw, ch = width / 3, height / 3
    for cell in rng.sample(range(9), rng.randint(1, 3)):
        kind = rng.choice(SHAPES)
        color = PALETTE[rng.choice([c for c in colors if c != bg])]
        cx, cy = (cell % 3 + 0.5) * cw, (cell // 3 + 0.5) * ch
        r = min(cw, ch) * (0.42 if rng.random() < 0.5 else 0.26)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=color)
        else:
            draw.polygon(_shape_points(kind, cx, cy, r), fill=color)
    return img


def synthetic_scenes(n: int, size: int, seed: int, source: str = "shapes") -> tuple[list, list]:
    """``n`` scene images and their scenes: ShapesWorld renders (train split, so held-out colour-shape
    pairs stay unseen), or the built-in flat-shapes drawer (scenes ``None``: it keeps no record)."""
    rng = random.Random(seed)
    if source == "shapes":
        return [random_shapes_image(rng, size) for _ in range(n)], [None] * n
    if source == "shapesworld":
        # Rendered at a whole multiple of the size, at least the world's 64 px, and resized as encode()
        # resizes corpus images: a small tokenizer trains on the soft edges it will be given, not on
        # aliased renders, and every cell keeps the same pixel phase (render_side).
        side = render_side(size)
        scenes = [random_scene(rng, "train") for _ in range(n)]
        return [square_image(render(s, side, side), size) for s in scenes], scenes
    raise MMGenError(f"unknown synthetic_source '{source}' (use shapesworld or shapes)")


def square_image(img, size: int) -> np.ndarray:
    """``img`` as RGB uint8 ``(size, size, 3)``: centre-cropped to a square, then resized (bicubic)."""
    img = img.convert("RGB")
    w, h = img.size
    if w != h:  # centre crop: the tokenizer trains on squares
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_training_images(cfg: TokenizerTrainConfig, with_scenes: bool = False):
    """All training images as a uint8 tensor ``(N, 3, R, R)`` and counts of what was read/skipped;
    ``with_scenes`` adds each image's ShapesWorld scene (``None`` where none is known: shards, folders)."""
    arrays: list[np.ndarray] = []
    stats = {"from_shards": 0, "from_dirs": 0, "synthetic": 0, "bad_records": 0, "undecodable": 0, "not_fetched": 0}
    limit = cfg.max_images

    def full() -> bool:
        return len(arrays) >= limit

    if cfg.inputs:
        for doc in read_docs(cfg.inputs):
            if full():
                break
            if isinstance(doc, BadRecord):
                stats["bad_records"] += 1
                continue
            for item in doc.images:
                if not item.fetched:  # a URL reference: `mmgen fetch` downloads it
                    stats["not_fetched"] += 1
                    continue
                try:
                    arrays.append(square_image(item.to_pil(), cfg.resolution))
                    stats["from_shards"] += 1
                except MediaError:
                    stats["undecodable"] += 1
    for folder in cfg.image_dirs:
        if not os.path.isdir(folder):
            raise MMGenError(f"image folder not found: {folder} (image_dirs takes directories of image files)")

        for p in sorted(Path(folder).rglob("*")):
            if full():
                break
            if p.suffix.lower() not in _IMAGE_EXTS:
                continue
            try:  # through mmgen's decoder: the pixel limit keeps a decompression bomb out
                arrays.append(square_image(Image(path=str(p)).to_pil(mode=None), cfg.resolution))
                stats["from_dirs"] += 1
            except (MediaError, OSError, ValueError, SyntaxError):
                stats["undecodable"] += 1
    if cfg.synthetic_images > 0 and not full():
        n = min(cfg.synthetic_images, limit - len(arrays))
        images, scenes = synthetic_scenes(n, cfg.resolution, cfg.seed, cfg.synthetic_source)
        arrays.extend(np.asarray(im, dtype=np.uint8) for im in images)
        stats["synthetic"] = n
    else:
        scenes = []
    if not arrays:
        raise MMGenError("no training images: set inputs=[shards...], image_dirs=[folders...] or synthetic_images=N")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if with_scenes:  # the synthetic scenes come last
        return x, stats, [None] * (len(arrays) - len(scenes)) + list(scenes)
    return x, stats


def save_recon_grid(x: torch.Tensor, recon: torch.Tensor, path: Path) -> None:
    """Inputs (top row) above their reconstructions (bottom row), as one PNG."""
    top = torch.cat(list(x), dim=-1)
    bottom = torch.cat(list(recon), dim=-1)
    tensor_to_pil(torch.cat([top, bottom], dim=-2)[None])[0].save(path)
