"""ShapesWorld: the embedded synthetic world whose truth is known exactly.

Scenes (shapes of named colours and sizes on a 3x3 grid) and their renders at any size
(:mod:`~mmgen.world.scene`), captions in one fixed grammar and QA pairs (:mod:`~mmgen.world.text`),
videos and spoken captions (:mod:`~mmgen.world.media`), build-up documents, labeled defects and the
world writer behind ``mmgen world`` (:mod:`~mmgen.world.documents`); the scene parser, the exact judge
that reads any picture back into facts (:mod:`~mmgen.world.scene_parser`); and the data-quality
operators built on it (:mod:`~mmgen.world.ops`). Every package from tokenizers up may use it.
"""

from mmgen.world.documents import (  # noqa: F401
    DEFECT_TYPES,
    DOC_KINDS,
    generate_world,
    make_doc,
    write_world,
)
from mmgen.world.scene import (  # noqa: F401
    BACKGROUNDS,
    COLORS,
    GRID,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    random_scene,
    render,
    render_side,
    render_size,
    split_of,
)
from mmgen.world.text import (  # noqa: F401
    all_cell_phrases,
    caption,
    cell_phrases,
    parse_caption,
    parse_objects,
    qa_pairs,
)
