"""The diffusion detokenizer as `mmgen generate`'s image output, against the tokenizer's own decoder.

    python benchmarks/detokenizer_output.py --checkpoint runs/quickstart/sft/final --n 100

Runs ``mmgen generate --checkpoint CKPT --mode t2i --prompt P --seed S`` through ``mmgen.cli.main`` in this
process, one call per prompt (``benchmarks/generate_defaults.py``'s ``run_cli``; the bundle loads once
for the whole run, each decoder is warmed up by one untimed call), on the first ``--n`` val prompts of
the quick start's t2i evaluation, once with ``--detokenizer none`` (the image tokenizer's decoder: the
baseline) and once per ``--steps`` with the bundle's detokenizer (or ``--detokenizer DIR``). Every call
has the same seed, so every setting draws the same generated codes: the LM's sampling does not depend
on the decoder.

Per setting: scene agreement with the baseline (the scene parser reads the same scene from both
pictures, over the prompts whose baseline picture parses), PSNR against the baseline picture, the
text-to-image accuracy each picture earns against its prompt (the quick start's judge), and seconds
per ``mmgen generate`` call as a ratio to the baseline's. With ``--sr2x`` the 2x super-resolution
pipeline draws too (PSNR against the bicubic 2x of the baseline picture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from generate_defaults import run_cli, score

from mmgen.utils.bench import md_table, write_section


def psnr(a, b) -> float:
    """PSNR (dB) of two PIL pictures of the same size, 8-bit."""
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = max(float(((x - y) ** 2).mean()), 1e-10)
    return 10 * np.log10(255.0**2 / mse)


def agreement(images, baseline) -> tuple[float, int]:
    """Share of the baseline's parseable pictures whose scene the detokenizer's picture repeats, and how many parsed."""
    from mmgen.world.scene_parser import compare_scenes, parse_scene

    base = [parse_scene(b) if b is not None else None for b in baseline]
    pairs = [(im, s) for im, s in zip(images, base) if s is not None]
    same = sum(im is not None and compare_scenes(parse_scene(im), s)["exact"] for im, s in pairs)
    return same / max(1, len(pairs)), len(pairs)


def main() -> None:
    import torch
    from PIL import Image

    from mmgen.eval.t2i import t2i_eval_set
    from mmgen.models.detokenizer_set import DETOKENIZER_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/quickstart/sft/final")
    ap.add_argument("--detokenizer", default=None, help="default: the checkpoint's own detokenizer/")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="4,8,25")
    ap.add_argument("--sr2x", action="store_true", help="also draw with the 2x super-resolution pipeline (8 steps)")
    ap.add_argument("--note", default="", help="what the pictures show, looked at by eye (goes into the section)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    detok = args.detokenizer or str(Path(args.checkpoint) / DETOKENIZER_DIR)
    if not Path(detok).is_dir():
        raise SystemExit(f"{detok} does not exist: give --detokenizer DIR or a checkpoint with a detokenizer/ folder")
    items = t2i_eval_set(args.n, "val", seed=1234)  # the quick start's t2i prompts
    prompts = [it.prompt for it in items]
    given = ["--detokenizer", args.detokenizer] if args.detokenizer else []

    import functools

    import mmgen.models.bundle as bundle_mod

    # One load for the whole run, and one untimed call per decoder first: every row then times drawing
    # alone, with nothing loading inside it (run_cli caches on top of this cache).
    bundle_mod.load_bundle = functools.lru_cache(maxsize=1)(bundle_mod.load_bundle)
    for warm in (["--detokenizer", "none"], given, [*given, "--detok-scale", "2"] if args.sr2x else None):
        if warm is not None:
            run_cli(args.checkpoint, prompts[:1], warm, args.seed)
    base, base_s = run_cli(args.checkpoint, prompts, ["--detokenizer", "none"], args.seed)
    m = score(base, items)
    rows = [
        [
            "image tokenizer's decoder (`--detokenizer none`)",
            "-",
            "100%",
            "inf",
            f"{m['accuracy']:.3f}",
            f"{base_s / len(prompts):.3f}",
            "1.00",
        ]
    ]
    print(rows[-1], flush=True)
    keep = {"tokenizer": base}
    runs = [
        (f"detokenizer, {s} steps (`--detok-steps {s}`)", s, [*given, "--detok-steps", str(s)], False)
        for s in map(int, args.steps.split(","))
    ]
    if args.sr2x:
        runs.append(
            (
                "2x super-resolution detokenizer, 8 steps (`--detok-scale 2`)",
                8,
                [*given, "--detok-scale", "2", "--detok-steps", "8"],
                True,
            )
        )
    for name, steps, extra, sr in runs:
        images, secs = run_cli(args.checkpoint, prompts, extra, args.seed)
        keep[name] = images
        ref = [b.resize(im.size, Image.BICUBIC) if sr else b for b, im in zip(base, images)]
        agree, parsed = agreement(images, base)
        m = score(images, items)
        rows.append(
            [
                name,
                steps,
                f"{100 * agree:.1f}% of {parsed}",
                f"{np.mean([psnr(a, b) for a, b in zip(images, ref)]):.2f}",
                f"{m['accuracy']:.3f}",
                f"{secs / len(prompts):.3f}",
                f"{secs / base_s:.2f}",
            ]
        )
        print(rows[-1], flush=True)

    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    k = min(8, len(prompts))
    strips = [keep["tokenizer"]] + [keep[name] for name, *_ in runs if not name.startswith("2x")]
    side = max(im.size[0] for im in strips[0])
    grid = Image.new("RGB", (k * side * 3, len(strips) * side * 3), "white")
    for r, strip in enumerate(strips):
        for c, im in enumerate(strip[:k]):
            grid.paste(im.resize((side * 3, side * 3), Image.NEAREST), (c * side * 3, r * side * 3))
    grid.save(out / "detokenizer_output.png")

    facts = (
        json.loads((Path(detok) / "x1" / "conditioner" / "config.json").read_text())
        if (Path(detok) / "x1").is_dir()
        else json.loads((Path(detok) / "conditioner" / "config.json").read_text())
    )
    table = md_table(
        [
            "decoder",
            "steps",
            "scene agreement with the decoder's picture",
            "PSNR dB vs it",
            "t2i accuracy (all objects)",
            "s / `mmgen generate` call",
            "time vs the decoder",
        ],
        rows,
    )
    body = (
        f"Checkpoint `{args.checkpoint}`, detokenizer `{detok}` (conditioned on its tokenizer's "
        f"{' + '.join(facts['grid_names'])} codes{' and decode' if facts.get('decoded_channels') else ''}); "
        f"the first {args.n} val prompts of the quick start's t2i evaluation, each drawn by one "
        f"`mmgen generate --mode t2i --seed {args.seed}` call per setting (the same codes in every setting). "
        "Scene agreement: the scene parser reads the same scene from the detokenizer's picture as from the "
        "tokenizer decoder's, over the pictures of the decoder that parse; PSNR against the decoder's picture "
        "(2x: against its bicubic 2x). Time: whole `mmgen generate` calls (LM, decoding, PNG), the bundle and "
        "each detokenizer loaded before timing.\n\n"
        f"{table}\n\nPNG: `benchmarks/out/detokenizer_output.png` (rows: the tokenizer's decoder, then the "
        f"detokenizer at {args.steps} steps; first {k} prompts, 3x enlarged)."
    )
    if args.note:
        body += f"\n\n{args.note}"
    print(table)
    if not args.no_write:
        write_section("detokenizer_output", "Diffusion detokenizer as `mmgen generate`'s image output (tiny)", body)


if __name__ == "__main__":
    main()
