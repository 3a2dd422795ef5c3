"""Image-text similarity with a CLIP model (open_clip or transformers, by name or local path)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from mmgen.data.doc import Image, Text
from mmgen.data.ops.base import (
    REDUCE_MODES,
    DocView,
    Op,
    Verdict,
    error_text,
    image_caption_pairs,
    reduce_scores,
    register_op,
)
from mmgen.errors import MediaError


@lru_cache(maxsize=2)
def _clip(name_or_path: str, device: str):
    from mmgen.backbones.clip import load_clip

    return load_clip(name_or_path, device=device)


def chunks(view: DocView) -> list[tuple[list[int], list[int]]]:
    """(text items, image items) of each chunk. Chunks end where an item carries ``dj_eoc`` (the
    Data-Juicer converter keeps ``<|__dj__eoc|>`` there); a document without it is one chunk."""
    out, texts, images = [], [], []
    for i, it in view.items():
        if isinstance(it, Text):
            texts.append(i)
        elif isinstance(it, Image) and it.fetched:  # a URL not fetched has no pixels to compare
            images.append(i)
        if int(it.meta.get("dj_eoc", 0)):
            out.append((texts, images))
            texts, images = [], []
    if texts or images:
        out.append((texts, images))
    return out


@register_op("image_text_similarity_filter")
class ImageTextSimilarityFilter(Op):
    """CLIP cosine similarity between text and images (Data-Juicer ``image_text_similarity_filter``).

    ``doc`` level, as Data-Juicer: per chunk holding images and text, the chunk's text (its
    paragraphs joined by a space) against each of its images, reduced by ``reduce_mode``
    (avg/max/min); the document is kept when ``any`` (or ``all``) chunk scores lie in
    [min_score, max_score]; documents with no such chunk are kept. ``node`` level scores each
    image against its caption (nearest text before, else after) and removes images out of range.
    ``horizontal_flip``/``vertical_flip`` flip images first, as Data-Juicer's options.

    ``model``: a directory saved by ``mmgen train-clip`` / open_clip, a transformers CLIP directory,
    or an open_clip model name (loaded by :func:`mmgen.backbones.clip.load_clip`; never downloaded here).

    Difference: Data-Juicer reports ``logits_per_text / 100``, the cosine times the model's learned
    logit scale over 100; that equals the cosine reported here when the scale sits at CLIP's cap of
    100 (OpenAI and most open_clip checkpoints). For other models the scale would only rescale
    the thresholds, so the cosine is the better-defined statistic."""

    default_level = "doc"

    @dataclass
    class Params:
        model: str = ""
        min_score: float = 0.1
        max_score: float = 1.0
        any_or_all: str = "any"
        reduce_mode: str = "avg"
        horizontal_flip: bool = False
        vertical_flip: bool = False
        device: str = "cpu"

        def validate(self):
            if not self.model:
                raise ValueError("set params.model to a CLIP directory or open_clip model name")
            if self.reduce_mode not in REDUCE_MODES or self.any_or_all not in ("any", "all"):
                raise ValueError(f"reduce_mode must be one of {REDUCE_MODES} and any_or_all 'any' or 'all'")

    def _pil(self, view, i):
        from PIL import ImageOps

        img = view.pil(i)
        if self.params.horizontal_flip:
            img = ImageOps.mirror(img)
        if self.params.vertical_flip:
            img = ImageOps.flip(img)
        return img

    def _similarities(self, text: str, pils) -> list[float]:
        clip = _clip(self.params.model, self.params.device)
        t = clip.encode_text([text])
        v = clip.encode_image(pils)
        return (v @ t[0]).tolist()

    def _in_range(self, s: float) -> bool:
        return self.params.min_score <= s <= self.params.max_score

    def apply(self, view):
        out, pils = [], {}
        for i, _ in list(view.images()):
            try:
                pils[i] = self._pil(view, i)
            except MediaError as e:
                out.append(Verdict(e.reason, {"error": error_text(e)}, item=i, quarantine=True))
        if self.level == "node":
            for i, cap in image_caption_pairs(view):
                if i in pils:
                    [s] = self._similarities(view.doc.items[cap].text, [pils[i]])
                    out.append(
                        Verdict(
                            None if self._in_range(s) else "low_image_text_similarity",
                            {"similarity": round(s, 6), "caption_item": cap},
                            item=i,
                        )
                    )
            return out
        scores = []
        for texts, images in chunks(view):
            images = [i for i in images if i in pils]
            text = " ".join(view.doc.items[t].text.strip() for t in texts).strip()
            if images and text:
                scores.append(
                    reduce_scores(self._similarities(text, [pils[i] for i in images]), self.params.reduce_mode)
                )
        if scores:
            ok = [self._in_range(s) for s in scores]
            keep = any(ok) if self.params.any_or_all == "any" else all(ok)
            out.append(
                Verdict(None if keep else "low_image_text_similarity", {"similarity": [round(s, 6) for s in scores]})
            )
        return out
