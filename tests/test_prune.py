"""Prefill pruning of the picture tokens a prompt shows (mmgen.inference.prune): exact at keep ratio 1, the
in-LLM ranking is layer K-1's attention, kept tokens keep their positions, batches and CFG rows stay
consistent, the cache really holds fewer entries, and every bad option is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError

from bundlekit import make_tiny_bundle

METHODS = ["fastv", "text", "pyramid", "merge"]
BASELINES = ["random", "stride"]
QUESTIONS = ["what colour is the circle?", "is there a small blue square in the center of it, on a white background?"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("prune_bundle"))


def _deep(bundle, base: str):
    """A 4-layer random decoder over the bundle's vocab (pyramid needs depth for several stages)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmgen.models.lm import build_tiny_lm

    tok = bundle.text_tokenizer
    if base == "llama":
        return build_tiny_lm(bundle.vocab, hidden=64, layers=4, heads=4, kv_heads=2, text_tokenizer=tok, seed=1).eval()
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=bundle.vocab.size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(bundle):
    return {"llama": _deep(bundle, "llama"), "qwen2": _deep(bundle, "qwen2")}


def _grid(seed: int, side: int = 8) -> np.ndarray:
    """A picture's code grid: a background code with a few object codes (what a scene looks like)."""
    rng = np.random.default_rng(seed)
    g = np.full((side, side), 3)
    g[rng.integers(0, side, 6), rng.integers(0, side, 6)] = rng.integers(0, 16, 6)
    return g


def _rows(bundle, questions=QUESTIONS, t2i: bool = False, seed: int = 0):
    """Picture-first prompts of different lengths; with ``t2i`` each ends with the <image> opener (the block
    the model then writes, which is never pruned)."""
    from mmgen.processing.processor import MMGenProcessor

    proc = MMGenProcessor.from_bundle(bundle)
    out = []
    for i, q in enumerate(questions):
        row = proc.picture_prompt_ids(q, bundle.vocab.image_block(_grid(seed + i)), question=not t2i)
        out.append(row + ([bundle.vocab["<image>"]] if t2i else []))
    return out


def _decode(model, vocab, rows, prune=None, **kw) -> list[list[int]]:
    from mmgen.inference.pipeline import decode_loop

    kw = dict(dict(max_new_tokens=24, eos_id=-1, pad_id=0, sizes=[(4, 4)]), **kw)
    got: list[list[int]] = [[] for _ in rows]
    for tok, active in decode_loop(model, vocab, rows, prune=prune, **kw):
        for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
            if a:
                got[r].append(t)
    return got


def _pruner(method: str, ratio: float, layer: int = 1):
    from mmgen.inference.prune import PrefillPruner

    return PrefillPruner(method, ratio, layer)


SETTINGS = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0, seed=7),
    "sampled-cfg": dict(temperature=1.0, top_k=8, seed=3, cfg_scale=3.0),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_keep_ratio_one_reproduces_the_plain_pipeline(bundle, models, method, setting):
    kw = dict(SETTINGS[setting])
    for model in (bundle.model, models["llama"]):
        for t2i in (False, True):
            rows = _rows(bundle, t2i=t2i)
            if "cfg_scale" in kw:  # the unconditional rows show the picture too: their blocks are pruned as well
                kw["uncond_rows"] = _rows(bundle, ["", ""], t2i=t2i)
            plain = _decode(model, bundle.vocab, rows, **kw)
            pruner = _pruner(method, 1.0)
            assert _decode(model, bundle.vocab, rows, prune=pruner, **kw) == plain
            assert all(b["kept"] == b["tokens"] == 64 for row in pruner.report["blocks"] for b in row)
            assert all(len(p) == 24 for p in plain)


def test_fastv_keeps_the_tokens_layer_k_minus_1_attends_most_from_the_last_token(bundle, models):
    """The q.k sub-block recomputed from the scoring layer's input and cached keys ranks exactly as the
    eager attention weights of that layer do (Llama and Qwen2 with grouped KV heads, left-padded rows)."""
    from mmgen.inference.pipeline import left_pad, make_cache
    from mmgen.inference.prune import read_blocks

    rows = _rows(bundle)
    ids, attn = left_pad(rows, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    for model in models.values():
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                eager = model(input_ids=ids, attention_mask=attn, position_ids=position, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
        for layer in (1, 2, 3):
            pruner = _pruner("fastv", 0.25, layer)
            pruner.prefill(model, bundle.vocab, ids, attn, position, make_cache(model))
            weights = eager.attentions[layer - 1].mean(1)[:, -1]  # heads averaged, from the last token
            for r, row in enumerate(rows):
                pad = int((attn[r] == 0).sum())
                cols = torch.tensor(read_blocks(row, bundle.vocab)[0].grids[0]) + pad
                want = sorted(weights[r, cols].topk(16).indices.tolist())
                assert pruner.kept[r] == [want]


def _layerwise_reference(model, ids_row: list[int], kept_cols: list[int], layer: int):
    """Logits of the last token and every layer's keys when layers ``0..layer-1`` read the whole row and
    layers ``layer..`` only ``kept_cols`` at their original positions: the model's own layers, run by hand."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    dec = model.get_decoder()
    ids = torch.tensor([ids_row])
    pos = torch.arange(len(ids_row))[None]
    hidden = dec.embed_tokens(ids)
    full, part = DynamicCache(), DynamicCache()
    for i, block in enumerate(dec.layers):
        if i == layer:
            hidden, pos = hidden[:, kept_cols], pos[:, kept_cols]
        mask = create_causal_mask(
            config=dec.config, inputs_embeds=hidden, attention_mask=torch.ones_like(pos), cache=None, position_ids=pos
        )
        hidden = block(
            hidden,
            attention_mask=mask,
            position_embeddings=dec.rotary_emb(hidden, pos),
            position_ids=pos,
            cache=full if i < layer else part,
            use_cache=True,
        )
    logits = model.lm_head(dec.norm(hidden))[0, -1]
    keys = [
        full.layers[i].keys[0][:, kept_cols] if i < layer else part.layers[i].keys[0] for i in range(len(dec.layers))
    ]
    return logits, keys


@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["fastv", "text"])
def test_pruned_prefill_equals_running_the_kept_tokens_through_the_upper_layers_by_hand(bundle, models, base, method):
    """Every row of a left-padded batch gets what layers K.. give its kept tokens at their original RoPE
    positions, and the cache of every layer holds exactly the kept tokens' keys."""
    from mmgen.inference.pipeline import left_pad, make_cache
    from mmgen.inference.prune import read_blocks

    model = models[base]
    rows = _rows(bundle)
    ids, attn = left_pad(rows, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache(model)
    pruner = _pruner(method, 0.25, 2)
    with torch.no_grad():
        out, mask = pruner.prefill(model, bundle.vocab, ids, attn, position, cache)
        assert cache.get_seq_length() == mask.shape[1] == max(len(r) for r in rows) - 48
        for r, row in enumerate(rows):
            grid = read_blocks(row, bundle.vocab)[0].grids[0]
            stayed = [grid[i] for i in pruner.kept[r][0]]
            kept_cols = sorted([i for i in range(len(row)) if i not in grid] + stayed)
            held = mask[r].bool()
            assert int(held.sum()) == len(kept_cols) == len(row) - 48
            want_logits, want_keys = _layerwise_reference(model, row, kept_cols, 2)
            assert torch.allclose(out.logits[r, -1], want_logits, atol=1e-5)
            for layer, want in zip(cache.layers, want_keys):
                assert torch.allclose(layer.keys[r][:, held], want, atol=1e-5)


def test_merge_decodes_like_a_plain_forward_over_the_merged_sequence(bundle):
    """After a merged prefill, every decode step continues at the next original position with a mask of the
    pruned cache: its logits equal a cache-free forward over the merged embeddings plus the new tokens."""
    from mmgen.inference.pipeline import left_pad
    from mmgen.inference.prune import BeforeLLMRun

    model, vocab = bundle.model, bundle.vocab
    rows = _rows(bundle)
    seen: list[torch.Tensor] = []
    pruner = _pruner("merge", 0.25)
    tokens = _decode(
        model,
        vocab,
        rows,
        prune=pruner,
        temperature=1.0,
        seed=5,
        max_new_tokens=6,
        allow_images=False,
        logits_hook=lambda cond, uncond, guided, in_block: seen.append(cond.clone()),
    )
    ids, attn = left_pad(rows, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    run = BeforeLLMRun(model, ids, attn, position, *_grids_and_shared(rows, vocab, ids, attn), 0.25)
    for r in range(len(rows)):
        valid = run.valid[r]
        embeds, pos = run.embeds[r][valid], run.position[r][valid]
        for step, t in enumerate(tokens[r][:-1]):
            with torch.no_grad():
                logits = model(inputs_embeds=embeds[None], position_ids=pos[None]).logits[0, -1]
            assert torch.allclose(logits, seen[step][r], atol=1e-4)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([t]))])
            pos = torch.cat([pos, pos[-1:] + 1])
    assert len(run.embeds[0][run.valid[0]]) == len(rows[0]) - 64 + 16


def _grids_and_shared(rows, vocab, ids, attn):
    from mmgen.inference.prune import read_blocks

    pad = (attn == 0).sum(-1).tolist()
    grids = [
        [[torch.tensor([pad[b] + p for p in g]) for g in blk.grids] for blk in read_blocks(r, vocab)]
        for b, r in enumerate(rows)
    ]
    return grids, {}


@pytest.mark.parametrize("method", METHODS + BASELINES)
def test_a_batch_of_different_lengths_with_cfg_decodes_each_row_as_it_would_alone(bundle, models, method):
    model, vocab = models["llama"], bundle.vocab
    rows = _rows(bundle, QUESTIONS + ["a"], t2i=True)
    uncond = _rows(bundle, ["", "", ""], t2i=True)
    assert len({len(r) for r in rows}) == 3
    kw = dict(temperature=0.0, cfg_scale=2.0)
    # the plain pipeline itself: batched rows decode as they do alone (left padding, per-row positions)
    plain = _decode(model, vocab, rows, uncond_rows=uncond, **kw)
    assert plain == [_decode(model, vocab, [r], uncond_rows=[u], **kw)[0] for r, u in zip(rows, uncond)]
    pruner = _pruner(method, 0.25)
    together = _decode(model, vocab, rows, prune=pruner, uncond_rows=uncond, **kw)
    alone = []
    for r, u in zip(rows, uncond):
        single = _pruner(method, 0.25)
        alone.append(_decode(model, vocab, [r], prune=single, uncond_rows=[u], **kw)[0])
        assert single.kept == [pruner.kept[rows.index(r)], pruner.kept[len(rows) + rows.index(r)]]
    assert together == alone
    assert together != plain  # a quarter of the picture changes what this model writes


@pytest.mark.parametrize("method", METHODS)
def test_cfg_rows_keep_identical_indices_of_the_picture_they_share(bundle, models, method):
    from mmgen.inference.pipeline import left_pad, make_cache

    model = models["qwen2"]
    cond = _rows(bundle, QUESTIONS, t2i=True)
    uncond = _rows(bundle, ["", ""], t2i=True)  # the same pictures, no text
    ids, attn = left_pad(cond + uncond, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    pruner = _pruner(method, 0.25, 2)
    cache = make_cache(model)
    pruner.prefill(model, bundle.vocab, ids, attn, position, cache, n_cond=2)
    for c in range(2):
        assert pruner.kept[c] == pruner.kept[2 + c] and len(pruner.kept[c][0]) == 16
    # a row with a different picture decides on its own
    other = _rows(bundle, [""], t2i=True, seed=9)
    ids, attn = left_pad(cond[:1] + other, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    pruner.prefill(model, bundle.vocab, ids, attn, position, make_cache(model), n_cond=1)
    assert len(pruner.kept[1][0]) == 16


@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS + BASELINES)
def test_a_pruned_run_holds_fewer_kv_entries_and_reports_them(bundle, models, base, method):
    from mmgen.inference.pipeline import cache_bytes, make_cache

    model, vocab = models[base], bundle.vocab
    rows = _rows(bundle, t2i=True)
    for ratio, kept in ((0.5, 32), (0.1, 7)):
        cache, plain_cache = make_cache(model), make_cache(model)
        pruner = _pruner(method, ratio, 1)
        got = _decode(model, vocab, rows, prune=pruner, cache=cache, temperature=1.0, seed=2, max_new_tokens=8)
        _decode(model, vocab, rows, cache=plain_cache, temperature=1.0, seed=2, max_new_tokens=8)
        assert all(len(g) == 8 for g in got)
        assert cache.get_seq_length() == plain_cache.get_seq_length() - (64 - kept)
        assert all(layer.keys.shape[2] == cache.get_seq_length() for layer in cache.layers)
        assert cache_bytes(cache) < cache_bytes(plain_cache)
        rep = pruner.report
        assert [[b["tokens"], b["kept"]] for row in rep["blocks"] for b in row] == [[64, kept], [64, kept]]
        assert rep["tokens_kept"] == [len(r) - 64 + kept for r in rows]
        assert 0 < rep["flops"] < rep["flops_full"]
        assert rep["flops_ratio"] == pytest.approx(rep["flops"] / rep["flops_full"], rel=1e-5)
        if method == "pyramid":  # three stages deepening the cut: 4 layers, K=1 -> stages at 1, 2, 3
            assert [k for k, _ in rep["stages"]] == [1, 2, 3]
            assert len(set(rep["tokens_per_layer"][0])) == 4


def test_the_pipeline_prunes_the_shown_picture_and_reports_it_in_meta(bundle):
    from PIL import Image

    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    pipe = MMGenPipeline(bundle)
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    opts = GenerationOptions(mode="t2i", max_new_tokens=30, temperature=0.0, cfg_scale=2.0)
    plain = pipe("a small blue square", opts, picture=picture)
    same = pipe("a small blue square", opts, picture=picture, prune_method="fastv", prune_ratio=1.0, prune_layer=1)
    assert same.images[0].load() == plain.images[0].load()
    doc = pipe("a small blue square", opts, picture=picture, prune_method="text", prune_ratio=0.5, prune_layer=1)
    p = doc.meta["prune"]
    assert p["method"] == "text" and p["blocks"][0] == [{"kind": "image", "tokens": 16, "kept": 8}]
    assert p["blocks"][1] == []  # the unconditional row shows no picture
    assert doc.meta["cache"]["tokens"] == plain.meta["cache"]["tokens"] - 8
    assert doc.meta["options"]["prune_method"] == "text" and len(doc.images) == 1
    # any transformers Cache receives the kept tokens as its prefill: here the fp8 one
    small = pipe("a small blue square", opts, picture=picture, prune_method="merge", prune_ratio=0.5, cache="fp8")
    assert small.meta["cache"]["tokens"] == doc.meta["cache"]["tokens"] and len(small.images) == 1
    # one forward per token the answer took (the prefill gave the first; a closing </s> is not an answer token)
    assert plain.meta["forward_passes"] == plain.meta["new_tokens"] + (plain.meta["stop"] == "eos")
    assert "prune" not in plain.meta


def test_continuous_features_merge_before_the_projector(bundle):
    """A model that reads its pixel codes as tokenizer features through its projector: ratio 1 is exact, and
    a merged token's input is the projector applied to the mean of its group's features."""
    from mmgen.inference.pipeline import left_pad, make_cache
    from mmgen.inference.prune import BeforeLLMRun
    from mmgen.models.unified_build import build_unified_lm

    vocab = bundle.vocab
    torch.manual_seed(0)
    model = build_unified_lm(
        vocab, None, hidden=64, layers=2, heads=4, image_feature_dim=8, text_tokenizer=bundle.text_tokenizer
    ).eval()
    model.set_code_vectors("image", torch.randn(16, 8))
    rows = _rows(bundle)
    plain = _decode(model, vocab, rows, temperature=0.0)
    assert _decode(model, vocab, rows, prune=_pruner("merge", 1.0), temperature=0.0) == plain
    assert _decode(model, vocab, rows, prune=_pruner("fastv", 1.0), temperature=0.0) == plain
    cache = make_cache(model)
    assert len(_decode(model, vocab, rows, prune=_pruner("fastv", 0.25), cache=cache, temperature=0.0)[0]) == 24
    assert cache.get_seq_length() == max(len(r) for r in rows) - 48 + 23
    ids, attn = left_pad(rows, 0, "cpu")
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        run = BeforeLLMRun(model, ids, attn, position, *_grids_and_shared(rows, vocab, ids, attn), 0.25)
        grid = _grids_and_shared(rows, vocab, ids, attn)[0][0][0][0]
        from mmgen.inference.token_merge import merge_plan

        a, _ = vocab.code_range("pix")
        feats = model.image_code_vectors[ids[0, grid] - a]
        kept, assign = merge_plan(feats, 16)
        want = model.image_projector(torch.stack([feats[assign == i].mean(0) for i in range(16)]))
        got = run.embeds[0][run.valid[0]]
        cols = run.index[0][run.valid[0]]
        at = [int((cols == c).nonzero()) for c in grid[kept]]
        assert torch.allclose(got[at], want, atol=1e-5)
        assert run.position[0][run.valid[0]][at].tolist() == position[0, grid[kept]].tolist()


def test_baselines_keep_evenly_spaced_or_seeded_random_tokens():
    from mmgen.inference.prune import baseline_plan

    assert baseline_plan("stride", 64, 4).tolist() == [0, 21, 42, 63]
    assert baseline_plan("stride", 10, 10).tolist() == list(range(10))
    a, b = baseline_plan("random", 64, 16, seed=1), baseline_plan("random", 64, 16, seed=2)
    assert a.tolist() == baseline_plan("random", 64, 16, seed=1).tolist() and a.tolist() != b.tolist()
    assert len(set(a.tolist())) == 16 and a.tolist() == sorted(a.tolist())


def test_blocks_read_are_the_closed_ones_with_their_grids(bundle):
    from mmgen.inference.prune import read_blocks
    from mmgen.processing.vocab import Vocab

    vocab = bundle.vocab
    block = vocab.image_block(_grid(0))
    row = [1, *block, 5, 6, *block[:20]]  # a second block still being written is not read
    found = read_blocks(row, vocab)
    assert len(found) == 1 and found[0].kind == "image" and len(found[0].grids[0]) == 64
    assert all(vocab.code_range("pix")[0] <= row[i] < vocab.code_range("pix")[1] for i in found[0].grids[0])
    # a video: a keyframe block and a merged frame, both read as grids of the one video block
    v = Vocab(300, {"sem": 8, "pix": 16}, max_grid=8, video_times=4)
    pix = np.zeros((2, 4, 4), dtype=np.int64)
    pix[1, :, 1:] = -1  # the second frame keeps one column
    vid = v.video_block(pix, [0.0, 0.5], [True, False], sem=np.zeros((2, 2, 2), dtype=np.int64))
    blocks = read_blocks([1, *vid, 2], v)
    assert len(blocks) == 1 and blocks[0].kind == "video"
    # sem + pix of the keyframe, then the merged frame's whole sem grid and its one kept pixel column
    assert [len(g) for g in blocks[0].grids] == [4, 16, 4, 4]


def test_prefill_flops_count_projections_attention_and_mlp():
    from types import SimpleNamespace

    from mmgen.inference.prune import prefill_flops

    cfg = SimpleNamespace(
        num_hidden_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=10,
    )
    one = 2 * 3 * 8 * (2 * 2 * 4 + 2 * 1 * 4) + 2 * 2 * 2 * 4 * 6 + 2 * 3 * 3 * 8 * 16  # n = 3
    assert prefill_flops(cfg, [3, 3]) == 2 * one + 2 * 8 * 10
    assert prefill_flops(cfg, [3, 1]) < prefill_flops(cfg, [3, 3])
    with pytest.raises(MMGenError, match="one per layer"):
        prefill_flops(cfg, [3])


BAD = [
    (dict(prune_method="fast"), "unknown prune_method 'fast'"),
    (dict(prune_method="fastv", prune_ratio=0.0), r"prune_ratio must be in \(0, 1\]"),
    (dict(prune_method="merge", prune_ratio=1.5), r"prune_ratio must be in \(0, 1\]"),
    (dict(prune_method="fastv", prune_layer=2), "prune_layer 2 >= the model's depth 2"),
    (dict(prune_method="text", prune_layer=0), "prune_layer must be an integer >= 1"),
    (dict(prune_method="none", prune_layer=-1), "prune_layer must be an integer >= 1"),
    (dict(prune_method="fastv", prune_schedule=[[1, 0.5]]), "prune_schedule sets the stages of prune_method=pyramid"),
    (dict(prune_method="pyramid", prune_schedule=[[1, 0.5], [1, 0.25]]), r"prune_schedule\[1\] = \[1, 0.25\]"),
    (dict(prune_method="pyramid", prune_schedule=[[1, 0.25], [1, 0.5]]), r"stages go deeper"),
    (dict(prune_method="pyramid", prune_schedule=[[3, 0.5]]), "prune_schedule\\[0\\] layer 3 >= the model's depth 2"),
    (dict(prune_method="pyramid", prune_schedule=[[1, 0]]), r"prune_schedule\[0\]: ratio must be in \(0, 1\]"),
    (dict(prune_method="pyramid", prune_schedule=[[1]]), r"must be a \[layer, ratio\] pair"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_every_invalid_option_is_a_one_line_error(bundle, bad, message):
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    with pytest.raises(MMGenError, match=message) as e:
        MMGenPipeline(bundle)("a red circle", GenerationOptions(max_new_tokens=5, **bad))
    assert "\n" not in str(e.value)


def test_cli_generate_prunes_a_picture_and_rejects_bad_options(bundle_dir, tmp_path, capsys):
    from PIL import Image

    from mmgen.cli import main

    picture = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(picture)

    def args(*flags, shown=str(picture)):
        return [
            "generate",
            "--checkpoint",
            str(bundle_dir),
            "--prompt",
            "what is it?",
            "--picture",
            shown,
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
            *flags,
        ]

    assert main(args("--prune-method", "fastv", "--prune-ratio", "0.25", "--prune-layer", "1")) == 0
    assert "(pruned: fastv kept" in capsys.readouterr().err
    assert main(args("--prune-method", "pyramid", "--prune-schedule", "1:0.5")) == 0
    capsys.readouterr()
    for bad, message in (
        (args("--prune-ratio", "0"), "prune_ratio must be in (0, 1]"),
        (args("--prune-method", "pyramid", "--prune-schedule", "1-0.5"), "is not LAYER:RATIO"),
        (args("--prune-method", "fastv", "--prune-layer", "5"), "prune_layer 5 >= the model's depth 2"),
        (args(shown=str(tmp_path / "none.png")), "does not exist"),
    ):
        assert main(bad) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0]


def test_the_evaluation_entry_points_take_a_pruner(bundle):
    """QA answers and build-up pictures (what the evaluation suites generate) can be measured under pruning."""
    from mmgen.inference.batch_generation import generate_image_rows, generate_text_rows

    rows = _rows(bundle)
    assert generate_text_rows(bundle, rows, max_new_tokens=4, prune=_pruner("fastv", 1.0)) == generate_text_rows(
        bundle, rows, max_new_tokens=4
    )
    pruner = _pruner("merge", 0.25)
    images = generate_image_rows(bundle, _rows(bundle, t2i=True), temperature=0.0, cfg_scale=1.0, prune=pruner)
    assert len(images) == 2 and [b["kept"] for row in pruner.report["blocks"] for b in row] == [16, 16]
