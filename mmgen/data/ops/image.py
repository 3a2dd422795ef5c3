"""Image operators: decodability, size, aspect ratio."""

from __future__ import annotations

from dataclasses import dataclass

from mmgen.data.ops.base import ImageOp, Verdict, error_text, register_op


@register_op("image_decode")
class ImageDecode(ImageOp):
    """Whether the image decodes fully (header and all pixel data). An undecodable image is
    quarantined with the decoder's message, not counted as a quality rejection."""

    def apply(self, view):
        out = []
        for i, img in list(view.images()):
            try:
                pil = view.pil(i)
            except Exception as e:  # noqa: BLE001 - to_pil raises MediaError; anything else is also undecodable
                out.append(Verdict("corrupt_image", {"decodable": False, "bytes": len(img.data or b""),
                                                     "error": error_text(e)}, item=i, quarantine=True))
                continue
            out.append(Verdict(None, {"decodable": True, "format": img.format, "width": pil.width,
                                      "height": pil.height}, item=i))
        return out


@register_op("image_size")
class ImageSize(ImageOp):
    """Shorter and longer side in pixels (from the header); rejects images below ``min_side`` or above ``max_side``."""

    @dataclass
    class Params:
        min_side: int = 32
        max_side: int = 100_000

    def image_stats(self, view, index, image):
        w, h = image.size
        return {"width": w, "height": h, "min_side": min(w, h), "max_side": max(w, h)}

    def judge(self, s):
        if s["min_side"] < self.params.min_side:
            return "image_too_small"
        if s["max_side"] > self.params.max_side:
            return "image_too_large"
        return None


@register_op("image_aspect")
class ImageAspect(ImageOp):
    """Aspect ratio, longer side over shorter side (>= 1); rejects images above ``max_aspect``."""

    @dataclass
    class Params:
        max_aspect: float = 3.0

    def image_stats(self, view, index, image):
        w, h = image.size
        return {"width": w, "height": h, "aspect": round(max(w, h) / max(1, min(w, h)), 4)}

    def judge(self, s):
        return "extreme_aspect" if s["aspect"] > self.params.max_aspect else None
