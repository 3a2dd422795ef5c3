"""Speculative Jacobi decoding of image blocks (mmgen.inference.speculative, its drafts mmgen.inference.drafts).

Greedy SJD writes the plain loop's tokens exactly (CFG on and off, rows of different prompt lengths,
text rows beside image rows, tiny Llama and Qwen2 bases, grid position embeddings); sampled SJD draws
the plain sampler's distribution (a chi-square test against the exact marginals of the first code
positions); the relaxed acceptance with delta 0 is the strict one; bad options are one-line errors."""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch

from mmgen.processing.vocab import Vocab

from bundlekit import TEXTS, bias_head

GRID = (4, 4)  # a 4x4 pixel-code block: 26 tokens, window positions cross <eol>s and the closers
PROMPTS = ["a large red circle at the top left, on a black background.", "a blue square", "two green"]


def _save_bundle(path, base: str):
    """A tiny random bundle with a real codebook (the pixel VQ, 16 codes, 16 px -> 4x4 codes) on a Llama
    or Qwen2 decoder. Its head is untied and its embeddings scaled up so each code's distribution is
    peaked and depends on the codes before it: a random model with tied embeddings repeats its last
    input and samples almost uniformly, so every draft would pass and nothing be tested."""
    from mmgen.models.bundle import Bundle, load_bundle
    from mmgen.models.text_tokenizer import special_ids, train_text_tokenizer
    from mmgen.models.unified_build import build_unified_lm
    from mmgen.tokenizers.vq import PixelVQ

    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": 16}, max_grid=8)
    torch.manual_seed(0)
    if base == "llama":
        model = build_unified_lm(vocab, hidden=64, layers=2, heads=4, text_tokenizer=tok, seed=0, tie_embeddings=False)
    else:
        ids = special_ids(tok)
        model = build_unified_lm(
            vocab,
            base={
                "model_type": "qwen2",
                "vocab_size": vocab.size,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "bos_token_id": ids["bos"],
                "eos_token_id": ids["eos"],
                "pad_token_id": ids["pad"],
                "tie_word_embeddings": False,
            },
        )
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
        model.get_output_embeddings().weight.mul_(30.0)
    vq = PixelVQ(resolution=(16, 16), channels=(8, 16), patch_size=2, code_dim=4, codebook_size=16, norm_groups=8)
    Bundle(model.eval(), tok, vocab, vq, {"image_resolution": [16, 16]}).save(path)
    return load_bundle(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bundle(tmp_path_factory, request):
    return _save_bundle(tmp_path_factory.mktemp(f"spec_{request.param}"), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save_bundle(tmp_path_factory.mktemp("spec_llama"), "llama")


def _rows(bundle, prompts, image: bool):
    from mmgen.inference.generate import prompt_ids

    return [prompt_ids(bundle, p, image=image) for p in prompts]


def _streams(bundle, rows, model=None, **kw) -> list[list[int]]:
    from mmgen.inference.pipeline import decode_loop

    got: list[list[int]] = [[] for _ in rows]
    for tok, active in decode_loop(model or bundle.model, bundle.vocab, rows, **kw):
        for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
            if a:
                got[r].append(t)
    return got


def _kw(bundle, n_rows: int, cfg_scale: float, image: bool = True, **kw) -> dict:
    tok = bundle.text_tokenizer
    out = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, sizes=[GRID], cfg_scale=cfg_scale, **kw)
    if cfg_scale != 1.0:
        out["uncond_rows"] = _rows(bundle, [""] * n_rows, image=image)
    return out


# -- greedy: the plain loop's tokens, exactly ---------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_sjd_writes_the_plain_tokens(bundle, cfg_scale):
    """Three t2i rows of three prompt lengths in one batch: same tokens as plain greedy decoding, in
    fewer forward passes, with drafts both accepted and rejected on the way; the cache afterwards holds
    exactly the committed tokens, as the plain loop's does."""
    from transformers import DynamicCache

    from mmgen.inference.speculative import SpeculativeJacobi

    rows = _rows(bundle, PROMPTS, image=True)
    assert len({len(r) for r in rows}) == 3
    kw = _kw(bundle, 3, cfg_scale, temperature=0.0, max_new_tokens=40, stop_after_images=1)
    plain_stats, spec_stats = {}, {}
    plain_cache, spec_cache = DynamicCache(config=bundle.model.config), DynamicCache(config=bundle.model.config)
    want = _streams(bundle, rows, stats=plain_stats, cache=plain_cache, **kw)
    spec = SpeculativeJacobi(window=8)
    got = _streams(bundle, rows, spec=spec, stats=spec_stats, cache=spec_cache, **kw)
    assert got == want
    block = bundle.vocab.image_block_len(*GRID) - 1
    assert all(len(g) == block for g in got)
    assert len({t for g in got for t in g[3:]}) > 4  # the codes vary: the drafts had something to get wrong
    s = spec.stats
    assert 0 < s["accepted"] < s["drafts"]  # both branches of the test ran
    assert spec_stats["forward_passes"] == s["passes"] < plain_stats["forward_passes"] == block
    assert sum(s["per_pass"]) == s["tokens"] == block and max(s["per_pass"]) > 2
    assert spec_cache.get_seq_length() == plain_cache.get_seq_length()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_sjd_with_text_rows_beside_image_rows(llama, cfg_scale):
    """A batch that mixes a row inside an image block with rows writing text (which may open images of
    their own): text stays plain, one token per pass, while the image row's surplus waits as pending
    tokens; every row's tokens equal plain greedy decoding's."""
    from mmgen.inference.speculative import SpeculativeJacobi

    model = copy.deepcopy(llama.model)
    bias_head(SimpleNamespace(model=model.lm), {llama.vocab["<image>"]: 4.0})
    rows = [_rows(llama, PROMPTS[:1], image=True)[0], *_rows(llama, PROMPTS[1:], image=False)]
    kw = _kw(llama, 3, cfg_scale, temperature=0.0, max_new_tokens=70)
    uncond = [*_rows(llama, [""], image=True), *_rows(llama, ["", ""], image=False)]
    kw["uncond_rows"] = uncond if cfg_scale != 1 else None
    want = _streams(llama, rows, model=model, **kw)
    spec = SpeculativeJacobi(window=16)
    got = _streams(llama, rows, model=model, spec=spec, **kw)
    assert got == want
    image = llama.vocab["<image>"]
    assert any(image in g for g in want[1:])  # a text row opened an image of its own later
    # until a text row opens its image (or stops), every pass commits one token
    text_until = min(g.index(image) if image in g else len(g) for g in want[1:])
    assert text_until > 3 and spec.stats["per_pass"][:text_until] == [1] * text_until
    assert spec.stats["passes"] < max(len(g) for g in want)


@pytest.mark.parametrize("codebooks", [{"pix": 16}, {"sem": 8, "pix": 16}], ids=["pix", "sem+pix"])
def test_greedy_sjd_with_grid_position_embeddings(codebooks):
    """A model whose image codes get learned (branch, row, column) embeddings: the verifying forward hands
    every window token its grid cell, so greedy SJD still writes the plain tokens; also for two-branch
    blocks (a semantic grid, then the pixel grid), whose masks change at </sem> <pix>."""
    from mmgen.inference.speculative import SpeculativeJacobi
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.models.unified_build import build_unified_lm

    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vocab = Vocab(len(tok), codebooks, max_grid=8)
    model = build_unified_lm(
        vocab,
        hidden=64,
        layers=2,
        heads=4,
        text_tokenizer=tok,
        seed=0,
        grid_positions=True,
        grid_target=True,
        tie_embeddings=False,
    ).eval()
    with torch.no_grad():
        model.grid_position_embedding.weight[1:].normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
        model.get_output_embeddings().weight.mul_(30.0)
    b = SimpleNamespace(model=model, vocab=vocab, text_tokenizer=tok)
    rows = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False), vocab["<image>"]] for p in PROMPTS]
    kw = _kw(b, 3, 1.0, temperature=0.0, max_new_tokens=vocab.image_block_len(*GRID), stop_after_images=1)
    want = _streams(b, rows, **kw)
    spec = SpeculativeJacobi(window=6)
    assert _streams(b, rows, spec=spec, **kw) == want
    assert all(len(g) == vocab.image_block_len(*GRID) - 1 for g in want)
    assert len({t for g in want for t in g[3:]}) > 4 and spec.stats["passes"] < len(want[0])


def test_window_of_one_and_text_only_decoding_stay_exact(llama):
    """Window 1 verifies one draft per pass; with no image block at all (text only, sampled), SJD is the
    plain loop itself: same random numbers, same tokens."""
    from mmgen.inference.speculative import SpeculativeJacobi

    rows = _rows(llama, PROMPTS, image=True)
    kw = _kw(llama, 3, 2.0, temperature=0.0, max_new_tokens=40, stop_after_images=1)
    assert _streams(llama, rows, spec=SpeculativeJacobi(window=1), **kw) == _streams(llama, rows, **kw)
    kw["max_new_tokens"] = 12  # a block the prompt opened, cut by the budget: the window stops at it
    cut = _streams(llama, rows, spec=SpeculativeJacobi(window=16), **kw)
    assert cut == _streams(llama, rows, **kw) and all(len(g) == 12 for g in cut)
    text = _rows(llama, PROMPTS, image=False)
    kw = _kw(llama, 3, 1.0, temperature=0.9, top_k=20, seed=3, max_new_tokens=25, allow_images=False)
    spec = SpeculativeJacobi(window=16)
    assert _streams(llama, text, spec=spec, **kw) == _streams(llama, text, **kw)
    assert spec.stats["drafts"] == 0 and set(spec.stats["per_pass"]) == {1}


# -- sampled: the plain sampler's distribution ----------------------------------------------------------
TEMPERATURE, TOP_K, CFG = 0.9, 10, 2.0


@torch.no_grad()
def _exact_code_marginals(bundle, prompt: str, depth: int) -> list[torch.Tensor]:
    """The exact distribution of each of the first ``depth`` codes of a t2i block under the plain
    sampler (CFG, the grid mask, temperature and top-k), marginalised over the codes before it by
    running the model on every prefix (16 ** (depth - 1) of them)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    from mmgen.inference.processors import cfg_mix

    vocab, model = bundle.vocab, bundle.model
    cond, uncond = _rows(bundle, [prompt, ""], image=True)
    head = [vocab.size_token("h", GRID[0]), vocab.size_token("w", GRID[1]), vocab["<pix>"]]
    lo, hi = vocab.code_range("pix")
    joint = torch.ones(())  # p(c_1 .. c_d) as a d-dimensional table
    out = []
    for d in range(depth):
        prefixes = list(itertools.product(range(hi - lo), repeat=d))
        codes = [[lo + c for c in p] for p in prefixes]
        c = model(input_ids=torch.tensor([cond + head + x for x in codes])).logits[:, -1, lo:hi].float()
        u = model(input_ids=torch.tensor([uncond + head + x for x in codes])).logits[:, -1, lo:hi].float()
        g = TopKLogitsWarper(TOP_K)(None, TemperatureLogitsWarper(TEMPERATURE)(None, cfg_mix(c, u, CFG)))
        step = g.softmax(-1).reshape(*([hi - lo] * d), hi - lo)
        joint = joint[..., None] * step
        out.append(joint.reshape(-1, hi - lo).sum(0) if d else joint)
    return out


def _chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of ``samples`` to ``probs``; cells expecting fewer than 5 draws are pooled."""
    from scipy.stats import chisquare

    obs = torch.bincount(samples, minlength=probs.numel()).double()
    exp = probs.double() * samples.numel()
    small = exp < 5
    o = torch.cat([obs[~small], obs[small].sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = e > 0
    return float(chisquare(o[keep].numpy(), (e[keep] * o.sum() / e[keep].sum()).numpy()).pvalue)


def test_sampled_sjd_draws_the_plain_samplers_distribution(llama):
    """400 independent t2i blocks (one batch, CFG on, temperature 0.9, top-k 10), with and without SJD:
    the first three codes' empirical distributions fit the exact marginals (chi-square, p > 0.001 each;
    with 400 draws this flags a shift of about 0.1 in total variation, which a broken residual or
    acceptance rule causes here). The same test passes for the plain loop, which checks the harness;
    about half the drafts are rejected, so the residual draw carries weight in what is tested. Every
    later code position (past the <eol>s, whose masks change) has the same distribution in both runs
    (chi-square of homogeneity, p > 0.001 / 16)."""
    from scipy.stats import chi2_contingency

    from mmgen.inference.speculative import SpeculativeJacobi

    n = 400
    exact = _exact_code_marginals(llama, PROMPTS[0], 3)
    kw = _kw(llama, n, CFG, temperature=TEMPERATURE, top_k=TOP_K, seed=0, max_new_tokens=30, stop_after_images=1)
    rows = _rows(llama, PROMPTS[:1], image=True) * n
    lo, hi = llama.vocab.code_range("pix")
    spec = SpeculativeJacobi(window=6)
    runs = []
    for run in (None, spec):
        runs.append(toks := torch.tensor(_streams(llama, rows, spec=run, **kw)))
        for i, probs in enumerate(exact):
            assert _chi_square_p(toks[:, 3 + i] - lo, probs) > 1e-3, (run, i)
    codes = [i for i in range(runs[0].shape[1]) if lo <= int(runs[0][0, i]) < hi]
    assert len(codes) == GRID[0] * GRID[1]
    for i in codes:
        table = torch.stack([torch.bincount(r[:, i] - lo, minlength=hi - lo) for r in runs])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy()).pvalue > 1e-3 / len(codes), i
    s = spec.stats
    assert 0.2 < s["accepted"] / s["drafts"] < 0.8 and s["passes"] < toks.shape[1]


def test_relaxed_acceptance_with_delta_zero_is_the_strict_rule(bundle):
    """delta = 0 credits no neighbour mass: same tokens as the strict rule on the same seed. delta > 0
    still writes whole, parseable blocks (Llama and Qwen2 bases)."""
    from mmgen.inference.speculative import SpeculativeJacobi, codebook_neighbours

    table = codebook_neighbours(bundle.vocab, bundle.image_tokenizer, 4)
    rows = _rows(bundle, PROMPTS, image=True) * 20
    kw = _kw(bundle, len(rows), CFG, temperature=1.0, seed=2, max_new_tokens=30, stop_after_images=1)
    strict = SpeculativeJacobi(window=8)
    zero = SpeculativeJacobi(window=8, delta=0.0, neighbours=table)
    loose = SpeculativeJacobi(window=8, delta=0.5, neighbours=table)
    want = _streams(bundle, rows, spec=strict, **kw)
    assert _streams(bundle, rows, spec=zero, **kw) == want
    got = _streams(bundle, rows, spec=loose, **kw)
    assert got != want and loose.stats["drafts"] > 0
    for g in got:
        parsed = bundle.vocab.parse_image_block([bundle.vocab["<image>"], *g])
        assert parsed["pix"].shape == GRID


@pytest.mark.parametrize("delta, accept", [(0.0, 0.1), (0.3, 0.7), (1.0, 1.0)])
def test_acceptance_rule_and_residual(delta, accept):
    """The rule itself, on 4000 rows of one draft each: draft code 0 drawn from q = (.5, .1, .2, .2) where
    the target is p = (.05, .9, .05, 0) and code 1 is code 0's codebook neighbour. Strict SJD accepts with
    probability p/q = 0.1; the relaxed rule with (p + min(delta, p(neighbours))) / q, capped at 1. A
    rejected draft is replaced from the residual max(0, p - q) / Z, here code 1 always."""
    from mmgen.inference.drafts import DraftSampler, DraftWindow, verify_drafts
    from mmgen.inference.speculative import SpeculativeJacobi

    rows, lo = 4000, 10
    p = torch.tensor([0.05, 0.9, 0.05, 0.0])
    q = torch.tensor([0.5, 0.1, 0.2, 0.2])
    one, zero = torch.ones(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    win = DraftWindow(torch.full((rows, 1), lo), one, zero, q.expand(rows, 1, 4).clone())
    target = torch.stack([p, torch.full((4,), 0.25)]).expand(rows, 2, 4).clone()
    near = torch.tensor([[1], [0], [3], [2]])
    spec = SpeculativeJacobi(window=1, delta=delta, neighbours=near)
    out, made, tested, accepted = verify_drafts(
        win, target, torch.full((rows,), 9), 9, spec, DraftSampler(1.0, 0, 1.0, torch.Generator().manual_seed(0)), lo
    )
    assert tested == rows and abs(accepted / rows - accept) < 0.025
    rejected = out[:, 0] != lo
    assert int(rejected.sum()) == rows - accepted and bool((out[rejected, 0] == lo + 1).all())
    assert bool((made[rejected] == 1).all()) and bool((made[~rejected] == 2).all())  # + one from the last target


def test_codebook_neighbours_are_the_nearest_codes(llama):
    from mmgen.inference.speculative import codebook_neighbours
    from mmgen.tokenizers.base import code_vectors

    vocab = llama.vocab
    table = codebook_neighbours(vocab, llama.image_tokenizer, 3)
    vecs = code_vectors(llama.image_tokenizer, "pix")
    lo = vocab.code_range("pix")[0] - vocab.text_size
    media = vocab.size - vocab.text_size
    assert table.shape == (media, 3)
    for c in range(16):
        d = (vecs - vecs[c]).norm(dim=-1)
        d[c] = float("inf")
        assert set((table[lo + c] - lo).tolist()) == set(d.topk(3, largest=False).indices.tolist())
    assert (table[:lo] == media).all()  # structural ids have no neighbours: they point at the empty column


# -- the pipeline, its options and errors --------------------------------------------------------------
def test_pipeline_reports_passes_and_writes_the_same_picture(llama):
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    pipe = MMGenPipeline(llama)
    opts = GenerationOptions(mode="t2i", max_new_tokens=30, temperature=0.0, cfg_scale=2.0)
    plain = pipe("a red circle", opts)
    fast = pipe("a red circle", opts, spec_decoding=True, spec_window=8)
    assert fast.images[0].load() == plain.images[0].load()
    assert fast.meta["cache"] == plain.meta["cache"]
    spec = fast.meta["spec"]
    assert fast.meta["forward_passes"] == spec["passes"] < plain.meta["forward_passes"] == plain.meta["new_tokens"]
    assert sum(spec["per_pass"]) == spec["tokens"] == fast.meta["new_tokens"]
    assert "spec" not in plain.meta and fast.meta["options"]["spec_window"] == 8


def test_composes_with_prefill_pruning_and_kv_compression(llama):
    """SJD on top of the other accelerations, CFG on, greedy, a picture shown before the prompt: pruned
    at the prefill (fastv, half its codes) into a compressed cache that evicts nothing (h2o, no budget),
    SJD draws the plain loop's picture under the same options. With a binding budget (streaming, 20
    entries) the window's queries see more entries than the plain steps' do, so the tokens may differ,
    but the block is whole and, drafts rolled back, the cache holds what the plain one holds."""
    from PIL import Image as PILImage

    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    pipe, picture = MMGenPipeline(llama), PILImage.new("RGB", (16, 16), (200, 30, 30))
    base = dict(mode="t2i", max_new_tokens=30, temperature=0.0, cfg_scale=2.0)
    for extra in (
        dict(prune_method="fastv", prune_ratio=0.5, prune_layer=1, kv_method="h2o"),
        dict(kv_method="streaming", kv_budget=20, kv_sinks=2),
    ):
        opts = GenerationOptions(**base, **extra)
        plain = pipe("a red circle", opts, picture=picture)
        fast = pipe("a red circle", opts, picture=picture, spec_decoding=True, spec_window=8)
        if extra.get("kv_budget") is None:
            assert fast.images[0].load() == plain.images[0].load()
            assert fast.meta["prune"]["tokens_kept"] == plain.meta["prune"]["tokens_kept"]
        assert fast.images[0].meta["codes_shape"] == list(GRID)
        assert fast.meta["kv"]["entries"] == plain.meta["kv"]["entries"]
        assert fast.meta["forward_passes"] < plain.meta["forward_passes"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(spec_window=0), "spec_window must be >= 1"),
        (dict(spec_delta=-0.1), r"spec_delta must be in \[0, 1\]"),
        (dict(spec_delta=1.5), r"spec_delta must be in \[0, 1\]"),
        (dict(spec_neighbours=0), "spec_neighbours must be >= 1"),
        (dict(spec_decoding=True, cache="fp8"), "the 'fp8' cache cannot do"),
    ],
)
def test_invalid_options_are_one_line_errors(llama, bad, message):
    from mmgen.errors import MMGenError
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    with pytest.raises(MMGenError, match=message) as e:
        MMGenPipeline(llama)("x", GenerationOptions(mode="t2i", max_new_tokens=30), **bad)
    assert "\n" not in str(e.value)


def test_relaxed_acceptance_needs_a_codebook(tmp_path):
    from mmgen.errors import MMGenError
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline
    from mmgen.inference.speculative import SpeculativeJacobi

    from bundlekit import make_tiny_bundle

    palette = make_tiny_bundle(tmp_path)  # its test tokenizer has a palette, no quantizer codebook
    with pytest.raises(MMGenError, match="needs the image tokenizer's codebook"):
        MMGenPipeline(palette)(
            "x", GenerationOptions(mode="t2i", max_new_tokens=30, spec_decoding=True, spec_delta=0.2)
        )
    with pytest.raises(MMGenError, match="spec_window must be >= 1"):
        SpeculativeJacobi(window=0)
    with pytest.raises(MMGenError, match="needs the codebook neighbours"):
        SpeculativeJacobi(delta=0.3)


def test_cli_flags(llama, tmp_path, capsys):
    from mmgen.cli import main

    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--spec", "--spec-window", "0"])
    assert rc == 2 and "error: spec_window must be >= 1" in capsys.readouterr().err  # checked before loading
    llama.save(tmp_path / "b")
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "b"),
            "--prompt",
            "a red circle",
            "--mode",
            "t2i",
            "--temperature",
            "0",
            "--max-new-tokens",
            "30",
            "--spec",
            "--spec-window",
            "8",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0 and "tokens per pass" in capsys.readouterr().err
    assert (tmp_path / "out" / "image_0.png").is_file()
