"""GenEval-style compositional text-to-image evaluation, on ShapesWorld and on real images.

GenEval (Ghosh et al., 2023) turns each prompt into metadata of what the image must hold and judges
a generated image by rules over an object detector's output. mmgen writes the same metadata format
(one JSON object per line: ``tag``, ``prompt``, ``include`` -- a list of ``{class, count, color?,
position?}`` -- and ``exclude``) and the same per-image results (``correct``, ``reason``, ``tag``,
``prompt``, ``metadata``, ``details``), so its files read like GenEval's.

The six tags and their rules:

- ``single_object`` / ``two_object``: every ``include`` class is detected at least ``count`` times;
- ``counting``: ``include`` count ``N`` and ``exclude`` count ``N + 1``: exactly ``N`` objects of the
  class (an extra one fails);
- ``colors``: the object of the class has the colour;
- ``position``: ``position: [relation, i]`` says the object stands in ``relation`` ("left of",
  "right of", "above", "below") to the object of ``include[i]``, beyond a margin (on ShapesWorld's
  3x3 grid: in another column or row, the cell is the unit; on boxes: centres apart by more than
  ``margin`` times the mean box side);
- ``color_attr``: two classes each with its own colour (attribute binding: swapping the two colours
  fails).

On ShapesWorld the class is the shape, the prompt is a caption in the world's grammar (every object
with size, colour, shape and cell, as the model learnt to read it), and the detector is the scene
parser, which is exact. Prompts holding a colour-shape pair the training split never shows are
marked ``heldout: true``. For real images the detector is an open-vocabulary model from transformers
(:class:`ZeroShotDetector`: OWL-ViT, OWLv2, Grounding DINO) loaded from a local path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mmgen.errors import MMGenError

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
# Centres of two boxes must be this many mean box sides apart to stand in a relation (GenEval's
# margin idea); a grid cell apart is a whole cell side, far beyond it.
POSITION_MARGIN = 0.5


# -- metadata ---------------------------------------------------------------------------------------
def _check_entry(e, where: str) -> dict:
    if not isinstance(e, dict):
        raise MMGenError(
            f"{where}: expected a JSON object per line with tag, prompt and include (GenEval's metadata format)"
        )
    missing = [k for k in ("tag", "prompt", "include") if k not in e]
    if missing:
        raise MMGenError(
            f"{where}: missing {', '.join(missing)} (GenEval's metadata format: tag, prompt, include, exclude)"
        )
    if e["tag"] not in TAGS:
        raise MMGenError(f"{where}: unknown tag {e['tag']!r} (use one of {', '.join(TAGS)})")
    for kind in ("include", "exclude"):
        reqs = e.get(kind, [])
        if not isinstance(reqs, list) or not all(
            isinstance(r, dict) and "class" in r and isinstance(r.get("count", 1), int) for r in reqs
        ):
            raise MMGenError(f"{where}: {kind} must be a list of {{class, count, ...}} objects")
        for r in reqs:
            pos = r.get("position")
            if pos is not None and not (
                isinstance(pos, list)
                and len(pos) == 2
                and pos[0] in RELATIONS
                and isinstance(pos[1], int)
                and 0 <= pos[1] < len(e["include"])
            ):
                raise MMGenError(
                    f"{where}: position must be [relation, include index] with relation one of "
                    f"{', '.join(RELATIONS)}, got {pos!r}"
                )
    return e


def load_metadata(path: str | Path) -> list[dict]:
    """Read a GenEval metadata jsonl; a line in another format is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise MMGenError(f"prompt file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise MMGenError(f"{p}:{i}: not JSON ({err.msg}); expected GenEval metadata jsonl") from None
        out.append(_check_entry(e, f"{p}:{i}"))
    if not out:
        raise MMGenError(f"{p}: no prompts")
    return out


def write_metadata(entries: Sequence[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return p


def shapesworld_metadata(n_per_tag: int = 25, seed: int = 0, heldout_every: int = 4) -> list[dict]:
    """GenEval metadata for ShapesWorld: ``n_per_tag`` prompts of each tag; every ``heldout_every``-th
    prompt of a tag holds a held-out colour-shape pair (the others are val-split scenes). Each entry
    keeps the scene it was drawn from (``scene``) and ``heldout``."""
    from mmgen.world import caption
    from mmgen.world.scene import (
        BACKGROUNDS,
        HELDOUT_PAIRS,
        POSITIONS,
        SHAPES,
        SIZES,
        Obj,
        Scene,
        pairs_allowed,
        split_of,
    )

    rng = random.Random(f"geneval-{seed}")
    seen_pairs = pairs_allowed("train")
    heldout_pairs = sorted(HELDOUT_PAIRS)

    def obj(color_shape, cell):
        c, s = color_shape
        return Obj(shape=s, color=c, size=rng.choice(list(SIZES)), cell=cell)

    def draw(tag: str, heldout: bool):
        cells = rng.sample(list(POSITIONS), 3)
        if tag in ("single_object", "colors"):
            objs = [obj(rng.choice(heldout_pairs if heldout else seen_pairs), cells[0])]
        elif tag == "counting":
            n = rng.choice((2, 3))
            shape = rng.choice(SHAPES)
            pairs = [p for p in (HELDOUT_PAIRS if heldout else seen_pairs) if p[1] == shape] or [
                p for p in seen_pairs if p[1] == shape
            ]
            objs = [obj(rng.choice(pairs), cells[i]) for i in range(n)]
            if heldout and not any((o.color, o.shape) in HELDOUT_PAIRS for o in objs):
                return None
        else:  # two objects of different shapes (and, for color_attr, different colours)
            first = rng.choice(heldout_pairs if heldout else seen_pairs)
            rest = [p for p in seen_pairs if p[1] != first[1] and (tag != "color_attr" or p[0] != first[0])]
            objs = [obj(first, cells[0]), obj(rng.choice(rest), cells[1])]
            rng.shuffle(objs)
        scene = Scene(background=rng.choice(list(BACKGROUNDS)), objects=objs)
        if split_of(scene) != ("heldout" if heldout else "val"):
            return None
        return scene

    entries = []
    for tag in TAGS:
        for i in range(n_per_tag):
            heldout = heldout_every > 0 and i % heldout_every == heldout_every - 1
            scene = None
            while scene is None:
                scene = draw(tag, heldout)
            entries.append(_entry(tag, scene, caption(scene, rng), rng, heldout))
    return entries


def _entry(tag: str, scene, prompt: str, rng: random.Random, heldout: bool) -> dict:
    objs = list(scene.objects)
    if tag in ("single_object", "two_object"):
        include = [{"class": o.shape, "count": 1} for o in objs]
        exclude = []
    elif tag == "counting":
        include = [{"class": objs[0].shape, "count": len(objs)}]
        exclude = [{"class": objs[0].shape, "count": len(objs) + 1}]
    elif tag in ("colors", "color_attr"):
        include = [{"class": o.shape, "count": 1, "color": o.color} for o in objs]
        exclude = []
    else:  # position: the second object in a relation to the first that holds in the scene
        a, b = objs
        include = [
            {"class": a.shape, "count": 1},
            {"class": b.shape, "count": 1, "position": [rng.choice(_grid_relations(b.cell, a.cell)), 0]},
        ]
        exclude = []
    return {
        "tag": tag,
        "include": include,
        "exclude": exclude,
        "prompt": prompt,
        "heldout": heldout,
        "scene": scene.to_dict(),
    }


# -- detections and the rules ------------------------------------------------------------------------
@dataclass
class Detection:
    """One detected object: class, confidence, box (x0, y0, x1, y1 in pixels), and where known its
    colour name and grid cell (the scene parser knows both exactly)."""

    cls: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None
    cell: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"class": self.cls, "score": round(float(self.score), 4), "box": [round(float(v), 2) for v in self.box]}
        if self.color is not None:
            d["color"] = self.color
        if self.cell is not None:
            d["cell"] = list(self.cell)
        return {**d, **self.extra}


class Detector(Protocol):
    """What the GenEval rules need from a detector: the objects of ``classes`` in an image, and
    optionally why it could read nothing (``last_reason``)."""

    def detect(self, image, classes: Sequence[str]) -> list[Detection]: ...


def _grid_relations(cell, target) -> list[str]:
    rels = []
    if cell[1] < target[1]:
        rels.append("left of")
    if cell[1] > target[1]:
        rels.append("right of")
    if cell[0] < target[0]:
        rels.append("above")
    if cell[0] > target[0]:
        rels.append("below")
    return rels


def relations(obj: Detection, target: Detection, margin: float = POSITION_MARGIN) -> list[str]:
    """The relations ``obj`` stands in to ``target``: by grid cell when both have one, else by box
    centres more than ``margin`` mean box sides apart."""
    if obj.cell is not None and target.cell is not None:
        return _grid_relations(obj.cell, target.cell)
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = obj.box, target.box
    dx = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    dy = (ay0 + ay1) / 2 - (by0 + by1) / 2
    side = ((ax1 - ax0) + (ay1 - ay0) + (bx1 - bx0) + (by1 - by0)) / 4
    rels = []
    if dx < -margin * side:
        rels.append("left of")
    if dx > margin * side:
        rels.append("right of")
    if dy < -margin * side:
        rels.append("above")
    if dy > margin * side:
        rels.append("below")
    return rels


def judge(entry: dict, detections: Sequence[Detection], margin: float = POSITION_MARGIN) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, reason); the reason names every failed rule."""
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(d.cls, []).append(d)
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for req in entry["include"]:
        cls, count = req["class"], int(req.get("count", 1))
        found = by_class.get(cls, [])
        if len(found) < count:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
            matched.append(None)
            continue
        if req.get("color"):
            right = [d for d in found if d.color == req["color"]]
            if len(right) < count:
                others = ", ".join(f"{d.color} {cls}" for d in found if d.color != req["color"])
                reasons.append(
                    f"expected {req['color']} {cls}>={count}, found {len(right)} {req['color']}"
                    + (f"; and {others}" if others else "")
                )
                matched.append(None)
                continue
            found = right
        matched.append(found[:count])
    for req, group in zip(entry["include"], matched):
        pos = req.get("position")
        if not pos or group is None:
            continue
        rel, ti = pos
        targets = matched[ti]
        if targets is None:
            reasons.append(f"no target for {req['class']} to be {rel}")
            continue
        for d in group:
            for t in targets:
                got = relations(d, t, margin)
                if rel not in got:
                    reasons.append(f"expected {req['class']} {rel} target, found {' and '.join(got) or 'no relation'}")
    for req in entry.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= int(req["count"]):
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return (not reasons, "\n".join(reasons))


def result_record(
    entry: dict,
    detections: Sequence[Detection],
    filename: str = "",
    margin: float = POSITION_MARGIN,
    unreadable: str | None = None,
) -> dict:
    """One line of GenEval's per-image results (``metadata`` and ``details`` as JSON strings)."""
    correct, reason = judge(entry, detections, margin)
    if unreadable and not detections:
        reason = f"{reason}\n(detector: {unreadable})" if reason else f"(detector: {unreadable})"
    details: dict[str, list] = {}
    for d in detections:
        details.setdefault(d.cls, []).append(d.to_dict())
    return {
        "filename": filename,
        "tag": entry["tag"],
        "prompt": entry["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(entry),
        "details": json.dumps(details),
    }


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy per tag, overall (GenEval's score: the mean of the tags' accuracies) and the share of
    all images, each with counts and a Wilson interval; the same split by ``heldout``."""
    from mmgen.eval.stats import proportion

    def block(recs):
        tags = {}
        for tag in TAGS:
            rs = [r for r in recs if r["tag"] == tag]
            if rs:
                tags[tag] = proportion(sum(r["correct"] for r in rs), len(rs))
        overall = sum(t["value"] for t in tags.values()) / len(tags) if tags else None
        return {"tags": tags, "overall": overall, "images": proportion(sum(r["correct"] for r in recs), len(recs))}

    heldout = [r for r in records if json.loads(r["metadata"]).get("heldout")]
    seen = [r for r in records if not json.loads(r["metadata"]).get("heldout")]
    return {**block(records), "seen_pairs": block(seen), "heldout_pairs": block(heldout)}


# -- detectors --------------------------------------------------------------------------------------
class SceneParserDetector:
    """The ShapesWorld scene parser as a detector: exact shape (the class), colour and cell."""

    def __init__(self):
        self.last_reason: str | None = None

    def detect(self, image, classes: Sequence[str] = ()) -> list[Detection]:
        from mmgen.world.scene import GRID
        from mmgen.world.scene_parser import parse_scene_report

        res = parse_scene_report(image)
        self.last_reason = res.reason
        if res.scene is None:
            return []
        w, h = image.size
        cw, ch = w / GRID, h / GRID
        return [
            Detection(
                o.shape,
                1.0,
                (o.cell[1] * cw, o.cell[0] * ch, (o.cell[1] + 1) * cw, (o.cell[0] + 1) * ch),
                color=o.color,
                cell=tuple(o.cell),
                extra={"size": o.size},
            )
            for o in res.scene.objects
            if not classes or o.shape in classes
        ]


# Named colours for boxes of real images: the nearest of these to a box's median pixel. GenEval
# classifies colour with CLIP on the crop; a detector wrapper may pass its own ``color_fn`` instead.
BASIC_COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "brown": (120, 75, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}


def box_color(image, box, palette: dict = BASIC_COLORS) -> str:
    import numpy as np

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = np.asarray(image.convert("RGB"))[max(0, y0) : max(y0 + 1, y1), max(0, x0) : max(x0 + 1, x1)].reshape(-1, 3)
    med = np.median(crop, axis=0) if len(crop) else np.zeros(3)
    return min(palette, key=lambda c: float(np.sum((np.array(palette[c]) - med) ** 2)))


class ZeroShotDetector:
    """An open-vocabulary detector from transformers (``AutoModelForZeroShotObjectDetection`` with its
    processor: OWL-ViT, OWLv2, Grounding DINO), loaded from a local directory. Each class is queried
    as "a photo of a CLASS"; boxes above ``threshold`` become detections, coloured by ``color_fn``."""

    def __init__(self, path: str | Path, threshold: float = 0.1, device: str = "cpu", color_fn=box_color):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        p = Path(path)
        if not p.is_dir():
            raise MMGenError(f"detector not found: {p} (give a local directory saved with save_pretrained)")
        self.processor = AutoProcessor.from_pretrained(p)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(p).to(device).eval()
        self.threshold, self.device, self.color_fn = threshold, device, color_fn
        self.last_reason = None

    def detect(self, image, classes: Sequence[str]) -> list[Detection]:
        import torch

        classes = list(classes)
        queries = [f"a photo of a {c}" for c in classes]
        image = image.convert("RGB")
        inputs = self.processor(text=[queries], images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        res = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[image.size[::-1]], text_labels=[queries]
        )[0]
        out = []
        labels = res.get("text_labels") or [queries[int(i)] for i in res["labels"]]
        for score, box, label in zip(res["scores"].tolist(), res["boxes"].tolist(), labels):
            cls = classes[queries.index(label)] if label in queries else label
            out.append(Detection(cls, score, tuple(box), color=self.color_fn(image, box) if self.color_fn else None))
        return out
