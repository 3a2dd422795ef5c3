"""The chat's speed panel (declared controls -> GenerationOptions) and the statistics under each answer."""

from __future__ import annotations

import re

import pytest

from mmgen.errors import MMGenError

from bundlekit import free_port, make_tiny_bundle

PROMPT = "a large red circle at the top left, on a black background."


def test_every_speed_control_names_a_generation_option():
    from mmgen.inference.chat_speed import SPEED_CONTROLS, SpeedControl, check_controls, speed_options

    check_controls(SPEED_CONTROLS)
    assert {c.field for c in SPEED_CONTROLS} >= {"prune_method", "prune_ratio", "cache", "detok_steps"}
    with pytest.raises(MMGenError, match="names 'prune_rate', which is not a generation option"):
        check_controls([SpeedControl("prune_rate", "keep ratio", "slider", (0.1, 1, 0.1))])
    with pytest.raises(MMGenError, match="kind 'knob'"):
        check_controls([SpeedControl("detok_steps", "steps", "knob")])
    budget = [
        SpeedControl("max_audio_frames", "frames (0 = no cap)", "number", none_at=0),
        SpeedControl("detok_steps", "steps", "slider", (1, 50, 1)),
    ]
    assert speed_options([0, 4.0], budget) == {"max_audio_frames": None, "detok_steps": 4.0}
    # a value the caller left out keeps its default
    assert speed_options([12, None], budget) == {"max_audio_frames": 12}


def _component(app, cls, elem_id: str):
    return next(c for c in app.blocks.values() if isinstance(c, cls) and c.elem_id == elem_id)


def test_the_panels_options_reach_the_pipeline_and_each_answer_shows_its_cost(detok_bundle, monkeypatch):
    import gradio as gr
    from gradio_client import Client

    from mmgen.inference import pipeline
    from mmgen.inference.chat_app import build_app, launch
    from mmgen.inference.chat_speed import SPEED_CONTROLS

    seen = []
    real = pipeline.MMGenPipeline.stream

    def spy(self, prompt, options=None, picture=None, **kw):
        doc = None
        for doc in real(self, prompt, options, picture=picture, **kw):
            yield doc
        seen.append((options, doc))

    monkeypatch.setattr(pipeline.MMGenPipeline, "stream", spy)
    app = build_app(detok_bundle)
    panel = next(c for c in app.blocks.values() if isinstance(c, gr.Accordion) and c.label == "speed")
    assert panel.open is False  # collapsed until asked for
    steps = _component(app, gr.Slider, "speed-detok_steps")
    assert steps.interactive and steps.value == 4 and steps.label == "detokenizer steps"
    assert _component(app, gr.Dropdown, "speed-cache").value == "dynamic"
    layer = _component(app, gr.Number, "speed-prune_layer")
    assert layer.maximum == 1 and layer.value == 1  # the tiny LM has 2 layers: K is 1 at most
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    want = {
        "prune_method": "merge",
        "prune_ratio": 0.5,
        "prune_layer": 1,
        "cache": "fp8",
        "kv_method": "streaming",
        "kv_budget": 64,
        "spec_decoding": True,
        "spec_window": 8,
        "detok_steps": 3,
        "detok_scheduler": "dpm",
    }
    try:
        # message, history, mode, temperature, top-k, seed, CFG, max new tokens, picture, then the panel in its order
        history = Client(url, verbose=False).predict(
            PROMPT, [], "t2i", 1.0, 0, 5, 1.0, 48, None, *[want[c.field] for c in SPEED_CONTROLS], api_name="/chat"
        )
    finally:
        app.close()
    options, doc = seen[-1]
    assert {k: getattr(options, k) for k in want} == want
    texts = [p["text"] for p in history[1]["content"] if p["type"] == "text"]
    assert history[1]["content"][0]["type"] == "file"
    assert history[1]["content"][1] == {
        "type": "text",
        "text": "*drawn by the diffusion detokenizer 1x, dpm 3 steps, CFG off*",
    }
    m = doc.meta
    stats = (
        f"*{m['new_tokens']} tokens · {m['forward_passes']} forward passes · {m['tokens_per_s']:.1f} tokens/s · "
        f"KV cache {m['cache']['bytes'] / 1000:.1f} kB (fp8) · "
        f"{m['spec']['tokens'] / m['spec']['passes']:.2f} picture tokens per pass*"
    )
    assert texts[-1] == stats and m["forward_passes"] > 0 and m["cache"]["kind"] == "fp8"


def test_engine_answers_with_panel_options_and_refuses_bad_ones(detok_bundle, tmp_path):
    from mmgen.inference.chat_app import build_app
    from mmgen.inference.chat_engine import ChatEngine
    from mmgen.models.bundle import load_bundle

    engine = ChatEngine(load_bundle(detok_bundle))
    final = list(engine.answer(PROMPT, [], mode="t2i", max_new_tokens=8, options={"detok_steps": 2.0}))[-1]
    parts = final[1]["content"]
    assert parts[1] == "*drawn by the diffusion detokenizer 1x, ddim 2 steps, CFG off*"
    assert re.fullmatch(
        r"\*\d+ tokens · \d+ forward passes · [\d.]+ tokens/s · KV cache [\d.]+ kB \(dynamic\)\*", parts[-1]
    )
    with pytest.raises(MMGenError, match="detok_steps: expected an integer, got 2.5"):
        list(engine.answer(PROMPT, [], mode="t2i", options={"detok_steps": 2.5}))
    with pytest.raises(MMGenError, match="detok_steps must be >= 1"):
        list(engine.answer(PROMPT, [], mode="t2i", options={"detok_steps": 0}))
    # the chat's --detokenizer: none draws with the tokenizer, and the panel's detokenizer controls grey out
    plain = ChatEngine(load_bundle(detok_bundle), detokenizer="none")
    final = list(plain.answer(PROMPT, [], mode="t2i", max_new_tokens=8))[-1]
    assert final[1]["content"][1] == "*drawn by the image tokenizer's decoder (test_palette)*"
    import gradio as gr

    app = build_app("plain", bundle=make_tiny_bundle(tmp_path / "plain"))
    steps = _component(app, gr.Slider, "speed-detok_steps")
    assert not steps.interactive and steps.label.endswith("(this checkpoint has no detokenizer)")
