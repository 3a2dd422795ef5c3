"""The suites of ``mmgen eval run``: each builds its cases, runs them batch by batch, judges every
sample and summarises with counts and 95% intervals.

A suite's cases are fixed by its options alone, and batch ``i`` of a split samples with seed
``seed + i`` (as :func:`mmgen.inference.batch_generation.generate_image_rows` numbers its batches), so a
batch gives the same result whether it runs in one go, after a resume, or inside the quick start.

- ``t2i``: captions of val and held-out scenes -> one image each, judged by the scene parser;
- ``robust``: the t2i suite's prompts of one split, each in every surface form people type
  (:mod:`mmgen.world.surface`: lower-case first letter, no final period, odd spacing, another
  word order, the grammar's synonyms), accuracy per form;
- ``geneval``: GenEval metadata (ShapesWorld's by default, or a file) -> one image per prompt, judged by
  GenEval's rules over a detector (:mod:`mmgen.eval.geneval`);
- ``qa``: a rendered scene and one question -> a greedy short answer, exact match;
- ``interleaved``: a build-up document cut before a step's picture -> the next picture, exact scene,
  plus InterleavedEval's five aspects judged by rules (:mod:`mmgen.eval.interleaved`);
- ``recon``: the image tokenizer's round trip on rendered scenes (scene agreement, PSNR).

Kept as one module: the suites are short subclasses of one protocol (cases, batches, a judge, a
summary) and read best side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen.errors import MMGenError
from mmgen.eval.stats import mean_interval, proportion
from mmgen.world.surface import SURFACE_FORMS

SUITES = ("t2i", "robust", "geneval", "qa", "interleaved", "recon")
_NEEDS_IMAGES = {"t2i", "robust", "geneval", "qa", "interleaved", "recon"}  # qa shows the model a picture


@dataclass
class EvalOptions:
    n: int = 200  # prompts / questions / documents per split (t2i, qa, interleaved)
    prompt_seed: int = 1234  # picks the t2i prompts (the quick start's value)
    batch_size: int = 16
    geneval_prompts: str | None = None  # GenEval metadata jsonl; None: ShapesWorld's, generated
    geneval_per_tag: int = 25
    detector: str = "scene_parser"  # or a local directory of a transformers zero-shot detector
    recon_n: int = 200
    recon_seed: int = 7
    interleaved_splits: tuple[str, ...] = ("val",)
    # build-up documents the model continues itself (writes the next instruction, then draws it); 0: none
    continuation_n: int = 0
    qa_max_new_tokens: int = 6
    # build-up documents with at least this many pictures, cut before the last (0: any, cut at a random step)
    interleaved_min_images: int = 0
    robust_forms: tuple[str, ...] = tuple(SURFACE_FORMS)  # the robust suite's surface forms
    robust_split: str = "val"  # whose t2i prompts the robust suite rewrites


@dataclass
class Context:
    out: Path | None  # None: in memory, records hold the images themselves (run_in_memory)
    sampling: dict
    opts: EvalOptions
    extra: dict = field(default_factory=dict)
    # GenerationOptions every generation call uses: its KV cache and accelerations, and its detok_* fields
    # choose the pictures' decoder (None: the plain loop and the image tokenizer's decoder)
    generation: Any = None

    def draw_kwargs(self, bundle, bi: int) -> dict:
        """The keyword arguments of ``generate_images`` / ``generate_image_rows`` for batch ``bi``: the run's
        sampling with seed + bi, the generation options, and what draws the pictures (the detokenizer
        ``generation`` chooses, its noise seeded the same way, or None for the tokenizer's decoder)."""
        from dataclasses import replace

        from mmgen.inference.detokenize import image_decoder

        s, seed = self.sampling, self.sampling["seed"] + bi
        decoder = None if self.generation is None else image_decoder(bundle, replace(self.generation, seed=int(seed)))
        return {
            "temperature": s["temperature"],
            "top_k": s["top_k"],
            "top_p": s["top_p"],
            "seed": seed,
            "cfg_scale": s["cfg_scale"],
            "options": self.generation,
            "image_decoder": decoder,
        }

    def save_image(self, img, rel: str):
        """``img`` saved under ``out`` as ``rel`` (which the record holds); in memory, ``img`` itself."""
        if self.out is None:
            return img
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
        return rel

    def load_image(self, rel: str):
        from PIL import Image

        with Image.open(self.out / rel) as im:
            return im.convert("RGB")


def parse_suites(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in names if s.strip()]
    if names == ["all"]:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise MMGenError(f"unknown suite {', '.join(bad) or '(none)'}; use a comma list of {', '.join(SUITES)} or all")
    return list(dict.fromkeys(names))


def check_suites(drawable: bool, suites: list[str], checkpoint) -> None:
    """A one-line MMGenError when a suite needs images and the checkpoint cannot draw (``drawable``:
    :func:`~mmgen.models.bundle.can_draw` of the bundle, or of its files before it loads)."""
    need = [s for s in suites if s in _NEEDS_IMAGES]
    if need and not drawable:
        raise MMGenError(
            f"suite {', '.join(need)} needs a checkpoint with an image tokenizer, and {checkpoint} has none "
            f"(no image_tokenizer/ or no pixel codes in its vocab); evaluate a checkpoint trained with "
            "data.image_tokenizer=DIR"
        )


def run_in_memory(
    suite, bundle, sampling: dict, opts: EvalOptions, progress: bool = False, generation=None
) -> list[dict]:
    """Every record of ``suite`` in batch order, nothing written: the evaluation functions
    (:func:`mmgen.eval.t2i.evaluate_t2i`, ...) are this plus ``suite.summarize``, so they give the
    numbers ``mmgen eval run`` gives for the same settings. ``generation``: see :class:`Context`."""
    ctx = Context(out=None, sampling=sampling, opts=opts, generation=generation)
    suite.prepare(bundle, ctx)
    batches = suite.batches
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=suite.name, unit="batch")
    return [r for _, bi, payload in batches for r in suite.run_batch(bundle, bi, payload, ctx)]


def function_sampling(bundle, seed: int, **given) -> dict:
    """The sampling dict of an evaluation function: the bundle's settings with ``given`` (those not
    None) in their place, and ``seed``."""
    from mmgen.inference.settings import bundle_sampling

    s = bundle_sampling(bundle, **given)
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "cfg_scale": s.cfg_scale, "seed": seed}


def _batches(items: list, size: int, prefix: str):
    size = max(1, int(size))
    return [(f"{prefix}/{bi}", bi, items[s : s + size]) for bi, s in enumerate(range(0, len(items), size))]


def _pct_block(records, keys) -> dict:
    return {k: proportion(sum(bool(r[k]) for r in records), len(records)) for k in keys}


class Suite:
    """What every suite has: ``prepare`` (its cases and ``batches``), ``run_batch`` (judged records),
    ``summarize``, ``panels`` (the report's grid, ``grid_cols`` wide) and ``finish``."""

    name = ""
    grid_cols = 6

    def finish(self, records: list[dict], ctx: Context, entry: dict) -> None:
        """Write what the suite keeps besides its samples into ``ctx.out`` and note it in its report ``entry``."""


# -- t2i ---------------------------------------------------------------------------------------------
class T2ISuite(Suite):
    name = "t2i"

    def __init__(self, splits=("val", "heldout")):
        self.splits = tuple(splits)

    def prepare(self, bundle, ctx: Context):
        from mmgen.eval.t2i import t2i_eval_set

        self.items = {sp: t2i_eval_set(ctx.opts.n, sp, seed=ctx.opts.prompt_seed) for sp in self.splits}
        self.batches = []
        for sp in self.splits:
            self.batches += [
                (k, bi, (sp, bi * ctx.opts.batch_size, chunk))
                for k, bi, chunk in _batches(self.items[sp], ctx.opts.batch_size, sp)
            ]
        return [
            {"split": sp, "prompt": it.prompt, "scene": it.scene.to_dict()}
            for sp in self.splits
            for it in self.items[sp]
        ]

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        split, start, chunk = payload
        return _draw_and_judge(bundle, bi, chunk, ctx, split, start, f"images/t2i/{split}")

    def summarize(self, records: list[dict]) -> dict:
        return _t2i_summary(records, "split", self.splits)

    def panels(self, records: list[dict], ctx: Context, k: int = 12) -> list[dict]:
        rows = []
        for sp in self.splits:
            rows += [r for r in records if r["split"] == sp][:k]
        return [
            {
                "images": [("generated", ctx.load_image(r["image"]))],
                "text": r["prompt"],
                "verdict": _verdict(r["all_objects"], r["parsed"]),
                "ok": r["all_objects"],
                "tag": r["split"],
            }
            for r in rows
        ]


def _verdict(ok: bool, parsed: bool = True) -> str:
    return "correct" if ok else ("unparseable" if not parsed else "wrong")


def _draw_and_judge(bundle, bi: int, chunk, ctx: Context, tag: str, start: int, image_prefix: str) -> list[dict]:
    """One image per T2IItem of ``chunk`` (batch ``bi``: seed + bi), judged by the scene parser."""
    from mmgen.eval.t2i import score_image
    from mmgen.inference.batch_generation import generate_images

    images = generate_images(bundle, [it.prompt for it in chunk], batch_size=len(chunk), **ctx.draw_kwargs(bundle, bi))
    return [
        {
            "id": f"{tag}/{start + j}",
            "split": it.split,
            "prompt": it.prompt,
            "truth": it.scene.to_dict(),
            "image": ctx.save_image(img, f"{image_prefix}_{start + j:04d}.png"),
            **score_image(img, it.scene),
        }
        for j, (it, img) in enumerate(zip(chunk, images))
    ]


def _t2i_summary(records: list[dict], key: str, groups) -> dict:
    """t2i metrics with intervals for each group of ``records`` (by ``record[key]``)."""
    from mmgen.eval.t2i import summarize

    out = {}
    for g in groups:
        rs = [r for r in records if r[key] == g]
        if rs:
            out[g] = {**summarize(rs), "intervals": _pct_block(rs, ("all_objects", "exact_scene", "parsed"))}
    return out


# -- robust ------------------------------------------------------------------------------------------
class RobustSuite(Suite):
    """The t2i suite's prompts of ``robust_split``, each rewritten in every surface form of
    ``robust_forms`` (:func:`mmgen.world.surface.surface_form`, keyed by ``prompt_seed`` and
    the prompt's index). Batch i of every form samples with seed + i, as the t2i suite's batch i of that
    split does: the forms differ in their text alone, and ``as_written`` gives the t2i suite's numbers."""

    name = "robust"

    def prepare(self, bundle, ctx: Context):
        from mmgen.eval.t2i import T2IItem, t2i_eval_set
        from mmgen.world.surface import check_forms, surface_form

        o = ctx.opts
        self.forms = check_forms(o.robust_forms)
        self.grid_cols = len(self.forms)
        base = t2i_eval_set(o.n, o.robust_split, seed=o.prompt_seed)
        self.batches, items = [], []
        for form in self.forms:
            cases = [
                T2IItem(surface_form(it.prompt, form, f"{o.prompt_seed}-{i}"), it.scene, it.split)
                for i, it in enumerate(base)
            ]
            self.batches += [
                (k, bi, (form, bi * o.batch_size, chunk)) for k, bi, chunk in _batches(cases, o.batch_size, form)
            ]
            items += [
                {"form": form, "split": it.split, "prompt": it.prompt, "scene": it.scene.to_dict()} for it in cases
            ]
        return items

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        form, start, chunk = payload
        return [
            {**r, "form": form} for r in _draw_and_judge(bundle, bi, chunk, ctx, form, start, f"images/robust/{form}")
        ]

    def summarize(self, records: list[dict]) -> dict:
        out = _t2i_summary(records, "form", self.forms)
        if out:
            worst = min(out, key=lambda f: out[f]["accuracy"])
            out["lowest"] = {"form": worst, **out[worst]["intervals"]["all_objects"]}
        return out

    def finish(self, records: list[dict], ctx: Context, entry: dict) -> None:
        """An example prompt of each form for the report's table."""
        entry["forms"] = {f: next((r["prompt"] for r in records if r["form"] == f), "") for f in self.forms}

    def panels(self, records: list[dict], ctx: Context, k: int = 4) -> list[dict]:
        by_id = {r["id"]: r for r in records}
        rows = [by_id[f"{f}/{i}"] for i in range(k) for f in self.forms if f"{f}/{i}" in by_id]
        return [
            {
                "images": [("generated", ctx.load_image(r["image"]))],
                "text": repr(r["prompt"]),
                "verdict": _verdict(r["all_objects"], r["parsed"]),
                "ok": r["all_objects"],
                "tag": r["form"],
            }
            for r in rows
        ]


# -- geneval -----------------------------------------------------------------------------------------
class GenEvalSuite(Suite):
    name = "geneval"

    def prepare(self, bundle, ctx: Context):
        from mmgen.eval.geneval import load_metadata, shapesworld_metadata

        o = ctx.opts
        self.entries = (
            load_metadata(o.geneval_prompts)
            if o.geneval_prompts
            else shapesworld_metadata(o.geneval_per_tag, seed=o.prompt_seed)
        )
        self.batches = [
            (k, bi, (bi * o.batch_size, chunk)) for k, bi, chunk in _batches(self.entries, o.batch_size, "all")
        ]
        self._detector = None
        return self.entries

    def detector(self, ctx: Context):
        if self._detector is None:
            from mmgen.eval.geneval import SceneParserDetector, ZeroShotDetector

            d = ctx.opts.detector
            self._detector = SceneParserDetector() if d == "scene_parser" else ZeroShotDetector(d)
        return self._detector

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        from mmgen.eval.geneval import result_record
        from mmgen.inference.batch_generation import generate_images

        start, chunk = payload
        images = generate_images(
            bundle, [e["prompt"] for e in chunk], batch_size=len(chunk), **ctx.draw_kwargs(bundle, bi)
        )
        det = self.detector(ctx)
        out = []
        for j, (e, img) in enumerate(zip(chunk, images)):
            rel = ctx.save_image(img, f"images/geneval/{start + j:04d}_{e['tag']}.png")
            classes = sorted({r["class"] for r in e["include"] + e.get("exclude", [])})
            dets = det.detect(img, classes)
            out.append(
                {
                    "id": str(start + j),
                    **result_record(e, dets, filename=rel, unreadable=getattr(det, "last_reason", None)),
                    "image": rel,
                }
            )
        return out

    def summarize(self, records: list[dict]) -> dict:
        from mmgen.eval.geneval import summarize

        return summarize(records)

    def write_results(self, records: list[dict], path: Path) -> None:
        """GenEval's per-image results file (one JSON object per image)."""
        keys = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
        path.write_text(
            "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in sorted(records, key=lambda r: int(r["id"])))
        )

    def finish(self, records: list[dict], ctx: Context, entry: dict) -> None:
        """GenEval's own files: the per-image results and the metadata the prompts came from."""
        self.write_results(records, ctx.out / "geneval_results.jsonl")
        (ctx.out / "geneval_metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.entries))
        entry["prompt_set"]["file"] = ctx.opts.geneval_prompts or "ShapesWorld (generated; geneval_metadata.jsonl)"
        entry["detector"] = ctx.opts.detector

    def panels(self, records: list[dict], ctx: Context, k: int = 4) -> list[dict]:
        from mmgen.eval.geneval import TAGS

        rows = []
        for tag in TAGS:
            rows += [r for r in records if r["tag"] == tag][:k]
        return [
            {
                "images": [("generated", ctx.load_image(r["image"]))],
                "text": r["prompt"],
                "verdict": "correct" if r["correct"] else r["reason"].splitlines()[0],
                "ok": r["correct"],
                "tag": r["tag"] + (", held-out pair" if json.loads(r["metadata"]).get("heldout") else ""),
            }
            for r in rows
        ]


# -- qa ----------------------------------------------------------------------------------------------
class QASuite(Suite):
    name = "qa"

    def __init__(self, splits=("val", "heldout")):
        self.splits = tuple(splits)

    def prepare(self, bundle, ctx: Context):
        from mmgen.eval.understanding import qa_cases, qa_prompt_ids, resolution
        from mmgen.inference.generate import image_ids
        from mmgen.world import render, render_size

        res = resolution(bundle)
        self.batches, items = [], []
        for sp in self.splits:
            scenes, qas = map(list, zip(*qa_cases(ctx.opts.n, sp, ctx.sampling["seed"])))
            # every picture of a split encoded in one call, as the quick start always did
            blocks = image_ids(bundle, [render(s, *render_size(res)) for s in scenes])
            rows = [qa_prompt_ids(bundle, b, q) for b, (q, _, _) in zip(blocks, qas)]
            cases = [{"scene": s, "qa": qa, "row": row} for s, qa, row in zip(scenes, qas, rows)]
            self.batches += [
                (k, bi, (sp, bi * ctx.opts.batch_size, chunk))
                for k, bi, chunk in _batches(cases, ctx.opts.batch_size, sp)
            ]
            items += [
                {"split": sp, "scene": c["scene"].to_dict(), "question": c["qa"][0], "truth": c["qa"][1]} for c in cases
            ]
        return items

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        from mmgen.eval.understanding import normalize_answer
        from mmgen.inference.batch_generation import generate_text_rows

        split, start, chunk = payload
        answers = generate_text_rows(
            bundle,
            [c["row"] for c in chunk],
            max_new_tokens=ctx.opts.qa_max_new_tokens,
            batch_size=len(chunk),
            options=ctx.generation,
        )
        return [
            {
                "id": f"{split}/{start + j}",
                "split": split,
                "question": c["qa"][0],
                "truth": c["qa"][1],
                "qtype": c["qa"][2],
                "answer": a,
                "correct": normalize_answer(a) == c["qa"][1],
                "scene": c["scene"].to_dict(),
            }
            for j, (c, a) in enumerate(zip(chunk, answers))
        ]

    def summarize(self, records: list[dict]) -> dict:
        out = {}
        for sp in self.splits:
            rs = [r for r in records if r["split"] == sp]
            if not rs:
                continue
            by_type: dict[str, list[bool]] = {}
            for r in rs:
                by_type.setdefault(r["qtype"], []).append(r["correct"])
            out[sp] = {
                "n": len(rs),
                "accuracy": float(np.mean([r["correct"] for r in rs])),
                "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
                "intervals": {
                    "accuracy": proportion(sum(r["correct"] for r in rs), len(rs)),
                    **{f"by_type.{k}": proportion(sum(v), len(v)) for k, v in sorted(by_type.items())},
                },
            }
        return out

    def panels(self, records: list[dict], ctx: Context, k: int = 12) -> list[dict]:
        from mmgen.world import Scene, render

        rows = []
        for sp in self.splits:
            rows += [r for r in records if r["split"] == sp][:k]
        return [
            {
                "images": [("input", render(Scene.from_dict(r["scene"]), 72, 72))],
                "text": f"Q: {r['question']}\nA: {r['answer'] or '(nothing)'}\ntruth: {r['truth']}",
                "verdict": "correct" if r["correct"] else "wrong",
                "ok": r["correct"],
                "tag": r["split"],
            }
            for r in rows
        ]


# -- interleaved -------------------------------------------------------------------------------------
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
                for k, bi, chunk in _batches(cases, ctx.opts.batch_size, sp)
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
                    for k, bi, chunk in _batches(cases, ctx.opts.batch_size, f"continuation_{sp}")
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
                    **_pct_block(rs, ("exact", "parsed")),
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
                    "verdict": _verdict(r["exact"], r["parsed"]),
                    "ok": r["exact"],
                    "tag": r["split"],
                }
            )
        return out


def ctx_splits(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["split"] for r in records))


# -- recon -------------------------------------------------------------------------------------------
class ReconSuite(Suite):
    name = "recon"

    def prepare(self, bundle, ctx: Context):
        self.batches = [("all/0", 0, None)]
        return {"n": ctx.opts.recon_n, "seed": ctx.opts.recon_seed}

    def run_batch(self, bundle, bi: int, payload, ctx: Context) -> list[dict]:
        from mmgen.eval.t2i import evaluate_reconstruction

        out = []
        toks = [("tokenizer", bundle.image_tokenizer)]
        if hasattr(bundle.image_tokenizer, "inner"):  # code blocks: also the image tokenizer under the table
            toks.append(("inner_tokenizer", bundle.image_tokenizer.inner))
        for name, tok in toks:
            r = evaluate_reconstruction(tok, n=ctx.opts.recon_n, seed=ctx.opts.recon_seed)
            ex = r.pop("examples")
            if name == "tokenizer":
                for i, (a, b) in enumerate(ex):
                    ctx.save_image(a, f"images/recon/{i:02d}_original.png")
                    ctx.save_image(b, f"images/recon/{i:02d}_reconstruction.png")
            out.append(
                {
                    "id": name,
                    "which": name,
                    "type": type(tok).__name__,
                    "tokens_per_image": tok.tokens_per_image(*tok.resolution),
                    **r,
                }
            )
        return out

    def summarize(self, records: list[dict]) -> dict:
        out = {}
        for r in records:
            m = {k: v for k, v in r.items() if k not in ("id", "which", "per_sample")}
            ps = r.get("per_sample", {})
            m["intervals"] = {
                "scene_agreement": proportion(sum(ps.get("exact", [])), len(ps.get("exact", []))),
                "psnr_db": mean_interval(ps.get("psnr", [])),
            }
            for sp in sorted(set(ps.get("split", []))):
                e = [x for x, s in zip(ps["exact"], ps["split"]) if s == sp]
                m["intervals"][f"scene_agreement_by_split.{sp}"] = proportion(sum(e), len(e))
            out[r["which"]] = m
        return out

    def panels(self, records: list[dict], ctx: Context, k: int = 8) -> list[dict]:
        out = []
        main = next((r for r in records if r["which"] == "tokenizer"), {})
        ps = main.get("per_sample", {})
        for i in range(k):
            a, b = f"images/recon/{i:02d}_original.png", f"images/recon/{i:02d}_reconstruction.png"
            if (ctx.out / a).is_file():
                ok = bool(ps["exact"][i]) if i < len(ps.get("exact", [])) else None
                out.append(
                    {
                        "images": [("original", ctx.load_image(a)), ("reconstruction", ctx.load_image(b))],
                        "text": f"PSNR {ps['psnr'][i]:.1f} dB" if i < len(ps.get("psnr", [])) else "",
                        "verdict": "" if ok is None else ("same scene" if ok else "scene differs"),
                        "ok": ok,
                        "tag": ps["split"][i] if i < len(ps.get("split", [])) else "",
                    }
                )
        return out


SUITE_CLASSES: dict[str, Any] = {
    "t2i": T2ISuite,
    "robust": RobustSuite,
    "geneval": GenEvalSuite,
    "qa": QASuite,
    "interleaved": InterleavedSuite,
    "recon": ReconSuite,
}
