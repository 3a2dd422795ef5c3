"""ShapesWorld's data-quality operators, judged exactly by the scene parser. They register into
:mod:`mmgen.data.ops` when this module is imported (``import mmgen.world.ops``), like any operator
defined outside the data package.

``scene_caption_match`` fills the slot of caption-image alignment: on real data a model score does
(CLIP similarity); on ShapesWorld the scene parser reads the image back into facts and the caption
grammar reads the caption into facts, so a mismatched caption is detected exactly and offline.

``scene_near_dedup`` finds near-duplicate pictures by what they show. Perceptual hashes cannot tell two
flat synthetic scenes apart when they differ only in one small object (a small red circle vs a small
orange square at the same place: the same pHash, a thumbnail difference under 1 grey level), while a
re-encoded, resized or slightly cropped copy of one scene moves further than that. The scene parser
reads each picture back into (background, objects), and two pictures are near duplicates when they
parse to the same scene and their perceptual hashes agree within ``radius`` bits.

A crop of a pixel or two per side shrinks the parser's 3x3 grid with the picture, so a border object
no longer fits any shape at its cell centre and the copy does not parse. Such a picture is padded
back to a square canvas with its own border colour, centred, at each side from its longer side up to
``uncrop`` pixels more, and every canvas that parses gives another key to match (or, when the picture
is kept, to register). What still cannot be read is compared by perceptual hash alone, against every
kept image, within the much tighter ``unparsed_radius``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from mmgen.data.ops.base import ImageOp, StatefulOp, Verdict, error_text, image_caption_pairs, register_op
from mmgen.data.ops.dedup import image_dup_verdict
from mmgen.data.ops.hashing import hamming, phash
from mmgen.errors import MediaError
from mmgen.world.scene_parser import parse_scene, scene_contains
from mmgen.world.text import parse_caption


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

    def apply(self, view):
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
            out.append(
                Verdict(
                    None if ok else "caption_mismatch",
                    {"parsed": True, "caption_item": cap[0]},
                    item=i if self.params.drop == "image" else cap[0],
                )
            )
        return out


def uncropped_canvases(pil, uncrop: int):
    """The picture centred on square canvases of side max(w, h) .. max(w, h) + ``uncrop``, filled
    with the median colour of its border: the frames a slightly cropped square original had."""
    rgb = pil.convert("RGB")
    w, h = rgb.size
    if uncrop <= 0 or abs(w - h) > uncrop or min(w, h) < 16:
        return []
    a = np.asarray(rgb)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    out = []
    for side in range(max(w, h), max(w, h) + uncrop + 1):
        canvas = PILImage.new("RGB", (side, side), fill)
        canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
        out.append(canvas)
    return out


def key_of(scene) -> str | None:
    """A parsed scene as canonical JSON, a comparable key (None: the picture did not parse)."""
    if scene is None:
        return None
    return json.dumps(scene.to_dict() if hasattr(scene, "to_dict") else str(scene), sort_keys=True)


def scene_key(pil) -> str | None:
    """The key of the scene a picture parses to."""
    return key_of(parse_scene(pil))


@register_op("scene_near_dedup")
class SceneNearDedup(StatefulOp):
    """Near-duplicate images across the run: same parsed ShapesWorld scene and DCT perceptual hash
    (64 bits) within ``radius``; the first kept image wins. ``node`` level removes the copy."""

    default_level = "node"

    @dataclass
    class Params:
        radius: int = 32
        unparsed_radius: int = 4
        uncrop: int = 4  # pixels a cropped copy's square canvas may exceed its longer side (0: off)

        def validate(self):
            if not (0 <= self.radius <= 64 and 0 <= self.unparsed_radius <= 64):
                raise ValueError("radius must be in 0..64 (bits of a 64-bit perceptual hash)")
            if not 0 <= self.uncrop <= 16:
                raise ValueError("uncrop must be in 0..16 pixels")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str | None, list[tuple[int, str, int]]] = {}  # key -> (phash, doc id, kept position)
        self._n = 0  # images registered so far: the position that makes "earliest kept" well defined

    def signature(self, view):
        out = {}
        for i, _ in view.images():
            try:
                pil = view.pil(i)
            except MediaError:
                continue
            key, alts = key_of(view.derived("scene", i, parse_scene)), []
            if key is None:  # perhaps a cropped copy: the keys of its uncropped canvases
                for canvas in uncropped_canvases(pil, self.params.uncrop):
                    k = scene_key(canvas)
                    if k is not None and all(k != a for a, _ in alts):
                        alts.append((k, phash(canvas)))
            out[i] = (key, phash(pil), alts)
        return out

    def _hits(self, key: str | None, h: int) -> list:
        if key is None:
            cands = (e for entries in self.seen.values() for e in entries)
            radius = self.params.unparsed_radius
        else:
            cands, radius = iter(self.seen.get(key, ())), self.params.radius
        return [(first_pos, d, first) for (kh, first, first_pos) in cands if (d := hamming(kh, h)) <= radius]

    def _match(self, key: str | None, h: int, alts) -> tuple[str, int] | None:
        """(first doc, distance) of the earliest kept image this one duplicates, or None."""
        if key is not None:
            hits = self._hits(key, h)
        else:  # unreadable: the scenes of its uncropped canvases, else the tight perceptual-hash fallback
            hits = [x for k, ah in alts for x in self._hits(k, ah)] or self._hits(None, h)
        if not hits:
            return None
        _, d, first = min(hits)
        return first, d

    def decide(self, view, sig, doc_id):
        return [image_dup_verdict(i, sig[i][1], self._match(*sig[i])) for i, _ in view.images() if i in sig]

    def commit(self, view, sig, doc_id):
        for i, _ in view.images():
            if i in sig:
                key, h, alts = sig[i]
                self._add([key, f"{h:x}", doc_id])
                for k, ah in alts:  # a kept crop is found again by the original's key
                    self._add([k, f"{ah:x}", doc_id])

    def _insert(self, e):
        self._n += 1
        self.seen.setdefault(e[0], []).append((int(e[1], 16), e[2], self._n))
