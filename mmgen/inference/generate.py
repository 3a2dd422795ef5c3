"""Interleaved generation: the entry points most callers use, built on :mod:`mmgen.inference.pipeline`
(one decode loop with an explicit KV cache writes text, images and speech alike) and the bundle's
:class:`~mmgen.processing.processor.MMGenProcessor` (prompts in, Docs out).

Text tokens and media-block tokens stream through the same loop; :class:`ImageGridConstraint` keeps
every image block (and, with ``allow_audio``, every audio block) well formed, and each block is decoded
as soon as it closes: images by the bundle's image tokenizer, audio codes by its audio codec into a WAV
at the codec's sample rate. The result is a :class:`~mmgen.data.doc.Doc` of Text, Image and Audio items.

Modes: ``auto`` (the model decides when to open a block), ``t2i`` (``<image>`` right after the prompt),
``tts`` (``<audio>`` right after the prompt: text to speech) and ``text`` (no media).

Classifier-free guidance (``cfg_scale > 1``) runs each prompt twice in one batch: the conditional row
and an unconditional row whose prompt is replaced by the empty prompt (``<s>``). Both rows receive the
same sampled tokens; while a row is inside a media block its non-text logits become
``uncond + s * (cond - uncond)`` (text logits are never guided).

Rows of a batch are left-padded; position ids follow each row's own tokens, so a row's output does not
depend on the other prompts in its batch beyond floating-point noise.

Many prompts at a time (one image per prompt row, short greedy answers) is
:mod:`mmgen.inference.batch_generation`; ``mmgen generate`` is :func:`run_generate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mmgen.data.doc import Audio, Doc, Image
from mmgen.errors import MMGenError
from mmgen.models.bundle import can_draw
from mmgen.processing.vocab import Vocab

MODES = ("auto", "t2i", "text", "tts")
OPENERS = {"t2i": "<image>", "tts": "<audio>"}  # modes whose answer starts inside a media block


# -- prompts and sizes: the bundle's processor (mmgen.processing.processor) lays them out ----
def _processor(bundle):
    from mmgen.processing.processor import MMGenProcessor

    return MMGenProcessor.from_bundle(bundle)


def trained_in_chat(bundle, conversation: bool = False) -> bool:
    """:meth:`MMGenProcessor.trained_in_chat <mmgen.processing.processor.MMGenProcessor.trained_in_chat>`."""
    return _processor(bundle).trained_in_chat(conversation)


def prompt_ids(bundle, prompt: str, image: bool) -> list[int]:
    """:meth:`MMGenProcessor.prompt_ids <mmgen.processing.processor.MMGenProcessor.prompt_ids>`."""
    return _processor(bundle).prompt_ids(prompt, image)


def picture_prompt_ids(bundle, text: str, block: list[int], question: bool) -> list[int]:
    """:meth:`MMGenProcessor.picture_prompt_ids <mmgen.processing.processor.MMGenProcessor.picture_prompt_ids>`."""
    return _processor(bundle).picture_prompt_ids(text, block, question)


def image_ids(bundle, images: Sequence) -> list[list[int]]:
    """:meth:`MMGenProcessor.image_ids <mmgen.processing.processor.MMGenProcessor.image_ids>`."""
    return _processor(bundle).image_ids(images)


def decode_parsed_blocks(bundle, parsed: Sequence[dict], image_decoder=None) -> list:
    """:meth:`MMGenProcessor.decode_image_blocks <mmgen.processing.processor.MMGenProcessor.decode_image_blocks>`."""
    return _processor(bundle).decode_image_blocks(parsed, image_decoder)


def default_image_sizes(bundle) -> list[tuple[int, int]]:
    """The code grids generation may declare: the tokenizer's grid at the training resolution."""
    tok = bundle.image_tokenizer
    if tok is None:
        return []
    res = None
    for key in ("image_resolution", "resolution", "image_size"):
        v = bundle.meta.get(key)
        if isinstance(v, int):
            res = (v, v)
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            res = (int(v[0]), int(v[1]))
        if res:
            break
    w, h = res or tuple(tok.resolution)
    gh, gw = tok.code_shape(w, h)
    if max(gh, gw) > bundle.vocab.config.max_grid:
        raise MMGenError(f"image grid {gh}x{gw} exceeds the vocab's max_grid {bundle.vocab.config.max_grid}")
    return [(gh, gw)]


def check_options(
    mode: str = "auto",
    max_new_tokens: int = 1,
    temperature=None,
    top_k=None,
    top_p=None,
    cfg_scale=None,
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
    cache: str = "dynamic",
) -> None:
    """The checks that need no model: ``mmgen generate`` runs them before it loads the checkpoint,
    :meth:`MMGenPipeline.check_inputs <mmgen.inference.pipeline.MMGenPipeline.check_inputs>` before it
    generates."""
    from mmgen.inference.pipeline import CACHES
    from mmgen.inference.settings import DEFAULT_SAMPLING

    if mode not in MODES:
        raise MMGenError(f"unknown mode '{mode}' (use one of: {', '.join(MODES)})")
    if mode == "text" and allow_audio:
        raise MMGenError("text mode writes no audio: drop allow_audio, or use mode auto or tts")
    if max_new_tokens < 1:
        raise MMGenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache not in CACHES:
        raise MMGenError(f"unknown cache '{cache}' (use one of: {', '.join(CACHES)})")
    if max_audio_frames is not None and max_audio_frames < 1:
        raise MMGenError(f"max_audio_frames must be >= 1, got {max_audio_frames}")
    DEFAULT_SAMPLING.override(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)


def check_mode_supported(bundle, mode: str, allow_audio: bool = False) -> None:
    """The checks that need the bundle: can it write what ``mode`` / ``allow_audio`` ask for."""
    if mode == "t2i" and not can_draw(bundle):
        raise MMGenError("t2i mode needs a checkpoint with an image tokenizer and pixel codes in its vocab")
    if mode == "tts" or allow_audio:
        check_audio(bundle, "tts mode" if mode == "tts" else "allow_audio")


def context_length(model) -> int | None:
    """How many positions the model reads (``max_position_embeddings``), None when its config has no limit."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def fit_to_context(model, prompt_len: int, max_new_tokens: int) -> tuple[int, str | None]:
    """``max_new_tokens`` cut to what fits after a ``prompt_len``-token prompt, and a note when it was
    cut. A prompt that leaves no room is a one-line MMGenError."""
    ctx = context_length(model)
    if ctx is None:
        return max_new_tokens, None
    if prompt_len >= ctx:
        raise MMGenError(f"the prompt is {prompt_len} tokens but the model reads at most {ctx}; shorten it")
    room = ctx - prompt_len
    if max_new_tokens <= room:
        return max_new_tokens, None
    return room, (
        f"max_new_tokens {max_new_tokens} capped to {room}: the model reads {ctx} tokens and the "
        f"prompt takes {prompt_len}"
    )


def check_audio(bundle, what: str) -> None:
    """Speech output needs both halves: an "audio" range in the vocab and the codec to decode it."""
    vocab = bundle.vocab
    if not vocab.has("audio"):
        raise MMGenError(f"{what} needs a checkpoint whose vocab has audio codes (train with data.audio_tokenizer=DIR)")
    codec = getattr(bundle, "audio_tokenizer", None)
    if codec is None:
        raise MMGenError(
            f"{what} needs a checkpoint with an audio codec (its audio_tokenizer/ folder); "
            "retrain with data.audio_tokenizer=DIR, or copy the codec there"
        )
    if (codec.n_q, codec.codebook_size) != (vocab.config.audio_levels, vocab.audio_codebook_size):
        raise MMGenError(
            f"the bundle's audio codec has {codec.n_q} levels x {codec.codebook_size} codes but the vocab "
            f"expects {vocab.config.audio_levels} x {vocab.audio_codebook_size}; use the codec it was trained with"
        )


# -- the decode loop -------------------------------------------------------------------------------
def sample_tokens(
    model, vocab: Vocab, rows: Sequence[Sequence[int]], **kw
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Continue ``rows`` one token at a time: :func:`mmgen.inference.pipeline.decode_loop` (same
    arguments), kept under this name for :mod:`mmgen.inference.batch_generation` and older callers."""
    from mmgen.inference.pipeline import decode_loop

    return decode_loop(model, vocab, rows, **kw)


# -- assembling documents ---------------------------------------------------------------------------
def eos_and_pad_ids(bundle) -> tuple[int, int]:
    tok = bundle.text_tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise MMGenError("the checkpoint's text tokenizer has no eos token (</s>); set eos_token on it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return int(eos), int(pad)


def iter_interleaved(
    bundle,
    prompt: str,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    mode: str = "auto",
    sizes: Sequence[tuple[int, int]] | None = None,
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
    picture=None,
    **options,
) -> Iterator[Doc]:
    """Stream :func:`generate_interleaved`
    (:meth:`MMGenPipeline.stream <mmgen.inference.pipeline.MMGenPipeline.stream>`): yields the growing
    answer after each new token.

    Every yield is a fresh Doc of the completed items plus the text written so far; the last one is the
    finished answer (``meta['stop']`` says why it stopped: ``eos`` or ``max_new_tokens``). Sampling
    options left None are the bundle's (:func:`mmgen.inference.settings.bundle_sampling`);
    ``max_new_tokens`` is cut to what the model's context leaves after the prompt (``meta['note']``).
    ``options`` are further :class:`~mmgen.inference.pipeline.GenerationOptions` fields (``prune_method=...``,
    ``spec_decoding=True``, ...)."""
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline

    options = GenerationOptions(
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        seed=seed,
        allow_audio=allow_audio,
        max_audio_frames=max_audio_frames,
        sizes=[list(s) for s in sizes or []],
        **options,
    )
    yield from MMGenPipeline(bundle).stream(prompt, options, picture=picture)


def generate_interleaved(
    bundle,
    prompt: str,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    mode: str = "auto",
    sizes: Sequence[tuple[int, int]] | None = None,
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
    picture=None,
    **options,
) -> Doc:
    """Continue ``prompt`` with interleaved text, images and (optionally) speech until ``</s>`` or
    ``max_new_tokens``. ``picture`` (a PIL image) is shown to the model before the prompt's text.

    ``mode``: ``auto`` lets the model choose when to open an image (or, with ``allow_audio``, an audio
    block); ``t2i`` opens an image right after the prompt; ``tts`` opens an audio block right after
    the prompt (and allows audio); ``text`` forbids media. Each closed audio block becomes an Audio
    item: a WAV decoded by the bundle's audio codec, ``frames x hop`` samples at its sample rate.
    ``max_audio_frames`` caps the code frames of one audio block. ``cfg_scale > 1`` turns on
    classifier-free guidance for the tokens inside media blocks. Sampling options left None are the
    bundle's (its ``generation_config.json``). The same arguments and seed give the same Doc. ``options`` are
    further :class:`~mmgen.inference.pipeline.GenerationOptions` fields, e.g. ``prune_method="fastv"``,
    ``kv_method="h2o"``."""
    doc = None
    for doc in iter_interleaved(  # noqa: B007 - the last Doc is the answer
        bundle,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        cfg_scale=cfg_scale,
        mode=mode,
        sizes=sizes,
        allow_audio=allow_audio,
        max_audio_frames=max_audio_frames,
        picture=picture,
        **options,
    ):
        pass
    return doc


def check_block_budget(vocab: Vocab, mode: str, max_new_tokens: int, sizes) -> None:
    """A mode that opens a block in the prompt must have room to close it."""
    if mode == "t2i":
        need = min(vocab.image_block_len(h, w) for h, w in sizes) - 1  # <image> is already in the prompt
        if max_new_tokens < need:
            raise MMGenError(
                f"max_new_tokens {max_new_tokens} is too small for one image block "
                f"({need} tokens for a {sizes[0][0]}x{sizes[0][1]} grid); raise --max-new-tokens"
            )
    if mode == "tts":
        need = vocab.audio_block_len(1) - 1  # <audio> is already in the prompt
        if max_new_tokens < need:
            raise MMGenError(
                f"max_new_tokens {max_new_tokens} is too small for one audio frame and </audio> "
                f"({need} tokens); raise --max-new-tokens"
            )


# -- the CLI stage ----------------------------------------------------------------------------------
def run_generate(
    checkpoint: str | Path,
    prompt: str,
    out: str | Path = "generated",
    mode: str = "auto",
    seed: int = 0,
    cfg_scale: float | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    device: str = "cpu",
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
    picture: str | Path | None = None,
    overrides: Sequence[str] = (),
    **options,
) -> tuple[Doc, list[Path]]:
    """``mmgen generate``: load a checkpoint, generate, write images as PNG and speech as WAV (and the
    Doc as JSON). Returns the Doc and the media files in item order. Sampling options left None are
    the bundle's (its ``generation_config.json``). ``picture`` (an image file) is shown to the model
    before the prompt's text. ``options`` and then ``overrides`` (``key=value`` strings, the CLI's trailing
    arguments) set any other :class:`~mmgen.inference.pipeline.GenerationOptions` field, e.g.
    ``prune_method``, ``kv_method``, ``detok_steps``, ``spec_decoding``, ``cache``. Every option is checked
    before the model loads."""
    from mmgen.inference.detokenize import check_detok_options
    from mmgen.inference.kv_cache import check_kv_options
    from mmgen.inference.pipeline import GenerationOptions, MMGenPipeline
    from mmgen.inference.prune import check_prune_options
    from mmgen.inference.speculative import check_spec_options
    from mmgen.models.bundle import check_bundle_dir, load_bundle
    from mmgen.utils.compat import ensure_torchvision

    o = GenerationOptions.build(
        overrides,
        mode=mode,
        seed=seed,
        cfg_scale=cfg_scale,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        allow_audio=allow_audio,
        max_audio_frames=max_audio_frames,
        **options,
    )
    check_options(
        o.mode,
        o.max_new_tokens,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        cfg_scale=o.cfg_scale,
        allow_audio=o.allow_audio,
        max_audio_frames=o.max_audio_frames,
        cache=o.cache,
    )
    check_prune_options(o)
    check_detok_options(o)
    check_kv_options(o)
    check_spec_options(o)
    shown = _read_picture(picture) if picture is not None else None
    check_bundle_dir(checkpoint)
    ensure_torchvision()
    bundle = load_bundle(checkpoint, device=device)
    doc = MMGenPipeline(bundle)(prompt, o, picture=shown)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    names: list[str | None] = []
    counts = {"image": 0, "audio": 0}
    for it in doc.items:
        if isinstance(it, (Image, Audio)):
            p = out / f"{it.kind}_{counts[it.kind]}.{'png' if it.kind == 'image' else 'wav'}"
            counts[it.kind] += 1
            p.write_bytes(it.load())
            paths.append(p)
            names.append(p.name)
        else:
            names.append(None)
    import json

    (out / "doc.json").write_text(json.dumps(doc.to_json(media_names=names), indent=1, ensure_ascii=False))
    return doc, paths


def _read_picture(path) -> object:
    """An image file as an RGB PIL image, or a one-line MMGenError."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise MMGenError(f"picture {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError):
        raise MMGenError(f"picture {path} could not be read as an image; give a PNG, JPEG or WebP file") from None
