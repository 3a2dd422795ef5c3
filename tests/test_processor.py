"""MMGenProcessor: prompts, pictures and chats -> ids in the layout training used, ids -> Doc, and the
chat template saved with the bundle."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from bundlekit import RES


def test_the_chat_template_is_saved_with_the_bundle_not_inferred_later(bundle_dir, tmp_path):
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import ChatTemplate, MMGenProcessor

    assert json.loads((bundle_dir / "processor_config.json").read_text())["chat_template"]["layout"] == "none"
    sft = load_bundle(bundle_dir)
    sft.meta.update(stage="sft", config={"data": {"chat": "auto"}})
    sft.chat_template = None  # saved from the run's facts: an sft run builds every document as chat turns
    sft.save(tmp_path / "sft")
    loaded = load_bundle(tmp_path / "sft")
    assert loaded.chat_template == ChatTemplate("all")
    loaded.meta["stage"] = "pretrain"  # the saved template wins over whatever the facts say later
    proc = MMGenProcessor.from_bundle(loaded)
    assert (
        proc.trained_in_chat()
        and proc.prompt_ids("a red circle", image=False)[1:3]
        != MMGenProcessor.from_bundle(load_bundle(bundle_dir)).prompt_ids("a red circle", image=False)[1:3]
    )
    # a bundle from before the file existed: its training facts, once, on load
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "sft", old)
    (old / "processor_config.json").unlink()
    assert load_bundle(old).chat_template is None
    assert MMGenProcessor.from_bundle(load_bundle(old)).chat_template == ChatTemplate("all")  # its mmgen.json: sft
    (old / "processor_config.json").write_text('{"chat_template": {"layout": "sometimes"}}')
    from mmgen.errors import MMGenError

    with pytest.raises(MMGenError, match="processor_config.json"):
        load_bundle(old)


def test_prompt_and_chat_ids_are_the_prefixes_training_writes(bundle_dir):
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import ChatTemplate, MMGenProcessor
    from mmgen.processing.sequence import encode_chat_prompt, encode_prompt

    bundle = load_bundle(bundle_dir)
    proc = MMGenProcessor.from_bundle(bundle)
    tok = bundle.text_tokenizer
    assert proc.prompt_ids("a red circle", image=True) == encode_prompt("a red circle", tok, bundle.vocab)
    chat = MMGenProcessor(tok, bundle.vocab, bundle.image_tokenizer, chat_template=ChatTemplate("all"))
    assert chat.chat_ids([{"role": "user", "content": "a red circle"}]) == encode_chat_prompt("a red circle", tok)
    from mmgen.world import random_scene, render

    pic = render(random_scene(random.Random(0), "val"), *RES)
    block = chat.image_ids([pic])[0]
    assert chat.chat_ids([{"role": "user", "content": [pic, "what colour?"]}]) == encode_chat_prompt(
        "what colour?", tok, image_ids=block
    )
    two = chat.chat_ids(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and?"},
        ]
    )
    assert two.count(tok.eos_token_id) == 1 and two[: len(encode_chat_prompt("hi", tok))] == encode_chat_prompt(
        "hi", tok
    )


def test_the_templates_tags_are_the_ones_every_prompt_uses(bundle_dir, tmp_path):
    """Tags saved in processor_config.json act: prompts, pictures, chats and build-up documents are laid
    out with them, as build_chat_sequence trains with them."""
    from mmgen.data.code_shards import CodedDoc
    from mmgen.eval.understanding import buildup_prompt_ids
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import ChatTemplate, MMGenProcessor
    from mmgen.processing.sequence import build_chat_sequence, encode_text
    from mmgen.world import make_doc

    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    ChatTemplate("all", "Q:", "A:").save(d)
    bundle = load_bundle(d)
    proc = MMGenProcessor.from_bundle(bundle)
    tok = bundle.text_tokenizer
    q, a = encode_text("Q:", tok), encode_text("A:", tok)
    assert encode_text("User:", tok) != q
    prompt = proc.prompt_ids("a red circle", image=False)
    assert prompt == [tok.bos_token_id, *q, *encode_text("a red circle", tok), *a]
    assert proc.chat_ids([{"role": "user", "content": "a red circle"}]) == prompt
    block = [bundle.vocab["<image>"]]  # any ids: the picture sits between the user tag and the text
    assert proc.picture_prompt_ids("what colour?", block, question=True) == [
        tok.bos_token_id,
        *q,
        *block,
        *encode_text("what colour?", tok),
        *a,
    ]
    doc = make_doc("buildup", random.Random(2), split="val", size=RES[0])
    cut = [i for i, it in enumerate(doc.items) if it.kind == "image"][1]
    codes = {
        i: np.asarray(bundle.image_tokenizer.encode([it.to_pil()]))[0]
        for i, it in enumerate(doc.items)
        if it.kind == "image"
    }
    built = build_chat_sequence(CodedDoc(doc, codes), tok, bundle.vocab, user_tag="Q:", assistant_tag="A:")
    prompt = buildup_prompt_ids(bundle, doc.items[:cut])
    assert built["input_ids"].tolist()[: len(prompt)] == prompt and prompt[1 : 1 + len(q)] == q


def test_decode_turns_generated_ids_back_into_a_doc(bundle_dir):
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import MMGenProcessor
    from mmgen.processing.sequence import encode_text

    bundle = load_bundle(bundle_dir)
    proc = MMGenProcessor.from_bundle(bundle)
    codes = np.arange(16).reshape(4, 4) % 16
    ids = (
        encode_text("here it is:", bundle.text_tokenizer)
        + bundle.vocab.image_block(codes)
        + encode_text("done", bundle.text_tokenizer)
    )
    doc = proc.decode(ids, meta={"k": 1})
    assert [it.kind for it in doc.items] == ["text", "image", "text"]
    assert doc.items[0].text == "here it is:" and doc.items[2].text == "done" and doc.meta == {"k": 1}
    img = doc.items[1]
    assert img.meta["codes_shape"] == [4, 4] and img.to_pil().size == RES
    # the image tokenizer reads the decoded picture back to the very same codes
    assert proc.image_ids([img.to_pil()])[0] == bundle.vocab.image_block(codes)
