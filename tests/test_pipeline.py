"""The pipeline's decode loop (transformers' LogitsProcessorList, warpers, StoppingCriteria and an explicit
DynamicCache) decodes token for token as the plain loop it replaced (tests/reference_loop.py)."""

from __future__ import annotations

import pytest

from bundlekit import make_tiny_bundle, tiny_qwen2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("pipeline_bundle"))


def _streams(loop, model, vocab, rows, **kw) -> list[list[int]]:
    got: list[list[int]] = [[] for _ in rows]
    for tok, active in loop(model, vocab, rows, **kw):
        for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
            if a:
                got[r].append(t)
    return got


def _rows(bundle, prompts, image: bool):
    from mmgen.inference.generate import prompt_ids

    return [prompt_ids(bundle, p, image=image) for p in prompts]


PROMPTS = ["a large red circle at the top left, on a black background.", "a blue square", "two green"]
SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=0.7, top_k=7, top_p=0.9, cfg_scale=2.5),
    dict(temperature=0.0, cfg_scale=3.0),
]


@pytest.mark.parametrize("base", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_decode_loop_reproduces_the_plain_loop(bundle, base, settings):
    from mmgen.inference.generate import default_image_sizes
    from mmgen.inference.pipeline import decode_loop

    from reference_loop import sample_tokens as reference

    model = bundle.model if base == "llama" else tiny_qwen2(bundle.vocab, bundle.text_tokenizer)
    vocab = bundle.vocab
    kw = dict(eos_id=3, pad_id=0, seed=11, sizes=default_image_sizes(bundle), **settings)
    if kw.get("cfg_scale", 1.0) != 1.0:
        kw["uncond_rows"] = _rows(bundle, [""] * len(PROMPTS), image=True)
    # t2i rows (one image block each, rows of three prompt lengths) and free-running auto rows
    t2i = _rows(bundle, PROMPTS, image=True)
    want = _streams(reference, model, vocab, t2i, max_new_tokens=40, stop_after_images=1, **kw)
    got = _streams(decode_loop, model, vocab, t2i, max_new_tokens=40, stop_after_images=1, **kw)
    assert got == want and all(len(g) > 3 for g in got)
    if "uncond_rows" in kw:
        kw["uncond_rows"] = _rows(bundle, [""] * len(PROMPTS), image=False)
    auto = _rows(bundle, PROMPTS, image=False)
    assert _streams(decode_loop, model, vocab, auto, max_new_tokens=30, **kw) == _streams(
        reference, model, vocab, auto, max_new_tokens=30, **kw
    )


def test_rows_of_different_lengths_decode_as_they_would_alone(bundle):
    from mmgen.inference.generate import default_image_sizes
    from mmgen.inference.pipeline import decode_loop

    rows = _rows(bundle, PROMPTS, image=True)
    assert len({len(r) for r in rows}) == 3
    kw = dict(
        eos_id=3, pad_id=0, temperature=0.0, sizes=default_image_sizes(bundle), max_new_tokens=40, stop_after_images=1
    )
    together = _streams(decode_loop, bundle.model, bundle.vocab, rows, **kw)
    alone = [_streams(decode_loop, bundle.model, bundle.vocab, [r], **kw)[0] for r in rows]
    assert together == alone


def test_the_cache_is_an_explicit_dynamic_cache_filled_in_place(bundle):
    from transformers import DynamicCache

    from mmgen.inference.pipeline import decode_loop

    rows = _rows(bundle, PROMPTS[:2], image=False)
    cache = DynamicCache(config=bundle.model.config)
    steps = sum(
        1
        for _ in decode_loop(
            bundle.model,
            bundle.vocab,
            rows,
            max_new_tokens=5,
            eos_id=-1,
            pad_id=0,
            temperature=0.0,
            allow_images=False,
            cache=cache,
        )
    )
    # the prefill and every step but the last wrote their keys and values into the cache we passed
    assert steps == 5 and cache.get_seq_length() == max(len(r) for r in rows) + steps - 1


def test_the_step_is_a_logits_processor_list_of_transformers_warpers(bundle):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from mmgen.inference.constraints import ImageGridConstraint
    from mmgen.inference.processors import MediaCFGLogitsProcessor, step_processors

    c = ImageGridConstraint(bundle.vocab)
    procs = step_processors(bundle.vocab, c, 2.0, 0.5, 4, 0.9)
    assert isinstance(procs, LogitsProcessorList)
    assert [type(p) for p in procs][0] is MediaCFGLogitsProcessor
    assert [type(p) for p in procs][2:] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    assert len(step_processors(bundle.vocab, c, 1.0, 0.0, 4, 0.9)) == 2  # greedy: no warpers


def test_pipeline_options_load_like_every_config_and_are_saved_with_the_output(bundle, tmp_path):
    from mmgen.config import load_config
    from mmgen.errors import MMGenError
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    (tmp_path / "gen.yaml").write_text("mode: t2i\nmax_new_tokens: 30\ncfg_scale: 2.0\n")
    opts = load_config(GenerationOptions, tmp_path / "gen.yaml", ["temperature=0", "seed=4"])
    assert (opts.mode, opts.temperature, opts.seed, opts.top_k) == ("t2i", 0.0, 4, None)
    with pytest.raises(MMGenError, match="temprature"):
        load_config(GenerationOptions, None, ["temprature=0.3"])
    pipe = MMGenPipeline(bundle)
    doc = pipe("a red circle", opts)
    saved = doc.meta["options"]
    assert saved["mode"] == "t2i" and saved["cfg_scale"] == 2.0 and saved["temperature"] == 0.0
    assert saved["top_k"] == 0 and saved["top_p"] == 1.0  # resolved from the bundle, not left None
    assert len(doc.images) == 1
    # the same options through the old entry point give the same tokens
    from mmgen.inference.generate import generate_interleaved

    old = generate_interleaved(
        bundle, "a red circle", mode="t2i", max_new_tokens=30, cfg_scale=2.0, temperature=0.0, seed=4
    )
    assert old.images[0].meta["codes_shape"] == doc.images[0].meta["codes_shape"]
    assert old.images[0].load() == doc.images[0].load()
    with pytest.raises(MMGenError, match="max_audio_frames"):
        pipe("x", opts, max_audio_frames=0)


def test_fp8_kv_cache_holds_a_quarter_of_the_bytes_and_still_draws(bundle):
    from mmgen.errors import MMGenError
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline, cache_bytes, make_cache

    pipe = MMGenPipeline(bundle)
    opts = GenerationOptions(mode="t2i", max_new_tokens=30, temperature=0.0)
    plain = pipe("a red circle", opts)
    small = pipe("a red circle", opts, cache="fp8")
    p, q = plain.meta["cache"], small.meta["cache"]
    assert p["kind"] == "dynamic" and q["kind"] == "fp8" and p["tokens"] == q["tokens"] > 20
    # measured from the tensors the layers hold: float32 keys/values against fp8 ones plus scales
    assert p["bytes"] == 2 * 2 * p["tokens"] * bundle.model.config.hidden_size * 4  # 2 layers x (k, v), no GQA
    assert q["bytes"] < p["bytes"] / 3
    assert len(small.images) == 1 and small.images[0].meta["codes_shape"] == [4, 4]
    assert cache_bytes(make_cache(bundle.model)) == 0
    with pytest.raises(MMGenError, match="unknown cache 'int3'"):
        pipe("a red circle", opts, cache="int3")


def test_option_checks_need_no_model():
    """check_options holds every check that needs no bundle; the pipeline and mmgen generate both run it."""
    from mmgen.errors import MMGenError
    from mmgen.inference.generate import check_options

    check_options("t2i", 10, max_audio_frames=3, cache="fp8")
    with pytest.raises(MMGenError, match="unknown cache 'int3'"):
        check_options(cache="int3")
    with pytest.raises(MMGenError, match="max_audio_frames must be >= 1"):
        check_options(max_audio_frames=0)
