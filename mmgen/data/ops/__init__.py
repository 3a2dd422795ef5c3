"""Data-quality operators for ``mmgen filter``: a registry of named, typed, level-aware filters.

    from mmgen.data.ops import build_op, OPS
    op = build_op("text_length", level="node", params={"min_words": 3})

Add an operator with ``@register_op("name")`` on a subclass of :class:`Op` (see ``base.py``). The
built-in operators register when this package is imported; operators defined elsewhere register when
their module is (ShapesWorld's: ``import mmgen.world.ops``).
"""

from mmgen.data.ops import dedup, image, language, quality, select, similarity, text, text_dj  # noqa: F401,E402 - registration side effects
from mmgen.data.ops.base import (  # noqa: F401
    LEVELS,
    OPS,
    DocView,
    ImageOp,
    NoParams,
    Op,
    StatefulOp,
    TextOp,
    Verdict,
    build_op,
    register_op,
)
from mmgen.data.ops.hashing import hamming, minhash, phash  # noqa: F401,E402
