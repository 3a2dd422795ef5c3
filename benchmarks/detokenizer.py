"""Diffusion detokenizer vs the VQ pixel decoder on the same codes, and 2x super-resolution vs bicubic.

    python benchmarks/detokenizer.py --tokenizer runs/tokenizer/tiny_vq/tokenizer \
        --pipeline runs/detokenizer/tiny/pipeline --sr-pipeline runs/detokenizer/tiny_sr2/pipeline

Held-out ShapesWorld scenes are rendered at the tokenizer's resolution and encoded once; the VQ decoder
and the diffusion pipeline (DDIM and DPM-Solver++, 4 / 8 / 25 steps) decode the same codes. Scene-parser
agreement: the parse of the decoded image equals the scene (exact background and objects). The 2x mode
draws twice the tokenizer's resolution from the same codes; it is compared with bicubic upsampling of
the VQ decoder's output and scored against the true render at that size. Sharpness: mean squared
finite difference relative to the truth's (1.0 = edges as steep as the render's, below = blurrier). The
squared form is the one that sees blur: an edge spread over two pixels keeps its summed absolute
difference but halves its summed square. PNGs go to benchmarks/out/; ``--note`` adds what they show,
looked at by eye. A pipeline trained with ``condition_on_decode`` gets the tokenizer given here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.models.detokenizer import decode_grids, load_pipeline
from mmgen.models.detokenizer_train import encode_all, shapes_pairs
from mmgen.tokenizers import load_image_tokenizer
from mmgen.tokenizers.vq import psnr
from mmgen.utils.bench import md_table, write_section
from mmgen.utils.pixels import tensor_to_pil
from mmgen.world.scene_parser import compare_scenes, parse_scene

OUT = Path(__file__).resolve().parent / "out"


def to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # score what a user would see


def agreement(images: torch.Tensor, scenes) -> float:
    return sum(compare_scenes(parse_scene(im), s)["exact"] for im, s in zip(tensor_to_pil(images), scenes)) / len(
        scenes
    )


def sharpness(x: torch.Tensor, ref: torch.Tensor) -> float:
    def energy(t):
        return (t[..., 1:, :-1] - t[..., :-1, :-1]).pow(2) + (t[..., :-1, 1:] - t[..., :-1, :-1]).pow(2)

    return float(energy(x).mean() / energy(ref).mean())


def sample(pipe, grids, steps: int, scheduler: str, cfg_scale: float) -> tuple[torch.Tensor, float]:
    pipe.use_scheduler(scheduler)
    t0 = time.time()
    y = pipe(
        grids,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return to_uint8_range(y), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="runs/tokenizer/tiny_vq/tokenizer")
    ap.add_argument("--pipeline", default="runs/detokenizer/tiny/pipeline")
    ap.add_argument("--sr-pipeline", default="runs/detokenizer/tiny_sr2/pipeline")
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument(
        "--split",
        default="heldout",
        help="scenes of this split (val: colour-shape pairs seen in training, "
        "which a code-block tokenizer's table holds)",
    )
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--note", default="", help="what the PNGs show, looked at by eye (goes into the section)")
    ap.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = load_image_tokenizer(args.tokenizer)
    res = int(tok.resolution[0])
    lo, hi, scenes = shapes_pairs(args.scenes, res, 2 * res, seed=777, split=args.split)
    x = lo.float() / 127.5 - 1
    pipe = load_pipeline(args.pipeline, tokenizer=tok)
    names = list(pipe.conditioner.config.grid_names)  # the grids it draws from (an LM's bundle: those the LM writes)
    grids = encode_all(tok, lo, names=names)
    shapes = " + ".join(f"{n} {g.shape[-2]}x{g.shape[-1]}" for n, g in zip(names, grids))
    with torch.no_grad():  # the tokenizer decodes from the same grids (DualViTok: sem + pix, or pix alone)
        vq = to_uint8_range(decode_grids(tok, names, grids))

    rows = [
        ["input render (ceiling)", "-", "-", f"{100 * agreement(x, scenes):.1f}%", "inf", "-"],
        ["VQ pixel decoder", "-", 1, f"{100 * agreement(vq, scenes):.1f}%", round(float(psnr(vq, x).mean()), 2), "-"],
    ]
    keep = {}
    for scheduler in ("ddim", "dpm"):
        for steps in (4, 8, 25):
            y, secs = sample(pipe, grids, steps, scheduler, args.cfg)
            keep[(scheduler, steps)] = y
            rows.append(
                [
                    f"diffusion detokenizer, {scheduler}",
                    steps,
                    steps * (1 if args.cfg == 1.0 else 2),
                    f"{100 * agreement(y, scenes):.1f}%",
                    round(float(psnr(y, x).mean()), 2),
                    round(secs / len(y), 3),
                ]
            )
    n = min(8, len(x))
    grid = torch.cat([torch.cat(list(t[:n]), -1) for t in (x, vq, keep[("ddim", 8)], keep[("dpm", 25)])], -2)
    tensor_to_pil(grid[None])[0].save(OUT / "detokenizer_vs_vq.png")

    body = (
        f"{args.scenes} {'held-out' if args.split == 'heldout' else args.split} ShapesWorld scenes at {res}x{res}, "
        f"tokenizer `{args.tokenizer}` ({shapes} codes), pipeline `{args.pipeline}`, CFG scale {args.cfg}.\n\n"
        + md_table(["decoder", "steps", "network passes", "scene-parser agreement", "PSNR dB", "s / image"], rows)
    )

    if args.sr_pipeline and Path(args.sr_pipeline).is_dir():
        truth = hi.float() / 127.5 - 1

        def up(t):
            return to_uint8_range(F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False))

        sr_pipe = load_pipeline(args.sr_pipeline, tokenizer=tok)
        sr_rows = [
            [
                "bicubic 2x of the VQ decoder output",
                f"{100 * agreement(up(vq), scenes):.1f}%",
                round(float(psnr(up(vq), truth).mean()), 2),
                round(sharpness(up(vq), truth), 3),
            ],
            [
                "bicubic 2x of the input render (reference)",
                f"{100 * agreement(up(x), scenes):.1f}%",
                round(float(psnr(up(x), truth).mean()), 2),
                round(sharpness(up(x), truth), 3),
            ],
        ]
        for steps in (8, 25):
            y, _ = sample(sr_pipe, grids, steps, "dpm", args.cfg)
            sr_rows.append(
                [
                    f"diffusion 2x from codes, dpm {steps} steps",
                    f"{100 * agreement(y, scenes):.1f}%",
                    round(float(psnr(y, truth).mean()), 2),
                    round(sharpness(y, truth), 3),
                ]
            )
        grid = torch.cat([torch.cat(list(t[:6]), -1) for t in (truth, up(vq), y)], -2)
        tensor_to_pil(grid[None])[0].save(OUT / "sr2x_truth_bicubic_diffusion.png")
        body += (
            f"\n\n2x super-resolution: {2 * res}x{2 * res} from the same codes ({shapes}), against the true "
            f"{2 * res}x{2 * res} render.\n\n"
            + md_table(["method", "scene-parser agreement", "PSNR dB", "sharpness vs truth"], sr_rows)
            + "\n\nPNGs: `benchmarks/out/detokenizer_vs_vq.png` (rows: input, VQ decoder, diffusion ddim 8, dpm "
            "25) and `benchmarks/out/sr2x_truth_bicubic_diffusion.png` (rows: truth, bicubic of VQ, diffusion 2x dpm "
            "25)."
        )
    if args.note:
        body += f"\n\n{args.note}"
    if not args.no_write:
        write_section("detokenizer", "Diffusion detokenizer vs VQ decoder (tiny)", body)
    print(body)


if __name__ == "__main__":
    main()
