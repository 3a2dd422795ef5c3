"""Interleaved generation: one sampling loop with a KV cache writes text, images and speech alike.

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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mmgen.data.doc import Audio, Doc, Image, Text
from mmgen.errors import MMGenError
from mmgen.inference.constraints import ImageGridConstraint
from mmgen.models.vocab import Vocab

MODES = ("auto", "t2i", "text", "tts")
OPENERS = {"t2i": "<image>", "tts": "<audio>"}  # modes whose answer starts inside a media block


# -- prompts and sizes ----------------------------------------------------------------------------
def trained_in_chat(bundle, conversation: bool = False) -> bool:
    """Whether the bundle learnt this kind of document in the chat template. Conversations (items
    with roles, such as QA) were under ``data.chat`` roles or all; plain instructions (a caption and
    its picture, a build-up document) only under all, which is what an SFT run does by default."""
    from mmgen.data.sequence import chat_layout

    stage = bundle.meta.get("stage", "")
    layout = chat_layout(stage, ((bundle.meta.get("config") or {}).get("data") or {}).get("chat", "auto"))
    return layout == "all" or (conversation and layout == "roles")


def prompt_ids(bundle, prompt: str, image: bool) -> list[int]:
    """The prefix training used for the same text: ``<s> text`` (plus ``<image>`` when ``image``), or
    ``<s> User: text Assistant:`` (plus ``<image>``) for a bundle fine-tuned on chat turns. The empty
    prompt stays ``<s>``: the unconditional row of classifier-free guidance, learnt in pretraining."""
    from mmgen.data.sequence import encode_chat_prompt, encode_prompt

    if prompt and trained_in_chat(bundle):
        return encode_chat_prompt(prompt, bundle.text_tokenizer) + ([bundle.vocab["<image>"]] if image else [])
    return encode_prompt(prompt, bundle.text_tokenizer, bundle.vocab, image=image)


def picture_prompt_ids(bundle, text: str, block: list[int], question: bool) -> list[int]:
    """A picture (its image block ids), then ``text``, in the layout the bundle learnt such prompts: a
    question about the picture (QA conversations) or, with ``question=False``, an instruction for the
    next picture (build-up documents); the chat template where :func:`trained_in_chat` says so."""
    from mmgen.data.sequence import encode_chat_prompt, encode_prompt, encode_text

    tok = bundle.text_tokenizer
    if trained_in_chat(bundle, conversation=question):
        return encode_chat_prompt(text, tok, image_ids=block)
    return encode_prompt("", tok, bundle.vocab, image=False) + list(block) + encode_text(text, tok)


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


def check_options(mode: str = "auto", max_new_tokens: int = 1, temperature=None, top_k=None, top_p=None,
                  cfg_scale=None, allow_audio: bool = False) -> None:
    """The checks that need no model: ``mmgen generate`` runs them before it loads the checkpoint."""
    from mmgen.inference.settings import DEFAULT_SAMPLING

    if mode not in MODES:
        raise MMGenError(f"unknown mode '{mode}' (use one of: {', '.join(MODES)})")
    if mode == "text" and allow_audio:
        raise MMGenError("text mode writes no audio: drop allow_audio, or use mode auto or tts")
    if max_new_tokens < 1:
        raise MMGenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    DEFAULT_SAMPLING.override(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)


def _check(bundle, mode: str, allow_audio: bool = False) -> None:
    check_options(mode, allow_audio=allow_audio)
    if mode == "t2i" and (bundle.image_tokenizer is None or not bundle.vocab.has("pix")):
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
    return room, (f"max_new_tokens {max_new_tokens} capped to {room}: the model reads {ctx} tokens and the "
                  f"prompt takes {prompt_len}")


def check_audio(bundle, what: str) -> None:
    """Speech output needs both halves: an "audio" range in the vocab and the codec to decode it."""
    vocab = bundle.vocab
    if not vocab.has("audio"):
        raise MMGenError(f"{what} needs a checkpoint whose vocab has audio codes (train with data.audio_tokenizer=DIR)")
    codec = getattr(bundle, "audio_tokenizer", None)
    if codec is None:
        raise MMGenError(f"{what} needs a checkpoint with an audio codec (its audio_tokenizer/ folder); "
                         "retrain with data.audio_tokenizer=DIR, or copy the codec there")
    if (codec.n_q, codec.codebook_size) != (vocab.config.audio_levels, vocab.audio_codebook_size):
        raise MMGenError(f"the bundle's audio codec has {codec.n_q} levels x {codec.codebook_size} codes but the vocab "
                         f"expects {vocab.config.audio_levels} x {vocab.audio_codebook_size}; use the codec it was trained with")


# -- guidance and sampling --------------------------------------------------------------------------
def image_token_mask(vocab: Vocab, size: int, device=None) -> torch.Tensor:
    """(V,) bool: the ids guidance acts on (everything that is not a text id)."""
    m = torch.zeros(size, dtype=torch.bool, device=device)
    m[vocab.text_size: vocab.size] = True
    return m


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rows_in_image: torch.Tensor,
               image_cols: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on image tokens of rows inside an image block; cond logits elsewhere."""
    guided = uncond + scale * (cond - uncond)
    where = rows_in_image[:, None] & image_cols[None, :]
    return torch.where(where, guided, cond)


def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the best token always stays).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _sample(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return scores.argmax(-1)
    probs = _warp(scores, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(scores.device)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, length - len(r):] = 1
    return ids.to(device), mask.to(device)


# -- the loop ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_tokens(model, vocab: Vocab, rows: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                  pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  cfg_scale: float = 1.0, uncond_rows: Sequence[Sequence[int]] | None = None,
                  sizes: Sequence[tuple[int, int]] | None = None, allow_images: bool = True,
                  stop_after_images: int | None = None, logits_hook=None, allow_audio: bool = False,
                  max_audio_frames: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sample continuations of ``rows`` under the grid constraint, one step at a time.

    Yields ``(tokens, active)`` per step: the (B,) new token ids and which rows were still generating
    (a finished row's token is ``pad_id`` and must be ignored). A row finishes at ``eos_id`` (outside an
    image block), after ``stop_after_images`` closed image blocks, or at ``max_new_tokens``.
    ``logits_hook(cond, uncond, guided, in_block)`` sees each step's logits (tests, analysis)."""
    if not rows:
        return
    device = next(model.parameters()).device
    bsz = len(rows)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        if uncond_rows is None or len(uncond_rows) != bsz:
            raise MMGenError("classifier-free guidance needs one unconditional prompt per row")
        all_rows = list(rows) + list(uncond_rows)
    else:
        all_rows = list(rows)
    ids, attn = _left_pad(all_rows, pad_id, device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    # Preallocated, so a step writes one column instead of copying the whole sequence.
    cur = ids.shape[1]
    seq = torch.full((bsz, cur + max_new_tokens), pad_id, dtype=torch.long, device=device)
    seq[:, :cur] = ids[:bsz]
    attn_buf = torch.ones((len(all_rows), cur + max_new_tokens), dtype=attn.dtype, device=device)
    attn_buf[:, :cur] = attn
    constraint = ImageGridConstraint(vocab, sizes=sizes, allow_images=allow_images, max_length=cur + max_new_tokens,
                                     allow_audio=allow_audio, max_audio_frames=max_audio_frames)
    gen = torch.Generator().manual_seed(int(seed))
    image_cols = None

    import inspect

    # The prefill needs the logits of the last position only (a real vocabulary makes the rest costly).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, **keep)
    past = out.past_key_values
    logits = out.logits[:, -1, :].float()
    next_pos = position[:, -1] + 1
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        constraint.observe(seq[:, :cur])
        cond = logits[:bsz]
        in_block = torch.tensor(constraint.in_block, dtype=torch.bool, device=device)
        if use_cfg:
            if image_cols is None:
                image_cols = image_token_mask(vocab, cond.shape[-1], device)
            uncond = logits[bsz:]
            scores = cfg_logits(cond, uncond, cfg_scale, in_block, image_cols)
        else:
            uncond, scores = None, cond
        if logits_hook is not None:
            logits_hook(cond, uncond, scores, in_block)
        scores = constraint.mask(scores)
        tok = _sample(scores, temperature, top_k, top_p, gen)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        was_active = active.clone()
        seq[:, cur] = tok
        cur += 1
        # The closing token of a block is only counted by observe() on the next step; count it here.
        finished = (tok == eos_id) & ~in_block
        if stop_after_images is not None:
            closes = torch.tensor([p > 0 and p + 1 == _block_len(constraint, b) for b, p in enumerate(constraint.pos)],
                                  dtype=torch.bool, device=device)
            done_images = torch.tensor(constraint.completed, device=device) + closes.long()
            finished |= done_images >= stop_after_images
        active = active & ~finished
        yield tok, was_active
        if not bool(active.any()) or step == max_new_tokens - 1:
            return
        step_tok = torch.cat([tok, tok]) if use_cfg else tok
        grid = {}
        if getattr(model.config, "grid_positions", False):
            # The new token's grid cell depends only on the tokens since its block opened, which the
            # conditional and unconditional rows share.
            g = model.grid_cells(seq[:, :cur], 1)
            grid = {"grid_positions": torch.cat([g, g]) if use_cfg else g}
        out = model(input_ids=step_tok[:, None], attention_mask=attn_buf[:, :cur], position_ids=next_pos[:, None],
                    past_key_values=past, use_cache=True, **grid)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1


def _block_len(constraint: ImageGridConstraint, b: int) -> int:
    if constraint.pos[b] < 3:
        return -1
    return constraint._block_length(constraint.h_tok[b], constraint.w_tok[b])


# -- assembling documents ---------------------------------------------------------------------------
class _DocBuilder:
    """Turns one row's token stream into Doc items: text spans, decoded image and audio blocks."""

    def __init__(self, bundle, audio: bool = False):
        self.bundle = bundle
        self.vocab = bundle.vocab
        # <audio> opens a block only when the constraint tracks audio; otherwise it is ignored as before.
        self.openers = {self.vocab["<image>"], *([self.vocab["<audio>"]] if audio else [])}
        self.items: list = []
        self.text_ids: list[int] = []
        self.block: list[int] | None = None
        self.block_len = -1
        self.n_tokens = 0

    def _flush_text(self) -> None:
        if self.text_ids:
            text = self.bundle.text_tokenizer.decode(self.text_ids, skip_special_tokens=True)
            if text.strip():
                self.items.append(Text(text.strip()))
            self.text_ids = []

    def push(self, t: int) -> bool:
        """Add one token; True when it completed an image or audio block."""
        self.n_tokens += 1
        v = self.vocab
        if self.block is None:
            if t in self.openers:
                self._flush_text()
                self.block = [t]
            elif t < v.text_size:
                self.text_ids.append(t)
            return False
        self.block.append(t)
        if self.block[0] == v["<audio>"]:
            if t != v["</audio>"]:
                return False
            self.items.append(self._decode_audio_block(self.block))
            self.block = None
            return True
        if len(self.block) == 3:
            h = self.block[1] - v.h_start + 1
            w = self.block[2] - v.w_start + 1
            self.block_len = v.image_block_len(h, w)
        if len(self.block) == self.block_len:
            self.items.append(self._decode_block(self.block))
            self.block, self.block_len = None, -1
            return True
        return False

    def _decode_block(self, block: list[int]) -> Image:
        parsed = self.vocab.parse_image_block(block)
        pil = decode_parsed_blocks(self.bundle, [parsed])[0]
        meta = {"codes_shape": [parsed["h"], parsed["w"]], "num_tokens": len(block),
                "width": pil.size[0], "height": pil.size[1]}
        if parsed["sem"] is not None:
            meta["sem_codes_shape"] = list(parsed["sem"].shape)
        return Image.from_pil(pil, meta=meta)

    def _decode_audio_block(self, block: list[int]) -> Audio:
        codes = self.vocab.parse_audio_block(block)
        return audio_item(self.bundle.audio_tokenizer, codes, meta={"num_tokens": len(block)})

    def snapshot(self, meta: dict) -> Doc:
        items = list(self.items)
        if self.text_ids:
            text = self.bundle.text_tokenizer.decode(self.text_ids, skip_special_tokens=True).strip()
            if text:
                items.append(Text(text))
        return Doc(items=items, meta=dict(meta))

    def finish(self, meta: dict) -> Doc:
        self._flush_text()
        if self.block is not None:  # only when the budget ran out, which the constraint prevents
            kind = "audio" if self.block[0] == self.vocab["<audio>"] else "image"
            meta = {**meta, f"unfinished_{kind}_tokens": len(self.block)}
        return Doc(items=list(self.items), meta=dict(meta))


def decode_audio_codes(codec, codes) -> np.ndarray:
    """Mono waveform of ``(levels, T)`` codes, exactly ``T * hop`` samples long. DAC's transposed
    convolutions return a few samples short of whole frames; padding the tail with silence keeps a
    block's duration equal to its frames over the codec's frame rate."""
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[1] * codec.hop_length
    y = np.asarray(codec.decode(codes), dtype=np.float32)[:n]
    return np.pad(y, (0, n - len(y)))


def audio_item(codec, codes, meta: dict | None = None) -> Audio:
    """An Audio item holding the WAV (at the codec's sample rate) of ``(levels, T)`` codes."""
    from mmgen.data.media import encode_wav

    codes = np.asarray(codes, dtype=np.int64)
    wave = decode_audio_codes(codec, codes)
    facts = {"codes_shape": list(codes.shape), "frames": int(codes.shape[1]), "sample_rate": codec.sample_rate,
             "duration": len(wave) / codec.sample_rate, **(meta or {})}
    return Audio(data=encode_wav(wave, codec.sample_rate), format="wav", meta=facts)


def _special(bundle) -> tuple[int, int]:
    tok = bundle.text_tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise MMGenError("the checkpoint's text tokenizer has no eos token (</s>); set eos_token on it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return int(eos), int(pad)


def iter_interleaved(bundle, prompt: str, max_new_tokens: int = 512, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     cfg_scale: float | None = None, mode: str = "auto",
                     sizes: Sequence[tuple[int, int]] | None = None, allow_audio: bool = False,
                     max_audio_frames: int | None = None, picture=None) -> Iterator[Doc]:
    """Stream :func:`generate_interleaved`: yields the growing answer after each new token.

    Every yield is a fresh Doc of the completed items plus the text written so far; the last one is the
    finished answer (``meta['stop']`` says why it stopped: ``eos`` or ``max_new_tokens``). Sampling
    options left None are the bundle's (:func:`mmgen.inference.settings.bundle_sampling`);
    ``max_new_tokens`` is cut to what the model's context leaves after the prompt (``meta['note']``)."""
    from mmgen.inference.settings import bundle_sampling

    check_options(mode, max_new_tokens, allow_audio=allow_audio)
    sampling = bundle_sampling(bundle, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    temperature, top_k, top_p, cfg_scale = sampling.temperature, sampling.top_k, sampling.top_p, sampling.cfg_scale
    _check(bundle, mode, allow_audio)
    vocab = bundle.vocab
    eos, pad = _special(bundle)
    can_image = bundle.image_tokenizer is not None and vocab.has("pix") and mode != "text"
    can_audio = allow_audio or mode == "tts"  # _check made sure the bundle can decode it
    sizes = list(sizes) if sizes else (default_image_sizes(bundle) if can_image else None)
    opener = [vocab[OPENERS[mode]]] if mode in OPENERS else []
    if picture is not None:  # shown before the text: a question about it, or (t2i) what to draw next
        if bundle.image_tokenizer is None:
            raise MMGenError("this checkpoint has no image tokenizer, so it cannot read a picture")
        block = image_ids(bundle, [picture])[0]
        rows = [picture_prompt_ids(bundle, prompt, block, question=mode != "t2i") + opener]
    else:
        rows = [prompt_ids(bundle, prompt, image=False) + opener]
    uncond = [prompt_ids(bundle, "", image=False) + opener] if cfg_scale != 1.0 else None
    max_new_tokens, note = fit_to_context(bundle.model, len(rows[0]), max_new_tokens)
    _check_budget(vocab, mode, max_new_tokens, sizes)
    builder = _DocBuilder(bundle, audio=can_audio)
    if opener:
        builder.block = list(opener)
    meta = {"prompt": prompt, "mode": mode, "seed": seed, "cfg_scale": cfg_scale, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens}
    if note:
        meta["note"] = note
    if can_audio:
        meta["max_audio_frames"] = max_audio_frames
    stop = "max_new_tokens"
    new = 0
    t0 = time.perf_counter()
    for tok, active in sample_tokens(bundle.model, vocab, rows, max_new_tokens=max_new_tokens, eos_id=eos,
                                     pad_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                     cfg_scale=cfg_scale, uncond_rows=uncond, sizes=sizes, allow_images=can_image,
                                     allow_audio=can_audio, max_audio_frames=max_audio_frames):
        if not bool(active[0]):
            break
        t = int(tok[0])
        new += 1
        if t == eos and builder.block is None:
            stop = "eos"
            break
        builder.push(t)
        yield builder.snapshot({**meta, "new_tokens": new})
    meta.update(new_tokens=new, stop=stop, seconds=round(time.perf_counter() - t0, 3))
    yield builder.finish(meta)


def generate_interleaved(bundle, prompt: str, max_new_tokens: int = 512, temperature: float | None = None,
                         top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                         cfg_scale: float | None = None, mode: str = "auto",
                         sizes: Sequence[tuple[int, int]] | None = None, allow_audio: bool = False,
                         max_audio_frames: int | None = None, picture=None) -> Doc:
    """Continue ``prompt`` with interleaved text, images and (optionally) speech until ``</s>`` or
    ``max_new_tokens``. ``picture`` (a PIL image) is shown to the model before the prompt's text.

    ``mode``: ``auto`` lets the model choose when to open an image (or, with ``allow_audio``, an audio
    block); ``t2i`` opens an image right after the prompt; ``tts`` opens an audio block right after
    the prompt (and allows audio); ``text`` forbids media. Each closed audio block becomes an Audio
    item: a WAV decoded by the bundle's audio codec, ``frames x hop`` samples at its sample rate.
    ``max_audio_frames`` caps the code frames of one audio block. ``cfg_scale > 1`` turns on
    classifier-free guidance for the tokens inside media blocks. Sampling options left None are the
    bundle's (its ``generation_config.json``). The same arguments and seed give the same Doc."""
    doc = None
    for doc in iter_interleaved(bundle, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, cfg_scale=cfg_scale, mode=mode, sizes=sizes,
                                allow_audio=allow_audio, max_audio_frames=max_audio_frames, picture=picture):
        pass
    return doc


def _check_budget(vocab: Vocab, mode: str, max_new_tokens: int, sizes) -> None:
    """A mode that opens a block in the prompt must have room to close it."""
    if mode == "t2i":
        need = min(vocab.image_block_len(h, w) for h, w in sizes) - 1  # <image> is already in the prompt
        if max_new_tokens < need:
            raise MMGenError(f"max_new_tokens {max_new_tokens} is too small for one image block "
                             f"({need} tokens for a {sizes[0][0]}x{sizes[0][1]} grid); raise --max-new-tokens")
    if mode == "tts":
        need = vocab.audio_block_len(1) - 1  # <audio> is already in the prompt
        if max_new_tokens < need:
            raise MMGenError(f"max_new_tokens {max_new_tokens} is too small for one audio frame and </audio> "
                             f"({need} tokens); raise --max-new-tokens")


def block_codes(parsed: dict):
    """The codes a parsed image block hands its tokenizer: ``{"sem", "pix"}`` grids for a dual
    tokenizer (its pixel decoder reads the semantic codes too, ILLUME+'s merge), the pixel grid otherwise."""
    return {"sem": parsed["sem"], "pix": parsed["pix"]} if parsed.get("sem") is not None else parsed["pix"]


def decode_parsed_blocks(bundle, parsed: Sequence[dict]) -> list:
    """PIL images of parsed image blocks, one decoder call per grid shape."""
    out: list = [None] * len(parsed)
    by_shape: dict[tuple, list[int]] = {}
    for r, p in enumerate(parsed):
        by_shape.setdefault(np.asarray(p["pix"]).shape, []).append(r)
    for idx in by_shape.values():
        pix = np.stack([parsed[r]["pix"] for r in idx])
        if parsed[idx[0]].get("sem") is not None:
            codes = {"sem": np.stack([parsed[r]["sem"] for r in idx]), "pix": pix}
        else:
            codes = pix
        for r, pil in zip(idx, bundle.image_tokenizer.decode(codes)):
            out[r] = pil
    return out


def image_ids(bundle, images: Sequence) -> list[list[int]]:
    """Token ids of PIL images as the model reads them: each image encoded by the bundle's tokenizer
    and laid out by the vocab (``<image> <h_H> <w_W> [<sem> ...] <pix> ... </image>``)."""
    out = bundle.image_tokenizer.encode(list(images))
    pix, sem = (out["pix"], out.get("sem")) if isinstance(out, dict) else (out, None)
    pix = np.asarray(pix.cpu() if torch.is_tensor(pix) else pix)
    sem = None if sem is None else np.asarray(sem.cpu() if torch.is_tensor(sem) else sem)
    use_sem = bundle.vocab.has("sem")
    return [bundle.vocab.image_block(pix[i], sem=sem[i] if use_sem and sem is not None else None)
            for i in range(len(pix))]


@torch.no_grad()
def generate_image_rows(bundle, rows: Sequence[Sequence[int]], uncond_rows: Sequence[Sequence[int]] | None = None,
                        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        seed: int = 0, cfg_scale: float | None = None, batch_size: int = 8,
                        size: tuple[int, int] | None = None, progress: bool = False, desc: str = "t2i") -> list:
    """One image per prompt row: each row (token ids ending in ``<image>``) is continued by exactly
    one image block under the grid constraint, then decoded. Batch ``i`` uses seed ``seed + i``.
    Sampling options left None are the bundle's. ``uncond_rows`` are needed when guidance is on."""
    from mmgen.inference.settings import bundle_sampling

    s = bundle_sampling(bundle, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    temperature, top_k, top_p, cfg_scale = s.temperature, s.top_k, s.top_p, s.cfg_scale
    _check(bundle, "t2i")
    if cfg_scale != 1.0 and uncond_rows is None:
        raise MMGenError("classifier-free guidance needs one unconditional prompt per row")
    vocab = bundle.vocab
    eos, pad = _special(bundle)
    sizes = [tuple(size)] if size else default_image_sizes(bundle)
    budget = max(vocab.image_block_len(h, w) for h, w in sizes) - 1
    out: list = []
    starts = range(0, len(rows), max(1, int(batch_size)))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for bi, s in enumerate(starts):
        chunk = [list(r) for r in rows[s:s + batch_size]]
        if any(not r or r[-1] != vocab["<image>"] for r in chunk):
            raise MMGenError("an image prompt row must end with the <image> token")
        if fit_to_context(bundle.model, max(len(r) for r in chunk), budget)[1]:
            raise MMGenError(f"a prompt of {max(len(r) for r in chunk)} tokens leaves no room for a {budget}-token "
                             f"image block in the model's {context_length(bundle.model)} positions; shorten it")
        uncond = [list(r) for r in uncond_rows[s:s + batch_size]] if cfg_scale != 1.0 else None
        blocks = [[vocab["<image>"]] for _ in chunk]
        for tok, active in sample_tokens(bundle.model, vocab, chunk, max_new_tokens=budget, eos_id=eos, pad_id=pad,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + bi,
                                         cfg_scale=cfg_scale, uncond_rows=uncond, sizes=sizes, stop_after_images=1):
            for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a:
                    blocks[r].append(t)
        out += decode_parsed_blocks(bundle, [vocab.parse_image_block(b) for b in blocks])
    return out


def generate_images(bundle, prompts: Sequence[str], temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, cfg_scale: float | None = None, batch_size: int = 8,
                    size: tuple[int, int] | None = None, progress: bool = False) -> list:
    """Text-to-image for many prompts, batched: one PIL image per prompt, in order.

    ``size`` is the (H, W) code grid (default: the tokenizer's native grid). Batch ``i`` uses seed
    ``seed + i`` so results do not depend on how many batches ran before. Sampling options left None
    are the bundle's."""
    from mmgen.inference.settings import bundle_sampling

    if isinstance(prompts, str):
        prompts = [prompts]
    cfg_scale = bundle_sampling(bundle, cfg_scale=cfg_scale).cfg_scale
    rows = [prompt_ids(bundle, p, image=True) for p in prompts]
    uncond = [prompt_ids(bundle, "", image=True) for _ in prompts] if cfg_scale != 1.0 else None
    return generate_image_rows(bundle, rows, uncond, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               cfg_scale=cfg_scale, batch_size=batch_size, size=size, progress=progress)


@torch.no_grad()
def generate_text_rows(bundle, rows: Sequence[Sequence[int]], max_new_tokens: int = 16, batch_size: int = 16,
                       progress: bool = False, desc: str = "text") -> list[str]:
    """Greedy text continuation of each prompt row until ``</s>`` (no images): short answers."""
    vocab = bundle.vocab
    eos, pad = _special(bundle)
    out: list[str] = []
    starts = range(0, len(rows), max(1, int(batch_size)))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        chunk = [list(r) for r in rows[s:s + batch_size]]
        got: list[list[int]] = [[] for _ in chunk]
        for tok, active in sample_tokens(bundle.model, vocab, chunk, max_new_tokens=max_new_tokens, eos_id=eos,
                                         pad_id=pad, temperature=0.0, allow_images=False):
            for r, (t, a) in enumerate(zip(tok.tolist(), active.tolist())):
                if a and t != eos:
                    got[r].append(t)
        out += [bundle.text_tokenizer.decode(g, skip_special_tokens=True).strip() for g in got]
    return out


# -- the CLI stage ----------------------------------------------------------------------------------
def run_generate(checkpoint: str | Path, prompt: str, out: str | Path = "generated", mode: str = "auto",
                 seed: int = 0, cfg_scale: float | None = None, max_new_tokens: int = 512,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 device: str = "cpu", allow_audio: bool = False,
                 max_audio_frames: int | None = None) -> tuple[Doc, list[Path]]:
    """``mmgen generate``: load a checkpoint, generate, write images as PNG and speech as WAV (and the
    Doc as JSON). Returns the Doc and the media files in item order. Sampling options left None are
    the bundle's (its ``generation_config.json``); every option is checked before the model loads."""
    from mmgen.models.bundle import check_bundle_dir, load_bundle
    from mmgen.utils.compat import ensure_torchvision

    check_options(mode, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                  allow_audio=allow_audio)
    if max_audio_frames is not None and max_audio_frames < 1:
        raise MMGenError(f"max_audio_frames must be >= 1, got {max_audio_frames}")
    check_bundle_dir(checkpoint)
    ensure_torchvision()
    bundle = load_bundle(checkpoint, device=device)
    doc = generate_interleaved(bundle, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, cfg_scale=cfg_scale, mode=mode, allow_audio=allow_audio,
                               max_audio_frames=max_audio_frames)
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
