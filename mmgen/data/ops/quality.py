"""A learned image-text quality scorer (the UniFilter idea, at ShapesWorld scale) and its filter op.

UniFilter trains a multimodal classifier on semi-synthetic pairs at graded quality levels and
filters a corpus by its score. mmgen makes such pairs itself from ShapesWorld, where the truth is
exact (:mod:`mmgen.training.quality` trains the scorer):

    level 3  the scene's own caption
    level 2  the caption of the scene with one attribute of one object changed (colour, shape,
             size or position): partially wrong
    level 1  the caption of an unrelated scene
    level 0  gibberish text, or a caption paired with a corrupted (noise) picture

The classifier is small (a 3-layer CNN over the image, hashed word uni/bigrams over the text, one
cross-attention from the words to the image cells, an MLP) and trains in seconds on a CPU. Its score
is the expected level / 3, in [0, 1]. Saved as ``quality_config.json`` + ``quality_model.safetensors``.

    mmgen train-quality --out runs/quality   # 8000 pairs x 30 epochs, about 2 CPU-minutes
    ops: [{op: quality_score, level: node, params: {model: runs/quality, min_score: 0.5}}]
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmgen.data.ops.base import (
    REDUCE_MODES,
    ImageOp,
    Verdict,
    error_text,
    image_caption_pairs,
    reduce_scores,
    register_op,
)
from mmgen.errors import MediaError, MMGenError

CONFIG_FILE, WEIGHTS_FILE = "quality_config.json", "quality_model.safetensors"
N_LEVELS = 4
_WORD = re.compile(r"[a-z]+")


@dataclass
class QualityConfig:
    image_size: int = 32
    buckets: int = 4096  # hashed word unigram + bigram vocabulary
    dim: int = 64


def text_ids(text: str, buckets: int) -> list[int]:
    """Hashed word unigrams and bigrams (CRC32, stable across processes and machines)."""
    ws = _WORD.findall(text.lower())
    grams = ws + [f"{a} {b}" for a, b in zip(ws, ws[1:])]
    return [1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams] or [1]  # 0 pads


def _model_class():
    import torch
    from torch import nn

    class QualityScorer(nn.Module):
        """Each text token (hashed word or word pair) attends over a 4x4 grid of image cells and
        is matched against what it found there; the per-token matches (mean, min, max) and the
        pooled text and image vectors go to an MLP over the quality levels."""

        def __init__(self, cfg: QualityConfig):
            super().__init__()
            self.cfg = cfg
            d = cfg.dim
            self.conv = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, 2, 1),
                nn.ReLU(),
                nn.Conv2d(32, d, 1),
                nn.AdaptiveAvgPool2d(4),
            )
            self.cell_pos = nn.Parameter(torch.zeros(16, d))  # where a cell is: position words need it
            self.tok = nn.Embedding(cfg.buckets, d, padding_idx=0)
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.head = nn.Sequential(nn.Linear(3 * d + 3, d), nn.ReLU(), nn.Linear(d, N_LEVELS))

        def forward(self, pixels, ids, mask):
            cells = self.conv(pixels).flatten(2).transpose(1, 2) + self.cell_pos  # (B, 16, d)
            w = self.tok(ids)  # (B, T, d)
            scale = w.shape[-1] ** -0.5
            att = (self.q(w) @ self.k(cells).transpose(1, 2) * scale).softmax(-1)
            match = ((att @ self.v(cells)) * w).sum(-1) * scale  # (B, T): is this token in the picture?
            m = mask.float()
            n = m.sum(1).clamp(min=1)
            big = 1e4 * (1 - m)
            stats = torch.stack([(match * m).sum(1) / n, (match + big).min(1).values, (match - big).max(1).values], -1)
            t = (w * m[..., None]).sum(1) / n[:, None]
            v = cells.mean(1)
            return self.head(torch.cat([v, t, v * t, stats], dim=-1))

    return QualityScorer


def build_model(cfg: QualityConfig):
    return _model_class()(cfg)


def batch_inputs(pils, texts, cfg: QualityConfig):
    """(pixels in [-0.5, 0.5], padded token ids, mask) for a batch of pairs."""
    import torch

    px = (
        np.stack(
            [np.asarray(p.convert("RGB").resize((cfg.image_size, cfg.image_size)), dtype=np.float32) for p in pils]
        )
        / 255.0
        - 0.5
    )
    ids = [text_ids(t, cfg.buckets) for t in texts]
    t_max = max(len(x) for x in ids)
    pad = np.zeros((len(ids), t_max), dtype=np.int64)
    for r, x in enumerate(ids):
        pad[r, : len(x)] = x
    ids_t = torch.from_numpy(pad)
    return torch.from_numpy(px).permute(0, 3, 1, 2).contiguous(), ids_t, ids_t != 0


def score_pairs(model, pils, texts) -> list[float]:
    """Expected quality level / 3 for each (image, text) pair, in [0, 1]."""
    import torch

    if not pils:
        return []
    with torch.inference_mode():
        probs = model(*batch_inputs(pils, texts, model.cfg)).softmax(-1)
    return (probs @ torch.arange(N_LEVELS, dtype=probs.dtype) / (N_LEVELS - 1)).tolist()


@lru_cache(maxsize=2)
def load_quality(path: str):
    """A scorer saved by :func:`mmgen.training.quality.train_quality` (safetensors; nothing is unpickled)."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise MMGenError(
            f"no quality scorer at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "train one with: mmgen train-quality --out DIR)"
        )
    cfg = QualityConfig(**json.loads((d / CONFIG_FILE).read_text())["config"])
    model = build_model(cfg)
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
    return model.eval()


@register_op("quality_score")
class QualityScore(ImageOp):
    """Learned image-text quality score (expected quality level / 3, in [0, 1]) of each image and
    its caption (the nearest text before it, else after it), from a scorer trained by
    ``mmgen train-quality``. ``node`` level removes the image (or its caption, ``drop: text``)
    scoring below ``min_score``; ``doc`` level reduces the pair scores (avg/max/min) and rejects the
    document below ``min_score``. For a DataComp-style top fraction, put ``min_score: 0`` here and
    a ``top_fraction`` selector on the stat ``quality_score``."""

    @dataclass
    class Params:
        model: str = ""
        min_score: float = 0.5
        reduce_mode: str = "avg"
        drop: str = "image"

        def validate(self):
            if not self.model:
                raise ValueError("set params.model to a directory written by `mmgen train-quality`")
            if self.reduce_mode not in REDUCE_MODES or self.drop not in ("image", "text"):
                raise ValueError(f"reduce_mode must be one of {REDUCE_MODES} and drop 'image' or 'text'")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        load_quality(self.params.model)  # fail at recipe load, not mid-run

    def apply(self, view):
        model = load_quality(self.params.model)
        out, pils, texts, pairs = [], [], [], []
        for i, cap in image_caption_pairs(view):
            try:
                pils.append(view.pil(i))
            except MediaError as e:
                out.append(Verdict(e.reason, {"error": error_text(e)}, item=i, quarantine=True))
                continue
            texts.append(view.doc.items[cap].text)
            pairs.append((i, cap))
        scores = score_pairs(model, pils, texts)
        low = self.params.min_score
        if self.level == "doc":
            if scores:
                s = reduce_scores(scores, self.params.reduce_mode)
                out.append(
                    Verdict(None if s >= low else "low_quality", {"quality_score": round(s, 4), "pairs": len(scores)})
                )
            return out
        for (i, cap), s in zip(pairs, scores):
            out.append(
                Verdict(
                    None if s >= low else "low_quality",
                    {"quality_score": round(s, 4), "caption_item": cap},
                    item=i if self.params.drop == "image" else cap,
                )
            )
        return out
