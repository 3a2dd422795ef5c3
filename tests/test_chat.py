"""The Gradio chat: launched in-process on 127.0.0.1, answered through gradio_client."""

from __future__ import annotations

import os

import pytest

from bundlekit import RES, free_port  # RES: the tiny bundle's image size


def test_chat_app_answers_with_text_and_image_through_gradio_client(bundle_dir):
    from gradio_client import Client
    from PIL import Image as PILImage

    from mmgen.inference.chat_app import build_app, launch

    app = build_app(bundle_dir)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert app.share_url is None
        client = Client(url, verbose=False)
        assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        prompt = "a large red circle at the top left, on a black background."
        history = client.predict(prompt, [], "t2i", 1.0, 0, 5, 3.0, 48, api_name="/chat")
        # a picture goes with a question: the model reads it first and answers in text
        from gradio_client import handle_file

        from mmgen.world import random_scene, render

        pic = bundle_dir / "question.png"
        render(random_scene(__import__("random").Random(0), "val"), *RES).save(pic)
        asked = client.predict(
            "what colour is the background?", [], "text", 0.0, 0, 0, 1.0, 16, handle_file(str(pic)), api_name="/chat"
        )
    finally:
        app.close()
    assert [m["role"] for m in asked] == ["user", "assistant"]
    assert [p["type"] for p in asked[0]["content"]] == ["file", "text"]  # the picture shown, then the question
    assert all(p["type"] == "text" for p in asked[1]["content"])
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"][0]["text"] == prompt
    parts = history[1]["content"]
    files = [p["file"] for p in parts if p["type"] == "file"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert parts[0]["type"] == "file"  # t2i: the image comes first
    assert files and texts and all(t.strip() for t in texts)
    path = files[0] if isinstance(files[0], str) else files[0]["path"]
    with PILImage.open(path) as im:
        assert im.format == "PNG" and im.size == RES


def test_chat_engine_streams_and_refuses_share_links(bundle_dir):
    from mmgen.errors import MMGenError
    from mmgen.inference.chat_app import serve
    from mmgen.inference.chat_engine import ChatEngine
    from mmgen.models.bundle import load_bundle

    engine = ChatEngine(load_bundle(bundle_dir))
    yields = list(
        engine.answer(
            "a small blue square", [], mode="t2i", seed=1, cfg_scale=2.0, max_new_tokens=8, stream_every_s=0.0
        )
    )
    assert len(yields) >= 2  # the answer streams while it grows
    final = yields[-1]
    assert final[0] == {"role": "user", "content": "a small blue square"}
    # max_new_tokens below one block is raised to fit a whole image in t2i mode.
    assert final[1]["content"][0]["mime_type"] == "image/png"
    with pytest.raises(MMGenError, match="type a message"):  # an empty message is a one-line message
        list(engine.answer("   ", [], mode="t2i"))
    with pytest.raises(MMGenError, match="share links"):
        serve(bundle_dir, share=True)


def test_a_picture_reaches_the_prompt_in_the_layout_the_bundle_learnt(bundle_dir, monkeypatch):
    import random

    import mmgen.inference.generate as gen
    from mmgen.inference.chat_engine import ChatEngine
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.processor import ChatTemplate
    from mmgen.world import random_scene, render

    bundle = load_bundle(bundle_dir)
    picture = render(random_scene(random.Random(1), "val"), *RES)
    block = gen.image_ids(bundle, [picture])[0]
    seen = []
    import mmgen.inference.pipeline as pipeline

    real = pipeline.decode_loop

    def spy(model, vocab, rows, **kw):
        seen.append([list(r) for r in rows])
        return real(model, vocab, rows, **kw)

    monkeypatch.setattr(pipeline, "decode_loop", spy)
    engine = ChatEngine(bundle)
    for stage, chat, mode in (("pretrain", "none", "text"), ("sft", "auto", "text"), ("pretrain", "roles", "t2i")):
        bundle.meta.update(stage=stage, config={"data": {"chat": chat}})
        bundle.chat_template = ChatTemplate.from_training(bundle.meta)  # what a run of this stage saves
        final = list(engine.answer("is there a circle?", [], mode=mode, max_new_tokens=4, picture=picture))[-1]
        assert final[0]["content"][0]["mime_type"] == "image/png" and final[0]["content"][1] == "is there a circle?"
        want = gen.picture_prompt_ids(bundle, "is there a circle?", block, question=mode != "t2i")
        assert seen[-1][0][: len(want)] == want
        right_after_bos = want[1 : 1 + len(block)] == block  # the chat template puts "User:" before the picture
        assert right_after_bos != gen.trained_in_chat(bundle, conversation=mode != "t2i"), (stage, chat, mode)
    assert len(seen) == 3
