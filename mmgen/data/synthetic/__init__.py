"""ShapesWorld: the embedded synthetic world whose truth is known exactly (see DESIGN.md)."""

from mmgen.data.synthetic.scene import (  # noqa: F401
    BACKGROUNDS, COLORS, GRID, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, SPLITS, Obj, Scene, random_scene, render,
    split_of,
)
