"""Speculative Jacobi decoding (SJD) of image blocks: several code tokens per forward pass, training-free.

Inside an image block whose grid is declared (past ``<image> <h_H> <w_W>``), each row keeps a window of
up to ``window`` tokens ahead of the tokens it has committed. One forward pass over ``[last committed
token, window]`` gives the target distribution ``p_t`` of every window position at once, and the window
is verified left to right with SJD's rule: draft ``x`` at a position is accepted with probability
``min(1, p_t(x) / p_{t-1}(x))``, where ``p_{t-1}`` is the distribution it was drawn from. The first
rejected position is resampled from the residual ``max(0, p_t - p_{t-1})`` (normalised), which makes
every committed token an exact sample of the plain sampler's distribution; when the whole window passes,
the last position's ``p_t`` gives one more token for free. The drafts behind a rejection are redrawn
from this pass's ``p_t`` at their positions (the Jacobi update), and positions new to the window are
drawn from the last target the pass produced, under their own position's grid mask. Greedy decoding
(temperature 0) turns all of this into Jacobi iteration with exact matching: the committed tokens are
the plain greedy loop's tokens.

What the targets are: the step's own processing, position by position. The conditional and
unconditional CFG rows run in the same forward (one batch), guidance is mixed before the softmax
(``uncond + s * (cond - uncond)`` on media ids, :func:`~mmgen.inference.processors.cfg_mix`), then the
grid constraint's mask for that position of the block (:meth:`ImageGridConstraint.block_allowed
<mmgen.inference.constraints.ImageGridConstraint.block_allowed>`: codes, ``<eol>`` at row ends,
closers) and transformers' temperature / top-k / top-p warpers. The first window position goes through
the step's ``LogitsProcessorList`` itself. Drafts are drawn from distributions built the same way, so a
position with one allowed token (``<eol>``, ``</pix>``, ``</image>``) is always accepted. Text, audio
blocks and the size tokens are decoded plainly, one token per pass.

Rollback: the verifying forward appends ``[last, window]`` to the KV cache; right after the
verification the cache is cropped (``Cache.crop``) back to the committed tokens, less the last one,
which the next pass feeds again: exactly the state the plain loop keeps. Cropping is chosen over
keeping the cache at the committed tokens and recomputing, which would need a copy of every layer per
pass (to verify on) or a second forward for the accepted tokens; a crop costs nothing on a
``DynamicCache``. A cache that cannot crop (transformers' quantized caches say so with
``is_croppable``) is refused with a one-line error. Only committed tokens are in the cache between
passes, so a compressed cache only ever evicts those.

Batches: every pass commits the same number ``n`` of tokens to all rows (the fewest any active row
produced), so the cache stays rectangular and the stopping criteria, the grid constraint and the
caller's stream see one token per row at a time as in the plain loop. A row that produced more keeps the
surplus as *pending* tokens at the front of its next window: they are already exact samples (their
context is committed unchanged), so they are accepted without a test and nothing a fast row verified is
thrown away; the batch then advances about as fast as its slowest row would alone.

Relaxed acceptance (the LANTERN idea): with ``delta > 0`` a draft code is credited, in the acceptance
test only, with the target mass of its ``k`` nearest codes in the image tokenizer's codebook (latent
proximity), at most ``delta``: ``min(1, (p_t(x) + min(delta, p_t(N_k(x)))) / p_{t-1}(x))``. A draft that
is a near neighbour of what the model prefers then passes more often, at a distribution shift bounded
by the credit; ``delta = 0`` is the exact rule above.

Why a loop of its own: transformers' assisted generation (``generate(assistant_model=...)``, prompt
lookup) verifies a separate drafter's greedy proposals, for batch size 1 and without the CFG rows; SJD
drafts with the model's own previous pass and accepts by probability ratio, on the guided distribution.

Functions to call:

- :func:`decode_loop(..., spec=SpeculativeJacobi(window=16)) <mmgen.inference.pipeline.decode_loop>` and
  ``MMGenPipeline(bundle)(prompt, spec_decoding=True, spec_window=16, spec_delta=0.0)``: generation with
  SJD; ``doc.meta['spec']`` holds the passes and tokens per pass, ``doc.meta['forward_passes']`` all of
  the call's forward passes (prefill included).
- :func:`speculative_from_options` builds the settings from :class:`~mmgen.inference.pipeline.GenerationOptions`
  and a bundle (the codebook neighbours for the relaxed test); :func:`check_spec_options` checks them.
- :func:`compare_t2i` (bundle, prompts, window, delta, ...) runs batched text-to-image twice, plain and
  with SJD, on the same seeds, and returns both runs' images, forward passes per image and seconds, and
  their ratios: what ``benchmarks/inference.py`` records.

The loop is :func:`jacobi_decode` here; the draft window, the sampler of targets and drafts, the
acceptance test and the Jacobi update it runs are in :mod:`mmgen.inference.drafts`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mmgen.errors import MMGenError
from mmgen.inference.drafts import (
    BlockMasks,
    DraftSampler,
    DraftWindow,
    block_left,
    next_window,
    plain_draw,
    verify_drafts,
)


@dataclass
class SpeculativeJacobi:
    """Settings of speculative Jacobi decoding, as :func:`~mmgen.inference.pipeline.decode_loop` takes them.

    ``window``: draft tokens verified per forward pass. ``delta``: the most neighbour mass the relaxed
    test credits a draft (0: exact SJD). ``neighbours``: ``(media ids, k)`` rows of the ``k`` nearest codes
    of each media id as media-column indices (:func:`codebook_neighbours`), needed when ``delta > 0``.
    ``stats`` is filled by the loop: passes, tokens committed per pass, drafts tested and accepted."""

    window: int = 16
    delta: float = 0.0
    neighbours: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if int(self.window) < 1:
            raise MMGenError(f"spec_window must be >= 1 (the draft window holds at least one token), got {self.window}")
        if not 0.0 <= float(self.delta) <= 1.0:
            raise MMGenError(
                f"spec_delta must be in [0, 1] (the most probability mass a draft is credited; 0 is exact "
                f"SJD), got {self.delta}"
            )
        if self.delta > 0 and self.neighbours is None:
            raise MMGenError(
                "relaxed acceptance (spec_delta > 0) needs the codebook neighbours: build the settings "
                "with speculative_from_options(options, bundle)"
            )


# -- options ----------------------------------------------------------------------------------------
def check_spec_options(options, bundle=None) -> None:
    """One-line MMGenErrors for the ``spec_*`` fields of ``options`` (a GenerationOptions); with ``bundle``,
    also what the bundle must have: a croppable cache and, for the relaxed test, a codebook."""
    if options.spec_window < 1:
        raise MMGenError(
            f"spec_window must be >= 1 (the draft window holds at least one token), got {options.spec_window}"
        )
    if not 0.0 <= options.spec_delta <= 1.0:
        raise MMGenError(
            f"spec_delta must be in [0, 1] (the most probability mass a draft is credited; 0 is exact SJD), "
            f"got {options.spec_delta}"
        )
    if options.spec_neighbours < 1:
        raise MMGenError(
            f"spec_neighbours must be >= 1 (codebook neighbours per code for the relaxed test), "
            f"got {options.spec_neighbours}"
        )
    if not options.spec_decoding or bundle is None:
        return
    from mmgen.inference.kv_cache import kv_cache_for

    if not kv_cache_for(bundle.model, options).is_croppable:
        raise MMGenError(
            f"speculative decoding rolls rejected drafts back out of the KV cache, which the "
            f"'{options.cache}' cache cannot do without kv compression; use cache=dynamic (or a kv_method "
            f"with cache=fp8), or turn spec_decoding off"
        )
    if options.spec_delta > 0:
        codebook_neighbours(bundle.vocab, bundle.image_tokenizer, 1)  # raises when there is no codebook


def speculative_from_options(options, bundle) -> SpeculativeJacobi | None:
    """The decode loop's settings for ``options`` (None when ``spec_decoding`` is off)."""
    if not options.spec_decoding:
        return None
    table = (
        codebook_neighbours(bundle.vocab, bundle.image_tokenizer, options.spec_neighbours)
        if options.spec_delta > 0
        else None
    )
    return SpeculativeJacobi(window=options.spec_window, delta=options.spec_delta, neighbours=table)


@torch.no_grad()
def codebook_neighbours(vocab, image_tokenizer, k: int) -> torch.Tensor:
    """``(vocab.size - vocab.text_size, k)`` long: for each media id (as an index past the text ids), the
    ``k`` nearest other codes of its code range by Euclidean distance between the tokenizer's code vectors
    (:func:`~mmgen.tokenizers.base.code_vectors`), as media-column indices. Ids without a codebook (the
    structural tokens) point at the column one past the end, which holds no mass."""
    from mmgen.tokenizers.base import code_vectors

    media = vocab.size - vocab.text_size
    table = torch.full((media, k), media, dtype=torch.long)
    found = False
    for name in ("sem", "pix"):
        vecs = code_vectors(image_tokenizer, name) if image_tokenizer is not None and vocab.has(name) else None
        if vecs is None:
            continue
        start, end = vocab.code_range(name)
        n = min(end - start, vecs.shape[0])
        kk = min(k, n - 1)
        found = True
        if kk < 1:
            continue
        vecs, first = vecs[:n].float(), start - vocab.text_size  # the range's first media column
        for s in range(0, n, 1024):  # chunks: a 16k codebook's full distance matrix would be 1 GiB
            d = torch.cdist(vecs[s : s + 1024], vecs)
            rows = torch.arange(d.shape[0])
            d[rows, s + rows] = float("inf")  # a code is not its own neighbour
            table[first + s : first + s + d.shape[0], :kk] = first + d.topk(kk, largest=False).indices
    if not found:
        raise MMGenError(
            "relaxed acceptance (spec_delta > 0) needs the image tokenizer's codebook, and this bundle's "
            "tokenizer has none; set spec_delta=0"
        )
    return table


# -- the loop ---------------------------------------------------------------------------------------
@torch.no_grad()
def jacobi_decode(
    model,
    vocab,
    spec: SpeculativeJacobi,
    *,
    cache,
    cache_kw: str,
    seq: torch.Tensor,
    cur: int,
    attn: torch.Tensor,
    dropped: int,
    next_pos: torch.Tensor,
    logits: torch.Tensor,
    processors,
    stopping,
    constraint,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator,
    max_new_tokens: int,
    pad_id: int,
    stats: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Step 4 of :func:`~mmgen.inference.pipeline.decode_loop` with speculative Jacobi decoding of image
    blocks (the module docstring says how). Takes over right after the prefill: ``seq`` (B, cur + budget)
    holds the conditional rows, ``attn`` the attention mask of all rows (2B with guidance) over every
    token, of which prefill pruning left ``dropped`` columns out of the cache, ``next_pos`` the position
    each row's next token takes, ``logits`` the prefill's last logits, ``cache`` the filled cache (its
    forwards take their mask from :func:`~mmgen.inference.kv_cache.attention_mask_for`, as the plain
    step's do). Yields ``(tokens, active)`` one token per row at a time, exactly like the plain loop."""
    from mmgen.inference.kv_cache import attention_mask_for
    from mmgen.inference.processors import cfg_mix

    if not getattr(cache, "is_croppable", False):
        raise MMGenError(
            f"speculative decoding rolls rejected drafts back with Cache.crop, which a "
            f"{type(cache).__name__} cannot do; use the dynamic cache"
        )
    stats = {} if stats is None else stats
    bsz, device = seq.shape[0], seq.device
    use_cfg = logits.shape[0] != bsz
    lo, hi = vocab.text_size, vocab.size
    media = hi - lo
    sampler = DraftSampler(temperature, top_k, top_p, gen)
    masks = BlockMasks(constraint, vocab, logits.shape[-1], device)
    report = spec.stats  # accumulates over the calls that share these settings (batches of one run)
    report.update(window=spec.window, delta=spec.delta)
    for key in ("passes", "tokens", "drafts", "accepted"):
        report.setdefault(key, 0)
    report.setdefault("per_pass", [])
    win = DraftWindow.empty(bsz, media, device)
    step_logits = logits[:, None, :]  # (rows, 1 + window, V): the targets of the last forward
    position = next_pos.clone()  # (rows,) position of the token step_logits[:, 0] predicts
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    step = 0
    while True:
        k = win.length  # (B,) window tokens each row fed to the last forward
        fed = step_logits.shape[1] - 1
        scores = processors(seq[:, :cur], step_logits[:, 0])  # slot 0: the plain step's own processing
        first = plain_draw(scores, sampler)
        cond = step_logits[:bsz, :, lo:hi]
        guided = cfg_mix(cond, step_logits[bsz:, :, lo:hi], cfg_scale) if use_cfg else cond  # (B, 1+fed, media)
        spec_rows = k > 0
        block_pos = torch.tensor(constraint.pos, dtype=torch.long, device=device)
        left = block_left(constraint, block_pos)
        budget = max_new_tokens - step
        out = first[:, None]
        made = torch.ones(bsz, dtype=torch.long, device=device)
        if fed:
            target = sampler.probs(guided, win.masks)
            slot0 = sampler.probs(scores[:, lo:hi])
            target[:, 0] = torch.where(spec_rows[:, None], slot0, torch.full_like(slot0, 1.0 / media))
            out, made_spec, tested, accepted = verify_drafts(win, target, left, budget, spec, sampler, lo)
            out = torch.where(spec_rows[:, None], out, torch.cat([first[:, None], out[:, 1:]], 1))
            made = torch.where(spec_rows, made_spec, made)
            report["drafts"] += tested
            report["accepted"] += accepted
        else:
            target = None
        n = int(made[active].min())
        report["passes"] += 1
        report["per_pass"].append(0)
        # roll back first (a caller may stop reading at any token): keep [last, the n - 1 window tokens
        # committed now]; the n-th is fed next, as the plain loop feeds its last token
        _crop(cache, fed + 1 - n)
        # commit n tokens, one column at a time, as the plain loop would have written them
        for j in range(n):
            tok = torch.where(active, out[:, j], torch.full_like(out[:, j], pad_id))
            was_active = active.clone()
            seq[:, cur] = tok
            cur += 1
            step += 1
            active = active & ~stopping(seq[:, :cur], scores)
            report["tokens"] += 1
            report["per_pass"][-1] += 1
            yield tok, was_active
            if not bool(active.any()) or step == max_new_tokens:
                _crop(cache, n - 1 - j)  # the tokens after the last one written never count
                return
            constraint.observe(seq[:, :cur])  # the state of the next position
        position = position + n
        win = next_window(
            win,
            out,
            made,
            n,
            k,
            target,
            guided,
            left,
            constraint,
            masks,
            sampler,
            active,
            spec.window,
            max_new_tokens - step,
            lo,
            device,
        )
        width = win.size
        feed = torch.cat([seq[:, cur - 1 : cur], win.tokens[:, :width]], 1)
        extra = {}
        if getattr(model.config, "grid_positions", False):
            g = model.grid_cells(torch.cat([seq[:, :cur], win.tokens[:, :width]], 1), 1 + width)
            extra["grid_positions"] = torch.cat([g, g]) if use_cfg else g
        ids = torch.cat([feed, feed]) if use_cfg else feed
        positions = (position - 1)[:, None] + torch.arange(1 + width, device=device)
        mask = attention_mask_for(cache, attn[:, : cur - dropped + width])  # every token seen, then the window
        res = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **extra
        )
        stats["forward_passes"] = stats.get("forward_passes", 0) + 1
        step_logits = res.logits.float()


def _crop(cache, tokens: int) -> None:
    """Drop the last ``tokens`` positions of every layer of ``cache`` (transformers' ``Cache.crop`` takes
    the count negated)."""
    if tokens > 0:
        cache.crop(-tokens)


# -- measuring --------------------------------------------------------------------------------------
def compare_t2i(
    bundle,
    prompts: Sequence[str],
    *,
    window: int = 16,
    delta: float = 0.0,
    neighbours: int = 8,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """Text-to-image for ``prompts`` twice on the same seeds, plain and with SJD (``window``, ``delta``,
    ``neighbours``); sampling options left None are the bundle's. Returns ``{'plain': run, 'spec': run,
    'passes_ratio', 'seconds_ratio', 'cpu_seconds_ratio'}`` where a run is ``{'images', 'forward_passes',
    'passes_per_image', 'seconds', 'cpu_seconds', 'tokens_per_pass'}`` and the ratios are plain over SJD
    (> 1: SJD is faster). ``cpu_seconds`` is this process's CPU time, which other work on a shared
    machine disturbs less than wall time."""
    from mmgen.inference.batch_generation import generate_images
    from mmgen.inference.pipeline import GenerationOptions

    options = GenerationOptions(spec_decoding=True, spec_window=window, spec_delta=delta, spec_neighbours=neighbours)
    check_spec_options(options, bundle)
    runs = {}
    for name, spec in (("plain", None), ("spec", speculative_from_options(options, bundle))):
        stats: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        images = generate_images(
            bundle,
            list(prompts),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            cfg_scale=cfg_scale,
            batch_size=batch_size,
            spec=spec,
            stats=stats,
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[name] = {
            "images": images,
            "forward_passes": stats["forward_passes"],
            "passes_per_image": stats["forward_passes"] / max(1, len(images)),
            "seconds": round(seconds, 4),
            "cpu_seconds": round(cpu, 4),
        }
        if spec is not None:
            runs[name]["tokens_per_pass"] = round(spec.stats["tokens"] / max(1, spec.stats["passes"]), 3)
    runs["passes_ratio"] = runs["plain"]["forward_passes"] / runs["spec"]["forward_passes"]
    runs["seconds_ratio"] = runs["plain"]["seconds"] / max(runs["spec"]["seconds"], 1e-9)
    runs["cpu_seconds_ratio"] = runs["plain"]["cpu_seconds"] / max(runs["spec"]["cpu_seconds"], 1e-9)
    return runs
