"""QA and interleaved evaluation: prompts are exactly the prefixes training sequences start with, and
the evaluators score real generations (a random tiny model), counting every sample."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmgen.processing.processor import ChatTemplate

from bundlekit import make_tiny_bundle


def _coded(bundle, doc):
    from mmgen.data.code_shards import CodedDoc

    codes = {}
    for i, it in enumerate(doc.items):
        if it.kind == "image":
            codes[i] = np.asarray(bundle.image_tokenizer.encode([it.to_pil()]))[0]
    return CodedDoc(doc, codes)


def test_buildup_prompt_is_the_training_prefix(tmp_path):
    from mmgen.eval.understanding import buildup_cases, buildup_prompt_ids
    from mmgen.processing.sequence import build_sequence

    bundle = make_tiny_bundle(tmp_path / "b")
    for case in buildup_cases(4, "val", seed=1, res=(32, 32)):
        from mmgen.data.doc import Doc

        prompt = buildup_prompt_ids(bundle, case["items"])
        seq = build_sequence(_coded(bundle, Doc(items=case["items"])), bundle.text_tokenizer, bundle.vocab)
        ids = seq["input_ids"].tolist()
        # The prompt is the document so far (without its </s>) followed by <image>.
        assert prompt[:-1] == ids[: len(prompt) - 1] and prompt[-1] == bundle.vocab["<image>"]
        assert case["instruction"] and case["truth"]["objects"] is not None


def test_qa_prompt_is_the_training_prefix_in_both_layouts(tmp_path):
    from mmgen.data.doc import Doc, Text
    from mmgen.eval.understanding import qa_prompt_ids
    from mmgen.inference.generate import image_ids
    from mmgen.processing.sequence import build_chat_sequence, build_sequence
    from mmgen.world import random_scene, render
    from mmgen.world.text import qa_pairs

    bundle = make_tiny_bundle(tmp_path / "b")
    rng = random.Random(0)
    scene = random_scene(rng, "val")
    q, a, _ = qa_pairs(scene, rng, n=1)[0]
    from mmgen.data.doc import Image

    doc = Doc(items=[Image.from_pil(render(scene, 32, 32)), Text(q, {"role": "question"}), Text(a, {"role": "answer"})])
    block = image_ids(bundle, [render(scene, 32, 32)])[0]
    # a pretraining with data.chat=roles built its QA documents as conversations: ask it in that layout
    # (an sft run builds every document in the chat template unless data.chat says otherwise)
    for stage, chat, build in (
        ("pretrain", "none", build_sequence),
        ("sft", "auto", build_chat_sequence),
        ("sft", "roles", build_chat_sequence),
        ("sft", "none", build_sequence),
        ("pretrain", "roles", build_chat_sequence),
    ):
        bundle.meta.update(stage=stage, config={"data": {"chat": chat}})
        bundle.chat_template = ChatTemplate.from_training(bundle.meta)  # what a run of this stage saves
        prompt = qa_prompt_ids(bundle, block, q)
        ids = build(_coded(bundle, doc), bundle.text_tokenizer, bundle.vocab)["input_ids"].tolist()
        assert ids[: len(prompt)] == prompt, stage
        answer = bundle.text_tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
        assert answer.split()[0] == a  # the answer is what follows the prompt


def test_t2i_and_buildup_prompts_are_the_training_prefix_in_both_layouts(tmp_path):
    """Caption -> image and build-up documents have no roles: a bundle learnt them in the chat template
    only when every document was built that way (an sft run's default), else in pretraining's layout."""
    from mmgen.data.doc import Doc, Image, Text
    from mmgen.eval.understanding import buildup_prompt_ids
    from mmgen.inference.generate import prompt_ids
    from mmgen.processing.sequence import build_chat_sequence, build_sequence
    from mmgen.world import make_doc, random_scene, render

    bundle = make_tiny_bundle(tmp_path / "b")
    rng = random.Random(1)
    scene = random_scene(rng, "val")
    caption = Doc(items=[Text("a large red circle at the top left"), Image.from_pil(render(scene, 32, 32))])
    buildup = make_doc("buildup", random.Random(2), split="val", size=32)
    cut = [i for i, it in enumerate(buildup.items) if it.kind == "image"][1]  # draw the second picture
    for stage, chat, build in (
        ("pretrain", "roles", build_sequence),
        ("sft", "auto", build_chat_sequence),
        ("sft", "roles", build_sequence),
        ("sft", "all", build_chat_sequence),
    ):
        bundle.meta.update(stage=stage, config={"data": {"chat": chat}})
        bundle.chat_template = ChatTemplate.from_training(bundle.meta)  # what a run of this stage saves
        prompt = prompt_ids(bundle, caption.items[0].text, image=True)
        ids = build(_coded(bundle, caption), bundle.text_tokenizer, bundle.vocab)["input_ids"].tolist()
        assert ids[: len(prompt)] == prompt, (stage, chat)
        prompt = buildup_prompt_ids(bundle, buildup.items[:cut])
        ids = build(_coded(bundle, buildup), bundle.text_tokenizer, bundle.vocab)["input_ids"].tolist()
        assert ids[: len(prompt)] == prompt, (stage, chat)
    assert prompt_ids(bundle, "", image=True) == [bundle.text_tokenizer.bos_token_id, bundle.vocab["<image>"]]


def test_evaluators_score_every_sample(tmp_path):
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa, normalize_answer

    bundle = make_tiny_bundle(tmp_path / "b")
    qa = evaluate_qa(bundle, n=3, splits=("val",))
    assert qa["splits"]["val"]["n"] == 3 and len(qa["samples"]) == 3
    assert all(s["correct"] == (normalize_answer(s["answer"]) == s["truth"]) for s in qa["samples"])
    inter = evaluate_interleaved(bundle, n=2, seed=0)
    assert len(inter["samples"]) == 2
    assert inter["splits"]["val"]["accuracy"] == pytest.approx(sum(s["exact"] for s in inter["samples"]) / 2)
    assert all(s["image"].size == (32, 32) for s in inter["samples"])
    assert normalize_answer(" Red.") == "red" and normalize_answer("") == ""
    # two-word positions are answers too: "bottom" alone is not "bottom right", and vice versa
    assert normalize_answer("Bottom right.</s> Is") == "bottom right"
    assert normalize_answer("bottom is") == "bottom" and normalize_answer("center right") == "center"
