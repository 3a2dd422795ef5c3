"""MMGenProcessor: the one object that turns prompts, pictures and chats into ids, and ids back into a Doc.

It owns the text tokenizer, the image tokenizer, the audio codec, the :class:`~mmgen.processing.vocab.Vocab`
and the bundle's :class:`ChatTemplate` (as transformers' Emu3 / Janus processors own theirs). The layout
itself has one home, :mod:`mmgen.processing.sequence` (training builds its sequences there; the
processor asks it for prompts, so inference sees the prefix training wrote) and the Vocab (blocks).

The chat template is saved with the bundle (``processor_config.json``), written when the bundle is
saved, so generation never re-derives it from the training config. Bundles saved before the file
existed get it from their training facts once, on load (:meth:`ChatTemplate.from_training`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmgen.data.doc import Audio, Doc, Image, Text
from mmgen.data.media import encode_wav
from mmgen.errors import MMGenError
from mmgen.processing.sequence import (
    ASSISTANT_TAG,
    USER_TAG,
    chat_layout,
    encode_chat_prompt,
    encode_prompt,
    encode_text,
)
from mmgen.processing.vocab import Vocab

PROCESSOR_CONFIG = "processor_config.json"
LAYOUTS = ("none", "roles", "all")


@dataclass(frozen=True)
class ChatTemplate:
    """Which documents the model learnt in the chat layout ``<s> User: ... Assistant: ... </s>``:
    ``none`` (plain documents, pretraining), ``roles`` (conversations only, whose items carry roles)
    or ``all`` (every document, SFT's default)."""

    layout: str = "none"
    user_tag: str = USER_TAG
    assistant_tag: str = ASSISTANT_TAG

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise MMGenError(f"unknown chat template layout '{self.layout}' (use one of: {', '.join(LAYOUTS)})")

    @classmethod
    def from_training(cls, meta: dict) -> ChatTemplate:
        """The template a training run used, from its bundle facts (stage and ``data.chat``)."""
        chat = ((meta.get("config") or {}).get("data") or {}).get("chat", "auto")
        return cls(chat_layout(meta.get("stage", ""), chat), USER_TAG, ASSISTANT_TAG)

    def save(self, directory: str | Path) -> Path:
        p = Path(directory) / PROCESSOR_CONFIG
        p.write_text(json.dumps({"chat_template": asdict(self)}, indent=1))
        return p

    @classmethod
    def load(cls, directory: str | Path) -> ChatTemplate | None:
        p = Path(directory) / PROCESSOR_CONFIG
        if not p.is_file():
            return None
        try:
            return cls(**json.loads(p.read_text())["chat_template"])
        except (MMGenError, ValueError, KeyError, TypeError) as e:
            raise MMGenError(f"{p} is not a valid processor config ({e}); fix or delete it") from None

    def applies(self, conversation: bool = False) -> bool:
        """Whether a prompt of this kind goes in the chat layout: conversations (items with roles, such
        as QA) under ``roles`` or ``all``; plain instructions (a caption and its picture, a build-up
        document) only under ``all``."""
        return self.layout == "all" or (conversation and self.layout == "roles")


class MMGenProcessor:
    """Doc / prompt / chat <-> ids for one bundle (``MMGenProcessor.from_bundle(bundle)``)."""

    def __init__(
        self,
        text_tokenizer,
        vocab: Vocab,
        image_tokenizer=None,
        audio_tokenizer=None,
        chat_template: ChatTemplate | None = None,
    ):
        self.text_tokenizer = text_tokenizer
        self.vocab = vocab
        self.image_tokenizer = image_tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.chat_template = chat_template or ChatTemplate()

    @classmethod
    def from_bundle(cls, bundle) -> MMGenProcessor:
        template = getattr(bundle, "chat_template", None) or ChatTemplate.from_training(bundle.meta)
        return cls(
            bundle.text_tokenizer,
            bundle.vocab,
            bundle.image_tokenizer,
            getattr(bundle, "audio_tokenizer", None),
            template,
        )

    # -- prompts -> ids -------------------------------------------------------------------------------
    def trained_in_chat(self, conversation: bool = False) -> bool:
        return self.chat_template.applies(conversation)

    def chat_prompt_ids(self, text: str, image_ids: list[int] | None = None) -> list[int]:
        """``<s> User: [image] text Assistant:`` with the template's tags (:func:`encode_chat_prompt
        <mmgen.processing.sequence.encode_chat_prompt>`, the layout training writes)."""
        t = self.chat_template
        return encode_chat_prompt(
            text, self.text_tokenizer, image_ids=image_ids, user_tag=t.user_tag, assistant_tag=t.assistant_tag
        )

    def prompt_ids(self, prompt: str, image: bool) -> list[int]:
        """The prefix training used for the same text: ``<s> text`` (plus ``<image>`` when ``image``), or
        ``<s> User: text Assistant:`` (plus ``<image>``) under a chat template that applies. The empty
        prompt stays ``<s>``: the unconditional row of classifier-free guidance, learnt in pretraining."""
        if prompt and self.trained_in_chat():
            return self.chat_prompt_ids(prompt) + ([self.vocab["<image>"]] if image else [])
        return encode_prompt(prompt, self.text_tokenizer, self.vocab, image=image)

    def picture_prompt_ids(self, text: str, block: list[int], question: bool) -> list[int]:
        """A picture (its image block ids), then ``text``: a question about the picture (QA
        conversations) or, with ``question=False``, an instruction for the next picture (build-up
        documents), in the chat layout where the template says so."""
        tok = self.text_tokenizer
        if self.trained_in_chat(conversation=question):
            return self.chat_prompt_ids(text, image_ids=block)
        return encode_prompt("", tok, self.vocab, image=False) + list(block) + encode_text(text, tok)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """A conversation (``[{"role": "user"|"assistant", "content": str | PIL | [parts]}]``, the
        messages format of transformers' chat templates) as the ids the model answers from: every
        turn in the bundle's chat layout, ending with the assistant tag."""
        tok = self.text_tokenizer
        ids = [tok.bos_token_id]
        for m in messages:
            role = m.get("role")
            if role not in ("user", "assistant"):
                raise MMGenError(f"a chat message's role must be user or assistant, got {role!r}")
            ids += encode_text(self.chat_template.user_tag if role == "user" else self.chat_template.assistant_tag, tok)
            parts = m.get("content")
            for part in parts if isinstance(parts, (list, tuple)) else [parts]:
                ids += encode_text(part, tok) if isinstance(part, str) else self.image_ids([part])[0]
            if role == "assistant":
                ids.append(tok.eos_token_id)
        return ids + encode_text(self.chat_template.assistant_tag, tok)

    def image_ids(self, images: Sequence) -> list[list[int]]:
        """Token ids of PIL images as the model reads them: each image encoded by the image tokenizer
        and laid out by the vocab (``<image> <h_H> <w_W> [<sem> ...] <pix> ... </image>``)."""
        import torch

        if self.image_tokenizer is None:
            raise MMGenError("this checkpoint has no image tokenizer, so it cannot read a picture")
        out = self.image_tokenizer.encode(list(images))
        pix, sem = (out["pix"], out.get("sem")) if isinstance(out, dict) else (out, None)
        pix = np.asarray(pix.cpu() if torch.is_tensor(pix) else pix)
        sem = None if sem is None else np.asarray(sem.cpu() if torch.is_tensor(sem) else sem)
        use_sem = self.vocab.has("sem")
        return [
            self.vocab.image_block(pix[i], sem=sem[i] if use_sem and sem is not None else None) for i in range(len(pix))
        ]

    # -- ids -> Doc ---------------------------------------------------------------------------------------
    def decode_image_blocks(self, parsed: Sequence[dict], image_decoder=None) -> list:
        """PIL images of parsed image blocks, one decoder call per grid shape: the image tokenizer's
        decoder, or ``image_decoder`` (an object whose ``decode(parsed)`` returns PIL images, e.g. the
        diffusion detokenizer's :class:`~mmgen.inference.detokenize.DetokenizerDecoder`)."""
        if image_decoder is not None:
            return image_decoder.decode(parsed)
        out: list = [None] * len(parsed)
        by_shape: dict[tuple, list[int]] = {}
        for r, p in enumerate(parsed):
            by_shape.setdefault(np.asarray(p["pix"]).shape, []).append(r)
        for idx in by_shape.values():
            has_sem = parsed[idx[0]].get("sem") is not None
            stacked = {
                "pix": np.stack([parsed[r]["pix"] for r in idx]),
                "sem": np.stack([parsed[r]["sem"] for r in idx]) if has_sem else None,
            }
            for r, pil in zip(idx, self.image_tokenizer.decode(block_codes(stacked))):
                out[r] = pil
        return out

    def doc_decoder(self, audio: bool = False, image_decoder=None) -> DocDecoder:
        """A streaming decoder of one row's generated ids (``push`` each, ``finish`` at the end); its
        pictures come from ``image_decoder`` when given (see :meth:`decode_image_blocks`)."""
        return DocDecoder(self, audio=audio, image_decoder=image_decoder)

    def decode(self, ids: Sequence[int], audio: bool = True, meta: dict | None = None) -> Doc:
        """Generated ids as a Doc: text spans, and every closed image or audio block decoded."""
        dec = self.doc_decoder(audio=audio and self.vocab.has("audio") and self.audio_tokenizer is not None)
        for t in ids:
            dec.push(int(t))
        return dec.finish(dict(meta or {}))


class DocDecoder:
    """Turns one row's token stream into Doc items: text spans, decoded image and audio blocks. Each
    Image item's ``meta['decoder']`` says what drew it: the ``image_decoder``'s ``info``, or
    ``{"kind": "tokenizer", ...}`` for the image tokenizer's own decoder."""

    def __init__(self, processor: MMGenProcessor, audio: bool = False, image_decoder=None):
        self.processor = processor
        self.vocab = processor.vocab
        self.image_decoder = image_decoder
        self.decoder_info = (
            dict(image_decoder.info)
            if image_decoder is not None
            else {"kind": "tokenizer", "tokenizer": getattr(processor.image_tokenizer, "mmgen_type", "")}
        )
        # <audio> opens a block only when the constraint tracks audio; otherwise it is ignored.
        self.openers = {self.vocab["<image>"], *([self.vocab["<audio>"]] if audio else [])}
        self.items: list = []
        self.text_ids: list[int] = []
        self.block: list[int] | None = None
        self.block_len = -1
        self.n_tokens = 0

    def _text(self) -> str:
        return self.processor.text_tokenizer.decode(self.text_ids, skip_special_tokens=True).strip()

    def _flush_text(self) -> None:
        if self.text_ids:
            text = self._text()
            if text:
                self.items.append(Text(text))
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
        pil = self.processor.decode_image_blocks([parsed], self.image_decoder)[0]
        meta = {
            "codes_shape": [parsed["h"], parsed["w"]],
            "num_tokens": len(block),
            "width": pil.size[0],
            "height": pil.size[1],
            "decoder": dict(self.decoder_info),
        }
        if parsed["sem"] is not None:
            meta["sem_codes_shape"] = list(parsed["sem"].shape)
        return Image.from_pil(pil, meta=meta)

    def _decode_audio_block(self, block: list[int]) -> Audio:
        codes = self.vocab.parse_audio_block(block)
        return audio_item(self.processor.audio_tokenizer, codes, meta={"num_tokens": len(block)})

    def snapshot(self, meta: dict) -> Doc:
        items = list(self.items)
        text = self._text() if self.text_ids else ""
        if text:
            items.append(Text(text))
        return Doc(items=items, meta=dict(meta))

    def finish(self, meta: dict) -> Doc:
        self._flush_text()
        if self.block is not None:  # only when the budget ran out, which the constraint prevents
            kind = "audio" if self.block[0] == self.vocab["<audio>"] else "image"
            meta = {**meta, f"unfinished_{kind}_tokens": len(self.block)}
        return Doc(items=list(self.items), meta=dict(meta))


def block_codes(parsed: dict):
    """The codes a parsed image block hands its tokenizer: ``{"sem", "pix"}`` grids for a dual
    tokenizer (its pixel decoder reads the semantic codes too, ILLUME+'s merge), the pixel grid otherwise."""
    return {"sem": parsed["sem"], "pix": parsed["pix"]} if parsed.get("sem") is not None else parsed["pix"]


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
    codes = np.asarray(codes, dtype=np.int64)
    wave = decode_audio_codes(codec, codes)
    facts = {
        "codes_shape": list(codes.shape),
        "frames": int(codes.shape[1]),
        "sample_rate": codec.sample_rate,
        "duration": len(wave) / codec.sample_rate,
        **(meta or {}),
    }
    return Audio(data=encode_wav(wave, codec.sample_rate), format="wav", meta=facts)
