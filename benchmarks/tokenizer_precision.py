"""Image-tokenizer training in bf16 autocast against float32: steps/s side by side, and what each tokenizer draws.

    python benchmarks/tokenizer_precision.py --clip runs/quickstart/clip/clip            # 300 steps x 2 rounds
    python benchmarks/tokenizer_precision.py --clip runs/quickstart/clip/clip --full     # + both trained to the end

The demo's DualViTok recipe (``tokenizers/tiny_dualvitok.yaml``) with ``precision=fp32`` and ``precision=bf16``,
trained in this process one after the other, in alternating order over the rounds, for ``--steps`` steps each
(``train_seconds`` from each run's eval.json: the training loop only). With ``--full`` both arms also train for the
recipe's own steps and each tokenizer is judged on 300 val scenes and 300 with held-out colour-shape pairs: the share
whose reconstruction the scene parser reads back exactly, from both code levels and from the pixel codes alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from mmgen.utils.bench import md_table, write_section

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("fp32", "bf16")


def train(clip: str, out: Path, precision: str, steps: int | None) -> dict:
    from mmgen.config import load_config
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.train import train_tokenizer
    from mmgen.tokenizers.train_config import TokenizerTrainConfig

    shutil.rmtree(out, ignore_errors=True)
    over = [f"dualvitok.teacher.name={clip}", f"out_dir={out}", f"precision={precision}", "progress=false"]
    if steps:
        over.append(f"steps={steps}")
    train_tokenizer(load_config(TokenizerTrainConfig, recipe_path("tiny_dualvitok", "tokenizers"), over))
    return json.loads((out / "eval.json").read_text())


def agreement(tok_dir: Path, n: int = 300) -> dict:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tokenizer_quality import decode_variant, encode_all, render_set, scene_agreement

    from mmgen.tokenizers import load_image_tokenizer

    tok = load_image_tokenizer(tok_dir)
    out = {}
    for split in ("val", "heldout"):
        scenes, images = render_set(n, split, 7, tok.resolution[0])
        codes = encode_all(tok, images)
        out[split] = {
            "full": scene_agreement(decode_variant(tok, codes, ("sem", "pix")), scenes),
            "pix": scene_agreement(decode_variant(tok, codes, ("pix",)), scenes),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default="runs/quickstart/clip/clip", help="the DualViTok teacher (a CLIP directory)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also train both arms to the recipe's steps and judge them")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "tokenizer_precision"))
    ap.add_argument("--no-write", action="store_true", help="print the result, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    if not Path(args.clip).is_dir():
        raise SystemExit(f"no CLIP teacher at {args.clip}: run `make demo` (or `mmgen train-clip tiny_clip`) first")
    torch.set_num_threads(2)
    work = Path(args.work)
    rates: dict[str, list[float]] = {a: [] for a in ARMS}
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            ev = train(args.clip, work / f"short_{arm}", arm, args.steps)
            rates[arm].append(args.steps / ev["train_seconds"])
            print(f"round {r}: {arm} {rates[arm][-1]:.2f} steps/s", flush=True)
    ratios = [b / f for f, b in zip(rates["fp32"], rates["bf16"])]
    rows = [[arm, ", ".join(f"{x:.2f}" for x in rates[arm])] for arm in ARMS]
    body = (
        f"The demo's DualViTok recipe, {args.steps} steps per run, {args.rounds} rounds in alternating order, "
        "2 threads; steps/s of the training loop.\n\n"
        + md_table(["precision", "steps/s per round"], rows)
        + f"\n\n**bf16 / fp32 steps/s: {min(ratios):.2f}-{max(ratios):.2f}x**\n"
    )
    if args.full:
        full_rows = []
        for arm in ARMS:
            ev = train(args.clip, work / f"full_{arm}", arm, None)
            ag = agreement(work / f"full_{arm}" / "tokenizer")
            full_rows.append(
                [
                    arm,
                    ev["steps"],
                    f"{ev['train_seconds']:.0f}",
                    f"{ev['eval_psnr']:.1f}",
                    f"{100 * ag['val']['full']:.1f}% / {100 * ag['val']['pix']:.1f}%",
                    f"{100 * ag['heldout']['full']:.1f}% / {100 * ag['heldout']['pix']:.1f}%",
                ]
            )
            print(full_rows[-1], flush=True)
        body += (
            "\nTrained to the recipe's steps, then judged by the scene parser on 300 val scenes and 300 with "
            "held-out colour-shape pairs (reconstruction read back exactly: both levels / pixel codes alone):\n\n"
            + md_table(["precision", "steps", "train s", "eval PSNR dB", "val scenes", "held-out pairs"], full_rows)
            + "\n"
        )
    print(body)
    if not args.no_write:
        write_section("tokenizer_precision", "Tokenizer training in bf16 autocast", body)


if __name__ == "__main__":
    main()
