"""Does an image tokenizer give an object the same codes in every ShapesWorld cell?

    python benchmarks/cell_codes.py runs/quickstart/tokenizer/tokenizer [--render 72] [--objects 40]

Each of ``--objects`` random objects (shape, colour, size, background) is drawn alone in each of the 9
cells, rendered at ``--render`` px (default: render_side of the tokenizer's size, as the quick start's
world renders) and encoded; the pixel codes under its cell are compared across the 9 placements. A
language model drawing from codes that do not depend on where the object stands learns one code
pattern per object instead of one per object and cell. Prints the mean number of distinct blocks per
object (1 = the same everywhere, 9 = all different) and the share of cells equal to the commonest.
When the code grid is not a multiple of 3, the block is the (grid // 3)-square at the cell's top left.
"""

from __future__ import annotations

import argparse
import collections
import random


def cell_blocks(codes, g: int) -> list[tuple]:
    out = []
    for i, (r, c) in enumerate((r, c) for r in range(3) for c in range(3)):
        r0, c0, n = (r * g) // 3, (c * g) // 3, g // 3
        out.append(tuple(codes[i, r0 : r0 + n, c0 : c0 + n].flatten().tolist()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizer")
    ap.add_argument("--render", type=int, default=0, help="render side in px (0: render_side of the tokenizer's size)")
    ap.add_argument("--objects", type=int, default=40)
    args = ap.parse_args()

    import numpy as np
    import torch

    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.utils.compat import ensure_torchvision
    from mmgen.world import BACKGROUNDS, COLORS, SHAPES, SIZES, Obj, Scene, render, render_side

    ensure_torchvision()
    tok = load_image_tokenizer(args.tokenizer)
    side = args.render or render_side(tok.resolution[0])
    rng = random.Random(0)
    distinct, commonest = [], []
    for _ in range(args.objects):
        c, s, z, bg = (
            rng.choice(list(COLORS)),
            rng.choice(SHAPES),
            rng.choice(list(SIZES)),
            rng.choice(list(BACKGROUNDS)),
        )
        imgs = [render(Scene(bg, [Obj(s, c, z, (r, k))]), side, side) for r in range(3) for k in range(3)]
        out = tok.encode(imgs)
        codes = np.asarray(torch.as_tensor(out["pix"] if isinstance(out, dict) else out))
        counts = collections.Counter(cell_blocks(codes, codes.shape[-1]))
        distinct.append(len(counts))
        commonest.append(counts.most_common(1)[0][1] / 9)
    print(
        f"{args.tokenizer}: {tok.resolution[0]} px, {codes.shape[-1]}x{codes.shape[-1]} pixel codes, pictures "
        f"rendered at {side} px: {np.mean(distinct):.2f} distinct code blocks per object (of 9), "
        f"{np.mean(commonest):.3f} of cells equal to the commonest"
    )


if __name__ == "__main__":
    main()
