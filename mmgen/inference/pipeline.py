"""The generation pipeline: one object, numbered steps, transformers' parts.

``MMGenPipeline(bundle)(prompt, GenerationOptions(...))`` runs

1. **check inputs** -- every option, before any work (:meth:`MMGenPipeline.check_inputs`);
2. **encode the prompt** -- the layout the bundle learnt, plus the unconditional row for guidance;
3. **prepare the cache** -- an explicit transformers ``Cache`` for the whole batch (``DynamicCache``, the fp8
   ``QuantizedCache``, or a compressed one from :mod:`mmgen.inference.kv_cache`);
4. **decode loop** -- each step's logits go through a ``LogitsProcessorList`` (media-block CFG, the grid
   constraint, transformers' temperature / top-k / top-p warpers) and rows stop through a
   ``StoppingCriteriaList``;
5. **decode media** -- closed image blocks through the image tokenizer, audio blocks through the codec,
   into a :class:`~mmgen.data.doc.Doc`.

Steps 2 and 5 are the bundle's :class:`~mmgen.processing.processor.MMGenProcessor`.

The loop is written here rather than delegated to ``model.generate()`` because one step must see the
conditional and unconditional rows of classifier-free guidance together (``generate()`` runs the
unconditional pass as a second model call with its own cache per step, and cannot guide only the rows
that are inside a media block), because the chat streams the answer token by token as a Doc, and
because speculative Jacobi decoding (:mod:`mmgen.inference.speculative`) verifies a window of drafts per
call on the guided distribution of those rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mmgen.errors import MMGenError
from mmgen.models.bundle import can_draw
from mmgen.processing.vocab import Vocab


@dataclass
class GenerationOptions:
    """Every option of one generation call (``key=value`` overrides and YAML like every mmgen config;
    saved with the output as ``doc.meta['options']``). Sampling options left None are the bundle's
    (its ``generation_config.json``, :func:`mmgen.inference.settings.bundle_sampling`)."""

    mode: str = "auto"  # auto | t2i | tts | text
    max_new_tokens: int = 512
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    seed: int = 0
    allow_audio: bool = False
    max_audio_frames: int | None = None
    sizes: list[list[int]] = field(default_factory=list)  # (H, W) code grids; empty: the tokenizer's own
    # The KV cache: "dynamic" (transformers' DynamicCache, exact) or "fp8" (transformers' QuantizedCache with
    # its fp8 backend: keys and values held in 8-bit floats with a per-tensor scale, a quarter of float32)
    cache: str = "dynamic"
    # Prefill pruning of the picture tokens the prompt shows (mmgen.inference.prune): none | fastv | text | pyramid |
    # merge | random | stride; the share of each code grid kept; the layer K from which fastv/text/pyramid drop
    # tokens; pyramid's [layer, ratio] stages (empty: three from prune_layer to prune_ratio; given: they replace both)
    prune_method: str = "none"
    prune_ratio: float = 1.0
    prune_layer: int = 2
    prune_schedule: list[list[float]] = field(default_factory=list)
    # KV-cache compression (mmgen.inference.kv_cache): which entries of the prompt and the answer the cache keeps
    kv_method: str = "none"  # none | snapkv (prompt, at prefill) | streaming (sinks + recent) | h2o (+ heavy hitters)
    kv_budget: int | None = None  # most entries a row holds per layer and KV head (None: no eviction, exact)
    kv_window: int = 32  # snapkv / h2o: observation window of the prompt, and the recent entries always kept
    kv_sinks: int = 4  # the first tokens of each row, always kept
    # Speculative Jacobi decoding of image blocks (mmgen.inference.speculative); off decodes plainly
    spec_decoding: bool = False
    spec_window: int = 16  # draft tokens verified per forward pass
    spec_delta: float = 0.0  # relaxed acceptance: most codebook-neighbour mass credited to a draft (0: exact)
    spec_neighbours: int = 8  # nearest codebook codes per code that the relaxed acceptance credits
    # The diffusion detokenizer draws the pictures (mmgen.inference.detokenize): detok_path "auto" is the
    # bundle's detokenizer/ when it has one, "none" the image tokenizer's decoder, or a directory
    detok_path: str = "auto"
    detok_steps: int = 4  # 4 draws as well as 8 or 25 (BENCHMARKS "Diffusion detokenizer"), at half of 8's cost
    detok_cfg_scale: float = 1.0
    detok_scale: int = 1  # 2: the 2x super-resolution pipeline
    detok_scheduler: str | None = None  # None: the sampler saved with it; ddim, dpm or ddpm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def build(cls, overrides: Sequence[str] = (), **fields) -> GenerationOptions:
        """Options from ``fields`` with ``key=value`` ``overrides`` on top (the CLI's trailing
        arguments); an unknown key or a value of the wrong type is a one-line MMGenError naming it."""
        from mmgen.config import apply_overrides, from_dict

        return from_dict(cls, apply_overrides(fields, list(overrides)))


CACHES = ("dynamic", "fp8")


def make_cache(model, kind: str = "dynamic"):
    """A new transformers ``Cache`` of ``kind`` (:data:`CACHES`) for ``model``."""
    from transformers import DynamicCache, QuantizedCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "fp8":
        return QuantizedCache("fp8", model.config)
    raise MMGenError(f"unknown cache '{kind}' (use one of: {', '.join(CACHES)})")


def loop_kwargs(bundle, options: GenerationOptions | None) -> dict:
    """:func:`decode_loop`'s keyword arguments for the parts of one call that ``options`` choose (the KV
    cache, the prefill pruner, speculative decoding), built fresh for that call from ``bundle``; ``{}`` for
    None (the loop's defaults)."""
    if options is None:
        return {}
    from mmgen.inference.kv_cache import check_kv_options, kv_cache_for
    from mmgen.inference.prune import check_prune_options, make_pruner
    from mmgen.inference.speculative import check_spec_options, speculative_from_options

    check_prune_options(options, bundle.model.config)
    check_kv_options(options, bundle.model.config)
    check_spec_options(options, bundle)
    return {
        "cache": kv_cache_for(bundle.model, options),
        "prune": make_pruner(options),
        "spec": speculative_from_options(options, bundle),
    }


def cache_bytes(cache) -> int:
    """Bytes the cache's layers actually hold: every tensor they keep (full-precision keys and values,
    quantized states and their scales), counted once each."""
    seen: set[int] = set()
    total = 0

    def visit(x):
        nonlocal total
        if torch.is_tensor(x):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.nelement() * x.element_size()
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    for layer in cache.layers:
        for v in vars(layer).values():
            visit(v)
    return total


def prepare_inputs_for(model) -> dict:
    """How a forward takes its cache (:func:`~mmgen.models.unified.cache_keyword`) and whether it can
    compute logits for the last position only."""
    from mmgen.models.unified import cache_keyword

    params = inspect.signature(model.forward).parameters
    return {"cache_kw": cache_keyword(model), "logits_to_keep": "logits_to_keep" in params}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded batch and its attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, length - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def decode_loop(
    model,
    vocab: Vocab,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    cfg_scale: float = 1.0,
    uncond_rows: Sequence[Sequence[int]] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    allow_images: bool = True,
    stop_after_images: int | None = None,
    logits_hook=None,
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
    cache=None,
    prune=None,
    spec=None,
    stats: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Steps 3 and 4: continue ``rows`` token by token, yielding ``(tokens, active)`` per step.

    ``tokens`` are the (B,) new ids, ``active`` which rows were still generating (a finished row's token
    is ``pad_id``). Rows are left-padded; position ids follow each row's own tokens. With guidance
    (``cfg_scale != 1``) the batch holds the conditional rows then ``uncond_rows``; both receive the
    sampled token. ``cache`` is the ``transformers.Cache`` to fill (default: a new ``DynamicCache``). ``prune``, a
    :class:`~mmgen.inference.prune.PrefillPruner`, prunes the picture tokens at the prefill: the cache then
    holds fewer columns than the rows, and the steps' attention mask follows the cache. ``spec`` (a
    :class:`~mmgen.inference.speculative.SpeculativeJacobi`) decodes image blocks with speculative Jacobi
    decoding. ``stats['forward_passes']`` counts every model forward the loop makes (one per batch, CFG rows
    included; a verified window is one)."""
    from transformers import StoppingCriteriaList

    from mmgen.inference.constraints import ImageGridConstraint
    from mmgen.inference.kv_cache import attention_mask_for
    from mmgen.inference.processors import BlockAwareEosCriteria, ImagesDoneCriteria, step_processors

    if not rows:
        return
    device = next(model.parameters()).device
    bsz = len(rows)
    use_cfg = cfg_scale != 1.0
    if use_cfg and (uncond_rows is None or len(uncond_rows) != bsz):
        raise MMGenError("classifier-free guidance needs one unconditional prompt per row")
    all_rows = list(rows) + (list(uncond_rows) if use_cfg else [])
    ids, attn = left_pad(all_rows, pad_id, device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    # Preallocated, so a step writes one column instead of copying the whole sequence.
    cur = ids.shape[1]
    seq = torch.full((bsz, cur + max_new_tokens), pad_id, dtype=torch.long, device=device)
    seq[:, :cur] = ids[:bsz]
    constraint = ImageGridConstraint(
        vocab,
        sizes=sizes,
        allow_images=allow_images,
        max_length=cur + max_new_tokens,
        allow_audio=allow_audio,
        max_audio_frames=max_audio_frames,
    )
    processors = step_processors(vocab, constraint, cfg_scale, temperature, top_k, top_p, logits_hook)
    stopping = StoppingCriteriaList(
        [BlockAwareEosCriteria(eos_id, constraint)]
        + ([ImagesDoneCriteria(stop_after_images, constraint)] if stop_after_images is not None else [])
    )
    gen = torch.Generator().manual_seed(int(seed))
    stats = {} if stats is None else stats
    stats.setdefault("forward_passes", 0)

    def forward(**kw):
        stats["forward_passes"] += 1
        return model(**kw)

    how = prepare_inputs_for(model)
    cache = make_cache(model) if cache is None else cache
    keep = {"logits_to_keep": 1} if how["logits_to_keep"] else {}  # the prefill needs the last position only
    if prune is not None:
        stats["forward_passes"] += 1  # a pruned prefill is one pass through the layers, fewer tokens after layer K
        out, attn = prune.prefill(model, vocab, ids, attn, position, cache, n_cond=bsz)
    else:
        out = forward(
            input_ids=ids,
            attention_mask=attention_mask_for(cache, attn),
            position_ids=position,
            use_cache=True,
            **{how["cache_kw"]: cache},
            **keep,
        )
    dropped = cur - attn.shape[1]  # prefill columns pruning left out of the cache
    attn_buf = torch.ones((len(all_rows), cur + max_new_tokens), dtype=attn.dtype, device=device)
    attn_buf[:, : attn.shape[1]] = attn
    logits = out.logits[:, -1, :].float()
    next_pos = position[:, -1] + 1
    if spec is not None:
        from mmgen.inference.speculative import jacobi_decode

        yield from jacobi_decode(
            model,
            vocab,
            spec,
            cache=cache,
            cache_kw=how["cache_kw"],
            seq=seq,
            cur=cur,
            attn=attn_buf,
            dropped=dropped,
            next_pos=next_pos,
            logits=logits,
            processors=processors,
            stopping=stopping,
            constraint=constraint,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            gen=gen,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            stats=stats,
        )
        return
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        scores = processors(seq[:, :cur], logits)
        if temperature == 0:
            tok = scores.argmax(-1)
        else:
            probs = scores.softmax(-1)
            tok = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(scores.device)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        was_active = active.clone()
        seq[:, cur] = tok
        cur += 1
        active = active & ~stopping(seq[:, :cur], scores)
        yield tok, was_active
        if not bool(active.any()) or step == max_new_tokens - 1:
            return
        step_tok = torch.cat([tok, tok]) if use_cfg else tok
        grid = {}
        if getattr(model.config, "grid_positions", False):
            # The new token's grid cell depends only on the tokens since its block opened, which the
            # conditional and unconditional rows share.
            g = model.grid_cells(seq[:, :cur], 1)
            grid = {"grid_positions": torch.cat([g, g]) if use_cfg else g}
        # A compressed cache holds fewer entries than tokens seen: its own mask (positions stay the rows' own).
        out = forward(
            input_ids=step_tok[:, None],
            attention_mask=attention_mask_for(cache, attn_buf[:, : cur - dropped]),
            position_ids=next_pos[:, None],
            use_cache=True,
            **{how["cache_kw"]: cache},
            **grid,
        )
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1


class MMGenPipeline:
    """Interleaved generation from one bundle, as numbered steps (see the module docstring).

    ``pipe(prompt, options)`` returns the finished :class:`~mmgen.data.doc.Doc`; :meth:`stream` yields it
    while it grows. ``options`` is a :class:`GenerationOptions` (or its fields as keywords); the
    options actually used, sampling settings resolved, are saved in ``doc.meta['options']``."""

    def __init__(self, bundle, processor=None):
        from mmgen.processing.processor import MMGenProcessor

        self.bundle = bundle
        self.processor = processor or MMGenProcessor.from_bundle(bundle)

    # 1. check inputs ------------------------------------------------------------------------------
    def check_inputs(self, options: GenerationOptions) -> GenerationOptions:
        """``options`` with the bundle's sampling settings filled in; a one-line MMGenError for any
        option this bundle cannot honour."""
        from dataclasses import replace

        from mmgen.inference.detokenize import check_detok_options
        from mmgen.inference.generate import check_mode_supported, check_options
        from mmgen.inference.kv_cache import check_kv_options
        from mmgen.inference.prune import check_prune_options
        from mmgen.inference.settings import bundle_sampling
        from mmgen.inference.speculative import check_spec_options

        o = options
        check_options(
            o.mode, o.max_new_tokens, allow_audio=o.allow_audio, max_audio_frames=o.max_audio_frames, cache=o.cache
        )
        check_kv_options(o, self.bundle.model.config)
        check_detok_options(o, self.bundle)
        s = bundle_sampling(self.bundle, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, cfg_scale=o.cfg_scale)
        check_mode_supported(self.bundle, o.mode, o.allow_audio)
        check_prune_options(o, self.bundle.model.config)
        check_spec_options(o, self.bundle)
        return replace(o, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale)

    # 2. encode the prompt ---------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str, options: GenerationOptions, picture=None
    ) -> tuple[list[int], list[int] | None]:
        """The conditional row (in the layout the bundle learnt, ending with the mode's opener) and,
        with guidance on, the unconditional row (the empty prompt, same opener)."""
        from mmgen.inference.generate import OPENERS

        proc = self.processor
        opener = [proc.vocab[OPENERS[options.mode]]] if options.mode in OPENERS else []
        if picture is not None:  # shown before the text: a question about it, or (t2i) what to draw next
            block = proc.image_ids([picture])[0]
            row = proc.picture_prompt_ids(prompt, block, question=options.mode != "t2i") + opener
        else:
            row = proc.prompt_ids(prompt, image=False) + opener
        uncond = proc.prompt_ids("", image=False) + opener if options.cfg_scale != 1.0 else None
        return row, uncond

    # 3 + 4. prepare the cache, decode loop -----------------------------------------------------------
    def stream(self, prompt: str, options: GenerationOptions | None = None, picture=None, **kw):
        """Yield the growing answer after each new token: a fresh Doc of the completed items plus the
        text so far; the last yield is the finished answer (``meta['stop']``: ``eos`` or
        ``max_new_tokens``). ``max_new_tokens`` is cut to what the context leaves (``meta['note']``)."""
        import time
        from dataclasses import replace

        from mmgen.inference.detokenize import image_decoder
        from mmgen.inference.generate import check_block_budget, default_image_sizes, eos_and_pad_ids, fit_to_context
        from mmgen.inference.kv_cache import kv_stats

        o = self.check_inputs(replace(options or GenerationOptions(), **kw))
        b, vocab = self.bundle, self.bundle.vocab
        eos, pad = eos_and_pad_ids(b)
        can_image = can_draw(b) and o.mode != "text"
        can_audio = o.allow_audio or o.mode == "tts"  # check_inputs made sure the bundle can decode it
        sizes = [tuple(s) for s in o.sizes] if o.sizes else (default_image_sizes(b) if can_image else None)
        row, uncond = self.encode_prompt(prompt, o, picture)
        budget, note = fit_to_context(b.model, len(row), o.max_new_tokens)
        check_block_budget(vocab, o.mode, budget, sizes)
        builder = self.processor.doc_decoder(audio=can_audio, image_decoder=image_decoder(b, o) if can_image else None)
        if o.mode in ("t2i", "tts"):
            builder.block = [row[-1]]  # the opener the prompt ends with
        meta = {
            "prompt": prompt,
            "mode": o.mode,
            "seed": o.seed,
            "cfg_scale": o.cfg_scale,
            "temperature": o.temperature,
            "top_k": o.top_k,
            "top_p": o.top_p,
            "max_new_tokens": budget,
            "options": o.to_dict(),
        }
        if note:
            meta["note"] = note
        if can_audio:
            meta["max_audio_frames"] = o.max_audio_frames
        if can_image:
            meta["image_decoder"] = builder.decoder_info  # what draws this answer's pictures
        stats = {"forward_passes": 0}
        stop, new, t0 = "max_new_tokens", 0, time.perf_counter()
        extra = loop_kwargs(b, o)  # 3. prepare the cache (and the prefill pruner, speculative decoding)
        cache, pruner, spec = extra["cache"], extra["prune"], extra["spec"]
        for tok, active in decode_loop(
            b.model,
            vocab,
            [row],
            max_new_tokens=budget,
            eos_id=eos,
            pad_id=pad,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            seed=o.seed,
            cfg_scale=o.cfg_scale,
            uncond_rows=[uncond] if uncond else None,
            sizes=sizes,
            allow_images=can_image,
            allow_audio=can_audio,
            max_audio_frames=o.max_audio_frames,
            stats=stats,
            **extra,
        ):
            if not bool(active[0]):
                break
            t = int(tok[0])
            new += 1
            if t == eos and builder.block is None:
                stop = "eos"
                break
            builder.push(t)  # 5. decode media: a block is decoded as soon as it closes
            yield builder.snapshot({**meta, "new_tokens": new})
        seconds = time.perf_counter() - t0
        meta.update(
            new_tokens=new,
            stop=stop,
            seconds=round(seconds, 3),
            forward_passes=stats["forward_passes"],
            tokens_per_s=round(new / seconds, 2) if seconds > 0 else None,
            cache={"kind": o.cache, "tokens": cache.get_seq_length(), "bytes": cache_bytes(cache)},
            kv=kv_stats(cache),
        )
        if pruner is not None:
            meta["prune"] = pruner.report
        if spec is not None:
            meta["spec"] = spec.stats
        yield builder.finish(meta)

    def __call__(self, prompt: str, options: GenerationOptions | None = None, picture=None, **kw):
        doc = None
        for doc in self.stream(prompt, options, picture=picture, **kw):  # noqa: B007 - the last Doc is the answer
            pass
        return doc
