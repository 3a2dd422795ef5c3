"""The interleaved chat: a Gradio app whose answers mix text, generated images and generated speech.

Each answer is one assistant message whose parts are, in order, the text spans, the images (PNG, each
with a line saying which decoder drew it: the image tokenizer's, or the bundle's diffusion detokenizer)
and the speech (WAV, played by the chat's audio player) of the generated Doc, streamed while the model
writes; a finished answer ends with what it cost (forward passes, tokens/s, KV-cache bytes). A collapsed
"speed" panel sets the generation pipeline's speed options (:mod:`mmgen.inference.chat_speed`). The
mode ``tts`` is offered only for bundles that can decode speech (an audio codec that matches the
vocab's audio codes). The same function is the named API endpoint ``/chat``, so
``gradio_client.Client(url).predict(prompt, [], "t2i", 0.2, 0, 0, 1.0, 512, api_name="/chat")``
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

import os
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.inference.chat_engine import MAX_PROMPT_CHARS, ChatEngine, can_speak, load_picture, mode_choices
from mmgen.models.bundle import can_draw

# Captions in ShapesWorld's grammar (what the tiny preset is trained on), the last one with a
# held-out colour-shape pair (blue circle) that never appears in training.
EXAMPLES = [
    ["A large red circle at the top left, on a black background.", "t2i"],
    ["A white background with a small green triangle at the bottom right.", "t2i"],
    [
        "There is a large orange cross on the left and a small yellow circle at the top right, on a navy background.",
        "t2i",
    ],
    ["A large blue circle in the center, on a white background.", "t2i"],
]

CONCURRENCY = 2  # answers generated at once; the rest wait in the queue
QUEUE_SIZE = 32  # waiting requests beyond this are turned away at once instead of waiting minutes
MAX_UPLOAD = "10mb"  # Gradio's max_file_size: a ShapesWorld picture is a few kB
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete Gradio's cached files older than an hour


def _gradio():
    # Analytics must be off before gradio is imported: it reads the flag at import and at launch.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


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
    return (
        f"**Checkpoint** `{checkpoint_dir}` · {n_params / 1e6:.2f}M parameters · vocab {bundle.vocab.size} · {img}.  \n"
        "Each message is answered on its own: the model sees only the current prompt."
    )


def build_app(
    checkpoint_dir: str | Path,
    device: str = "cpu",
    bundle=None,
    concurrency: int = CONCURRENCY,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    detokenizer: str | None = None,
):
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
    # Guidance acts on every media token (processors.MediaCFGLogitsProcessor), so the label names what this
    # bundle writes.
    guided = " and ".join(k for k, on in (("image", has_images), ("audio", engine.speaks)) if on)

    def chat(
        message: str,
        history: list,
        mode: str,
        temperature: float,
        top_k: int,
        seed: int,
        cfg_scale: float,
        max_new_tokens: int,
        picture=None,
        *speed,
    ):
        """Answer `message` with interleaved text, images and speech; returns the conversation. An
        optional `picture` is shown to the model first (ask about it, or have the next one drawn); the
        remaining arguments are the speed panel's options, in its order."""
        try:
            shown = load_picture(picture) if picture else None
            yield from engine.answer(
                message,
                history,
                mode,
                temperature,
                top_k,
                seed,
                cfg_scale,
                max_new_tokens,
                picture=shown,
                options=speed_options(speed),
            )
        except MMGenError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="mmgen chat", analytics_enabled=False, fill_height=True, delete_cache=DELETE_CACHE) as app:
        drawn = engine.draws_with_detokenizer()
        detok = {"scales": engine.detokenizer_scales()} if drawn else None
        gr.Markdown("## mmgen · interleaved chat\n" + _describe(bundle, checkpoint_dir, detok))
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="conversation",
                    height=520,
                    elem_id="mmgen-chat",
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                    group_consecutive_messages=False,
                    placeholder="Describe a ShapesWorld scene; pick *text to image* to force a picture. "
                    "With a picture below: ask about it in *text only*, or describe "
                    "a change and pick *text to image*.",
                )
                with gr.Row():
                    msg = gr.Textbox(
                        placeholder="a large red circle at the top left, on a black background.",
                        label="prompt",
                        show_label=False,
                        scale=5,
                        lines=1,
                        autofocus=True,
                        max_length=engine.max_prompt_chars,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80)
                picture = gr.File(
                    label="picture (optional), shown to the model before your message",
                    file_types=["image"],
                    type="filepath",
                    height=120,
                    visible=bundle.image_tokenizer is not None,
                )
            with gr.Column(scale=1, min_width=240):
                mode = gr.Radio(
                    mode_choices(bundle),
                    label="mode",
                    value="t2i" if has_images else "tts" if engine.speaks else "text",
                )
                cfg_scale = gr.Slider(
                    1.0,
                    8.0,
                    value=defaults.cfg_scale,
                    step=0.5,
                    label=f"CFG scale ({guided or 'image'} tokens; 1 = off)",
                    interactive=bool(guided),
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=defaults.temperature, step=0.05, label="temperature (0 = greedy)"
                )
                top_k = gr.Slider(0, 512, value=defaults.top_k, step=1, label="top-k (0 = off)")
                seed = gr.Number(value=0, precision=0, label="seed")
                max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="max new tokens")
                with gr.Accordion("speed", open=False, elem_id="mmgen-speed"):
                    gr.Markdown(
                        "Options of the generation pipeline; under each answer: its forward passes, "
                        "tokens/s and KV-cache bytes."
                    )
                    depth = getattr(bundle.model.config, "num_hidden_layers", None)
                    speed = build_speed_panel(
                        gr,
                        engine.defaults,
                        {"detokenizer": drawn},
                        {"layers": depth - 1 if depth else None},
                        SPEED_CONTROLS,
                    )
                clear = gr.Button("Clear conversation")
        gr.Examples(
            examples=EXAMPLES if has_images else [[e[0], "text"] for e in EXAMPLES],
            inputs=[msg, mode],
            label="ShapesWorld prompts",
        )

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
    return gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
    )


# Generated images are small (e.g. 32x32 px): show them larger, with crisp code patches.
CSS = (
    "#mmgen-chat .message img { width: 160px !important; height: 160px !important; max-width: none !important; "
    "max-height: none !important; object-fit: contain !important; image-rendering: pixelated; }"
)


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Start serving ``app``; returns its local URL (after Ctrl-C when ``block``)."""
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        theme=_theme(),
        css=CSS,
        footer_links=["api", "settings"],
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
    )
    url = app.local_url
    if block:
        print(f"mmgen chat running at {url} (Ctrl-C to stop)", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return url


def serve(
    checkpoint_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    device: str = "cpu",
    block: bool = True,
    detokenizer: str | None = None,
):
    """Load a checkpoint and serve the chat at ``http://host:port``; returns the app when not blocking."""
    if share:
        raise MMGenError(
            "public share links are disabled (they route through gradio.live); "
            "bind --host 0.0.0.0 and use your own tunnel or reverse proxy instead"
        )
    app = build_app(checkpoint_dir, device=device, detokenizer=detokenizer)
    url = launch(app, host=host, port=port, block=block)
    if not block:
        print(f"mmgen chat running at {url}", flush=True)
    return app
