"""The chat speaks: tts answers carry a WAV part the Chatbot plays, and only speaking bundles offer tts."""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from bundlekit import bias_head, free_port, make_tiny_bundle
from trainkit import AUDIO_HOP as HOP
from trainkit import AUDIO_SR as SR

IMAGE_ONLY_MODES = [("auto: the model decides", "auto"), ("text to image", "t2i"), ("text only", "text")]


def _wav(path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with open(path, "rb") as f:
        return sf.read(io.BytesIO(f.read()))


def _audio_parts(message: dict) -> list[dict]:
    return [p for p in message["content"] if isinstance(p, dict) and p.get("mime_type") == "audio/wav"]


def test_tts_answer_is_a_playable_wav_of_at_least_half_a_second(speech, tmp_path):
    from mmgen.inference.chat_engine import ChatEngine

    bias_head(speech, {speech.vocab["</audio>"]: -30.0})  # talk until the budget closes the block
    engine = ChatEngine(speech, tmp_path)
    final = list(engine.answer("a red sound.", [], mode="tts", max_new_tokens=4, stream_every_s=0.0))[-1]
    assert final[0] == {"role": "user", "content": "a red sound."}
    parts = final[1]["content"]
    audio = _audio_parts(final[1])
    assert parts[0] is audio[0] and len(audio) == 1  # tts: the speech comes first
    assert audio[0]["path"].startswith(str(tmp_path)) and audio[0]["path"].endswith(".wav")
    x, sr = _wav(audio[0]["path"])
    # max_new_tokens 4 was raised to hold half a second: 25 frames of the 50 frames/s codec.
    assert sr == SR and len(x) == 25 * HOP and np.abs(x).max() > 0
    assert audio[0]["alt_text"] == "generated speech, 0.50 s"
    # What the browser receives: a file message typed audio/wav, which the Chatbot renders as a player.
    import gradio as gr

    sent = gr.Chatbot().postprocess(final).root[1].content[0]
    assert sent.type == "file" and sent.file.mime_type == "audio/wav"


def test_auto_mode_may_speak_only_with_a_codec(speech, tmp_path):
    from mmgen.inference.chat_engine import ChatEngine

    bias_head(speech, {speech.vocab["<audio>"]: 20.0, speech.vocab["<image>"]: -30.0})
    final = list(ChatEngine(speech, tmp_path).answer("a red sound.", [], mode="auto", max_new_tokens=12))[-1]
    assert _audio_parts(final[1])
    mute = dataclasses.replace(speech, audio_tokenizer=None)  # same vocab, no codec: audio stays off
    final = list(ChatEngine(mute, tmp_path).answer("a red sound.", [], mode="auto", max_new_tokens=12))[-1]
    assert not _audio_parts(final[1])


def test_doc_to_message_keeps_document_order_and_writes_each_block_once(tmp_path):
    from mmgen.data.doc import Audio, Doc, Image, Text
    from mmgen.data.media import encode_wav
    from mmgen.inference.chat_engine import doc_to_message

    png = Image(data=b"\x89PNG fake", format="png", meta={"codes_shape": [2, 2]})
    wav = Audio(data=encode_wav(np.zeros(160, np.float32), 16000), format="wav")
    msg = doc_to_message(Doc(items=[Text("hi"), wav, png, Text("bye"), wav]), tmp_path)
    kinds = [p if isinstance(p, str) else p["mime_type"] for p in msg["content"]]
    assert kinds == ["hi", "audio/wav", "image/png", "bye", "audio/wav"]
    assert msg["content"][1]["path"] == msg["content"][4]["path"]  # named by content hash
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png", ".wav"]


def _component(app, cls, label_start: str = ""):
    return next(c for c in app.blocks.values() if isinstance(c, cls) and (c.label or "").startswith(label_start))


def test_mode_list_offers_tts_only_when_the_bundle_can_speak(speech, tmp_path):
    import gradio as gr

    from mmgen.inference.chat_app import build_app
    from mmgen.inference.chat_engine import mode_choices

    assert [v for _, v in mode_choices(speech)] == ["auto", "t2i", "tts", "text"]
    assert mode_choices(dataclasses.replace(speech, audio_tokenizer=None)) == IMAGE_ONLY_MODES
    speaking = build_app("speech", bundle=speech)
    assert ("text to speech", "tts") in _component(speaking, gr.Radio).choices
    assert _component(speaking, gr.Slider, "CFG").label == "CFG scale (image and audio tokens; 1 = off)"
    # An image-only bundle's app is what it was before speech.
    plain = build_app("plain", bundle=make_tiny_bundle(tmp_path))
    radio, cfg = _component(plain, gr.Radio), _component(plain, gr.Slider, "CFG")
    assert radio.choices == IMAGE_ONLY_MODES and radio.value == "t2i"
    # guidance starts off (BENCHMARKS: CFG 3 left 4% of the quick start model's images parseable)
    assert cfg.label == "CFG scale (image tokens; 1 = off)" and cfg.interactive and cfg.value == 1.0
    assert "speech" not in next(c for c in plain.blocks.values() if isinstance(c, gr.Markdown)).value


def test_chat_app_speaks_through_gradio_client(speech_dir):
    from gradio_client import Client

    from mmgen.inference.chat_app import build_app, launch

    app = build_app(speech_dir)
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        history = Client(url, verbose=False).predict("a red sound.", [], "tts", 1.0, 0, 3, 2.0, 16, api_name="/chat")
    finally:
        app.close()
    parts = history[1]["content"]
    assert parts[0]["type"] == "file"  # the client hands back the downloaded file's local path
    f = parts[0]["file"]
    path = f if isinstance(f, str) else f["path"]
    assert path.endswith(".wav")
    x, sr = _wav(path)
    assert sr == SR and len(x) > 0 and len(x) % HOP == 0
