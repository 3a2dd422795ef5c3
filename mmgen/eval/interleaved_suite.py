"""The ``interleaved`` suite of ``mmgen eval run``: a build-up document cut before a step's picture -> the
next picture (exact scene), and a continuation task where the model writes the instruction too, each
sample judged on InterleavedEval's five aspects by rules (:mod:`mmgen.eval.interleaved`).
"""

from __future__ import annotations

import numpy as np

from mmgen.eval.stats import mean_interval, proportion
from mmgen.eval.suite_base import Context, Suite, batches_of, ctx_splits, pct_block, verdict


class InterleavedSuite(Suite):
    name = "interleaved"
    grid_cols = 4  # each panel holds three pictures

    def prepare(self, bundle, ctx: Context):
        from mmgen.eval.understanding import buildup_cases, buildup_prompt_ids, resolution
        from mmgen.inference.generate import prompt_ids

        res = resolution(bundle)
        self.batches, items = [], []
        uncond = prompt_ids(bundle, "", image=True)  # <s> <image>: the empty prompt
        for sp in ctx.opts.interleaved_splits:
            cases = buildup_cases(ctx.opts.n, sp, ctx.sampling["seed"], res, ctx.opts.interleaved_min_images)
            for c in cases:
                c["row"], c["uncond"] = buildup_prompt_ids(bundle, c["items"]), uncond
            self.batches += [
                (k, bi, (sp, bi * ctx.opts.batch_size, chunk))
                for k, bi, chunk in batches_of(cases, ctx.opts.batch_size, sp)
            ]
            items += [
                {
                    "split": sp,
                    "instruction": c["instruction"],
                    "truth": c["truth"],
                    "document": [it.text if it.kind == "text" else it.meta.get("scene") for it in c["items"]],
                }
                for c in cases
            ]
        if ctx.opts.continuation_n:
            from mmgen.eval.understanding import continuation_cases

            for sp in ctx.opts.interleaved_splits:
                cases = continuation_cases(ctx.opts.continuation_n, sp, ctx.sampling["seed"], res)
                for c in cases:
                    c["row"], c["uncond"] = (
                        buildup_prompt_ids(bundle, c["items"])[:-1],
                        uncond,
                    )  # no <image>: text first
                self.batches += [
                    (k, bi, (f"continuation_{sp}", bi * ctx.opts.batch_size, chunk))
                    for k, bi, chunk in batches_of(cases, ctx.opts.batch_size, f"continuation_{sp}")
                ]
                items += [
                    {
                        "split": f"continuation_{sp}",
                        "before": c["before"],
                        "document": [it.text if it.kind == "text" else it.meta.get("scene") for it in c["items"]],
                    }
                    for c in cases
                ]
        return items

    def _continue(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        """The model writes the next instruction (greedy, up to its first full stop) and draws its picture;
        the rules judge all five aspects, text quality included."""
        from mmgen.eval.interleaved import apply_instruction, judge_step
        from mmgen.inference.batch_generation import generate_image_rows, generate_text_rows
        from mmgen.processing.sequence import encode_text
        from mmgen.world.scene import Scene
        from mmgen.world.scene_parser import compare_scenes, parse_scene

        split, start, chunk = payload
        texts = generate_text_rows(
            bundle, [c["row"] for c in chunk], max_new_tokens=32, batch_size=len(chunk), options=ctx.generation
        )
        texts = [t[: t.index(".") + 1] if "." in t else t for t in texts]
        rows = [
            c["row"] + encode_text(t, bundle.text_tokenizer) + [bundle.vocab["<image>"]] for c, t in zip(chunk, texts)
        ]
        images = generate_image_rows(
            bundle, rows, [c["uncond"] for c in chunk], batch_size=len(chunk), **ctx.draw_kwargs(bundle, bi)
        )
        out = []
        for j, (c, t, img) in enumerate(zip(chunk, texts, images)):
            i = start + j
            before = Scene.from_dict(c["before"])
            pred = parse_scene(img)
            truth = apply_instruction(before, t)
            # an instruction that is not an edit has no truth: neither exact nor any object recalled
            cmp = compare_scenes(pred, truth) if truth is not None else {"exact": False, "object_recall": 0.0}
            before_img = [it for it in c["items"] if it.kind == "image"][-1]
            out.append(
                {
                    "id": f"{split}/{i}",
                    "split": split,
                    "instruction": t,
                    "truth": truth.to_dict() if truth is not None else None,
                    "before": ctx.save_image(before_img.to_pil(), f"images/interleaved/{split}_{i:04d}_before.png"),
                    "image": ctx.save_image(img, f"images/interleaved/{split}_{i:04d}.png"),
                    "exact": cmp["exact"],
                    "parsed": pred is not None,
                    "object_recall": cmp["object_recall"],
                    "pred": pred.to_dict() if pred is not None else None,
                    "aspects": judge_step(before, t, pred, model_text=True),
                }
            )
        return out

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        from mmgen.eval.interleaved import judge_step
        from mmgen.inference.batch_generation import generate_image_rows
        from mmgen.world.scene import Scene
        from mmgen.world.scene_parser import compare_scenes, parse_scene

        split, start, chunk = payload
        if split.startswith("continuation_"):
            return self._continue(bundle, bi, payload, ctx)
        images = generate_image_rows(
            bundle,
            [c["row"] for c in chunk],
            [c["uncond"] for c in chunk],
            batch_size=len(chunk),
            **ctx.draw_kwargs(bundle, bi),
        )
        out = []
        for j, (c, img) in enumerate(zip(chunk, images)):
            i = start + j
            pred = parse_scene(img)
            truth = Scene.from_dict(c["truth"])
            cmp = compare_scenes(pred, truth)
            before = [it for it in c["items"] if it.kind == "image"][-1]
            prev_scene = Scene.from_dict(before.meta["scene"])
            out.append(
                {
                    "id": f"{split}/{i}",
                    "split": split,
                    "instruction": c["instruction"],
                    "truth": c["truth"],
                    "before": ctx.save_image(before.to_pil(), f"images/interleaved/{split}_{i:04d}_before.png"),
                    "image": ctx.save_image(img, f"images/interleaved/{split}_{i:04d}.png"),
                    "exact": cmp["exact"],
                    "parsed": cmp["parsed"],
                    "object_recall": cmp["object_recall"],
                    "pred": pred.to_dict() if pred is not None else None,
                    "aspects": judge_step(prev_scene, c["instruction"], pred, truth),
                }
            )
        return out

    def summarize(self, records: list[dict]) -> dict:
        from mmgen.eval.interleaved import ASPECTS

        out = {}
        for sp in ctx_splits(records):
            rs = [r for r in records if r["split"] == sp]
            out[sp] = {
                "n": len(rs),
                "accuracy": float(np.mean([r["exact"] for r in rs])),
                "parse_rate": float(np.mean([r["parsed"] for r in rs])),
                "object_recall": float(np.mean([r["object_recall"] for r in rs])),
                "intervals": {
                    **pct_block(rs, ("exact", "parsed")),
                    "object_recall": mean_interval([r["object_recall"] for r in rs]),
                },
                "aspects": {
                    a: proportion(
                        sum(r["aspects"][a]["pass"] for r in rs if a in r["aspects"]),
                        sum(a in r["aspects"] for r in rs),
                    )
                    for a in ASPECTS
                    if any(a in r["aspects"] for r in rs)
                },
            }
        return out

    def panels(self, records: list[dict], ctx: Context, k: int = 12) -> list[dict]:
        from PIL import Image as PILImage

        from mmgen.world import Scene, render

        out = []
        rows = []
        for sp in ctx_splits(records):
            rows += [r for r in records if r["split"] == sp][: k // len(ctx_splits(records)) or 1]
        for r in rows:
            exp = ctx.load_image(r["image"]).size
            expected = render(Scene.from_dict(r["truth"]), *exp) if r["truth"] else PILImage.new("RGB", exp, "gray")
            out.append(
                {
                    "images": [
                        ("before", ctx.load_image(r["before"])),
                        ("generated", ctx.load_image(r["image"])),
                        ("expected" if r["truth"] else "(not an edit)", expected),
                    ],
                    "text": r["instruction"],
                    "verdict": verdict(r["exact"], r["parsed"]),
                    "ok": r["exact"],
                    "tag": r["split"],
                }
            )
        return out
