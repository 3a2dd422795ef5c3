"""Near-duplicate ShapesWorld pictures, judged by what they show.

Perceptual hashes cannot tell two flat synthetic scenes apart when they differ only in one small
object (a small red circle vs a small orange square at the same place: the same pHash, a thumbnail
difference under 1 grey level), while a re-encoded, resized or slightly cropped copy of one scene
moves further than that. The scene parser reads each picture back into (background, objects), and
two pictures are near duplicates when they parse to the same scene and their perceptual hashes
agree within ``radius`` bits. An image the parser cannot read (a crop can cut a small object in
half) is compared by perceptual hash alone, against every kept image, within the much tighter
``unparsed_radius``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mmgen.data.ops.base import StatefulOp, Verdict, register_op
from mmgen.data.ops.dedup import hamming, phash
from mmgen.errors import MediaError, MMGenError


def scene_key(pil) -> str | None:
    try:
        from mmgen.eval.scene_parser import parse_scene
    except ImportError as e:
        raise MMGenError(f"scene_near_dedup needs the ShapesWorld scene parser ({e}); remove the op") from None
    scene = parse_scene(pil)
    if scene is None:
        return None
    return json.dumps(scene.to_dict() if hasattr(scene, "to_dict") else str(scene), sort_keys=True)


@register_op("scene_near_dedup")
class SceneNearDedup(StatefulOp):
    """Near-duplicate images across the run: same parsed ShapesWorld scene and DCT perceptual hash
    (64 bits) within ``radius``; the first kept image wins. ``node`` level removes the copy."""

    default_level = "node"

    @dataclass
    class Params:
        radius: int = 32
        unparsed_radius: int = 4

        def validate(self):
            if not (0 <= self.radius <= 64 and 0 <= self.unparsed_radius <= 64):
                raise ValueError("radius must be in 0..64 (bits of a 64-bit perceptual hash)")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str, list[tuple[int, str]]] = {}

    def signature(self, view):
        out = {}
        for i, _ in view.images():
            try:
                pil = view.pil(i)
            except MediaError:
                continue
            out[i] = (scene_key(pil), phash(pil))
        return out

    def _match(self, key: str | None, h: int):
        if key is None:
            cands = (e for entries in self.seen.values() for e in entries)
            radius = self.params.unparsed_radius
        else:
            cands, radius = iter(self.seen.get(key, ())), self.params.radius
        hits = [(first_pos, d, first) for (kh, first, first_pos) in cands if (d := hamming(kh, h)) <= radius]
        return min(hits)[1:] if hits else None  # the earliest kept image wins

    def decide(self, view, sig, doc_id):
        out = []
        for i, _ in view.images():
            if i not in sig:
                continue
            key, h = sig[i]
            hit = self._match(key, h)
            stats = {"phash": f"{h:x}"} | ({"distance": hit[0]} if hit else {})
            out.append(Verdict("near_duplicate_image" if hit else None, stats, item=i,
                               duplicate_of=hit[1] if hit else None))
        return out

    def commit(self, view, sig, doc_id):
        for i, _ in view.images():
            if i in sig:
                self._add([sig[i][0], f"{sig[i][1]:x}", doc_id])

    def _insert(self, e):
        self._n = getattr(self, "_n", 0) + 1
        self.seen.setdefault(e[0], []).append((int(e[1], 16), e[2], self._n))
