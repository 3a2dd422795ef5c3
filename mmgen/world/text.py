"""ShapesWorld text: captions in one fixed grammar (and their parser), QA pairs with exact answers,
and the edit steps of build-up documents.

Grammar of a caption (every template uses the same phrases, so :func:`parse_caption` reads all):
    OBJECT  := "a" SIZE COLOR SHAPE ("at the" | "on the" | "in the") POSITION
    OBJECTS := OBJECT | OBJECT " and " OBJECT | OBJECT ", " OBJECT " and " OBJECT
    BG      := COLOR_OF_BACKGROUND " background"
"""

from __future__ import annotations

import random
import re

from mmgen.errors import MMGenError
from mmgen.world.scene import (
    BACKGROUNDS,
    COLORS,
    GRID,
    HELDOUT_PAIRS,
    POSITION_PREPOSITION,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = (
    "{objects}, on a {bg} background.",
    "On a {bg} background: {objects}.",
    "A {bg} background with {objects}.",
    "There is {objects}, on a {bg} background.",
)
_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def position_phrase(cell: tuple[int, int]) -> str:
    p = POSITIONS[tuple(cell)]
    return f"{POSITION_PREPOSITION.get(p, 'at')} the {p}"


def object_phrase(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape} {position_phrase(o.cell)}"


EMPTY_CELL = "an empty cell"


def cell_phrases(scene: Scene) -> list[str]:
    """One phrase per grid cell in row-major order: the object's size, colour and shape, or empty.
    What region-text losses align a cell's image features with (CLIP teacher, DualViTok codes)."""
    out = []
    for r in range(GRID):
        for c in range(GRID):
            o = scene.at((r, c))
            out.append(f"a {o.size} {o.color} {o.shape}" if o else EMPTY_CELL)
    return out


def all_cell_phrases() -> list[str]:
    """Every phrase :func:`cell_phrases` can write (held-out colour-shape pairs included): the classes
    a cell is told apart from."""
    return [EMPTY_CELL] + [f"a {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]


def join_phrases(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random | None = None, template: int | None = None) -> str:
    """A caption of the scene; ``rng`` picks the template and the object order."""
    objs = list(scene.objects)
    if rng is not None:
        rng.shuffle(objs)
    if template is None:
        template = rng.randrange(len(CAPTION_TEMPLATES)) if rng is not None else 0
    return caption_text(objs, scene.background, template)


def caption_text(objs: list[Obj], background: str, template: int) -> str:
    """The caption of template ``template`` naming ``objs`` in the order given."""
    text = CAPTION_TEMPLATES[template].format(objects=join_phrases([object_phrase(o) for o in objs]), bg=background)
    return text[0].upper() + text[1:]


def caption_parts(text: str) -> tuple[int, list[Obj], str] | None:
    """(template, objects in the order the text names them, background) of a caption exactly as
    :func:`caption` writes it; None for any other text (another sentence, or a caption already
    rewritten)."""
    objs = parse_objects(text)
    bg = _BG_RE.search(text.lower())
    if not objs or bg is None:
        return None
    for t in range(len(CAPTION_TEMPLATES)):
        if caption_text(objs, bg.group(1), t) == text:
            return t, objs, bg.group(1)
    return None


_ALT = lambda xs: "|".join(sorted((re.escape(x) for x in xs), key=len, reverse=True))  # noqa: E731
OBJECT_PHRASE_RE = re.compile(
    rf"\b(?:a|an|one)\s+({_ALT(SIZES)})\s+({_ALT(COLORS)})\s+({_ALT(SHAPES)})\s+"
    rf"(?:at|on|in)\s+the\s+({_ALT(_CELL_OF)})\b"
)
_BG_RE = re.compile(rf"\b({_ALT(BACKGROUNDS)})\s+background\b")


def parse_objects(text: str) -> list[Obj]:
    """Every "a SIZE COLOR SHAPE at the POSITION" phrase in ``text``."""
    t = " ".join(text.lower().split())
    return [
        Obj(shape=m.group(3), color=m.group(2), size=m.group(1), cell=_CELL_OF[m.group(4)])
        for m in OBJECT_PHRASE_RE.finditer(t)
    ]


def swap_attribute(text: str, rng: random.Random, attr: str | None = None) -> str:
    """``text`` with one object's shape or colour (``attr``, else chosen by ``rng``) replaced by another
    value that keeps the object's colour-shape pair allowed in the train split: a hard negative caption
    that differs from the true one in that word only (NegCLIP's "swap", SugarCrepe's "replace-att")."""
    matches = list(OBJECT_PHRASE_RE.finditer(text.lower()))  # lower() keeps ASCII offsets, so spans index ``text``
    if not matches:
        raise MMGenError(f"no 'a SIZE COLOR SHAPE at the POSITION' phrase to swap in {text[:80]!r}")
    m = rng.choice(matches)
    color, shape = m.group(2), m.group(3)
    attr = attr or rng.choice(("color", "shape"))
    if attr == "shape":
        group, options = 3, [s for s in SHAPES if s != shape and (color, s) not in HELDOUT_PAIRS]
    else:
        group, options = 2, [c for c in COLORS if c != color and (c, shape) not in HELDOUT_PAIRS]
    new = rng.choice(options)
    return text[: m.start(group)] + new + text[m.end(group) :]


def parse_caption(text: str) -> Scene:
    """The scene a caption (or a text-to-image prompt in the caption grammar) describes."""
    t = " ".join(text.lower().split())
    bg = _BG_RE.search(t)
    objs = parse_objects(t)
    if bg is None or not objs:
        raise MMGenError(
            f"not a ShapesWorld caption: {text[:80]!r} (expected e.g. 'a large red circle at "
            f"the top left, on a black background.')"
        )
    try:
        return Scene(background=bg.group(1), objects=objs).validate()
    except ValueError as e:
        raise MMGenError(f"inconsistent ShapesWorld caption {text[:80]!r}: {e}") from None


# -- questions and answers ----------------------------------------------------------------------------
def _unique_name(scene: Scene, o: Obj) -> str:
    """A short noun phrase that picks out ``o`` alone: "the red circle" if unique, else by position."""
    same = [p for p in scene.objects if p.color == o.color and p.shape == o.shape]
    if len(same) == 1:
        return f"the {o.color} {o.shape}"
    return f"the {o.shape} {position_phrase(o.cell)}"


def answer_phrases() -> frozenset[str]:
    """Every answer :func:`qa_pairs` can give: one word, except two-word positions ("top left")."""
    return frozenset([*COLORS, *SHAPES, *BACKGROUNDS, *NUMBER_WORDS, *SIZES, *POSITIONS.values(), "yes", "no"])


def qa_pairs(scene: Scene, rng: random.Random, n: int = 3) -> list[tuple[str, str, str]]:
    """``n`` (question, answer, type) triples about the scene; answers are exact phrases of
    :func:`answer_phrases` (single words, or a two-word position such as "bottom right")."""
    makers = ["color", "shape", "count", "count_color", "exists", "position", "size", "background", "relation"]
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for _ in range(n * 10):
        if len(out) >= n:
            break
        kind = rng.choice(makers)
        o = rng.choice(scene.objects)
        if kind == "color":
            q, a = f"What color is the {o.shape} {position_phrase(o.cell)}?", o.color
        elif kind == "shape":
            q, a = f"What shape is {position_phrase(o.cell)}?", o.shape
        elif kind == "count":
            q, a = "How many shapes are there?", NUMBER_WORDS[len(scene.objects)]
        elif kind == "count_color":
            c = rng.choice(list(COLORS))
            q, a = f"How many {c} shapes are there?", NUMBER_WORDS[sum(p.color == c for p in scene.objects)]
        elif kind == "exists":
            c, s = (o.color, o.shape) if rng.random() < 0.5 else (rng.choice(list(COLORS)), rng.choice(SHAPES))
            q = f"Is there a {c} {s}?"
            a = "yes" if any(p.color == c and p.shape == s for p in scene.objects) else "no"
        elif kind == "position":
            q, a = f"Where is {_unique_name(scene, o)}?", POSITIONS[o.cell]
        elif kind == "size":
            q, a = f"Is {_unique_name(scene, o)} large or small?", o.size
        elif kind == "background":
            q, a = "What color is the background?", scene.background
        else:  # relation between two objects: left/right by column, above/below by row
            if len(scene.objects) < 2:
                continue
            o, p = rng.sample(scene.objects, 2)
            rel = rng.choice(["left of", "right of", "above", "below"])
            holds = {
                "left of": o.cell[1] < p.cell[1],
                "right of": o.cell[1] > p.cell[1],
                "above": o.cell[0] < p.cell[0],
                "below": o.cell[0] > p.cell[0],
            }[rel]
            q = f"Is {_unique_name(scene, o)} {rel} {_unique_name(scene, p)}?"
            a = "yes" if holds else "no"
        if q in seen:
            continue
        seen.add(q)
        out.append((q, a, kind))
    return out


# -- build-up edits ------------------------------------------------------------------------------------
def random_edit(scene: Scene, rng: random.Random, allowed_pairs: list[tuple[str, str]]) -> tuple[Scene, str, dict]:
    """One edit (add / remove / move / recolor / resize) of ``scene``: (new scene, instruction, edit facts).
    New colour-shape pairs are drawn from ``allowed_pairs`` so edits respect the split."""
    objs = list(scene.objects)
    free = [c for c in POSITIONS if scene.at(c) is None]
    ops = []
    if len(objs) < GRID * GRID and len(objs) < 3 and free:
        ops.append("add")
    if len(objs) > 1:
        ops.append("remove")
    if free:
        ops.append("move")
    ops += ["recolor", "resize"]
    op = rng.choice(ops)
    if op == "add":
        color, shape = rng.choice(allowed_pairs)
        new = Obj(shape=shape, color=color, size=rng.choice(list(SIZES)), cell=rng.choice(free))
        return Scene(scene.background, objs + [new]), f"Add {object_phrase(new)}.", {"op": op, "object": new.to_dict()}
    o = rng.choice(objs)
    name = _unique_name(scene, o)
    rest = [p for p in objs if p is not o]
    if op == "remove":
        return Scene(scene.background, rest), f"Remove {name}.", {"op": op, "object": o.to_dict()}
    if op == "move":
        cell = rng.choice(free)
        new = Obj(o.shape, o.color, o.size, cell)
        text = f"Move {name} to the {POSITIONS[cell]}."
    elif op == "recolor":
        colors = [c for c in COLORS if c != o.color and (c, o.shape) in allowed_pairs]
        new = Obj(o.shape, rng.choice(colors), o.size, o.cell)
        text = f"Make {name} {new.color}."
    else:
        new = Obj(o.shape, o.color, "small" if o.size == "large" else "large", o.cell)
        text = f"Make {name} {new.size}."
    return Scene(scene.background, rest + [new]), text, {"op": op, "object": o.to_dict(), "result": new.to_dict()}


# -- defective text ----------------------------------------------------------------------------------
# Fixed sentences in other languages, written for this project (not translations of any source).
FOREIGN_SENTENCES = {
    "fr": [
        "Un grand cercle rouge se trouve en haut à gauche, sur un fond noir.",
        "Il fait beau aujourd'hui et nous allons nous promener au bord de la rivière.",
        "La boulangerie du coin ouvre très tôt le matin.",
    ],
    "de": [
        "Ein kleines blaues Quadrat liegt in der Mitte auf weißem Hintergrund.",
        "Morgen fahren wir mit dem Zug in die Berge und wandern bis zum Abend.",
        "Die Bibliothek bleibt am Sonntag leider geschlossen.",
    ],
    "es": [
        "Un triángulo verde grande está abajo a la derecha, sobre un fondo azul oscuro.",
        "Mañana vamos a cocinar una paella con nuestros amigos del barrio.",
        "El museo de la ciudad tiene una exposición nueva de pintura.",
    ],
}


def gibberish(rng: random.Random, n_words: int = 12) -> str:
    letters = "bcdfghjklmnpqrstvwxzaeiouy"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def ngram_spam(rng: random.Random, scene: Scene | None = None) -> str:
    if scene is not None and scene.objects and rng.random() < 0.5:
        o = rng.choice(scene.objects)
        gram = f"{o.color} {o.shape}"
    else:
        gram = rng.choice(["buy now", "click here", "best price", "free shapes"])
    return " ".join([gram] * rng.randint(10, 25)) + "."


def small_text_edit(text: str, rng: random.Random) -> str:
    """A near-duplicate of ``text``: one character-level edit that keeps it readable."""
    op = rng.choice(["drop_char", "double_char", "punct", "case"])
    if op == "punct":
        return text.rstrip(".") + "!"
    if op == "case":
        return text.lower() if text != text.lower() else text.upper()
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    i = rng.choice(letters) if letters else 0
    if op == "drop_char":
        return text[:i] + text[i + 1 :]
    return text[:i] + text[i] + text[i:]
