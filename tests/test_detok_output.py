"""The diffusion detokenizer as generation's image output: a tiny detokenizer built from config, saved in
a tiny bundle; generate, the CLI and the evaluation draw through it, each picture's meta names it, and a
detokenizer for another tokenizer (or any bad option) is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError

from bundlekit import RES, PaletteTokenizer, make_tiny_bundle, tiny_detok

PROMPT = "a large red circle at the top left, on a black background."


def _codes_of(image_item, tok) -> torch.Tensor:
    """The code grid behind a picture drawn by the palette tokenizer (flat patches: encoding is exact)."""
    return tok.encode([image_item.to_pil()])


@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_generate_draws_through_the_bundles_detokenizer_and_says_so(detok_bundle, base):
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline
    from mmgen.models.bundle import load_bundle

    from bundlekit import tiny_qwen2

    b = load_bundle(detok_bundle)
    assert b.detokenizer.scales == [1, 2] and not b.detokenizer._loaded  # nothing loads before a picture
    if base == "qwen2":
        b.model = tiny_qwen2(b.vocab, b.text_tokenizer)
    pipe = MMGenPipeline(b)
    o = GenerationOptions(mode="t2i", max_new_tokens=30, seed=3, cfg_scale=2.0, detok_steps=3)
    drawn = pipe(PROMPT, o)
    plain = pipe(PROMPT, o, detok_path="none")  # same tokens: the decoder does not steer the LM
    img, ref = drawn.images[0], plain.images[0]
    assert img.meta["decoder"] == {
        "kind": "detokenizer",
        "scale": 1,
        "steps": 3,
        "cfg_scale": 1.0,
        "scheduler": "ddim",
        "path": str(detok_bundle / "detokenizer" / "x1"),
    }
    assert drawn.meta["image_decoder"] == img.meta["decoder"]
    assert ref.meta["decoder"] == {"kind": "tokenizer", "tokenizer": "test_palette"}
    assert drawn.meta["options"]["detok_steps"] == 3 and img.meta["codes_shape"] == ref.meta["codes_shape"]
    # the picture is the detokenizer's drawing of the generated codes, with the call's seed
    codes = _codes_of(ref, b.image_tokenizer)
    want = b.detokenizer.pipeline(1)(
        [codes], num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(3)
    ).images[0]
    assert np.array_equal(np.asarray(img.to_pil()), np.asarray(want))
    assert not np.array_equal(np.asarray(img.to_pil()), np.asarray(ref.to_pil()))
    # the 2x pipeline draws the same codes at twice the size; another sampler is recorded
    big = pipe(PROMPT, o, detok_scale=2, detok_scheduler="dpm").images[0]
    assert big.to_pil().size == (2 * RES[0], 2 * RES[1])
    assert big.meta["decoder"]["scale"] == 2 and big.meta["decoder"]["scheduler"] == "dpm"


def test_bundle_layout_round_trip_and_add_detokenizer(detok_bundle, tmp_path):
    from mmgen.models.bundle import load_bundle
    from mmgen.models.detokenizer_set import DetokenizerSet, add_detokenizer, pipeline_facts

    for scale in (1, 2):
        facts = pipeline_facts(detok_bundle / "detokenizer" / f"x{scale}")
        assert facts["scale"] == scale and facts["tokenizer_type"] == "test_palette"
    b = make_tiny_bundle(tmp_path / "b")
    assert b.detokenizer is None
    single = tmp_path / "one"
    tiny_detok(b.image_tokenizer).save_pretrained(str(single))
    assert add_detokenizer(tmp_path / "b", single) == tmp_path / "b" / "detokenizer" / "x1"
    assert load_bundle(tmp_path / "b").detokenizer.scales == [1]
    assert DetokenizerSet.from_dir(single).scales == [1]  # --detokenizer takes one pipeline directory too
    (tmp_path / "wrong" / "x2").mkdir(parents=True)
    tiny_detok(b.image_tokenizer).save_pretrained(str(tmp_path / "wrong" / "x2"))
    with pytest.raises(MMGenError, match="holds a 1x detokenizer; name its folder x1"):
        DetokenizerSet.from_dir(tmp_path / "wrong")


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_detokenizer_for_another_tokenizer_is_a_one_line_error(tmp_path):
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline
    from mmgen.models.detokenizer_set import add_detokenizer

    b = make_tiny_bundle(tmp_path / "b")
    tok = b.image_tokenizer
    other = PaletteTokenizer()
    with torch.no_grad():
        other.palette.mul_(0.5)  # same type and sizes, other codes
    cases = {
        "another image tokenizer (test_palette, fingerprint": tiny_detok(other),
        "with 32 'pix' codes": tiny_detok(tok, sizes=(32,)),
        "made for a pixel_vq image tokenizer": tiny_detok(tok, tokenizer_type="pixel_vq"),
        "made for 64 px pictures": tiny_detok(tok, tokenizer_resolution=64, side=8),
        "draws from 'sem' codes, which this checkpoint's LM does not write": tiny_detok(tok, names=("sem",)),
    }
    pipe = MMGenPipeline(b)
    for i, (msg, detok) in enumerate(cases.items()):
        d = tmp_path / f"detok{i}"
        detok.save_pretrained(str(d))
        with pytest.raises(MMGenError, match=msg.replace("(", r"\(")) as e:
            pipe(PROMPT, GenerationOptions(mode="t2i", max_new_tokens=30, detok_path=str(d)))
        assert "mmgen train-detokenizer tiny_detokenizer bundle=" in _one_line(e)
        with pytest.raises(MMGenError, match=msg.replace("(", r"\(")):
            add_detokenizer(tmp_path / "b", d)
    assert not (tmp_path / "b" / "detokenizer").exists()  # nothing was added


def test_every_detok_option_is_checked_in_one_line(detok_bundle, tmp_path):
    from mmgen.inference.detokenize import check_detok_options
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline
    from mmgen.models.bundle import load_bundle

    bad = {
        "detok_steps must be >= 1": dict(detok_steps=0),
        "detok_cfg_scale must be >= 1": dict(detok_cfg_scale=0.5),
        "detok_scale must be 1 or 2": dict(detok_scale=3),
        "unknown detok_scheduler 'euler'": dict(detok_scheduler="euler"),
        "detokenizer directory .* does not exist": dict(detok_path=str(tmp_path / "missing")),
        "detok_scale 2 needs a detokenizer, and detok_path is none": dict(detok_path="none", detok_scale=2),
    }
    for msg, kw in bad.items():
        with pytest.raises(MMGenError, match=msg) as e:
            check_detok_options(GenerationOptions(**kw))
        _one_line(e)
    plain = make_tiny_bundle(tmp_path / "plain")  # no detokenizer: pictures from the tokenizer, 2x is refused
    with pytest.raises(MMGenError, match="detok_scale 2 needs a detokenizer: this checkpoint has none"):
        MMGenPipeline(plain)(PROMPT, mode="t2i", max_new_tokens=30, detok_scale=2)
    assert MMGenPipeline(plain)(PROMPT, mode="t2i", max_new_tokens=30).images[0].meta["decoder"]["kind"] == "tokenizer"
    only_1x = tmp_path / "only1x"
    tiny_detok(plain.image_tokenizer).save_pretrained(str(only_1x))
    with pytest.raises(MMGenError, match="has no 2x pipeline"):
        MMGenPipeline(load_bundle(detok_bundle))(
            PROMPT, mode="t2i", max_new_tokens=30, detok_path=str(only_1x), detok_scale=2
        )
    with pytest.raises(MMGenError, match="unknown config key 'detok_step'; did you mean 'detok_steps'"):
        GenerationOptions.build(["detok_step=4"])


def test_cli_generate_with_detokenizer_flags(detok_bundle, tmp_path, capsys):
    from mmgen.cli import main

    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(detok_bundle),
            "--prompt",
            PROMPT,
            "--mode",
            "t2i",
            "--max-new-tokens",
            "30",
            "--detok-steps",
            "2",
            "--out",
            str(out),
            "detok_scheduler=dpm",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "pictures drawn by the diffusion detokenizer 1x, dpm 2 steps, CFG off" in err and "forward passes" in err
    doc = json.loads((out / "doc.json").read_text())
    assert doc["items"][0]["meta"]["decoder"]["steps"] == 2 and doc["meta"]["image_decoder"]["scheduler"] == "dpm"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(detok_bundle),
            "--prompt",
            PROMPT,
            "--mode",
            "t2i",
            "--detokenizer",
            "none",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "image tokenizer's decoder" in capsys.readouterr().err
    for args, msg in (
        (["--detok-steps", "0"], "error: detok_steps must be >= 1"),
        (["detok_stepz=3"], "error: unknown config key 'detok_stepz'; did you mean 'detok_steps'?"),
        (["--detokenizer", str(tmp_path / "nope")], "does not exist"),
    ):
        rc = main(["generate", "--checkpoint", str(detok_bundle), "--prompt", "x", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_eval_draws_through_the_detokenizer_and_resumes_only_with_the_same_decoder(detok_bundle, tmp_path):
    from mmgen.eval.run import run_eval

    kw = dict(n=2, batch_size=2, progress=False, temperature=0.0)
    rep = run_eval(detok_bundle, "t2i", tmp_path / "ev", detok={"detok_steps": 2}, **kw)
    dec = rep["inference"]["image_decoder"]
    assert dec["kind"] == "detokenizer" and dec["steps"] == 2
    assert "drawn by the diffusion detokenizer 1x, ddim 2 steps" in rep["inference"]["image_decoding"]
    assert rep["suites"]["t2i"]["samples"] == 4
    assert (
        "Generated pictures: one image block under the grid constraint, drawn by the diffusion detokenizer"
        in (tmp_path / "ev" / "report.md").read_text()
    )
    with pytest.raises(MMGenError, match="different image_decoder"):
        run_eval(detok_bundle, "t2i", tmp_path / "ev", detok={"detok_path": "none"}, **kw)
    again = run_eval(detok_bundle, "t2i", tmp_path / "ev", detok={"detok_steps": 2}, **kw)
    assert again["suites"]["t2i"]["resumed_batches"] == 2
    plain = run_eval(detok_bundle, "t2i", tmp_path / "ev_plain", detok={"detok_path": "none"}, **kw)
    assert plain["inference"]["image_decoder"] is None
    with pytest.raises(MMGenError, match="detok takes the detok_\\* generation options only"):
        run_eval(detok_bundle, "t2i", tmp_path / "ev2", detok={"seed": 1}, **kw)


def test_train_detokenizer_for_a_bundle_adds_it_there(tmp_path):
    from mmgen.config import load_config
    from mmgen.inference.pipeline import MMGenPipeline
    from mmgen.models.bundle import load_bundle
    from mmgen.models.detokenizer_set import pipeline_facts
    from mmgen.models.detokenizer_train import DetokenizerTrainConfig, train_detokenizer

    make_tiny_bundle(tmp_path / "b")
    cfg = load_config(
        DetokenizerTrainConfig,
        None,
        [
            f"bundle={tmp_path / 'b'}",
            f"out_dir={tmp_path / 'run'}",
            "steps=2",
            "batch_size=2",
            "train_images=4",
            "eval_images=0",
            "log_every=1",
            "ckpt_every=2",
            "model.block_out_channels=[8,16]",
            "model.norm_num_groups=4",
            "model.condition_on_decode=true",
            "progress=false",
        ],
    )
    train_detokenizer(cfg)
    b = load_bundle(tmp_path / "b")
    facts = pipeline_facts(tmp_path / "b" / "detokenizer" / "x1")
    assert facts["grid_names"] == ["pix"] and facts["tokenizer_sha256"] == b.image_tokenizer.fingerprint()
    doc = MMGenPipeline(b)(PROMPT, mode="t2i", max_new_tokens=30, detok_steps=1)
    assert doc.images[0].meta["decoder"]["kind"] == "detokenizer" and doc.images[0].to_pil().size == RES
    with pytest.raises(MMGenError, match="writes no pictures"):
        from dataclasses import replace

        from mmgen.models.detokenizer_train import for_bundle

        (tmp_path / "b" / "image_tokenizer").rename(tmp_path / "b" / "moved")
        for_bundle(replace(cfg, bundle=str(tmp_path / "b")))


def test_forward_passes_and_tokens_per_second_are_counted(tmp_path):
    from mmgen.inference.pipeline import MMGenPipeline

    b = make_tiny_bundle(tmp_path / "b")
    calls = []
    b.model.register_forward_hook(lambda *a: calls.append(1))
    for cfg_scale in (1.0, 2.0):  # guidance runs both rows in one forward: it costs no extra passes
        calls.clear()
        doc = MMGenPipeline(b)(PROMPT, mode="t2i", max_new_tokens=30, cfg_scale=cfg_scale)
        m = doc.meta
        assert m["forward_passes"] == len(calls) == m["new_tokens"]  # a prefill, then one pass per later token
        assert m["tokens_per_s"] == pytest.approx(m["new_tokens"] / m["seconds"], rel=0.02)
