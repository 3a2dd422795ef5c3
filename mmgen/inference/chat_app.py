"""The interleaved chat: a Gradio app whose answers mix text, generated images and generated speech.

Each answer is one assistant message whose parts are, in order, the text spans, the images (PNG, each
with a line saying which decoder drew it: the image tokenizer's, or the bundle's diffusion detokenizer)
and the speech (WAV, played by the chat's audio player) of the generated Doc, streamed while the model
writes; a finished answer ends with what it cost (forward passes, tokens/s, KV-cache bytes). A collapsed
"speed" panel sets the generation pipeline's speed options (:mod:`mmgen.inference.chat_speed`). The mode ``tts`` is offered only for bundles that can decode speech (an audio codec that
matches the vocab's audio codes). The same function is the named API endpoint ``/chat``,
so ``gradio_client.Client(url).predict(prompt, [], "t2i", 0.2, 0, 0, 1.0, 512, api_name="/chat")``
returns the conversation with the answer's images as local files. A picture can go with the message
(the last argument, ``gradio_client.handle_file(path)``): the model sees it first, and answers a question
about it (mode ``text``) or draws the next picture (mode ``t2i``).

Nothing phones home: Gradio's analytics are off (environment and Blocks), fonts are the system's (no
Google Fonts), and public share links are refused.

Several people share one server fairly: the queue runs ``concurrency`` answers at once (Gradio's
``default_concurrency_limit``), and a request is bounded before any work starts -- a prompt longer than
``max_prompt_chars`` or than the model's context is refused with one line, and ``max_new_tokens`` is
cut to what the context leaves. Errors the user can fix arrive as ``gr.Error`` messages (an upload that is not
an image included: the chat opens uploads itself); anything else is shown without its details
(``show_error=False``), so no server path reaches a browser. Uploads are capped at ``MAX_UPLOAD``. Generated
media and uploads are deleted after an hour (``delete_cache``) and the chat's own media folder when the
app is garbage collected or the process exits.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.models.bundle import can_draw

# Captions in ShapesWorld's grammar (what the tiny preset is trained on), the last one with a
# held-out colour-shape pair (blue circle) that never appears in training.
EXAMPLES = [
    ["A large red circle at the top left, on a black background.", "t2i"],
    ["A white background with a small green triangle at the bottom right.", "t2i"],
    ["There is a large orange cross on the left and a small yellow circle at the top right, on a navy background.", "t2i"],
    ["A large blue circle in the center, on a white background.", "t2i"],
]

MODE_CHOICES = [("auto: the model decides", "auto"), ("text to image", "t2i"), ("text to speech", "tts"),
                ("text only", "text")]
TTS_MIN_SECONDS = 0.5  # a tts answer always has room for at least this much speech
# A ShapesWorld caption is ~100 characters; this bounds the tokenizer's work on a pasted novel long
# before the context check (tokens) refuses it.
MAX_PROMPT_CHARS = 2000
CONCURRENCY = 2  # answers generated at once; the rest wait in the queue
QUEUE_SIZE = 32  # waiting requests beyond this are turned away at once instead of waiting minutes
MAX_UPLOAD = "10mb"  # Gradio's max_file_size: a ShapesWorld picture is a few kB
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete Gradio's cached files older than an hour


def _gradio():
    # Analytics must be off before gradio is imported: it reads the flag at import and at launch.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


def can_speak(bundle) -> bool:
    """Whether generation accepts tts / allow_audio for ``bundle`` (generate.py's own check)."""
    from mmgen.inference.generate import check_audio

    try:
        check_audio(bundle, "tts")
    except MMGenError:
        return False
    return True


def mode_choices(bundle) -> list[tuple[str, str]]:
    """The modes the bundle can answer in: t2i needs images, tts speech, auto at least one of them."""
    images, speech = can_draw(bundle), can_speak(bundle)
    ok = {"auto": images or speech, "t2i": images, "tts": speech, "text": True}
    return [c for c in MODE_CHOICES if ok[c[1]]]


def _media_file(data: bytes, ext: str, media_dir: Path) -> str:
    # Named by content: a streamed answer re-renders the same finished block on every update.
    p = media_dir / f"{hashlib.sha1(data).hexdigest()[:16]}.{ext}"
    if not p.exists():
        p.write_bytes(data)
    return str(p)


def doc_to_message(doc, image_dir: Path) -> dict | None:
    """The assistant message for a generated Doc: text spans, image and speech files, in document order;
    under each generated picture the decoder that drew it, and under a finished answer its statistics."""
    from mmgen.data.doc import Audio, Image
    from mmgen.inference.chat_speed import answer_stats, picture_caption

    parts: list = []
    for it in doc.items:
        if isinstance(it, Image):
            h, w = it.meta.get("codes_shape", ["?", "?"])
            parts.append({"path": _media_file(it.load(), "png", image_dir), "mime_type": "image/png",
                          "alt_text": f"generated image, {h}x{w} codes"})
            caption = picture_caption(it.meta)
            if caption:
                parts.append(caption)
        elif isinstance(it, Audio):
            # Gradio's Chatbot picks its player from the file's mime type (taken from the .wav suffix).
            parts.append({"path": _media_file(it.load(), "wav", image_dir), "mime_type": "audio/wav",
                          "alt_text": f"generated speech, {it.duration:.2f} s"})
        else:
            parts.append(it.text)
    stats = answer_stats(doc.meta) if parts else None
    if stats:
        parts.append(stats)
    return {"role": "assistant", "content": parts} if parts else None


class ChatEngine:
    """Holds the loaded bundle and answers one prompt at a time (Gradio's queue serialises calls)."""

    def __init__(self, bundle, image_dir: str | Path | None = None, max_prompt_chars: int = MAX_PROMPT_CHARS,
                 detokenizer: str | None = None):
        import shutil
        import weakref

        from mmgen.inference.detokenize import check_detok_options
        from mmgen.inference.pipeline import GenerationOptions

        self.bundle = bundle
        # The options every answer starts from; the panel and the sliders set the rest per answer.
        self.defaults = GenerationOptions(detok_path=detokenizer or "auto")
        check_detok_options(self.defaults, bundle)  # a detokenizer for another tokenizer fails at start-up
        if image_dir is None:
            # Under the system temp dir, where Gradio serves files from without an allowed_paths entry;
            # removed with the engine (or at exit), since Gradio keeps its own copies of what it served.
            image_dir = tempfile.mkdtemp(prefix="mmgen_chat_")
            weakref.finalize(self, shutil.rmtree, image_dir, True)
        self.image_dir = Path(image_dir)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.speaks = can_speak(bundle)
        self.max_prompt_chars = int(max_prompt_chars)

    def check_message(self, message: str | None) -> str:
        """The stripped message, or a one-line MMGenError for an empty or oversized one."""
        message = (message or "").strip()
        if not message:
            raise MMGenError("type a message first (a picture goes with a question or an instruction)")
        if len(message) > self.max_prompt_chars:
            raise MMGenError(f"the message is {len(message)} characters; this chat takes at most "
                             f"{self.max_prompt_chars}")
        return message

    def draws_with_detokenizer(self) -> bool:
        """Whether this chat's pictures come from a diffusion detokenizer (the panel's detok_* controls act)."""
        from mmgen.inference.detokenize import image_decoder

        return can_draw(self.bundle) and image_decoder(self.bundle, self.defaults) is not None

    def detokenizer_scales(self) -> list[int]:
        """The output scales the chat's detokenizer draws at (1: the tokenizer's resolution, 2: twice it)."""
        from mmgen.inference.detokenize import detokenizer_for

        detoks = detokenizer_for(self.bundle, self.defaults)
        return detoks.scales if detoks is not None else []

    def answer(self, message: str, history: list | None, mode: str = "auto", temperature: float | None = None,
               top_k: int | None = None, seed: int = 0, cfg_scale: float | None = None, max_new_tokens: int = 512,
               stream_every_s: float = 0.2, picture=None, options: dict | None = None):
        """Yield the conversation (messages format) while the answer grows; the last yield is final.
        ``picture`` (PIL) is shown to the model before the message: a question about it in the text
        modes, an instruction for the next picture in t2i. Sampling options left None are the
        bundle's; ``options`` sets any other GenerationOptions field (the speed panel's). An empty or
        oversized message, one longer than the model's context, or an invalid option is a one-line
        MMGenError before any generation."""
        from dataclasses import asdict

        from mmgen.inference.generate import default_image_sizes
        from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

        history = list(history or [])
        message = self.check_message(message)
        if picture is not None:
            import io

            buf = io.BytesIO()
            picture.convert("RGB").save(buf, format="PNG")
            shown = {"path": _media_file(buf.getvalue(), "png", self.image_dir), "mime_type": "image/png",
                     "alt_text": "the picture shown to the model"}
            history.append({"role": "user", "content": [shown, message]})
        else:
            history.append({"role": "user", "content": message})
        max_new_tokens = int(max_new_tokens)
        if mode == "t2i" and can_draw(self.bundle):
            # A t2i answer must hold at least one whole image block.
            need = max(self.bundle.vocab.image_block_len(h, w) for h, w in default_image_sizes(self.bundle))
            max_new_tokens = max(max_new_tokens, need)
        if mode == "tts" and self.speaks:
            # A tts answer must hold a short utterance, not just one frame (the budget closes the block).
            codec = self.bundle.audio_tokenizer
            frames = max(1, round(TTS_MIN_SECONDS * codec.frame_rate))
            max_new_tokens = max(max_new_tokens, self.bundle.vocab.audio_block_len(frames))
        o = GenerationOptions.build(**{**asdict(self.defaults), **(options or {}), "mode": mode,
                                       "max_new_tokens": max_new_tokens, "temperature": _num(temperature, float),
                                       "top_k": _num(top_k, int), "seed": int(seed), "cfg_scale": _num(cfg_scale, float),
                                       "allow_audio": self.speaks and mode != "text"})
        # a pipeline per answer: its processor reads the bundle's chat template as it is now
        stream = MMGenPipeline(self.bundle).stream(message, o, picture=picture)
        last = 0.0
        n_media = 0
        doc = None
        for doc in stream:
            media = len(doc.images) + len(doc.audios)
            now = time.monotonic()
            if media != n_media or now - last >= stream_every_s:
                n_media, last = media, now
                msg = doc_to_message(doc, self.image_dir)
                yield history + ([msg] if msg else [])
        msg = doc_to_message(doc, self.image_dir) if doc is not None else None
        if msg is None:
            msg = {"role": "assistant", "content": "(the model ended its answer without writing anything)"}
        yield history + [msg]


def _num(v, cast):
    return None if v is None else cast(v)


def load_picture(path) -> object:
    """An uploaded file as an RGB PIL image, or a one-line MMGenError that names no server path.
    The chat takes the upload as a file and opens it here: ``gr.Image`` would open it in Gradio's own
    preprocessing, whose error for a file that is not an image names the server's temp file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise MMGenError("the picture could not be read as an image; upload a PNG, JPEG or WebP file") from None


def _describe(bundle, checkpoint_dir, detokenizer: dict | None = None) -> str:
    from mmgen.inference.generate import default_image_sizes

    n_params = sum(p.numel() for p in bundle.model.parameters())
    sizes = default_image_sizes(bundle)
    img = "no image tokenizer (text only)"
    if sizes:
        h, w = sizes[0]
        d = bundle.image_tokenizer.downsample
        img = f"images {w * d}x{h * d} px ({h}x{w} codes, {bundle.vocab.image_block_len(h, w)} tokens each)"
        if detokenizer:
            img += f" drawn by the diffusion detokenizer ({', '.join(f'{s}x' for s in detokenizer['scales'])})"
    if can_speak(bundle):
        codec = bundle.audio_tokenizer
        img += f" · speech at {codec.sample_rate} Hz ({codec.frame_rate:g} frames/s, {codec.n_q} tokens a frame)"
    return (f"**Checkpoint** `{checkpoint_dir}` · {n_params / 1e6:.2f}M parameters · vocab {bundle.vocab.size} · {img}.  \n"
            "Each message is answered on its own: the model sees only the current prompt.")


def build_app(checkpoint_dir: str | Path, device: str = "cpu", bundle=None, concurrency: int = CONCURRENCY,
              max_prompt_chars: int = MAX_PROMPT_CHARS, detokenizer: str | None = None):
    """The chat as a ``gr.Blocks`` (not launched). ``bundle`` skips loading when already in memory;
    ``concurrency`` answers run at once (the model is shared read-only; each answer has its own cache).
    ``detokenizer`` (a directory, or ``none``) chooses what draws the pictures instead of the bundle's own."""
    from mmgen.inference.chat_speed import SPEED_CONTROLS, build_speed_panel, speed_options
    from mmgen.inference.settings import bundle_sampling

    gr = _gradio()
    if bundle is None:
        from mmgen.models.bundle import load_bundle
        from mmgen.utils.compat import ensure_torchvision

        ensure_torchvision()
        bundle = load_bundle(checkpoint_dir, device=device)
    if int(concurrency) < 1:
        raise MMGenError(f"concurrency must be >= 1, got {concurrency}")
    engine = ChatEngine(bundle, max_prompt_chars=max_prompt_chars, detokenizer=detokenizer)
    defaults = bundle_sampling(bundle)  # the sliders start at the settings the bundle was evaluated with
    has_images = can_draw(bundle)
    # Guidance acts on every media token (processors.MediaCFGLogitsProcessor), so the label names what this bundle writes.
    guided = " and ".join(k for k, on in (("image", has_images), ("audio", engine.speaks)) if on)

    def chat(message: str, history: list, mode: str, temperature: float, top_k: int, seed: int,
             cfg_scale: float, max_new_tokens: int, picture=None, *speed):
        """Answer `message` with interleaved text, images and speech; returns the conversation. An
        optional `picture` is shown to the model first (ask about it, or have the next one drawn); the
        remaining arguments are the speed panel's options, in its order."""
        try:
            shown = load_picture(picture) if picture else None
            yield from engine.answer(message, history, mode, temperature, top_k, seed, cfg_scale, max_new_tokens,
                                     picture=shown, options=speed_options(speed))
        except MMGenError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="mmgen chat", analytics_enabled=False, fill_height=True, delete_cache=DELETE_CACHE) as app:
        drawn = engine.draws_with_detokenizer()
        detok = {"scales": engine.detokenizer_scales()} if drawn else None
        gr.Markdown("## mmgen · interleaved chat\n" + _describe(bundle, checkpoint_dir, detok))
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="conversation", height=520, elem_id="mmgen-chat", buttons=["copy", "copy_all"],
                                     feedback_options=None, group_consecutive_messages=False,
                                     placeholder="Describe a ShapesWorld scene; pick *text to image* to force a picture. "
                                                 "With a picture below: ask about it in *text only*, or describe "
                                                 "a change and pick *text to image*.")
                with gr.Row():
                    msg = gr.Textbox(placeholder="a large red circle at the top left, on a black background.",
                                     label="prompt", show_label=False, scale=5, lines=1, autofocus=True,
                                     max_length=engine.max_prompt_chars)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80)
                picture = gr.File(label="picture (optional), shown to the model before your message",
                                  file_types=["image"], type="filepath", height=120,
                                  visible=bundle.image_tokenizer is not None)
            with gr.Column(scale=1, min_width=240):
                mode = gr.Radio(mode_choices(bundle), label="mode",
                                value="t2i" if has_images else "tts" if engine.speaks else "text")
                cfg_scale = gr.Slider(1.0, 8.0, value=defaults.cfg_scale, step=0.5,
                                      label=f"CFG scale ({guided or 'image'} tokens; 1 = off)", interactive=bool(guided))
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="temperature (0 = greedy)")
                top_k = gr.Slider(0, 512, value=defaults.top_k, step=1, label="top-k (0 = off)")
                seed = gr.Number(value=0, precision=0, label="seed")
                max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="max new tokens")
                with gr.Accordion("speed", open=False, elem_id="mmgen-speed"):
                    gr.Markdown("Options of the generation pipeline; under each answer: its forward passes, "
                                "tokens/s and KV-cache bytes.")
                    depth = getattr(bundle.model.config, "num_hidden_layers", None)
                    speed = build_speed_panel(gr, engine.defaults, {"detokenizer": drawn},
                                              {"layers": depth - 1 if depth else None}, SPEED_CONTROLS)
                clear = gr.Button("Clear conversation")
        gr.Examples(examples=EXAMPLES if has_images else [[e[0], "text"] for e in EXAMPLES],
                    inputs=[msg, mode], label="ShapesWorld prompts")

        inputs = [msg, chatbot, mode, temperature, top_k, seed, cfg_scale, max_new_tokens, picture, *speed]
        event = gr.on([msg.submit, send.click], chat, inputs, chatbot, api_name="chat")
        event.then(lambda: "", None, msg, api_visibility="private")
        clear.click(lambda: [], None, chatbot, api_visibility="private")
    app.queue(default_concurrency_limit=int(concurrency), max_size=QUEUE_SIZE)
    app.mmgen_engine = engine
    return app


def _theme():
    gr = _gradio()
    # System fonts only: the default theme would fetch Google Fonts from the browser.
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


# Generated images are small (e.g. 32x32 px): show them larger, with crisp code patches.
CSS = ("#mmgen-chat .message img { width: 160px !important; height: 160px !important; max-width: none !important; "
       "max-height: none !important; object-fit: contain !important; image-rendering: pixelated; }")


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Start serving ``app``; returns its local URL (after Ctrl-C when ``block``)."""
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
               quiet=True, show_error=False, theme=_theme(), css=CSS, footer_links=["api", "settings"],
               max_file_size=MAX_UPLOAD, ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False)
    url = app.local_url
    if block:
        print(f"mmgen chat running at {url} (Ctrl-C to stop)", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return url


def serve(checkpoint_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          device: str = "cpu", block: bool = True, detokenizer: str | None = None):
    """Load a checkpoint and serve the chat at ``http://host:port``; returns the app when not blocking."""
    if share:
        raise MMGenError("public share links are disabled (they route through gradio.live); "
                         "bind --host 0.0.0.0 and use your own tunnel or reverse proxy instead")
    app = build_app(checkpoint_dir, device=device, detokenizer=detokenizer)
    url = launch(app, host=host, port=port, block=block)
    if not block:
        print(f"mmgen chat running at {url}", flush=True)
    return app
