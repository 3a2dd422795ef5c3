"""ShapesWorld: the embedded synthetic world whose truth is known exactly (see DESIGN.md).

Scenes (shapes of named colours and sizes on a 3x3 grid), their renders at any size, captions in one
fixed grammar, QA pairs, build-up documents, videos, spoken captions, labeled defects and the world
writer behind ``mmgen world``. The judge that reads images back is :mod:`mmgen.eval.scene_parser`.
"""

from mmgen.data.synthetic.scene import (  # noqa: F401
    BACKGROUNDS, COLORS, GRID, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, SPLITS, Obj, Scene, random_scene, render,
    render_side, render_size, split_of,
)
from mmgen.data.synthetic.text import (  # noqa: F401
    all_cell_phrases, caption, cell_phrases, parse_caption, parse_objects, qa_pairs,
)
from mmgen.data.synthetic.world import (  # noqa: F401
    DEFECT_TYPES, DOC_KINDS, generate_world, make_doc, write_world,
)
