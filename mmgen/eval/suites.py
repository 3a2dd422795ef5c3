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

What the suites share (options, context, the protocol, batching) is :mod:`mmgen.eval.suite_base`; the
interleaved suite, the longest, is :mod:`mmgen.eval.interleaved_suite`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmgen.eval.interleaved_suite import InterleavedSuite
from mmgen.eval.stats import mean_interval, proportion
from mmgen.eval.suite_base import Context, Suite, batches_of, pct_block, verdict


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
                for k, bi, chunk in batches_of(self.items[sp], ctx.opts.batch_size, sp)
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
                "verdict": verdict(r["all_objects"], r["parsed"]),
                "ok": r["all_objects"],
                "tag": r["split"],
            }
            for r in rows
        ]


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
            out[g] = {**summarize(rs), "intervals": pct_block(rs, ("all_objects", "exact_scene", "parsed"))}
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
                (k, bi, (form, bi * o.batch_size, chunk)) for k, bi, chunk in batches_of(cases, o.batch_size, form)
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
                "verdict": verdict(r["all_objects"], r["parsed"]),
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
            (k, bi, (bi * o.batch_size, chunk)) for k, bi, chunk in batches_of(self.entries, o.batch_size, "all")
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
                for k, bi, chunk in batches_of(cases, ctx.opts.batch_size, sp)
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
