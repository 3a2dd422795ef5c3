"""What an LM writes in the cells of colour-shape pairs it never saw, given everything before them.

    python benchmarks/heldout_cells.py runs/quickstart/sft/final [more bundles] [--scenes 100]

For ``--scenes`` held-out-split scenes (each holds at least one held-out pair), the caption's prompt is
followed by the picture's true block tokens (teacher forcing), and at each cell the model's most likely
pixel code is compared with the true one: per cell kind (empty, seen object, held-out object), and for
held-out cells whether the written block has the right colour and the right shape (read from the block
labels of :func:`mmgen.tokenizers.blocks.compose_blocks`). A bundle whose tokenizer has no block for a
held-out pair cannot be right there. Unlike the evaluation's text-to-image figure this isolates one cell:
its mistakes are the model's, not those of the cells it wrote before. Writes the "Held-out cells"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import random


def probe(bundle_dir: str, scenes: int) -> dict:
    import numpy as np
    import torch

    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import MMGenProcessor
    from mmgen.world import caption, random_scene, render
    from mmgen.world.scene import HELDOUT_PAIRS, render_size

    bundle = load_bundle(bundle_dir)
    proc, tok, vocab, model = MMGenProcessor.from_bundle(bundle), bundle.image_tokenizer, bundle.vocab, bundle.model
    model.eval()
    lo, hi = vocab.code_range("pix")
    labels = getattr(tok, "labels", None) or [None] * (hi - lo)
    grid0 = np.zeros((3, 3), dtype=np.int64)
    where = {}  # cell -> its index inside an image block
    for r in range(3):
        for c in range(3):
            one = grid0.copy()
            one[r, c] = 1
            a, b = vocab.image_block(grid0), vocab.image_block(one)
            where[(r, c)] = next(k for k in range(len(a)) if a[k] != b[k])
    rng = random.Random(7)
    hits, total, written = collections.Counter(), collections.Counter(), collections.Counter()
    side = render_size(tok.resolution)
    for _ in range(scenes):
        scene = random_scene(rng, "heldout")
        codes = tok.encode([render(scene, *side)])
        grid = np.asarray((codes["pix"] if isinstance(codes, dict) else codes)[0])
        prompt = proc.prompt_ids(caption(scene, rng), image=True)[:-1]  # the block brings its own <image>
        ids = prompt + vocab.image_block(grid)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for cell, k in where.items():
            at = len(prompt) + k
            guess = lo + int(logits[at - 1, lo:hi].argmax())
            obj = scene.at(cell)
            kind = "empty" if obj is None else "held-out" if (obj.color, obj.shape) in HELDOUT_PAIRS else "seen"
            total[kind] += 1
            hits[kind] += int(guess == ids[at])
            if kind == "held-out":
                lab = labels[guess - lo]
                if not lab or lab.get("kind") != "object":
                    written["no object / unlabelled"] += 1
                else:
                    colour = "right colour" if lab["color"] == obj.color else "wrong colour"
                    written[f"{colour}, {'right' if lab['shape'] == obj.shape else 'wrong'} shape"] += 1
    return {
        "bundle": bundle_dir,
        "composed_rows": (tok.fit_stats or {}).get("composed", 0) if hasattr(tok, "fit_stats") else 0,
        "factors": bool(getattr(model, "block_factors", None) is not None),
        "accuracy": {k: (hits[k], total[k]) for k in ("empty", "seen", "held-out")},
        "held_out_written": dict(written),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--scenes", type=int, default=100)
    args = ap.parse_args()

    import torch

    from mmgen.utils.bench import write_section

    torch.set_num_threads(1)
    rows = [probe(b, args.scenes) for b in args.bundles]
    kinds = ("right colour, right shape", "right colour, wrong shape", "wrong colour, right shape")
    lines = [
        f"Teacher-forced, {args.scenes} held-out-split scenes per bundle; the model's most likely block at each cell.",
        "",
        "| bundle | composed blocks | block factors | empty cells | seen objects | held-out objects | held-out cells "
        "written as: " + " / ".join(kinds) + " / other |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        acc = " | ".join(f"{h / n:.3f} ({h}/{n})" for h, n in r["accuracy"].values())
        n = max(1, r["accuracy"]["held-out"][1])
        shares = [r["held_out_written"].get(k, 0) for k in kinds]
        shares.append(r["accuracy"]["held-out"][1] - sum(shares))
        lines.append(
            f"| `{r['bundle']}` | {r['composed_rows']} | {'yes' if r['factors'] else 'no'} | {acc} | "
            + " / ".join(f"{s / n:.2f}" for s in shares)
            + " |"
        )
        print(r)
    write_section("heldout_cells", "Held-out colour-shape pairs, cell by cell", "\n".join(lines))


if __name__ == "__main__":
    main()
