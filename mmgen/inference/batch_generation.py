"""Batched generation for the evaluation suites and benchmarks: one image per prompt row (text-to-image,
each row continued by exactly one image block under the grid constraint, then decoded) and short
greedy text answers, many rows at a time. Batch ``i`` samples with seed ``seed + i``, so a result does
not depend on how many batches ran before it. Free-form interleaved answers are
:func:`mmgen.inference.generate.generate_interleaved`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgen.errors import MMGenError
from mmgen.inference.generate import (
    check_mode_supported,
    context_length,
    decode_parsed_blocks,
    default_image_sizes,
    eos_and_pad_ids,
    fit_to_context,
    prompt_ids,
    sample_tokens,
)


def _loop_kwargs(bundle, options, prune=None, spec=None, stats=None) -> dict:
    """The decode loop's parts for one batch: those ``options`` choose, with ``prune`` and ``spec`` given
    in place (so the caller can read their reports after), and ``stats`` to add the forward passes to."""
    from mmgen.inference.pipeline import loop_kwargs

    kw = loop_kwargs(bundle, options)
    kw.update({k: v for k, v in {"prune": prune, "spec": spec, "stats": stats}.items() if v is not None})
    return kw


@torch.no_grad()
def generate_image_rows(
    bundle,
    rows: Sequence[Sequence[int]],
    uncond_rows: Sequence[Sequence[int]] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    batch_size: int = 8,
    size: tuple[int, int] | None = None,
    progress: bool = False,
    desc: str = "t2i",
    options=None,
    prune=None,
    spec=None,
    image_decoder=None,
    stats: dict | None = None,
) -> list:
    """One image per prompt row: each row (token ids ending in ``<image>``) is continued by exactly
    one image block under the grid constraint, then decoded (by the image tokenizer, or by
    ``image_decoder``: :func:`mmgen.inference.detokenize.image_decoder`). Batch ``i`` uses seed
    ``seed + i``. Sampling options left None are the bundle's. ``uncond_rows`` are needed when guidance is on.
    ``options`` (a :class:`~mmgen.inference.pipeline.GenerationOptions`) chooses the decode loop's other
    parts, its KV cache and accelerations (:func:`~mmgen.inference.pipeline.loop_kwargs`); its sampling
    fields are not read here. ``prune`` (a :class:`~mmgen.inference.prune.PrefillPruner`) and ``spec`` (a
    :class:`~mmgen.inference.speculative.SpeculativeJacobi`) replace the ones ``options`` would build, so
    their reports can be read after; ``stats['forward_passes']`` adds up the forward passes of all batches."""
    from mmgen.inference.settings import bundle_sampling

    s = bundle_sampling(bundle, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    temperature, top_k, top_p, cfg_scale = s.temperature, s.top_k, s.top_p, s.cfg_scale
    check_mode_supported(bundle, "t2i")
    if cfg_scale != 1.0 and uncond_rows is None:
        raise MMGenError("classifier-free guidance needs one unconditional prompt per row")
    vocab = bundle.vocab
    eos, pad = eos_and_pad_ids(bundle)
    sizes = [tuple(size)] if size else default_image_sizes(bundle)
    budget = max(vocab.image_block_len(h, w) for h, w in sizes) - 1
    out: list = []
    starts = range(0, len(rows), max(1, int(batch_size)))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for bi, s in enumerate(starts):
        chunk = [list(r) for r in rows[s : s + batch_size]]
        if any(not r or r[-1] != vocab["<image>"] for r in chunk):
            raise MMGenError("an image prompt row must end with the <image> token")
        if fit_to_context(bundle.model, max(len(r) for r in chunk), budget)[1]:
            raise MMGenError(
                f"a prompt of {max(len(r) for r in chunk)} tokens leaves no room for a {budget}-token "
                f"image block in the model's {context_length(bundle.model)} positions; shorten it"
            )
        uncond = [list(r) for r in uncond_rows[s : s + batch_size]] if cfg_scale != 1.0 else None
        blocks = [[vocab["<image>"]] for _ in chunk]
        for tok, active in sample_tokens(
            bundle.model,
            vocab,
            chunk,
            max_new_tokens=budget,
            eos_id=eos,
            pad_id=pad,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + bi,
            cfg_scale=cfg_scale,
            uncond_rows=uncond,
            sizes=sizes,
            stop_after_images=1,
            **_loop_kwargs(bundle, options, prune, spec, stats),
        ):
            for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a:
                    blocks[r].append(t)
        out += decode_parsed_blocks(bundle, [vocab.parse_image_block(b) for b in blocks], image_decoder)
    return out


def generate_images(
    bundle,
    prompts: Sequence[str],
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    batch_size: int = 8,
    size: tuple[int, int] | None = None,
    progress: bool = False,
    options=None,
    spec=None,
    image_decoder=None,
    stats: dict | None = None,
) -> list:
    """Text-to-image for many prompts, batched: one PIL image per prompt, in order.

    ``size`` is the (H, W) code grid (default: the tokenizer's native grid). Batch ``i`` uses seed
    ``seed + i`` so results do not depend on how many batches ran before. Sampling options left None
    are the bundle's; ``options``, ``spec``, ``image_decoder`` and ``stats`` as in :func:`generate_image_rows`."""
    from mmgen.inference.settings import bundle_sampling

    if isinstance(prompts, str):
        prompts = [prompts]
    cfg_scale = bundle_sampling(bundle, cfg_scale=cfg_scale).cfg_scale
    rows = [prompt_ids(bundle, p, image=True) for p in prompts]
    uncond = [prompt_ids(bundle, "", image=True) for _ in prompts] if cfg_scale != 1.0 else None
    return generate_image_rows(
        bundle,
        rows,
        uncond,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        cfg_scale=cfg_scale,
        batch_size=batch_size,
        size=size,
        progress=progress,
        options=options,
        spec=spec,
        image_decoder=image_decoder,
        stats=stats,
    )


@torch.no_grad()
def generate_text_rows(
    bundle,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "text",
    options=None,
    prune=None,
) -> list[str]:
    """Greedy text continuation of each prompt row until ``</s>`` (no images): short answers. ``options``
    and ``prune`` as in :func:`generate_image_rows`."""
    vocab = bundle.vocab
    eos, pad = eos_and_pad_ids(bundle)
    out: list[str] = []
    starts = range(0, len(rows), max(1, int(batch_size)))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        chunk = [list(r) for r in rows[s : s + batch_size]]
        got: list[list[int]] = [[] for _ in chunk]
        for tok, active in sample_tokens(
            bundle.model,
            vocab,
            chunk,
            max_new_tokens=max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            temperature=0.0,
            allow_images=False,
            **_loop_kwargs(bundle, options, prune),
        ):
            for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a and t != eos:
                    got[r].append(t)
        out += [bundle.text_tokenizer.decode(g, skip_special_tokens=True).strip() for g in got]
    return out
