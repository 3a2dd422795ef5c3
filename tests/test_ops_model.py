"""Model-based operators with tiny models built from config and saved to temp dirs: causal-LM
perplexity, CLIP image-text similarity, the learned quality scorer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.ops import DocView, build_op
from mmgen.errors import MMGenError

from trainkit import assert_logged_run


def _captions(n, seed=0):
    from mmgen.world import caption, random_scene

    rng = random.Random(seed)
    return [caption(random_scene(rng), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer GPT-2 with a byte-level BPE, trained for a few steps on ShapesWorld captions."""
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmgen.models.text_tokenizer import train_text_tokenizer

    texts = _captions(400)
    tok = train_text_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        batch = [[tok.bos_token_id] + tok(t)["input_ids"][:40] for t in texts[step % 20 * 20 :][:20]]
        n = max(map(len, batch))
        ids = torch.tensor([b + [tok.pad_token_id] * (n - len(b)) for b in batch])
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_perplexity_statistic_and_decision(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    op = build_op("perplexity_filter", level="node", params={"model": str(tiny_lm), "max_ppl": 60})
    good = _captions(1, seed=99)[0]
    bad = "Zq vlorp kkk 7734 wuggle ##!! frumious bandersnatch grob"
    vs = op.apply(DocView(Doc([Text(good), Text(bad)])))
    # independent: exp of the mean next-token NLL, gathered by hand from the logits
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    for v, text in zip(vs, (good, bad)):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
        assert v.stats["perplexity"] == pytest.approx(math.exp(nll), rel=1e-3)
        assert v.stats["lm_tokens"] == ids.shape[1] - 1
    assert vs[0].stats["perplexity"] < 20 < 200 < vs[1].stats["perplexity"]
    assert [v.reason for v in vs] == [None, "high_perplexity"]


def test_perplexity_model_errors(tmp_path):
    with pytest.raises(MMGenError, match="params.model"):
        build_op("perplexity_filter")
    op = build_op("perplexity_filter", params={"model": str(tmp_path / "nowhere")})
    with pytest.raises(MMGenError, match="cannot load causal LM"):
        op.apply(DocView(Doc([Text("some text here")])))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from mmgen.backbones.clip import TINY_CLIP_CFG, build_open_clip, save_clip

    torch.manual_seed(0)
    model = build_open_clip(TINY_CLIP_CFG)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # CLIP's cap: logits / 100 are then the cosines
    return save_clip(model, tmp_path_factory.mktemp("clip") / "clip", TINY_CLIP_CFG)


def _dj_reference(clip_dir, text, pils, mode):
    """Data-Juicer's statistic: the model's logits_per_text / 100, reduced over the chunk's images."""
    from mmgen.backbones.clip import load_clip

    enc = load_clip(clip_dir)
    img_f, txt_f, scale = enc.model(enc.pixels(pils), enc.tokenize([text]))
    logits = (scale * txt_f @ img_f.T)[0] / 100.0
    return {"avg": logits.mean(), "max": logits.max(), "min": logits.min()}[mode].item()


def test_image_text_similarity_matches_dj_formula(tiny_clip, real_dir):
    from mmgen.data.formats import read_records

    docs = list(
        read_records(str(real_dir / "dj-demo-images.jsonl"), "dj", path_map={"../../tests/ops/data/": f"{real_dir}/"})
    )
    for mode in ("avg", "min"):
        op = build_op(
            "image_text_similarity_filter", params={"model": str(tiny_clip), "reduce_mode": mode, "min_score": -1.0}
        )
        for d in docs:
            [v] = op.apply(DocView(d))
            [text] = [t.text for t in d.texts]
            want = _dj_reference(tiny_clip, text, [im.to_pil() for im in d.images], mode)
            assert v.stats["similarity"] == [pytest.approx(want, abs=1e-4)] and v.reason is None

    # two chunks (Data-Juicer's <|__dj__eoc|>), any vs all
    lena, cat = Image(path=str(real_dir / "lena.jpg")), Image(path=str(real_dir / "cat.jpg"))
    doc = Doc(
        [lena, Text("a portrait", meta={"dj_eoc": 1}), Text("a cat"), cat, Image(path=str(real_dir / "img2.jpg"))]
    )
    op = build_op("image_text_similarity_filter", params={"model": str(tiny_clip), "min_score": -1.0})
    [v] = op.apply(DocView(doc))
    s = v.stats["similarity"]
    assert len(s) == 2
    assert s[1] == pytest.approx(
        _dj_reference(tiny_clip, "a cat", [cat.to_pil(), PILImage.open(real_dir / "img2.jpg")], "avg"), abs=1e-4
    )
    lo, hi = sorted(s)
    mid = (lo + hi) / 2
    any_op = build_op("image_text_similarity_filter", params={"model": str(tiny_clip), "min_score": mid})
    all_op = build_op(
        "image_text_similarity_filter", params={"model": str(tiny_clip), "min_score": mid, "any_or_all": "all"}
    )
    assert any_op.apply(DocView(doc))[0].reason is None
    assert all_op.apply(DocView(doc))[0].reason == "low_image_text_similarity"
    node = build_op("image_text_similarity_filter", level="node", params={"model": str(tiny_clip), "min_score": 2.0})
    assert [(v.item, v.reason) for v in node.apply(DocView(doc))] == [
        (0, "low_image_text_similarity"),
        (3, "low_image_text_similarity"),
        (4, "low_image_text_similarity"),
    ]


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory):
    from mmgen.training.quality import train_quality

    out = tmp_path_factory.mktemp("quality")
    metrics = train_quality(out, examples=1600, epochs=8, seed=0, val_examples=200)
    return out, metrics


def test_quality_scorer_learns_levels(quality_model):
    out, m = quality_model
    assert (out / "quality_model.safetensors").is_file()
    assert [r["epoch"] for r in assert_logged_run(out)] == list(range(1, 9))
    by = m["mean_score_by_level"]
    assert m["accuracy"] > 0.4  # chance is 0.25
    assert by[0] < 0.15 and min(by[1], by[2], by[3]) > by[0] + 0.4


def test_quality_training_resumes_from_its_last_epoch_checkpoint(quality_model, tmp_path):
    """A run stopped after epoch 7 of 8 (its last checkpoint removed) and resumed ends with the
    uninterrupted run's weights and log."""
    import shutil

    from safetensors.torch import load_file

    from mmgen.training.quality import train_quality

    out, _ = quality_model
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    *_, last = sorted((cut / "checkpoints").glob("step_*"))
    shutil.rmtree(last)
    (cut / "quality_model.safetensors").unlink()
    train_quality(cut, examples=1600, epochs=8, seed=0, val_examples=200, resume=True)
    assert sorted(p.name for p in (cut / "checkpoints").glob("step_*")) == ["step_00000175", "step_00000200"]
    a, b = load_file(str(out / "quality_model.safetensors")), load_file(str(cut / "quality_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert assert_logged_run(cut) == assert_logged_run(out)


def test_quality_score_op_node_doc_and_top_fraction(quality_model):
    from mmgen.data.ops.quality import load_quality, score_pairs
    from mmgen.data.ops.select import TopFraction
    from mmgen.training.quality import make_examples

    out, _ = quality_model
    ex = make_examples(40, seed=7)
    good = [(im, t) for im, t, lv in ex if lv == 3][:3]
    junk = [(im, t) for im, t, lv in ex if lv == 0][:3]
    doc = Doc([x for im, t in good + junk for x in (Text(t), Image.from_pil(im))])
    op = build_op("quality_score", level="node", params={"model": str(out), "min_score": 0.3})
    vs = op.apply(DocView(doc))
    assert [v.item for v in vs] == [1, 3, 5, 7, 9, 11]
    assert [v.reason for v in vs] == [None] * 3 + ["low_quality"] * 3
    want = score_pairs(load_quality(str(out)), [im for im, _ in good + junk], [t for _, t in good + junk])
    assert [v.stats["quality_score"] for v in vs] == pytest.approx(want, abs=1e-4)
    [d] = build_op(
        "quality_score", level="doc", params={"model": str(out), "reduce_mode": "min", "min_score": 0.3}
    ).apply(DocView(doc))
    assert d.reason == "low_quality" and d.stats["quality_score"] == pytest.approx(min(want), abs=1e-4)

    docs = [Doc([Text(t), Image.from_pil(im)], id=f"d{i}") for i, (im, t) in enumerate(good + junk)]
    sel = build_op(
        "top_fraction",
        params={
            "op": "quality_score",
            "params": {"model": str(out), "min_score": 0.0},
            "stat": "quality_score",
            "fraction": 0.5,
        },
    )
    assert isinstance(sel, TopFraction)
    sigs = [sel.signature(DocView(d)) for d in docs]
    for d, s in zip(docs, sigs):  # pass 1 observes and keeps
        assert sel.decide(DocView(d), s, d.id)[0].reason is None
        sel.commit(DocView(d), s, d.id)
    assert sel.finalize() == {"d0", "d1", "d2"}
    assert [sel.decide(DocView(d), None, d.id)[0].reason for d in docs] == [None] * 3 + ["not_selected"] * 3


def test_quality_model_missing(tmp_path):
    with pytest.raises(MMGenError, match="train-quality"):
        build_op("quality_score", params={"model": str(tmp_path)})


def test_noise_image_scores_low_even_with_a_true_caption(quality_model):
    from mmgen.data.ops.quality import load_quality, score_pairs
    from mmgen.world import caption, random_scene, render

    out, _ = quality_model
    rng = random.Random(3)
    scene = random_scene(rng)
    noise = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    s_true, s_noise = score_pairs(load_quality(str(out)), [render(scene), noise], [caption(scene)] * 2)
    assert s_noise < 0.15 < s_true
