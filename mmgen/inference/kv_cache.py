"""KV-cache compression for long interleaved context: transformers cache layers that hold a budget.

A long multi-image document or chat fills the KV cache with entries the answer barely reads. The
methods here evict them, as transformers v5 ``Cache(layers=[...])`` objects that the pipeline's decode
loop fills like any other cache (``GenerationOptions.kv_method``):

- ``none`` -- transformers' own cache, exact (``DynamicCache``, or ``QuantizedCache`` with ``cache=fp8``).
- ``snapkv`` -- prompt compression at the end of the prefill (SnapKV idea): each layer scores the prompt's
  entries by the attention the last ``kv_window`` prompt queries give them (summed over the window and
  over the query heads that share a KV head, then average-pooled over 7 neighbouring entries so that
  parts of one image go together) and keeps the best, the window itself and the first ``kv_sinks``
  tokens: ``kv_budget`` entries in all. The answer is kept whole.
- ``streaming`` -- attention sinks and a recent window (StreamingLLM idea): the first ``kv_sinks``
  tokens and the most recent ``kv_budget - kv_sinks``, in the prompt and while decoding. No scores.
- ``h2o`` -- sinks, a recent window and heavy hitters (H2O idea): the first ``kv_sinks`` tokens, the
  last ``kv_window``, and the entries that have received the most attention fill ``kv_budget``. The
  prompt is scored by its last ``kv_window`` queries (as snapkv, without pooling); every decoded token
  then adds the attention it gives to each held entry.

``kv_budget`` counts every entry a row holds per layer and KV head, sinks and window included. The
prefill attends to the whole prompt, and each layer stores only the part of it that it keeps. A
decoding forward first evicts
committed entries down to the budget, then attends to them and to its own new entries, which it never
evicts (under speculative verification they are drafts, not yet committed): between forwards a cache
holds at most ``kv_budget`` entries plus those of the last forward (one when decoding plainly).
``kv_budget=None`` evicts nothing: the tokens are exactly those of the plain cache. ``cache=fp8``
composes with every method: the kept entries are held as transformers' ``Fp8QuantizedLayer`` holds them
(8-bit floats, per-tensor scale frozen at the prefill), and eviction gathers the 8-bit entries as they
are, without quantizing again.

**Selection is per layer, per row and per KV head.** The layout ``[batch, kv_heads, entries, head_dim]``
lets each head gather its own entries; only the number of entries must be the same in every row, head
and layer, since one attention mask serves the whole forward. Rows shorter than that count (left
padding, a short unconditional CFG row) keep padding entries; padding scores below any token and is
never protected, so every head of a row keeps the same number of padding entries, all at the front
(entries stay in sequence order), and a row's mask is ``entry >= padding``. Each CFG row is its own
prompt and keeps its own entries.

**Scores without eager attention.** SDPA returns no weights. A forward pre-hook on every attention
module hands its input (hidden states and rotary cos/sin) to the layer of the cache that forward is
called with (other caches ignore it); the layer recomputes only the queries it needs with the module's
own ``q_proj`` (and ``q_norm``, where a model has one) and rotary function, and their softmax attention
over the keys it returns to the model: the observation window at the prefill, the new tokens while
decoding (h2o). The model itself stays on SDPA / flash attention.

**Positions and masks.** After an eviction the cache length is no longer a position: the loop passes
``position_ids`` (the decode loop does), and takes the 2-D attention mask of each forward from
:func:`attention_mask_for`, which turns the mask over every token seen into one over the entries held
(and plans the forward's evictions). A forward without it is a one-line error, not a wrong mask.

**Rollback.** ``cache.crop(-n)`` drops the last ``n`` entries of every layer, and the attention their
queries gave (not yet added to the h2o scores). For ``n`` up to the entries of the last forward it undoes
that forward: what the forward evicted depended on committed entries only and would have been evicted
by the next forward anyway, so every later forward computes what it would have without the drafts.
Further back it drops the ``n`` most recent entries held, which are the ``n`` most recent tokens while
``n <= kv_window`` (snapkv and h2o keep the window whole). ``get_seq_length()`` is the number of entries
held, not a position: a loop over a compressed cache keeps its own positions.

**With prefill pruning** (:mod:`mmgen.inference.prune`) the pruned prompt is the cache's prefill. The
methods that cut the input (merge, random, stride) run one forward over it, scored like any prefill; the
in-LLM ones (fastv, text, pyramid) write the kept entries in without a forward of the cache's own, so
snapkv and h2o cannot score that prompt and a budget with them is a one-line error (streaming, or no
budget, works with every pruning method).

For the benchmark::

    from mmgen.inference.kv_cache import make_kv_cache, kv_stats, budget_sweep
    cache = make_kv_cache(model, "h2o", budget=256, window=32, sinks=4, quantize=False)
    for tok, active in decode_loop(model, vocab, rows, ..., cache=cache): ...   # mmgen.inference.pipeline
    kv_stats(cache)   # {'bytes', 'bytes_peak', 'entries', 'tokens_held', 'tokens_seen', ...}
    budget_sweep(model, vocab, rows, [dict(method="h2o", budget=64), ...], **decode_loop_kwargs)

``MMGenPipeline`` does the same from ``GenerationOptions(kv_method=..., kv_budget=...)`` and reports
:func:`kv_stats` in ``doc.meta['kv']``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from mmgen.errors import MMGenError
from mmgen.inference.kv_layers import BudgetLayer, CacheRows, Fp8BudgetLayer, KVPolicy, rotary_function

METHODS = ("none", "snapkv", "streaming", "h2o")


def check_kv_options(options, model_config=None) -> None:
    """One-line MMGenError for a ``kv_*`` option (of a GenerationOptions) that cannot work; with
    ``model_config``, also for a model whose layers the compressed cache cannot hold."""
    m, budget, window, sinks = options.kv_method, options.kv_budget, options.kv_window, options.kv_sinks
    if m not in METHODS:
        raise MMGenError(f"unknown kv_method '{m}' (use one of: {', '.join(METHODS)})")
    if window < 1:
        raise MMGenError(f"kv_window must be >= 1, got {window}")
    if sinks < 0:
        raise MMGenError(f"kv_sinks must be >= 0, got {sinks}")
    if budget is not None:
        if m == "none":
            raise MMGenError(f"kv_budget {budget} needs a kv_method that evicts (snapkv, streaming or h2o)")
        kept, what = (
            (sinks + 1, f"kv_sinks {sinks} + 1 recent token")
            if m == "streaming"
            else (sinks + window, f"kv_sinks {sinks} + kv_window {window}")
        )
        if budget < kept:
            raise MMGenError(
                f"kv_budget {budget} is below what kv_method={m} always keeps ({what} = {kept}); "
                "raise kv_budget or lower the others"
            )
    from mmgen.inference.prune import IN_LLM

    prune = getattr(options, "prune_method", "none")
    if budget is not None and m in ("snapkv", "h2o") and prune in IN_LLM:
        raise MMGenError(
            f"kv_method={m} scores the prompt in its prefill forward, which prune_method={prune} "
            "replaces by its own; use kv_method=streaming, or prune_method merge, random or stride"
        )
    if m != "none" and model_config is not None:
        types, _ = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
        other = sorted(set(types) - {"full_attention"})
        if other:
            raise MMGenError(
                f"kv_method={m} compresses full-attention layers only; this model also has "
                f"{', '.join(other)} layers (use kv_method=none)"
            )


class CompressedKVCache(Cache):
    """A ``Cache`` of budgeted layers (one per decoder layer) for ``model``: build it with
    :func:`make_kv_cache`, take each forward's attention mask from :func:`attention_mask_for`."""

    def __init__(self, model, policy: KVPolicy, quantize: bool = False):
        config = model.config.get_text_config(decoder=True)
        self.policy, self.rows, self.quantized, self.peak_bytes = policy, CacheRows(), quantize, 0
        layer = Fp8BudgetLayer if quantize else BudgetLayer
        super().__init__(layers=[layer(policy, self.rows) for _ in range(config.num_hidden_layers)])
        if policy.scored:
            _hook_attention(model, config.num_hidden_layers)

    def attention_mask_for(self, mask: torch.Tensor) -> torch.Tensor:
        """The 2-D mask of the next forward over the entries held, from ``mask`` over every token seen
        and the forward's new ones (left-padded rows); plans the forward's evictions."""
        rows = self.rows
        self.peak_bytes = max(self.peak_bytes, cache_size(self))
        new, held = mask.shape[-1] - rows.seen, self.get_seq_length()
        if new < 1:
            raise MMGenError(
                f"the attention mask covers {mask.shape[-1]} tokens but the cache has seen {rows.seen}: "
                "pass the mask over every token seen plus the new ones"
            )
        rows.prefill = held == 0
        rows.drop = self.policy.evictions(held, new, rows.prefill)
        if rows.prefill:
            real = mask.bool()
            rows.real = real.sum(-1)
            pads = mask.shape[-1] - rows.real
            if not torch.equal(real, torch.arange(mask.shape[-1], device=mask.device)[None] >= pads[:, None]):
                raise MMGenError("a compressed KV cache needs left-padded rows (padding first, then the tokens)")
            rows.candidates, step = real, mask
        else:
            rows.candidates = torch.arange(held, device=mask.device)[None] >= rows.pads[:, None]
            pads = rows.pads
            rows.real = rows.real + mask[:, rows.seen :].sum(-1)
        # Padding scores below every token, so each row evicts its padding first, in every layer and head.
        rows.pads = (pads - rows.drop).clamp(min=0)
        if not rows.prefill:
            kept = torch.arange(held - rows.drop, device=mask.device)[None] >= rows.pads[:, None]
            step = torch.cat([kept.to(mask.dtype), mask[:, rows.seen :]], -1)
        rows.mask, rows.seen, rows.forward = step.bool(), rows.seen + new, rows.forward + 1
        return step

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_mask_sizes(0)[0]

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last ``-tokens_to_remove`` entries of every layer (see the module docstring)."""
        super().crop(tokens_to_remove)
        self.rows.seen += tokens_to_remove
        self.rows.real = self.rows.real + tokens_to_remove


def cache_size(cache) -> int:
    """:func:`mmgen.inference.pipeline.cache_bytes` (bytes the layers hold)."""
    from mmgen.inference.pipeline import cache_bytes

    return cache_bytes(cache)


def _hand_source(module, args, kwargs):
    """Forward pre-hook of an attention module: give its input to the layer of a compressed cache."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, CompressedKVCache) and cache.policy.scored:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache.layers[module.layer_idx].source = (module, hidden, kwargs.get("position_embeddings"))


def _hook_attention(model, layers: int) -> None:
    """Put :func:`_hand_source` on every attention module of ``model`` (once; it does nothing for other caches)."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if len(mods) != layers:
        raise MMGenError(
            f"kv scoring reads each attention layer's q_proj; found {len(mods)} in {type(model).__name__} "
            f"for {layers} layers (use kv_method=streaming or none for this model)"
        )
    for m in mods:
        rotary_function(m)
        if not getattr(m, "_mmgen_kv_hook", False):
            m.register_forward_pre_hook(_hand_source, with_kwargs=True)
            m._mmgen_kv_hook = True


def make_kv_cache(
    model, method: str = "none", budget: int | None = None, window: int = 32, sinks: int = 4, quantize: bool = False
) -> Cache:
    """A new cache for ``model``: transformers' own for ``method='none'``
    (:func:`mmgen.inference.pipeline.make_cache`), else a :class:`CompressedKVCache`."""
    from types import SimpleNamespace

    from mmgen.inference.pipeline import make_cache

    check_kv_options(
        SimpleNamespace(kv_method=method, kv_budget=budget, kv_window=window, kv_sinks=sinks), model.config
    )
    if method == "none":
        return make_cache(model, "fp8" if quantize else "dynamic")
    return CompressedKVCache(model, KVPolicy(method, budget, window, sinks), quantize=quantize)


def kv_cache_for(model, options) -> Cache:
    """:func:`make_kv_cache` from a GenerationOptions (``kv_*`` fields, ``cache='fp8'`` to quantize)."""
    return make_kv_cache(
        model,
        options.kv_method,
        options.kv_budget,
        options.kv_window,
        options.kv_sinks,
        quantize=options.cache == "fp8",
    )


def attention_mask_for(cache, mask: torch.Tensor) -> torch.Tensor:
    """The 2-D attention mask a forward over ``cache`` takes: ``mask`` itself (over every token seen plus
    the new ones) for a plain cache, the mask over the entries held for a :class:`CompressedKVCache`."""
    return cache.attention_mask_for(mask) if isinstance(cache, CompressedKVCache) else mask


def kv_stats(cache) -> dict:
    """What ``cache`` holds: ``bytes`` now and ``bytes_peak`` (measured from the tensors themselves, between
    forwards), ``entries`` per row, layer and KV head (padding included), and, for a compressed
    cache, per row ``tokens_seen`` (padding excluded) and ``tokens_held`` (the entries that are tokens)."""
    now = cache_size(cache)
    if not isinstance(cache, CompressedKVCache):
        # A plain cache evicts nothing: it holds every token it has seen, and only grows.
        kind = "fp8" if type(cache).__name__ == "QuantizedCache" else "dynamic"
        return {
            "method": "none",
            "quantized": kind == "fp8",
            "bytes": now,
            "bytes_peak": now,
            "entries": cache.get_seq_length(),
        }
    p, rows, held = cache.policy, cache.rows, cache.get_seq_length()
    pads = rows.pads
    out = {
        "method": p.method,
        "budget": p.budget,
        "window": p.window,
        "sinks": p.sinks,
        "quantized": cache.quantized,
        "bytes": now,
        "bytes_peak": max(cache.peak_bytes, now),
        "entries": held,
    }
    if rows.real is not None:
        out["tokens_seen"] = rows.real.tolist()
        out["tokens_held"] = (held - pads).tolist()
    return out


def budget_sweep(model, vocab, rows: Sequence[Sequence[int]], settings: Sequence[dict], **decode_kw) -> list[dict]:
    """Decode ``rows`` once per setting (:func:`make_kv_cache` keywords; the first is the reference,
    usually ``{}`` = the plain cache) with the same ``decode_loop`` keywords, and return per setting
    :func:`kv_stats`, ``seconds`` (wall) and ``cpu_seconds`` (this process's CPU time: steadier on a shared
    machine), ``tokens_per_s`` (tokens written by all rows, over wall time) and ``agreement``: the fraction
    of written tokens equal to the reference's, position by position."""
    import time

    from mmgen.inference.pipeline import decode_loop

    out, ref = [], None
    for s in settings:
        cache = make_kv_cache(model, **s)
        got: list[list[int]] = [[] for _ in rows]
        t0, c0 = time.perf_counter(), time.process_time()
        for tok, active in decode_loop(model, vocab, rows, cache=cache, **decode_kw):
            for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a:
                    got[r].append(t)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ref = got if ref is None else ref
        n = sum(len(g) for g in got)
        same = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
        out.append(
            {
                **kv_stats(cache),
                "setting": dict(s),
                "seconds": round(seconds, 4),
                "cpu_seconds": round(cpu, 4),
                "tokens_per_s": round(n / seconds, 2),
                "agreement": same / max(1, sum(len(r) for r in ref)),
                "tokens": got,
            }
        )
    return out
