"""Video tokens on ShapesWorld clips: token count after temporal merging vs before, and scene-parser
accuracy of the last frame rebuilt from the merged tokens (vs from every frame's full codes, and vs
the rendered frame itself).

    python benchmarks/video_tokens.py --tokenizer runs/tokenizer/tiny_vq/tokenizer

Clips: one-object motion clips (move / grow / shrink / recolour) of held-out-split scenes, 8 frames at
64x64, written as mp4 (PyAV) and decoded back through the video encoder, so compression is included.
"""

from __future__ import annotations

import argparse
import random

import torch

from mmgen.tokenizers import load_image_tokenizer
from mmgen.tokenizers.video import VideoEncoder
from mmgen.utils.bench import md_table, write_section
from mmgen.world.media import encode_mp4, make_motion, render_motion
from mmgen.world.scene_parser import compare_scenes, parse_scene

SETTINGS = [  # (label, keep_ratio, similarity_threshold)
    ("no merging (every frame in full)", 1.0, 2.0),
    ("merge identical codes only", 1.0, 1.0),
    ("merge cos >= 0.9, keep <= 50%", 0.5, 0.9),
    ("merge cos >= 0.9, keep <= 25%", 0.25, 0.9),
    ("merge cos >= 0.8, keep <= 10%", 0.10, 0.8),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="runs/tokenizer/tiny_vq/tokenizer")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--section", default="video_tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_image_tokenizer(args.tokenizer)
    rng = random.Random(123)
    clips = []
    for _ in range(args.clips):
        start, end, facts, _ = make_motion(rng, "heldout")
        frames = render_motion(start, end, args.frames, 64, 64)
        clips.append((encode_mp4(frames, fps=8), end, facts["motion"]))

    rows = []
    for label, keep, thr in SETTINGS:
        enc = VideoEncoder(
            tok, fps=8.0, max_frames=args.frames, keep_ratio=keep, similarity_threshold=thr, scene_threshold=1.0
        )
        before = after = ok = ok_src = 0
        for data, end, _ in clips:
            frames, times, keys = enc.sample_frames(data)
            vt = enc.merge(enc.encode_frames(frames), times, keys)
            grids = vt if isinstance(vt, dict) else {"": vt}  # DualViTok: sem and pix grids
            parts = grids.values()
            before += sum(v.tokens_before for v in parts)
            after += sum(v.tokens_after for v in parts)
            last = enc.decode(vt)[-1]
            ok += compare_scenes(parse_scene(last), end)["exact"]
            ok_src += compare_scenes(parse_scene(frames[-1]), end)["exact"]
        rows.append(
            [
                label,
                before,
                after,
                round(after / before, 3),
                f"{100 * ok / len(clips):.1f}%",
                f"{100 * ok_src / len(clips):.1f}%",
            ]
        )
    body = (
        f"{len(clips)} ShapesWorld motion clips (held-out split), {args.frames} frames each at 64x64 via mp4; "
        f"image tokenizer `{args.tokenizer}` ({getattr(tok, 'mmgen_type', '?')}, frames encoded at its "
        f"{'x'.join(map(str, tok.resolution))} resolution: "
        + " + ".join(f"{v.grid[0]}x{v.grid[1]}{f' {k}' if k else ''}" for k, v in grids.items())
        + " codes per frame). "
        "Accuracy: exact scene-parser match (background and every object) of the last frame rebuilt from the "
        "merged tokens, against the clip's final scene; last column: the decoded mp4 frame itself (the ceiling).\n\n"
        + md_table(
            [
                "setting",
                "tokens before",
                "tokens after",
                "after / before",
                "last frame exact (from tokens)",
                "last frame exact (mp4 frame)",
            ],
            rows,
        )
    )
    write_section(args.section, "Video tokens: temporal merging (tiny)", body)
    print(body)


if __name__ == "__main__":
    main()
