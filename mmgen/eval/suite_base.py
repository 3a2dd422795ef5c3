"""What every suite of ``mmgen eval run`` shares (:mod:`mmgen.eval.suites` has the suites themselves): the
suite names, :class:`EvalOptions`, the run :class:`Context`, the :class:`Suite` protocol, batching, and the
helpers that turn judged records into counts with 95% intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgen.errors import MMGenError
from mmgen.eval.stats import proportion
from mmgen.world.surface import SURFACE_FORMS

SUITES = ("t2i", "robust", "geneval", "qa", "interleaved", "recon")
NEEDS_IMAGES = {"t2i", "robust", "geneval", "qa", "interleaved", "recon"}  # qa shows the model a picture


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
    need = [s for s in suites if s in NEEDS_IMAGES]
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


def batches_of(items: list, size: int, prefix: str):
    size = max(1, int(size))
    return [(f"{prefix}/{bi}", bi, items[s : s + size]) for bi, s in enumerate(range(0, len(items), size))]


def pct_block(records, keys) -> dict:
    return {k: proportion(sum(bool(r[k]) for r in records), len(records)) for k in keys}


class Suite:
    """What every suite has: ``prepare`` (its cases and ``batches``), ``run_batch`` (judged records),
    ``summarize``, ``panels`` (the report's grid, ``grid_cols`` wide) and ``finish``."""

    name = ""
    grid_cols = 6

    def finish(self, records: list[dict], ctx: Context, entry: dict) -> None:
        """Write what the suite keeps besides its samples into ``ctx.out`` and note it in its report ``entry``."""


def verdict(ok: bool, parsed: bool = True) -> str:
    return "correct" if ok else ("unparseable" if not parsed else "wrong")


def ctx_splits(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["split"] for r in records))
