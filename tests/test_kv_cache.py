"""KV-cache compression (mmgen.inference.kv_cache): an unlimited budget is the plain cache token for token;
a small one holds fewer bytes and still draws; what is kept is what each method says (checked against
eager attention weights and against masking the evicted tokens out of a full cache); batches, CFG rows
and rollback stay exact; every invalid option is a one-line error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bundlekit import TEXTS, make_tiny_bundle, tiny_qwen2

METHODS = ["snapkv", "streaming", "h2o"]
SMALL = {"budget": 40, "window": 8, "sinks": 4}  # well under the ~85-155-token documents below


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("kv_bundle"))


@pytest.fixture(scope="module")
def models(bundle):
    return {"llama": bundle.model, "qwen2": tiny_qwen2(bundle.vocab, bundle.text_tokenizer)}


def _documents(bundle, images=(4, 3, 2)) -> list[list[int]]:
    """Interleaved prompts of several pictures each (random 4x4 code grids between captions), of three
    lengths, each ending with <image>: the model reads a long multi-image context, then draws."""
    from mmgen.inference.generate import prompt_ids

    rows = []
    for r, n in enumerate(images):
        rng = np.random.default_rng(r)
        row = prompt_ids(bundle, TEXTS[r], image=False)
        for k in range(n):
            picture = bundle.vocab.image_block(rng.integers(0, 16, (4, 4)))
            row += picture + prompt_ids(bundle, TEXTS[r + k + 1], image=False)[1:]
        rows.append(row + [bundle.vocab["<image>"]])
    return rows


def _decode(model, bundle, rows, cache=None, cfg=1.0, temperature=1.0, **kw):
    """Tokens per row and the conditional and unconditional logits of every step."""
    from mmgen.inference.generate import default_image_sizes, prompt_ids
    from mmgen.inference.pipeline import decode_loop

    logits = []
    got: list[list[int]] = [[] for _ in rows]
    uncond = [prompt_ids(bundle, "", image=True) for _ in rows] if cfg != 1.0 else None

    def hook(cond, unc, guided, in_block):
        logits.append((cond.clone(), None if unc is None else unc.clone()))

    for tok, active in decode_loop(
        model,
        bundle.vocab,
        rows,
        max_new_tokens=25,
        eos_id=3,
        pad_id=0,
        seed=3,
        temperature=temperature,
        top_k=8,
        cfg_scale=cfg,
        uncond_rows=uncond,
        sizes=default_image_sizes(bundle),
        stop_after_images=1,
        cache=cache,
        logits_hook=hook,
        **kw,
    ):
        for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
            if a:
                got[r].append(t)
    return got, logits


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_an_unlimited_budget_reproduces_the_plain_cache(bundle, models, base, method):
    from mmgen.inference.kv_cache import make_kv_cache

    model, rows = models[base], _documents(bundle)
    for quantize in (False, True):
        want, _ = _decode(model, bundle, rows, make_kv_cache(model, quantize=quantize), cfg=2.5)
        assert all(len(w) == 25 for w in want)  # one whole 4x4 block per row
        # no budget: nothing is scored or evicted; a budget above every row's length: scored, never evicted
        for budget in (None, 10_000):
            cache = make_kv_cache(model, method, budget=budget, window=8, quantize=quantize)
            got, _ = _decode(model, bundle, rows, cache, cfg=2.5)
            assert got == want, (quantize, budget)


@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_a_small_budget_holds_fewer_bytes_and_still_draws(bundle, models, base, method):
    from mmgen.inference.kv_cache import kv_stats, make_kv_cache

    model, rows = models[base], _documents(bundle)
    plain = make_kv_cache(model)
    want, _ = _decode(model, bundle, rows, plain, cfg=2.5)
    full = kv_stats(plain)
    for quantize in (False, True):
        cache = make_kv_cache(model, method, quantize=quantize, **SMALL)
        got, _ = _decode(model, bundle, rows, cache, cfg=2.5)
        for g in got:  # still one valid image block per row (the grid constraint holds with any cache)
            parsed = bundle.vocab.parse_image_block([bundle.vocab["<image>"], *g])
            assert parsed["pix"].shape == (4, 4)
        s = kv_stats(cache)
        assert s["method"] == method and s["quantized"] == quantize
        seen, held = s["tokens_seen"], s["tokens_held"]
        assert seen[:3] == [len(r) + 24 for r in rows] and seen[3:] == [2 + 24] * 3  # 24 tokens fed after the prefill
        if method == "snapkv":  # the prompt is cut to the budget; the answer is kept whole
            assert s["entries"] == SMALL["budget"] + 24 and held[:3] == [SMALL["budget"] + 24] * 3
        else:  # the budget plus the last forward's token
            assert s["entries"] == SMALL["budget"] + 1 and held[:3] == [SMALL["budget"] + 1] * 3
        assert held[3:] == [2 + 24] * 3  # the short unconditional rows evict padding, never a token
        # bytes per entry: the model's precision (h2o adds a float32 score per entry and KV head), or 8 bits
        per_entry = s["bytes"] / s["entries"] / (full["bytes"] / full["entries"])
        assert (0.25 <= per_entry < 0.35) if quantize else (1 <= per_entry < 1.1)
        # a layer stores only what it keeps of the prompt: the cache never held more than it holds now
        assert s["bytes_peak"] == s["bytes"] < full["bytes"] * (0.15 if quantize else 0.45)
    assert full["bytes"] == full["bytes_peak"] and full["entries"] == max(len(r) for r in rows) + 24


def test_eviction_changes_the_logits_but_not_the_prefill(bundle, models):
    """The small budget really acts (a sanity check of the test above): the first step, right after the
    prefill, attends to every prompt entry; later steps see less and their logits move."""
    from mmgen.inference.kv_cache import make_kv_cache

    model, rows = models["llama"], _documents(bundle)
    _, plain = _decode(model, bundle, rows, make_kv_cache(model), temperature=0.0)
    _, small = _decode(model, bundle, rows, make_kv_cache(model, "h2o", **SMALL), temperature=0.0)
    assert torch.equal(plain[0][0], small[0][0])
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(plain[1:], small[1:])) > 1e-2


@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_rows_and_cfg_rows_keep_what_they_would_keep_alone(bundle, models, base, method):
    """Rows of three lengths with their (much shorter) unconditional CFG rows, in one batch, decode as each
    prompt does alone: every row selects its own entries, padding never displaces a token."""
    from mmgen.inference.kv_cache import make_kv_cache

    model, rows = models[base], _documents(bundle)

    def run(rs, **kv):
        return _decode(model, bundle, rs, make_kv_cache(model, **kv), cfg=2.5, temperature=0.0)

    # the plain cache is exact batched against alone: the premise of this test
    together, _ = run(rows)
    assert together == [run([r])[0][0] for r in rows]
    together, logits = run(rows, method=method, **SMALL)
    for i, r in enumerate(rows):
        alone, own = run([r], method=method, **SMALL)
        assert together[i] == alone[0]
        for (c, u), (c1, u1) in zip(logits, own):
            torch.testing.assert_close(c[i], c1[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(u[i], u1[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_padding_is_evicted_first_whatever_it_scores(bundle, models, method, monkeypatch):
    """A row keeps padding only when it has too few tokens, in every layer and head alike (its mask is
    `entry >= padding`), even if a scorer ranks padding first: here one that adds 100 to every padding entry."""
    from mmgen.inference import kv_cache, kv_layers

    scorer = kv_layers._Budget._attention

    def rank_padding_first(self, source, keys, n):
        return scorer(self, source, keys, n) + 100.0 * ~self.rows.mask[:, None, None, :]

    monkeypatch.setattr(kv_layers._Budget, "_attention", rank_padding_first)
    model, rows = models["qwen2"], _documents(bundle)

    def run(rs):
        return _decode(model, bundle, rs, kv_cache.make_kv_cache(model, method, **SMALL), cfg=2.5, temperature=0.0)

    together, logits = run(rows)
    for i, r in enumerate(rows):
        alone, own = run([r])
        assert together[i] == alone[0]
        for (c, u), (c1, u1) in zip(logits, own):
            torch.testing.assert_close(c[i], c1[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(u[i], u1[0], atol=1e-4, rtol=1e-4)


# -- what each method keeps -----------------------------------------------------------------------
def _eager(model):
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def _prefill(model, rows, cache, attentions=False):
    from mmgen.inference.kv_cache import attention_mask_for
    from mmgen.inference.pipeline import left_pad

    ids, mask = left_pad(rows, 0, "cpu")
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=attention_mask_for(cache, mask),
            position_ids=position,
            cache=cache,
            use_cache=True,
            output_attentions=attentions,
        ), mask.bool()


def _grouped(weights, kv_heads):
    b, h, q, k = weights.shape
    return weights.reshape(b, kv_heads, h // kv_heads, q, k).sum(2)


@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_snapkv_keeps_the_prompt_entries_the_window_attends_to_most(bundle, models, base):
    """The kept keys are the plain cache's keys at the entries eager attention ranks first: the last
    `window` prompt queries' attention weights (padding queries left out), summed per KV head, pooled over
    7 entries; the first `sinks` tokens and the window always kept; padding never while tokens remain."""
    from mmgen.inference.kv_cache import make_kv_cache

    model = _eager(models[base])
    rows = _documents(bundle)[1:]  # two lengths: the shorter row is left-padded
    budget, window, sinks = 30, 6, 3
    cache = make_kv_cache(model, "snapkv", budget=budget, window=window, sinks=sinks)
    out, real = _prefill(model, rows, cache, attentions=True)
    plain = make_kv_cache(model)
    _prefill(model, rows, plain)
    t = real.shape[1]
    for layer, weights in enumerate(out.attentions):
        full = plain.layers[layer].keys
        w = _grouped(weights[:, :, -window:] * real[:, None, -window:, None], full.shape[1]).sum(2)
        score = torch.nn.functional.avg_pool1d(w, 7, stride=1, padding=3)
        first = real & (real.cumsum(-1) <= sinks)
        keep = (first | (torch.arange(t) >= t - window))[:, None] & real[:, None]
        score = score.masked_fill(keep, float("inf")).masked_fill(~real[:, None], float("-inf"))
        idx = score.topk(budget, -1).indices.sort(-1).values
        want = torch.gather(full, 2, idx[..., None].expand(-1, -1, -1, full.shape[-1]))
        assert torch.equal(cache.layers[layer].keys, want)
        assert not torch.equal(idx[:, 0], idx[:, 1])  # each KV head keeps its own entries


@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_h2o_scores_are_the_attention_each_entry_has_received(bundle, models, base):
    """With nothing evicted, h2o's running score of every entry is what eager attention says it received:
    from the prompt's last `window` queries, then from every decoded token."""
    from mmgen.inference.kv_cache import make_kv_cache
    from mmgen.inference.pipeline import left_pad

    model = _eager(models[base])
    rows, window = _documents(bundle)[1:], 5
    cache = make_kv_cache(model, "h2o", budget=10_000, window=window)
    got, _ = _decode(model, bundle, rows, cache)
    fed = [r + g[:-1] for r, g in zip(rows, got)]  # the last token is sampled, never fed
    ids, mask = left_pad(fed, 0, "cpu")
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, output_attentions=True)
    prompt = max(len(r) for r in rows)
    queries = torch.zeros(ids.shape[1], dtype=torch.bool)
    queries[prompt - window :] = True
    real = mask.bool() & queries
    for layer, weights in enumerate(out.attentions):
        lay = cache.layers[layer]
        want = _grouped(weights * real[:, None, :, None], lay.keys.shape[1]).sum(2)
        torch.testing.assert_close(lay.scores + lay.pending.sum(2), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_streaming_attends_to_the_sinks_and_the_recent_tokens_only(bundle, models, base):
    """Each step over a streaming cache gives the logits of the plain cache with every token but the
    first `sinks` and the most recent `budget - sinks` (and the step's own) masked out."""
    from mmgen.inference.kv_cache import attention_mask_for, make_kv_cache

    model, row = models[base], _documents(bundle)[0]
    budget, sinks = 24, 4
    cache, plain = make_kv_cache(model, "streaming", budget=budget, sinks=sinks), make_kv_cache(model)
    toks = torch.randint(bundle.vocab.text_size, bundle.vocab.size, (12,), generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([row])
    n = seq.shape[1]
    with torch.no_grad():
        for step in range(len(toks) + 1):
            x = seq if step == 0 else toks[step - 1].view(1, 1)
            pos = torch.arange(n - x.shape[1], n)[None]
            full_mask = torch.ones(1, n, dtype=torch.long)
            a = model(
                input_ids=x,
                attention_mask=attention_mask_for(cache, full_mask),
                position_ids=pos,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
            visible = full_mask.clone()
            committed = n - x.shape[1]
            if step and committed > budget:  # sinks + the most recent of the tokens before this one
                visible[0, sinks : committed - (budget - sinks)] = 0
            b = model(input_ids=x, attention_mask=visible, position_ids=pos, cache=plain, use_cache=True).logits[:, -1]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            if step < len(toks):
                n += 1


@pytest.mark.parametrize("method", ["streaming", "h2o"])
@pytest.mark.parametrize("quantize", [False, True])
def test_crop_rolls_back_a_forward_of_drafts_exactly(bundle, models, method, quantize):
    """Speculative verification: a forward of drafts, then crop(-3), leaves the cache as if the drafts were
    never written (they were never candidates for eviction; their attention is not scored)."""
    from mmgen.inference.kv_cache import attention_mask_for, make_kv_cache

    model, rows = models["qwen2"], _documents(bundle)[1:]
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(bundle.vocab.text_size, bundle.vocab.size, (2, 8), generator=gen)
    drafts = torch.randint(bundle.vocab.text_size, bundle.vocab.size, (2, 3), generator=gen)
    caches, outs = [], []
    for with_drafts in (False, True):
        cache = make_kv_cache(model, method, quantize=quantize, **SMALL)
        _, real = _prefill(model, rows, cache)
        mask, pos = real.long(), real.long().sum(-1, keepdim=True)
        logits = []
        with torch.no_grad():
            for i in range(toks.shape[1]):
                if with_drafts and i == 5:
                    m = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], -1)
                    model(
                        input_ids=drafts,
                        attention_mask=attention_mask_for(cache, m),
                        cache=cache,
                        use_cache=True,
                        position_ids=pos + torch.arange(3),
                    )
                    cache.crop(-3)
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], -1)
                logits.append(
                    model(
                        input_ids=toks[:, i : i + 1],
                        attention_mask=attention_mask_for(cache, mask),
                        cache=cache,
                        use_cache=True,
                        position_ids=pos,
                    ).logits
                )
                pos = pos + 1
        caches.append(cache)
        outs.append(torch.cat(logits, 1))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a._stored_keys(), b._stored_keys())
        if method == "h2o":
            assert torch.equal(a.scores, b.scores) and torch.equal(a.pending, b.pending)


@pytest.mark.parametrize("prune", ["merge", "fastv"])
def test_kv_compression_composes_with_prefill_pruning(bundle, prune):
    """A pruned prefill fills a compressed cache as its prefill (before the LLM: one forward the cache
    scores; in the LLM: the kept entries written into it): no budget is the pruned plain run token for
    token, and a budget holds what it says."""
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    pipe = MMGenPipeline(bundle)
    shown = bundle.image_tokenizer.decode(np.random.default_rng(2).integers(0, 16, (4, 4)))[0]
    opts = GenerationOptions(
        mode="t2i",
        max_new_tokens=30,
        temperature=1.0,
        cfg_scale=2.0,
        seed=5,
        prune_method=prune,
        prune_ratio=0.5,
        prune_layer=1,
    )
    pruned = pipe("a small blue square", opts, picture=shown)
    methods = ["streaming", "h2o"] if prune == "merge" else ["streaming"]
    for method in methods:
        same = pipe("a small blue square", opts, picture=shown, kv_method=method)
        assert same.images[0].load() == pruned.images[0].load() and same.meta["prune"] == pruned.meta["prune"]
        small = pipe(
            "a small blue square", opts, picture=shown, kv_method=method, kv_budget=12, kv_window=4, kv_sinks=2
        )
        assert small.meta["kv"]["entries"] == 13 and len(small.images) == 1
        assert (
            small.meta["kv"]["tokens_seen"][0]
            == pruned.meta["kv"]["entries"] - pruned.meta["new_tokens"] + small.meta["new_tokens"]
        )  # the pruned prompt, then the answer
    if prune == "fastv":
        from mmgen.errors import MMGenError

        with pytest.raises(
            MMGenError,
            match="kv_method=h2o scores the prompt in its prefill forward, which prune_method=fastv replaces",
        ):
            pipe("a small blue square", opts, picture=shown, kv_method="h2o", kv_budget=12, kv_window=4)


# -- the pipeline, the CLI, bad options --------------------------------------------------------------
def test_the_pipeline_reports_kv_bytes_and_tokens(bundle):
    from mmgen.config import load_config
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    pipe = MMGenPipeline(bundle)
    opts = GenerationOptions(mode="t2i", max_new_tokens=30, temperature=0.0, cfg_scale=2.0)
    plain = pipe("a large red circle at the top left, on a black background.", opts)
    kv = load_config(
        GenerationOptions,
        None,
        [
            "mode=t2i",
            "max_new_tokens=30",
            "temperature=0",
            "cfg_scale=2",
            "kv_method=h2o",
            "kv_budget=8",
            "kv_window=2",
            "kv_sinks=2",
            "cache=fp8",
        ],
    )
    small = pipe("a large red circle at the top left, on a black background.", kv)
    p, s = plain.meta["kv"], small.meta["kv"]
    assert p == {
        "method": "none",
        "quantized": False,
        "bytes": plain.meta["cache"]["bytes"],
        "bytes_peak": plain.meta["cache"]["bytes"],
        "entries": plain.meta["cache"]["tokens"],
    }
    assert s["method"] == "h2o" and s["quantized"] and s["entries"] == 9 and s["tokens_held"] == [9, 9]
    assert s["tokens_seen"][0] - small.meta["new_tokens"] == p["entries"] - plain.meta["new_tokens"]  # the prompt
    assert s["bytes_peak"] < p["bytes"] / 4
    assert small.meta["options"]["kv_method"] == "h2o" and small.meta["options"]["kv_budget"] == 8
    assert len(small.images) == 1 and small.images[0].meta["codes_shape"] == [4, 4]


def test_cli_generate_takes_the_kv_options(bundle, tmp_path, capsys):
    from mmgen.cli import main

    bundle.save(tmp_path / "b")
    args = [
        "generate",
        "--checkpoint",
        str(tmp_path / "b"),
        "--prompt",
        "a large red circle at the top left",
        "--mode",
        "t2i",
        "--max-new-tokens",
        "30",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--kv-method", "streaming", "--kv-budget", "6", "--kv-sinks", "2", "--cache", "fp8"]) == 0
    err = capsys.readouterr().err
    assert "kv cache (streaming, budget 6): 7 of " in err and (tmp_path / "out" / "image_0.png").exists()
    assert main([*args, "--kv-method", "h2o", "--kv-budget", "6"]) == 2
    assert "error: kv_budget 6 is below what kv_method=h2o always keeps" in capsys.readouterr().err


BAD = [
    ({"kv_method": "pyramid"}, "unknown kv_method 'pyramid'"),
    ({"kv_method": "h2o", "kv_window": 0}, "kv_window must be >= 1, got 0"),
    ({"kv_method": "streaming", "kv_sinks": -1}, "kv_sinks must be >= 0, got -1"),
    ({"kv_budget": 64}, "kv_budget 64 needs a kv_method that evicts"),
    (
        {"kv_method": "snapkv", "kv_budget": 30},
        r"kv_budget 30 is below what kv_method=snapkv always keeps \(kv_sinks 4 \+ kv_window 32 = 36\)",
    ),
    ({"kv_method": "streaming", "kv_budget": 4}, r"kv_budget 4 is below .* \(kv_sinks 4 \+ 1 recent token = 5\)"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_invalid_kv_options_are_one_line_errors(bundle, options, message):
    from mmgen.errors import MMGenError
    from mmgen.inference.kv_cache import check_kv_options
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    with pytest.raises(MMGenError, match=message) as e:
        check_kv_options(GenerationOptions(**options))
    assert "\n" not in str(e.value)
    with pytest.raises(MMGenError, match=message):
        MMGenPipeline(bundle)("a red circle", GenerationOptions(max_new_tokens=4, **options))


def test_what_a_compressed_cache_cannot_do_is_a_one_line_error(bundle, models):
    from mmgen.errors import MMGenError
    from mmgen.inference.kv_cache import attention_mask_for, make_kv_cache

    sliding = tiny_qwen2(
        bundle.vocab, bundle.text_tokenizer, use_sliding_window=True, sliding_window=16, max_window_layers=0
    )
    with pytest.raises(
        MMGenError, match="compresses full-attention layers only; this model also has sliding_attention"
    ):
        make_kv_cache(sliding, "h2o", budget=64)
    model = models["llama"]
    cache = make_kv_cache(model, "h2o", budget=40, window=8)
    ids = torch.tensor([[5, 6, 7, 0]])
    with pytest.raises(MMGenError, match="needs left-padded rows"):
        attention_mask_for(cache, torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(MMGenError, match="needs its attention mask from .*attention_mask_for"):
        model(input_ids=ids, cache=make_kv_cache(model, "streaming", budget=8), use_cache=True)
    with pytest.raises(MMGenError, match="crop takes minus the number of entries"):
        cache.crop(3)
