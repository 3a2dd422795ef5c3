"""InterleavedEval's five aspects, judged exactly on ShapesWorld's interleaved documents.

InterleavedEval (Liu et al., 2024) scores interleaved generation on text quality, perceptual quality,
image coherence, text-image coherence and helpfulness, with GPT-4o as the judge. On ShapesWorld every
aspect has an exact rule, because the world's grammar says what an instruction means and the scene
parser says what a picture shows. One step is: the scene before, an edit instruction (from the
document, or written by the model), and the picture the model drew after it.

- **text quality** (only where the model writes the instruction): the text is one sentence of the
  world's edit grammar (add / remove / move / recolour / resize) whose object exists in the scene
  before and whose change can be made (:func:`apply_instruction` returns a scene);
- **perceptual quality**: the picture is a well-formed ShapesWorld scene (the parser reads it: a
  palette background, every blob a clean shape of a palette colour, centred in its cell);
- **image coherence**: the picture keeps what the instruction leaves alone: the background and every
  object the edit does not touch, with the same shape, colour, size and cell;
- **text-image coherence**: the picture shows the change the instruction names: every object the edit
  creates is there and every object it removes or replaces is gone;
- **helpfulness**: the step does what was asked, all of it and nothing else: the parsed scene equals
  the scene the instruction leads to.
"""

from __future__ import annotations

import re

from mmgen.world.scene import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene

ASPECTS = ("text_quality", "perceptual_quality", "image_coherence", "text_image_coherence", "helpfulness")

_CELL_OF = {p: c for c, p in POSITIONS.items()}
_alt = lambda xs: "|".join(sorted((re.escape(x) for x in xs), key=len, reverse=True))  # noqa: E731
_POS = _alt(_CELL_OF)
_NAME = rf"the (?:(?P<c>{_alt(COLORS)}) (?P<s>{_alt(SHAPES)})|(?P<s2>{_alt(SHAPES)}) (?:at|on|in) the (?P<p>{_POS}))"
_EDITS = {
    "add": re.compile(
        rf"^add an? (?P<z>{_alt(SIZES)}) (?P<c>{_alt(COLORS)}) (?P<s>{_alt(SHAPES)}) (?:at|on|in) the (?P<p>{_POS})\.$"
    ),
    "remove": re.compile(rf"^remove {_NAME}\.$"),
    "move": re.compile(rf"^move {_NAME} to the (?P<to>{_POS})\.$"),
    "recolor": re.compile(rf"^make {_NAME} (?P<new>{_alt(COLORS)})\.$"),
    "resize": re.compile(rf"^make {_NAME} (?P<new>{_alt(SIZES)})\.$"),
}


def _find(scene: Scene, m) -> Obj | None:
    if m.group("c"):
        same = [o for o in scene.objects if o.color == m.group("c") and o.shape == m.group("s")]
        return same[0] if len(same) == 1 else None
    o = scene.at(_CELL_OF[m.group("p")])
    return o if o is not None and o.shape == m.group("s2") else None


def apply_instruction(scene: Scene, text: str) -> Scene | None:
    """The scene after an edit instruction of the world's grammar, or None when ``text`` is not one
    (another sentence, an object the scene lacks or names ambiguously, an occupied target cell)."""
    t = " ".join(text.strip().lower().split())
    for op, rx in _EDITS.items():
        m = rx.match(t)
        if not m:
            continue
        if op == "add":
            cell = _CELL_OF[m.group("p")]
            if scene.at(cell) is not None:
                return None
            return Scene(scene.background, scene.objects + [Obj(m.group("s"), m.group("c"), m.group("z"), cell)])
        o = _find(scene, m)
        if o is None:
            return None
        rest = [p for p in scene.objects if p is not o]
        if op == "remove":
            return Scene(scene.background, rest)
        if op == "move":
            cell = _CELL_OF[m.group("to")]
            if scene.at(cell) is not None:
                return None
            return Scene(scene.background, rest + [Obj(o.shape, o.color, o.size, cell)])
        new = m.group("new")
        if (new == o.color) or (new == o.size):
            return None  # a change that changes nothing is no edit
        changed = Obj(o.shape, new, o.size, o.cell) if op == "recolor" else Obj(o.shape, o.color, new, o.cell)
        return Scene(scene.background, rest + [changed])
    return None


def judge_step(
    before: Scene, instruction: str, pred: Scene | None, truth: Scene | None = None, model_text: bool = False
) -> dict:
    """Each aspect's verdict on one step: ``{aspect: {"pass": bool, "why": str}}``. ``truth`` is the
    scene the document shows next (else the instruction applied to ``before``); ``model_text`` adds
    text quality, for instructions the model wrote."""
    out: dict[str, dict] = {}
    applied = apply_instruction(before, instruction)
    if model_text:
        out["text_quality"] = {
            "pass": applied is not None,
            "why": "an edit of the world's grammar that applies"
            if applied is not None
            else "not an applicable edit instruction of the world's grammar",
        }
    truth = truth if truth is not None else applied
    out["perceptual_quality"] = {
        "pass": pred is not None,
        "why": "parses as a ShapesWorld scene" if pred is not None else "the parser cannot read it",
    }
    if truth is None:  # an instruction that says nothing applicable: nothing to be coherent with
        return out
    kept = set(before.objects) & set(truth.objects)
    created = set(truth.objects) - set(before.objects)
    gone = set(before.objects) - set(truth.objects)
    got = set(pred.objects) if pred is not None else set()
    lost = sorted(o.describe() + " at the " + o.position for o in kept - got)
    bg_ok = pred is not None and pred.background == truth.background
    out["image_coherence"] = {
        "pass": pred is not None and not lost and bg_ok,
        "why": "kept the background and every untouched object"
        if pred is not None and not lost and bg_ok
        else ("lost " + ", ".join(lost) if lost else "background changed" if pred is not None else "unreadable"),
    }
    missing = sorted(o.describe() + " at the " + o.position for o in created - got)
    stayed = sorted(o.describe() + " at the " + o.position for o in gone & got)
    ok = pred is not None and not missing and not stayed
    out["text_image_coherence"] = {
        "pass": ok,
        "why": "shows the change"
        if ok
        else "; ".join(
            filter(
                None,
                [
                    "missing " + ", ".join(missing) if missing else "",
                    "still shows " + ", ".join(stayed) if stayed else "",
                    "" if pred is not None else "unreadable",
                ],
            )
        ),
    }
    exact = pred is not None and pred.background == truth.background and set(pred.objects) == set(truth.objects)
    out["helpfulness"] = {"pass": exact, "why": "the scene asked for, exactly" if exact else "not the scene asked for"}
    return out
