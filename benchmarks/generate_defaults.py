"""What `mmgen generate` draws with no sampling options, judged like the quick start's t2i evaluation.

    make demo && python benchmarks/generate_defaults.py --report runs/quickstart/report.json

Runs the command as a user would, ``mmgen generate --checkpoint CKPT --mode t2i --prompt P``, through
``mmgen.cli.main`` in this process, one call per prompt (option parsing, checks, sampling settings from
the bundle's ``generation_config.json``, PNG output); the bundle is loaded once and handed to every call
(``--reload`` loads it in every call, as separate commands would), on the first ``--n`` val prompts of
the quick start's t2i evaluation (``mmgen.eval.t2i.t2i_eval_set``, same prompt seed), and scores each
PNG with the same scene-parser judge (``score_image``). Side by side in the same run: the command the docs used to show,
``--temperature 1 --cfg-scale 3`` (transformers' default temperature). The report's own val accuracy
(its batched evaluation, same prompts) is the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from mmgen.utils.bench import md_table, write_section


def run_cli(
    checkpoint: str, prompts: list[str], extra: list[str], seed: int, reload: bool = False
) -> tuple[list, float]:
    """PIL images written by one ``mmgen generate`` call per prompt (None where it wrote none)."""
    import functools

    from PIL import Image

    import mmgen.models.bundle as bundle_mod
    from mmgen.cli import main

    real_load = bundle_mod.load_bundle
    if not reload:
        bundle_mod.load_bundle = functools.lru_cache(maxsize=1)(real_load)

    images, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(prompts):
            out = Path(tmp) / str(i)
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main(
                    [
                        "generate",
                        "--checkpoint",
                        checkpoint,
                        "--mode",
                        "t2i",
                        "--prompt",
                        p,
                        "--seed",
                        str(seed),
                        "--out",
                        str(out),
                        *extra,
                    ]
                )
            if rc != 0:
                raise SystemExit(f"mmgen generate failed on prompt {i}: {err.getvalue().strip()[-300:]}")
            png = out / "image_0.png"
            images.append(Image.open(png).convert("RGB") if png.is_file() else None)
    bundle_mod.load_bundle = real_load
    return images, time.perf_counter() - t0


def score(images, items) -> dict:
    from mmgen.eval.t2i import score_image, summarize

    scores = []
    for img, it in zip(images, items):
        if img is None:
            scores.append(
                {
                    "parsed": False,
                    "all_objects": False,
                    "exact_scene": False,
                    "background": False,
                    "object_recall": 0.0,
                    "attr_acc": {},
                }
            )
        else:
            scores.append(score_image(img, it.scene))
    return summarize(scores)


def main() -> None:
    import torch

    from mmgen.eval.t2i import t2i_eval_set
    from mmgen.inference.settings import load_generation_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="runs/quickstart/report.json")
    ap.add_argument("--checkpoint", default=None, help="default: the report's checkpoint")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reload", action="store_true", help="load the bundle in every call (slow)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = json.loads(Path(args.report).read_text())
    ckpt = args.checkpoint or report["checkpoint"]
    prompt_seed = 1234  # the quick start's evaluate_t2i default
    items = t2i_eval_set(args.n, "val", seed=prompt_seed)
    prompts = [it.prompt for it in items]
    gc = load_generation_config(ckpt)
    has_file = (Path(ckpt) / "generation_config.json").is_file()
    runs = {
        "`mmgen generate --checkpoint CKPT --mode t2i --prompt P` (the bundle's settings)": [],
        "the same with `--temperature 1 --cfg-scale 3` (the old documented command)": [
            "--temperature",
            "1",
            "--cfg-scale",
            "3",
        ],
    }
    rows, results = [], {}
    for name, extra in runs.items():
        images, secs = run_cli(ckpt, prompts, extra, args.seed, args.reload)
        m = score(images, items)
        results[name] = m
        rows.append([name, m["n"], m["accuracy"], m["parse_rate"], m["exact_scene"], f"{secs / len(prompts):.2f}"])
        print(name, json.dumps({k: m[k] for k in ("accuracy", "parse_rate", "exact_scene")}), flush=True)
    val = report["t2i"]["val"]
    samples = Path(args.report).parent / "t2i_samples.jsonl"
    first = None
    if samples.is_file():  # the report's own judgements of the same first n val prompts
        got = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        got = [s for s in got if s["split"] == "val"][: args.n]
        if [s["prompt"] for s in got] == prompts:
            first = sum(bool(s["all_objects"]) for s in got) / len(got)
    rows.append(
        [
            f"the report's t2i evaluation (batched, temperature {report['config']['temperature']}, "
            f"CFG {report['config']['cfg_scale']}), all {val['n']} val prompts",
            val["n"],
            val["accuracy"],
            val["parse_rate"],
            val["exact_scene"],
            "-",
        ]
    )
    if first is not None:
        rows.append(["the report's t2i evaluation, the same first prompts", args.n, first, "-", "-", "-"])
    table = md_table(["run", "prompts", "t2i accuracy (all objects)", "parsed", "exact scene", "s / prompt"], rows)
    settings = (
        f"do_sample={gc.do_sample}, temperature={gc.temperature}, top_k={gc.top_k}, top_p={gc.top_p}, "
        f"guidance_scale={gc.guidance_scale}"
    )
    body = (
        f"Checkpoint `{ckpt}` "
        f"({'its generation_config.json' if has_file else 'no sampling settings saved: the defaults'}: {settings}); "
        f"the first {args.n} val prompts of the quick start's t2i evaluation, seed {args.seed} for every call, each "
        f"image judged by the scene parser exactly as the evaluation judges it.\n\n{table}\n\nThe command without "
        "sampling options now draws with the settings the recipe was evaluated with. A single call samples with its "
        "own seed where the evaluation samples in batches, so the two agree within sampling noise, not token for "
        "token.\n"
    )
    print(table)
    if not args.no_write:
        write_section("generate_defaults", "`mmgen generate` defaults against the quick start's evaluation", body)


if __name__ == "__main__":
    main()
