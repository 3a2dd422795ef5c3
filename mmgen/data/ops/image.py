"""Image operators: decodability, format, size and shape, aspect ratio, file size, blur."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mmgen.data.media_format import sniff_format
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
                # a bomb or a mislabelled file keeps its own reason; every other failure is a corrupt image
                reason = getattr(e, "reason", None)
                reason = reason if reason in ("too_many_pixels", "format_mismatch") else "corrupt_image"
                out.append(
                    Verdict(
                        reason,
                        {"decodable": False, "bytes": len(img.data or b""), "error": error_text(e)},
                        item=i,
                        quarantine=True,
                    )
                )
                continue
            out.append(
                Verdict(
                    None, {"decodable": True, "format": img.format, "width": pil.width, "height": pil.height}, item=i
                )
            )
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


@register_op("image_format")
class ImageFormat(ImageOp):
    """Container format of the encoded bytes (sniffed from the magic number, else the declared
    one); rejects formats outside ``formats``."""

    @dataclass
    class Params:
        formats: list = field(default_factory=lambda: ["jpeg", "png", "webp", "gif", "bmp", "tiff"])

    def image_stats(self, view, index, image):
        return {"format": sniff_format(image.load()) or image.format or "unknown"}

    def judge(self, s):
        return None if s["format"] in self.params.formats else "image_format"


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (kernel [[0,1,0],[1,-4,1],[0,1,0]]) over interior
    pixels: low for blurred or flat images, high for sharp detail."""
    g = gray.astype(np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


@register_op("image_blur")
class ImageBlur(ImageOp):
    """Sharpness as the variance of the Laplacian of the gray image (Pech-Pacheco et al. 2000);
    rejects images below ``min_variance``. Images are first shrunk to ``max_side`` on their longer
    side so the statistic does not depend on resolution alone."""

    @dataclass
    class Params:
        min_variance: float = 100.0
        max_side: int = 512

    def image_stats(self, view, index, image):
        pil = view.pil(index)
        if max(pil.size) > self.params.max_side:
            pil = pil.copy()
            pil.thumbnail((self.params.max_side, self.params.max_side))
        return {"laplacian_var": round(laplacian_variance(np.asarray(pil.convert("L"))), 4)}

    def judge(self, s):
        return None if s["laplacian_var"] >= self.params.min_variance else "blurry_image"


class AnyAllImageOp(ImageOp):
    """An image statistic kept inside a range, Data-Juicer style: ``node`` level removes each failing
    image; ``doc`` level keeps the document when ``any`` (Data-Juicer's default) or ``all`` of its
    images pass. Documents without images are kept."""

    def image_stats(self, view, index, image):
        raise NotImplementedError

    def passes(self, stats: dict) -> bool:
        raise NotImplementedError

    def judge(self, s):
        return None if self.passes(s) else self.reason

    def apply(self, view):
        verdicts = super().apply(view)
        if self.level == "node":
            return verdicts
        judged = [v for v in verdicts if not v.quarantine]
        out = [v for v in verdicts if v.quarantine]
        if not judged:
            return out
        ok = [v.reason is None for v in judged]
        keep = any(ok) if self.params.any_or_all == "any" else all(ok)
        # per-image stats for the report, then the one document decision
        out += [Verdict(None, v.stats, item=v.item) for v in judged]
        out.append(Verdict(None if keep else self.reason, {"images": len(ok), "passing": sum(ok)}))
        return out


def _any_or_all_ok(self):
    if self.any_or_all not in ("any", "all"):
        raise ValueError("any_or_all must be 'any' or 'all'")


@register_op("image_aspect_ratio_filter")
class ImageAspectRatioFilter(AnyAllImageOp):
    """Aspect ratio width / height (Data-Juicer ``image_aspect_ratio_filter``), kept when
    ``min_ratio <= w/h <= max_ratio``."""

    reason = "aspect_ratio"
    default_level = "doc"

    @dataclass
    class Params:
        min_ratio: float = 0.333
        max_ratio: float = 3.0
        any_or_all: str = "any"
        validate = _any_or_all_ok

    def image_stats(self, view, index, image):
        w, h = image.size
        return {"aspect_ratio": round(w / h, 6) if h else float("inf")}

    def passes(self, s):
        return self.params.min_ratio <= s["aspect_ratio"] <= self.params.max_ratio


@register_op("image_shape_filter")
class ImageShapeFilter(AnyAllImageOp):
    """Width and height in pixels from the header (Data-Juicer ``image_shape_filter``), kept when
    both lie in their [min, max] ranges."""

    reason = "image_shape"
    default_level = "doc"

    @dataclass
    class Params:
        min_width: int = 1
        max_width: float = float("inf")
        min_height: int = 1
        max_height: float = float("inf")
        any_or_all: str = "any"
        validate = _any_or_all_ok

    def image_stats(self, view, index, image):
        w, h = image.size
        return {"width": w, "height": h}

    def passes(self, s):
        p = self.params
        return p.min_width <= s["width"] <= p.max_width and p.min_height <= s["height"] <= p.max_height


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
    "tb": 1024**4,
    "tib": 1024**4,
}


def parse_size(value) -> int:
    """'10KB', '1.5 MiB', 2048 -> bytes (binary multiples, as Data-Juicer's size parser)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {value!r} (write e.g. 2048, '10KB', '1.5MB', '1TB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@register_op("image_size_filter")
class ImageSizeFilter(AnyAllImageOp):
    """Encoded file size in bytes (Data-Juicer ``image_size_filter``: the size of the image file),
    kept when ``min_size <= bytes <= max_size``; sizes accept units ('10KB', '1MB', binary
    multiples). For pixel dimensions use ``image_shape_filter`` or ``image_size``."""

    reason = "image_file_size"
    default_level = "doc"

    @dataclass
    class Params:
        min_size: str = "0"
        max_size: str = "1TB"
        any_or_all: str = "any"

        def validate(self):
            _any_or_all_ok(self)
            parse_size(self.min_size), parse_size(self.max_size)

    def image_stats(self, view, index, image):
        return {"image_bytes": len(image.load())}

    def passes(self, s):
        return parse_size(self.params.min_size) <= s["image_bytes"] <= parse_size(self.params.max_size)
