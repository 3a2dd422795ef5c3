"""Surface forms of ShapesWorld prompts: deterministic, each really different, every one read back as
the same scene; and the training-side variation, which rewrites text-to-image prompts only and leaves
pictures, codes and scenes as they were."""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest

from mmgen.errors import MMGenError
from mmgen.world import Scene, caption, parse_caption, random_scene
from mmgen.world.surface import EDITS, SURFACE_FORMS, apply_edits, check_forms, surface_form, vary_prompt, vary_prompts
from mmgen.world.text import CAPTION_TEMPLATES, caption_parts


def _prompts(n=60, seed=3):
    from mmgen.eval.t2i import t2i_eval_set

    return t2i_eval_set(n, "val", seed=seed) + t2i_eval_set(n // 3, "heldout", seed=seed)


def test_every_form_is_deterministic_differs_and_reads_as_the_same_scene():
    for i, it in enumerate(_prompts()):
        forms = {f: surface_form(it.prompt, f, i) for f in SURFACE_FORMS}
        assert forms == {f: surface_form(it.prompt, f, i) for f in SURFACE_FORMS}  # same seed, same strings
        assert forms["as_written"] == it.prompt
        assert len(set(forms.values())) == len(forms), forms  # every form its own string
        for f, text in forms.items():
            assert parse_caption(text).key() == it.scene.key(), (f, text)
        assert forms["lower_first"][0].islower() and forms["lower_first"][1:] == it.prompt[1:]
        assert forms["no_period"] == it.prompt[:-1] and not forms["lower_no_period"].endswith(".")
        assert "  " in forms["spacing"] and forms["spacing"].split() != [] and "  " not in it.prompt
        # another template or object order, still a caption as the world writes them
        assert caption_parts(forms["word_order"])[:2] != caption_parts(it.prompt)[:2]
        a, b = it.prompt.lower().split(), forms["synonyms"].lower().split()
        swaps = {(x, y) for x, y in zip(a, b) if x != y}
        assert len(a) == len(b) and swaps, forms["synonyms"]
        assert all({x, y} <= {"a", "one"} or {x, y} <= {"at", "on", "in"} for x, y in swaps), forms["synonyms"]
    # another seed draws other forms somewhere in the set
    p = _prompts(20)
    assert [surface_form(it.prompt, "word_order", 0) for it in p] != [
        surface_form(it.prompt, "word_order", 1) for it in p
    ]


def test_caption_parts_reads_every_template_and_object_order():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng, "train")
        for t in range(len(CAPTION_TEMPLATES)):
            text = caption(scene, rng, template=t)
            tpl, objs, bg = caption_parts(text)
            assert tpl == t and bg == scene.background and Scene(bg, objs).key() == scene.key()
    assert caption_parts("Start with a large red circle at the top, on a black background.") is None
    assert caption_parts("What color is the circle at the top?") is None


def test_edits_refuse_text_they_cannot_rewrite_and_unknown_names_in_one_line():
    rng = random.Random(0)
    with pytest.raises(MMGenError, match="not a caption"):
        apply_edits("Make the red circle blue.", ["word_order"], rng)
    with pytest.raises(MMGenError, match="no final full stop"):
        apply_edits("a large red circle at the top, on a black background", ["no_period"], rng)
    with pytest.raises(MMGenError, match="unknown surface form 'shouting'"):
        check_forms("as_written,shouting")
    with pytest.raises(MMGenError, match="unknown surface edit"):
        apply_edits("A.", ["typos"], rng)
    assert check_forms("no_period, lower_first,no_period") == ("no_period", "lower_first")
    # a text outside the caption grammar is never varied
    assert vary_prompt("Make the red circle blue.", rng, 1.0) == "Make the red circle blue."


def test_vary_prompt_rate_and_mix_of_edits():
    rng = random.Random(5)
    prompts = [it.prompt for it in _prompts(200)]
    out = [vary_prompt(p, rng, 0.5) for p in prompts]
    changed = [o != p for o, p in zip(out, prompts)]
    assert 0.35 < np.mean(changed) < 0.65
    assert all(parse_caption(o).key() == parse_caption(p).key() for o, p in zip(out, prompts))
    assert [vary_prompt(p, rng, 0.0) for p in prompts] == prompts
    # every edit shows up among the varied prompts
    varied = [o for o, c in zip(out, changed) if c]
    assert any(o[0].islower() for o in varied) and any(not o.endswith(".") for o in varied)
    assert any("  " in o for o in varied) and any(" one " in f" {o.lower()} " for o in varied)
    assert len(EDITS) == 5


def _world_docs(n=40, seed=0):
    from mmgen.world import make_doc

    rng = random.Random(seed)
    return [make_doc(kind, rng, "train", size=36) for kind in ["caption", "qa", "buildup"] * (n // 3)]


def _sha(doc):
    return [hashlib.sha1(it.load()).hexdigest() if it.kind != "text" else None for it in doc.items]


def test_vary_prompts_rewrites_prompts_only_and_keeps_pictures_and_scenes():
    docs = _world_docs()
    before = [([it.text if it.kind == "text" else None for it in d.items], _sha(d), d.id) for d in docs]
    varied = [vary_prompts(d, 1.0) for d in docs]
    prompts = 0
    for (texts, shas, doc_id), d in zip(before, varied):
        assert _sha(d) == shas and d.id == doc_id  # pictures bytes and identity untouched
        for i, (old, it) in enumerate(zip(texts, d.items)):
            if it.kind != "text":
                continue
            is_prompt = d.meta["kind"] == "caption" and d.items[i + 1 : i + 2] and d.items[i + 1].kind == "image"
            if is_prompt:
                prompts += 1
                assert it.text != old and it.meta["surface_of"] == old
                scene = Scene.from_dict(d.items[i + 1].meta["scene"])
                assert parse_caption(it.text).key() == scene.key()
            else:  # captions after their picture, questions, answers and build-up steps: as written
                assert it.text == old
    assert prompts >= 3
    # the same documents are varied the same way again (keyed by the document's id)
    again = [vary_prompts(d, 1.0) for d in _world_docs()]
    assert [[it.text for it in d.texts] for d in again] == [[it.text for it in d.texts] for d in varied]


def test_training_records_vary_prompts_and_the_text_tokenizer_learns_from_them(tmp_path, monkeypatch):
    from mmgen.data.code_shards import CodedDoc, CodeShardWriter, read_code_shards
    from mmgen.training.config import load_train_config
    from mmgen.training.data import new_text_tokenizer, sequence_settings, training_records

    docs = _world_docs(60)
    shards = tmp_path / "codes"
    with CodeShardWriter(shards, keep_media=True) as w:
        for d in docs:
            w.write(CodedDoc(d, codes={i: np.full((3, 3), i) for i, it in enumerate(d.items) if it.kind == "image"}))
    plain = list(read_code_shards(str(shards)))
    cfg = load_train_config(
        "tiny_pretrain",
        [
            f"data.code_shards={shards}",
            "data.prompt_variation=1.0",
            "data.image_tokenizer=null",
            "data.codebook_size=16",
        ],
    )
    settings = sequence_settings(cfg)
    assert settings["prompt_variation"] == 1.0
    recs = list(training_records(str(shards), settings))
    assert [r.doc.id for r in recs] == [r.doc.id for r in plain]
    n_prompts = 0
    for r, p in zip(recs, plain):
        assert set(r.codes) == set(p.codes) and all(np.array_equal(r.codes[k], p.codes[k]) for k in p.codes)
        assert _sha(r.doc) == _sha(p.doc)
        new = [it.text for it in r.doc.texts]
        old = [it.text for it in p.doc.texts]
        n_prompts += sum(a != b for a, b in zip(new, old))
    assert n_prompts >= 5
    # without the switch the records are the shards' own, and the settings as before it existed
    off = load_train_config(
        "tiny_pretrain",
        [f"data.code_shards={shards}", "data.prompt_variation=0", "data.image_tokenizer=null", "data.codebook_size=16"],
    )
    assert "prompt_variation" not in sequence_settings(off)
    assert [[t.text for t in r.doc.texts] for r in training_records(str(shards), sequence_settings(off))] == [
        [t.text for t in r.doc.texts] for r in plain
    ]

    seen = {}
    import mmgen.training.data as training_data  # where new_text_tokenizer looks the trainer up

    real = training_data.train_text_tokenizer
    monkeypatch.setattr(
        training_data, "train_text_tokenizer", lambda texts, **kw: real(seen.setdefault("texts", list(texts)), **kw)
    )
    tok = new_text_tokenizer(cfg)
    varied = [it.text for r in recs for it in r.doc.texts if "surface_of" in it.meta]
    assert varied and set(varied) <= set(seen["texts"])
    assert not set(varied) & {it.text for r in plain for it in r.doc.texts}
    assert tok.decode(tok.encode(varied[0])) == varied[0]


def test_prompt_variation_out_of_range_is_a_one_line_error():
    from mmgen.training.config import load_train_config

    with pytest.raises(MMGenError, match=r"data.prompt_variation must be in \[0, 1\], got 1.5"):
        load_train_config("tiny_pretrain", ["data.prompt_variation=1.5", "data.code_shards=x"])


def test_packed_shards_and_the_in_memory_trainer_vary_the_same_prompts_the_same_way(tmp_path):
    from transformers import AutoTokenizer

    from mmgen.data.code_shards import CodedDoc, CodeShardWriter
    from mmgen.data.packed_shards import read_packed_shard
    from mmgen.training.config import load_train_config
    from mmgen.training.data import prepare_data
    from mmgen.training.pack import pack

    shards = tmp_path / "codes"
    with CodeShardWriter(shards) as w:  # one shard: the trainer packs the corpus, pack a shard at a time
        for d in _world_docs(30):
            w.write(CodedDoc(d, codes={i: np.full((3, 3), i) for i, it in enumerate(d.items) if it.kind == "image"}))
    over = [
        f"data.code_shards={shards}",
        "data.prompt_variation=1.0",
        "data.image_tokenizer=null",
        "data.codebook_size=16",
        "data.text_vocab_size=300",
        "data.seq_len=256",
        f"out_dir={tmp_path / 'run'}",
    ]
    index = pack("tiny_pretrain", over, tmp_path / "packed", progress=False)
    assert index["settings"]["prompt_variation"] == 1.0
    mem = prepare_data(load_train_config("tiny_pretrain", over), tmp_path / "run", 0)
    got = read_packed_shard(tmp_path / "packed" / index["shards"][0]["name"])
    for k in got:
        assert np.array_equal(got[k], mem["rows"][k]), k
    tok = AutoTokenizer.from_pretrained(tmp_path / "packed" / "text_tokenizer")
    text = tok.decode([int(i) for i in got["input_ids"].ravel() if i < len(tok)])
    varied = [it.text for d in _world_docs(30) for it in vary_prompts(d, 1.0).texts if "surface_of" in it.meta]
    # the text tokenizer reads runs of spaces as one (its normalizer), so decoded prompts are single-spaced
    assert varied and all(re.sub(r"[ \t]+", " ", v) in text for v in varied)
    # a run asking for other prompts than the packed shards hold stops with one line
    with pytest.raises(MMGenError, match="prompt_variation"):
        prepare_data(
            load_train_config(
                "tiny_pretrain",
                [
                    *over[:1],
                    "data.prompt_variation=0.5",
                    *over[2:],
                    "data.source=packed",
                    f"data.packed_shards={tmp_path / 'packed'}",
                ],
            ),
            tmp_path / "run2",
            0,
        )
