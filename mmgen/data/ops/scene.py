"""Caption/image agreement for ShapesWorld, judged exactly by the scene parser.

This is the slot for caption-image alignment. On real data it is filled by a model score (issue 3:
CLIP similarity); on ShapesWorld the scene parser reads the image back into facts and the caption
grammar reads the caption into facts, so a mismatched caption is detected exactly and offline.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmgen.data.ops.base import ImageOp, Verdict, error_text, image_caption_pairs, register_op
from mmgen.errors import MediaError, MMGenError


def _parsers():
    try:
        from mmgen.eval.scene_parser import parse_scene, scene_contains
        from mmgen.data import synthetic
    except ImportError as e:
        raise MMGenError(f"scene_caption_match needs the ShapesWorld scene parser ({e}); "
                         "remove the op from the recipe") from None
    parse_caption = getattr(synthetic, "parse_caption", None)
    if parse_caption is None:
        raise MMGenError("scene_caption_match needs mmgen.data.synthetic.parse_caption, which this "
                         "checkout lacks; remove the op from the recipe")
    return parse_scene, parse_caption, scene_contains


@register_op("scene_caption_match")
class SceneCaptionMatch(ImageOp):
    """Whether each image shows what its caption says: the caption (the nearest text item before
    the image, else the one after) is parsed into required objects, the image by the scene parser;
    a mismatch when a parsed caption names an object the parsed image lacks. Images or captions
    that do not parse are not judged. ``node`` level drops the image (or its caption, ``drop: text``)."""

    @dataclass
    class Params:
        drop: str = "image"

        def validate(self):
            if self.drop not in ("image", "text"):
                raise ValueError("drop must be 'image' or 'text'")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _parsers()  # fail at recipe load, not mid-run

    def apply(self, view):
        parse_scene, parse_caption, scene_contains = _parsers()
        out = []
        for i, cap_i in image_caption_pairs(view):
            cap = (cap_i, view.doc.items[cap_i])
            try:
                want = parse_caption(cap[1].text)
            except Exception:  # noqa: BLE001 - free text the grammar does not cover is not judged
                want = None
            if not want:
                continue
            try:
                pred = view.derived("scene", i, parse_scene)
            except MediaError as e:
                out.append(Verdict(e.reason, {"error": error_text(e)}, item=i, quarantine=True))
                continue
            if pred is None:
                out.append(Verdict(None, {"parsed": False}, item=i))
                continue
            objs = getattr(want, "objects", want)
            bg = getattr(want, "background", None)
            ok = scene_contains(pred, objs, background=bg)
            out.append(Verdict(None if ok else "caption_mismatch", {"parsed": True, "caption_item": cap[0]},
                               item=i if self.params.drop == "image" else cap[0]))
        return out
