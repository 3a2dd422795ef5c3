"""ShapesWorld scenes: the facts (:class:`Scene`, :class:`Obj`), the palette and the renderer.

Every visual choice of the world lives in the constants below, so the renderer, the caption grammar
and the scene parser agree by construction. The choices are made to survive the tiny preset's image
path (64x64 pixels, a VQ with 8x downsampling, i.e. 8x8 codes): four shapes whose silhouettes differ
in fill ratio and convexity, seven saturated colours far apart in CIELAB, and three neutral
backgrounds that no shape colour comes near.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import numpy as np

# -- the world's vocabulary (single source of truth) ------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Saturated colours, pairwise >= ~45 apart in CIELAB, none near a background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (250, 135, 20),
    "yellow": (245, 215, 25),
    "green": (30, 170, 50),
    "cyan": (30, 200, 220),
    "blue": (35, 70, 230),
    "magenta": (215, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "navy": (15, 20, 70),
}
# Side of the shape's bounding square as a fraction of the shorter side of its grid cell. The gap
# between the two (0.5 vs 0.8) is what lets size survive blur and 8x8-code reconstruction.
SIZES: dict[str, float] = {"small": 0.5, "large": 0.8}
GRID = 3
MAX_OBJECTS = 3
# Cell -> the phrase used in captions ("at the top left", "in the center").
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
POSITION_PREPOSITION: dict[str, str] = {"center": "in", "left": "on", "right": "on"}  # default "at"
# Arm thickness of the cross as a fraction of its side: thick enough to stay a cross after blur.
CROSS_ARM = 1 / 3

# Colour-shape pairs that never appear in the train split (compositional generalisation test).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "cross"),
        ("yellow", "square"),
    }
)
SPLITS = ("train", "val", "heldout")
VAL_FRACTION = 1 / 20  # of scenes without a held-out pair, chosen by a stable hash of the scene


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col) on the GRID x GRID grid

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "cell": list(self.cell)}

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(shape=d["shape"], color=d["color"], size=d["size"], cell=(int(d["cell"][0]), int(d["cell"][1])))

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)

    def __post_init__(self):
        self.objects = sorted(self.objects, key=lambda o: o.cell)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(background=d["background"], objects=[Obj.from_dict(o) for o in d.get("objects", [])])

    def key(self) -> str:
        """Canonical text form (objects in cell order): equal scenes have equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def at(self, cell: tuple[int, int]) -> Obj | None:
        return next((o for o in self.objects if o.cell == tuple(cell)), None)

    def validate(self) -> Scene:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects in one cell")
        for o in self.objects:
            if o.shape not in SHAPES or o.color not in COLORS or o.size not in SIZES:
                raise ValueError(f"unknown object attribute in {o}")
            if not (0 <= o.cell[0] < GRID and 0 <= o.cell[1] < GRID):
                raise ValueError(f"cell {o.cell} outside the {GRID}x{GRID} grid")
        return self


def has_heldout_pair(scene: Scene) -> bool:
    return any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)


def split_of(scene: Scene) -> str:
    """The split a scene belongs to: ``heldout`` if it holds a held-out colour-shape pair, else
    ``val`` for a fixed 1/20 of scenes (stable hash of the canonical form), else ``train``."""
    if has_heldout_pair(scene):
        return "heldout"
    h = int.from_bytes(hashlib.sha1(scene.key().encode()).digest()[:4], "big")
    return "val" if h % round(1 / VAL_FRACTION) == 0 else "train"


def pairs_allowed(split: str) -> list[tuple[str, str]]:
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    return [p for p in all_pairs if p not in HELDOUT_PAIRS] if split != "heldout" else all_pairs


def random_object(rng: random.Random, cell: tuple[int, int], split: str = "train") -> Obj:
    color, shape = rng.choice(pairs_allowed(split))
    return Obj(shape=shape, color=color, size=rng.choice(list(SIZES)), cell=cell)


def random_scene(rng: random.Random, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene whose :func:`split_of` is ``split`` (rejection sampling; scenes are cheap)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    cells = list(POSITIONS)
    for _ in range(10_000):
        n = n_objects or rng.randint(1, MAX_OBJECTS)
        chosen = rng.sample(cells, n)
        objs = [random_object(rng, c, split) for c in chosen]
        if split == "heldout" and not any((o.color, o.shape) in HELDOUT_PAIRS for o in objs):
            # Force one held-out pair so heldout scenes are not mostly ordinary ones.
            c, s = rng.choice(sorted(HELDOUT_PAIRS))
            objs[0] = Obj(shape=s, color=c, size=objs[0].size, cell=objs[0].cell)
        scene = Scene(background=rng.choice(list(BACKGROUNDS)), objects=objs)
        if split_of(scene) == split:
            return scene
    raise RuntimeError(f"could not sample a scene for split {split}")


# -- rendering --------------------------------------------------------------------------------------
def cell_geometry(width: int, height: int, cell: tuple[int, int]) -> tuple[float, float, float]:
    """(center x, center y, side of the cell's inscribed square) in pixels."""
    cw, ch = width / GRID, height / GRID
    return (cell[1] + 0.5) * cw, (cell[0] + 0.5) * ch, min(cw, ch)


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """Boolean coverage of pixel centres (xs, ys) by ``shape`` of bounding square ``side`` at (cx, cy)."""
    h = side / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base at the bottom of the bounding square
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":
        t = h * CROSS_ARM
        return ((np.abs(dx) <= h) & (np.abs(dy) <= t)) | ((np.abs(dx) <= t) & (np.abs(dy) <= h))
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(canvas: np.ndarray, shape: str, rgb, cx: float, cy: float, side: float, scale: float = 1.0) -> None:
    """Paint a shape into an (H, W, 3) uint8 canvas in place; coordinates are in output pixels and
    ``scale`` is the supersampling factor of the canvas. Only the shape's bounding box is touched."""
    H, W = canvas.shape[:2]
    cx, cy, side = cx * scale, cy * scale, side * scale
    h = side / 2 + 1
    x0, x1 = max(0, int(cx - h)), min(W, int(np.ceil(cx + h)) + 1)
    y0, y1 = max(0, int(cy - h)), min(H, int(np.ceil(cy + h)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    m = shape_mask(shape, xs, ys, cx, cy, side)
    canvas[y0:y1, x0:x1][m] = rgb


def render_objects(
    background: str | tuple, placed: list[tuple], width: int = 64, height: int = 64, supersample: int = 1
):
    """Render free-form placements ``(shape, rgb_or_color_name, cx, cy, side)`` (used by videos for
    in-between frames). ``supersample`` > 1 anti-aliases by box-filtering a larger canvas."""
    from PIL import Image

    bg = BACKGROUNDS[background] if isinstance(background, str) else tuple(background)
    k = max(1, int(supersample))
    canvas = np.empty((height * k, width * k, 3), np.uint8)
    canvas[:] = bg
    for shape, color, cx, cy, side in placed:
        rgb = COLORS[color] if isinstance(color, str) else tuple(int(v) for v in color)
        draw_shape(canvas, shape, rgb, cx, cy, side, scale=k)
    img = Image.fromarray(canvas, "RGB")
    return img.resize((width, height), Image.BOX) if k > 1 else img


def placement(obj: Obj, width: int, height: int) -> tuple:
    cx, cy, cell_side = cell_geometry(width, height, obj.cell)
    return (obj.shape, obj.color, cx, cy, SIZES[obj.size] * cell_side)


WORLD_SIZE = 64  # the side the world renders its pictures at unless asked otherwise


def render_side(size: int, at_least: int = WORLD_SIZE) -> int:
    """The side to render a picture at that will be resized to ``size``: the smallest multiple of ``size``
    that is at least ``at_least``. An integer downscale moves every cell by whole pixels, so when ``size``
    is a multiple of GRID an object is the same pixels in every cell (and a patch tokenizer whose grid
    divides the cell gives it the same codes wherever it stands)."""
    return size * -(-at_least // size)


def render_size(resolution) -> tuple[int, int]:
    """``render_side`` of each side of a (width, height) ``resolution``: where to render pictures that a
    tokenizer of that resolution will read, as the quick start's world renders its corpus."""
    return tuple(render_side(int(x)) for x in resolution)


def render(scene: Scene, width: int = 64, height: int = 64, supersample: int = 1):
    """The scene as a PIL RGB image of any size and aspect ratio. Shapes keep their proportions
    (a circle stays round); aliased by default so every pixel is a palette colour."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return render_objects(
        scene.background, [placement(o, width, height) for o in scene.objects], width, height, supersample
    )
