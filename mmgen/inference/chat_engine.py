"""The chat's answers without the web page: :class:`ChatEngine` holds a loaded bundle, bounds each
request (message length, the model's context, a t2i answer's room for a whole image block, a tts
answer's for a short utterance) and streams the conversation while the pipeline writes; its messages
carry the answer's text spans, image and speech files (named by content), the decoder that drew each
picture and what the answer cost; :func:`load_picture` opens an uploaded picture. The Gradio page
around it is :mod:`mmgen.inference.chat_app`."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.models.bundle import can_draw

MODE_CHOICES = [
    ("auto: the model decides", "auto"),
    ("text to image", "t2i"),
    ("text to speech", "tts"),
    ("text only", "text"),
]
TTS_MIN_SECONDS = 0.5  # a tts answer always has room for at least this much speech
# A ShapesWorld caption is ~100 characters; this bounds the tokenizer's work on a pasted novel long
# before the context check (tokens) refuses it.
MAX_PROMPT_CHARS = 2000


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
            parts.append(
                {
                    "path": _media_file(it.load(), "png", image_dir),
                    "mime_type": "image/png",
                    "alt_text": f"generated image, {h}x{w} codes",
                }
            )
            caption = picture_caption(it.meta)
            if caption:
                parts.append(caption)
        elif isinstance(it, Audio):
            # Gradio's Chatbot picks its player from the file's mime type (taken from the .wav suffix).
            parts.append(
                {
                    "path": _media_file(it.load(), "wav", image_dir),
                    "mime_type": "audio/wav",
                    "alt_text": f"generated speech, {it.duration:.2f} s",
                }
            )
        else:
            parts.append(it.text)
    stats = answer_stats(doc.meta) if parts else None
    if stats:
        parts.append(stats)
    return {"role": "assistant", "content": parts} if parts else None


class ChatEngine:
    """Holds the loaded bundle and answers one prompt at a time (Gradio's queue serialises calls)."""

    def __init__(
        self,
        bundle,
        image_dir: str | Path | None = None,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        detokenizer: str | None = None,
    ):
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
            raise MMGenError(
                f"the message is {len(message)} characters; this chat takes at most {self.max_prompt_chars}"
            )
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

    def answer(
        self,
        message: str,
        history: list | None,
        mode: str = "auto",
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
        cfg_scale: float | None = None,
        max_new_tokens: int = 512,
        stream_every_s: float = 0.2,
        picture=None,
        options: dict | None = None,
    ):
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
            shown = {
                "path": _media_file(buf.getvalue(), "png", self.image_dir),
                "mime_type": "image/png",
                "alt_text": "the picture shown to the model",
            }
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
        o = GenerationOptions.build(
            **{
                **asdict(self.defaults),
                **(options or {}),
                "mode": mode,
                "max_new_tokens": max_new_tokens,
                "temperature": _num(temperature, float),
                "top_k": _num(top_k, int),
                "seed": int(seed),
                "cfg_scale": _num(cfg_scale, float),
                "allow_audio": self.speaks and mode != "text",
            }
        )
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
