"""How many caption -> image examples does a tiny decoder need before it binds objects to grid cells?

    python benchmarks/binding_probe.py                       # 128x2 and 256x4, one- and multi-object captions
    python benchmarks/binding_probe.py --steps 3000 --models 128x2 --no-write
    python benchmarks/binding_probe.py --models 128x2 --objects 0 --cells own,target   # the LM's grid_target

The text-to-image problem of the quick start with the image stripped away: a ShapesWorld caption
(word-level tokens) is followed by one token per grid cell, row by row, naming the object in that cell
(one of the 56 size-colour-shape objects) or "empty". A Llama built from config learns it by
next-token prediction on the cell tokens only, from fresh train-split captions drawn with replacement
(batch 64). Every ``--every`` steps it is scored greedily on 500 unseen val captions: the share of
occupied cells whose object token is exactly right.

What it measures is the learning of *binding* — which object the caption puts in which cell — with
nothing else to learn: with one-object captions any attention over the caption finds the attributes,
with up to three the model has to match the cell to the position phrase and read the words before it.
Steps, examples (steps x 64) and seconds until 50% and 90% of the objects are right are reported per
model size, side by side in one run, so the model a CPU budget can afford to bind is known before the
quick start spends 10 minutes training it. Writes the BENCHMARKS.md section "binding_probe" and a PNG.

``--cells`` adds a learned cell embedding to the inputs, as the unified LM's grid positions do: ``own``
gives each cell token the embedding of its own cell (``model.grid_positions``), ``target`` gives each
input the cell it predicts (``model.grid_target``: the ``<img>`` token names cell 0, cell k's token
names cell k + 1); ``none`` adds nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
BATCH = 64
PAD, BOS, IMG = 0, 1, 2
WORD0 = 3


class CaptionGrid:
    """ShapesWorld captions as word ids, and each scene's 3x3 grid of object ids (0 = empty)."""

    def __init__(self):
        from mmgen.world.scene import COLORS, SHAPES, SIZES

        self.objects = [(s, c, z) for s in SHAPES for c in COLORS for z in SIZES]
        self.words: dict[str, int] = {}

    def word_ids(self, text: str) -> list[int]:
        for p in ",.:":
            text = text.replace(p, f" {p}")
        return [self.words.setdefault(w, WORD0 + len(self.words)) for w in text.lower().split()]

    def example(self, rng: random.Random, n_objects: int | None) -> tuple[list[int], list[int]]:
        from mmgen.world import caption, random_scene

        scene = random_scene(rng, "train", n_objects=n_objects)
        grid = [0] * 9
        for o in scene.objects:
            grid[o.cell[0] * 3 + o.cell[1]] = 1 + self.objects.index((o.shape, o.color, o.size))
        return [BOS, *self.word_ids(caption(scene, rng)), IMG], grid

    def cell_token(self, obj: int) -> int:
        return 256 + obj  # after every word id (the caption grammar has < 100 words)


def batch(data: CaptionGrid, items, torch):
    """Inputs and targets for next-token prediction of the 9 cell tokens after the caption."""
    seqs = [ids + [data.cell_token(g) for g in grid] for ids, grid in items]
    n = max(len(s) for s in seqs)
    x = torch.full((len(seqs), n), PAD, dtype=torch.long)
    y = torch.full((len(seqs), n), -100, dtype=torch.long)
    for b, ((ids, grid), s) in enumerate(zip(items, seqs)):
        x[b, : len(s)] = torch.tensor(s)
        # position t predicts token t + 1: the caption's last token (<img>) predicts the first cell
        y[b, len(ids) - 1 : len(s) - 1] = torch.tensor([data.cell_token(g) for g in grid])
    return x, y


def cell_ids(x, y, cells: str, torch):
    """Per input position, 1 + the cell its embedding names (0: none), for the ``--cells`` arm."""
    out = torch.zeros_like(x)
    if cells == "none":
        return out
    predicting = y >= 0  # the <img> token and the first 8 cell tokens, in cell order
    k = predicting.long().cumsum(-1) - 1  # the cell each of them predicts
    if cells == "target":
        return torch.where(predicting, 1 + k, out)
    # own: the cell token at t is the cell predicted at t - 1 (the <img> token has none)
    own = torch.zeros_like(x)
    own[:, 1:] = torch.where(predicting[:, :-1], 1 + k[:, :-1], 0)
    return own


def run(
    model_size: str, n_objects: int | None, steps: int, every: int, lr: float, seed: int, cells: str = "none"
) -> dict:
    import torch

    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in model_size.split("x"))
    data = CaptionGrid()
    rng = random.Random(seed)
    val = [data.example(random.Random(f"val-{i}"), n_objects) for i in range(500)]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256 + 1 + len(data.objects),
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    cell_table = torch.nn.Embedding(10, hidden, padding_idx=0)  # zero-initialised, as in the unified LM
    torch.nn.init.zeros_(cell_table.weight)

    def forward(x, y):
        return model(inputs_embeds=model.get_input_embeddings()(x) + cell_table(cell_ids(x, y, cells, torch))).logits

    opt = torch.optim.AdamW([*model.parameters(), *cell_table.parameters()], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    xv, yv = batch(data, val, torch)
    occupied = yv > data.cell_token(0)
    curve, t_train = [], 0.0
    for step in range(1, steps + 1):
        x, y = batch(data, [data.example(rng, n_objects) for _ in range(BATCH)], torch)
        t0 = time.perf_counter()
        logits = forward(x, y)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_train += time.perf_counter() - t0
        if step % every == 0:
            with torch.no_grad():
                pred = forward(xv, yv).argmax(-1)
            acc = float((pred[occupied] == yv[occupied]).float().mean())
            curve.append({"step": step, "seconds": t_train, "object_accuracy": acc, "loss": loss.item()})
            print(
                f"{model_size} objects={n_objects or '1-3'} cells={cells} step {step}: object accuracy {acc:.3f} "
                f"({t_train:.0f} s)",
                flush=True,
            )
    return {
        "model": model_size,
        "objects": n_objects or "1-3",
        "cells": cells,
        "curve": curve,
        "s_per_step": t_train / steps,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def first_reaching(curve: list[dict], level: float):
    return next((c for c in curve if c["object_accuracy"] >= level), None)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        ax.plot(
            [c["step"] * BATCH for c in r["curve"]],
            [c["object_accuracy"] for c in r["curve"]],
            label=f"{r['model']}, {r['objects']} objects, cells: {r['cells']}",
        )
    ax.set_xlabel("caption -> grid examples seen")
    ax.set_ylabel("objects right (500 val captions)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="128x2,256x4", help="comma-separated HIDDENxLAYERS")
    ap.add_argument("--objects", default="1,0", help="comma-separated objects per caption (0: 1-3, as the world draws)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", default="none", help="comma-separated cell-embedding arms: none, own, target")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = [
        run(m, int(k) or None, args.steps, args.every, args.lr, args.seed, c)
        for m in args.models.split(",")
        for k in args.objects.split(",")
        for c in args.cells.split(",")
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "binding_probe.json").write_text(json.dumps(results, indent=1))
    # the tracked PNG changes only with the section that shows it
    png = OUT / "binding_probe.png" if args.no_write else ROOT / "benchmarks" / "binding_probe.png"
    plot(results, png)

    from mmgen.utils.bench import md_table, write_section

    rows = []
    for r in results:
        row = [r["model"], r["parameters"], r["objects"], r["cells"], round(r["s_per_step"] * 1000, 1)]
        for level in (0.5, 0.9):
            c = first_reaching(r["curve"], level)
            row += [f"{c['step'] * BATCH:,} ({c['seconds']:.0f} s)" if c else f"> {args.steps * BATCH:,}"]
        row.append(round(r["curve"][-1]["object_accuracy"], 3))
        rows.append(row)
    table = md_table(
        [
            "model (hidden x layers)",
            "parameters",
            "objects per caption",
            "cell embedding",
            "ms per step of 64",
            "examples (seconds) to 50% right",
            "to 90% right",
            f"right after {args.steps * BATCH:,}",
        ],
        rows,
    )
    print(table)
    if not args.no_write:
        write_section(
            "binding_probe",
            "Binding probe: caption -> grid cells without the image",
            f"""
{table}

Each row trains from scratch on fresh captions (batch {BATCH}, lr {args.lr}, AdamW, {args.threads} threads), \
scored every
{args.every} steps on 500 unseen val captions; a level is reported at the first score that reaches it. The curves:
`benchmarks/binding_probe.png`.

![binding probe](benchmarks/binding_probe.png)
""",
        )


if __name__ == "__main__":
    main()
