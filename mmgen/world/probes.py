"""Single-object probe scenes: every object the world can draw (held-out colour-shape pairs included),
each alone on every background, with the label of every cell.

A tokenizer encodes these to show which code stands for which object (see
:func:`mmgen.tokenizers.blocks.compose_blocks`): the codes of a held-out pair exist in the tokenizer even
though no training document shows one, and labelled codes let a model share what it learns about "red"
or "triangle" across every code that has them (:mod:`mmgen.training.block_factors`).
"""

from __future__ import annotations

import itertools

from mmgen.world.scene import BACKGROUNDS, COLORS, GRID, SHAPES, SIZES, Obj, Scene

# Where each object is drawn: a corner, the centre and the opposite corner, so a code that depends on
# where its cell lies shows up as a second code of the same label.
PROBE_CELLS = ((0, 0), (1, 1), (2, 2))


def object_label(obj: Obj, background: str) -> dict:
    return {"kind": "object", "color": obj.color, "shape": obj.shape, "size": obj.size, "background": background}


def empty_label(background: str) -> dict:
    return {"kind": "empty", "background": background}


def object_probes(cells=PROBE_CELLS) -> list[tuple[Scene, dict]]:
    """(scene, {cell: label}) for every colour, shape, size and background, the object at each of
    ``cells``; every other cell is labelled empty."""
    out = []
    for color, shape, size, bg in itertools.product(COLORS, SHAPES, SIZES, BACKGROUNDS):
        for cell in cells:
            obj = Obj(shape, color, size, cell)
            labels = {(r, c): empty_label(bg) for r in range(GRID) for c in range(GRID)}
            labels[cell] = object_label(obj, bg)
            out.append((Scene(bg, [obj]), labels))
    return out
