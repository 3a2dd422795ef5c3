"""Coded documents -> token sequences for the unified LM (the layout training and inference share).

A document becomes::

    <s> text ids | image block | text ids | ... </s>

Consecutive Text items are joined with one space and encoded together (the tokenizer sees natural
text); an image item becomes ``vocab.image_block(codes, sem)``; an audio item with codes becomes
``vocab.audio_block(codes)`` when the vocab has an ``audio`` range; a video item with codes becomes
``vocab.video_block(...)`` (keyframes whole, merged frames sparse) when the vocab has the video layout.
Items without usable codes are skipped and counted by reason, never silently. Loss kinds follow the
ids: audio codes are "audio", and video codes, which are image codes of the same tokenizer, "image".

:func:`encode_prompt` is what text-to-image generation feeds the model: for a caption document
``[caption, image]`` the training sequence starts with exactly ``encode_prompt(caption, ...)``, so the
model sees at inference the very prefix it was trained on.

Each sequence also lists the token offsets of its item boundaries: :mod:`mmgen.data.packing` may split
a long document only there, never inside an image block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mmgen.data.doc import Audio, BadRecord, Image, Text, Video
from mmgen.errors import MMGenError
from mmgen.processing.vocab import Vocab

# Which token kinds get a next-token loss. "structural" covers <image>, size tokens, <eol>, ...
TARGET_KINDS = ("text", "structural", "image", "audio")


def encode_text(text: str, text_tokenizer) -> list[int]:
    """Token ids of one text span, without special tokens (shared by training and inference).

    Every piece of text -- a corpus caption in training, a user's prompt at inference -- becomes ids
    here, and only here. ``split_special_tokens`` makes a typed ``</s>``, ``<s>``, ``<pad>``, ``<unk>``
    (or a pretrained tokenizer's ``<|im_start|>``) plain characters: text can never end a document,
    fake a turn or open a block. Structural tokens (``<image>``, ``<eol>``, ...) are Vocab ids past
    the text tokenizer's range, which no text encodes to. Text without such strings is encoded
    exactly as before."""
    return list(text_tokenizer.encode(text.strip(), add_special_tokens=False, split_special_tokens=True))


def _bos_eos(text_tokenizer) -> tuple[int, int]:
    bos, eos = text_tokenizer.bos_token_id, text_tokenizer.eos_token_id
    if bos is None or eos is None:
        raise MMGenError("the text tokenizer has no bos/eos token; set bos_token and eos_token on it")
    return int(bos), int(eos)


def encode_prompt(text: str, text_tokenizer, vocab: Vocab, image: bool = True) -> list[int]:
    """The prefix text-to-image generation starts from: ``<s> text [<image>]``.

    With ``image=False`` it is the prefix for continuing in text (captioning, chat)."""
    bos, _ = _bos_eos(text_tokenizer)
    ids = [bos, *encode_text(text, text_tokenizer)]
    if image:
        ids.append(vocab["<image>"])
    return ids


def _kind_of(vocab: Vocab, ids: np.ndarray, eos: int) -> np.ndarray:
    """Per-token kind index into TARGET_KINDS. ``</s>`` counts as structural: a model trained on
    image targets only must still learn to stop after ``</image>``."""
    out = np.where((ids < vocab.text_size) & (ids != eos), 0, 1)
    for name, (a, b) in vocab.ranges.items():
        out = np.where((ids >= a) & (ids < b), 3 if name == "audio" else 2, out)
    return out


def build_sequence(coded_doc, text_tokenizer, vocab: Vocab, targets: Iterable[str] = TARGET_KINDS) -> dict:
    """One :class:`~mmgen.data.code_shards.CodedDoc` -> token ids plus per-token facts.

    Returns ``{"input_ids": int64 (N,), "loss_mask": bool (N,), "modality": int8 (N,)
    (vocab.modality_of), "boundaries": [offsets where a new item starts], "skipped": {reason: n},
    "doc_id": str}``. ``loss_mask[i]`` says whether token i is a training target; ``<s>`` never is.
    ``targets`` limits the loss to some token kinds (e.g. ``("image", "structural")`` for
    text-to-image only)."""
    bad = set(targets) - set(TARGET_KINDS)
    if bad:
        raise MMGenError(f"unknown loss target kind(s) {sorted(bad)} (known: {', '.join(TARGET_KINDS)})")
    bos, eos = _bos_eos(text_tokenizer)
    doc = coded_doc.doc
    ids: list[int] = [bos]
    boundaries: list[int] = []
    skipped: Counter = Counter()
    pending_text: list[str] = []

    def flush_text():
        if pending_text:
            span = encode_text(" ".join(t.strip() for t in pending_text), text_tokenizer)
            pending_text.clear()
            if span:
                boundaries.append(len(ids))
                ids.extend(span)

    for i, item in enumerate(doc.items):
        if isinstance(item, Text):
            if item.text.strip():
                pending_text.append(item.text)
            continue
        block = media_ids(coded_doc, i, vocab, skipped)
        if block:
            flush_text()
            boundaries.append(len(ids))
            ids.extend(block)
    flush_text()
    boundaries.append(len(ids))
    ids.append(eos)

    arr = np.asarray(ids, dtype=np.int64)
    kinds = _kind_of(vocab, arr, eos)
    wanted = np.isin(kinds, [TARGET_KINDS.index(k) for k in targets])
    loss_mask = wanted.copy()
    loss_mask[0] = False  # <s> has no context to be predicted from
    return {
        "input_ids": arr,
        "loss_mask": loss_mask,
        "modality": vocab.modality_of(arr).astype(np.int8),
        "boundaries": boundaries,
        "cond_span": _cond_span(arr, boundaries, vocab),
        "skipped": dict(skipped),
        "doc_id": getattr(doc, "id", None),
    }


def media_ids(coded_doc, i: int, vocab: Vocab, skipped: Counter) -> list[int]:
    """The block of media item ``i`` (image, audio or video); [] and a counted reason when it has no
    codes, the vocab has no layout for it, or its codes do not fit the vocab (e.g. a grid larger
    than max_grid, a time past the last time token)."""
    item = coded_doc.doc.items[i]
    reason = _no_block_reason(coded_doc, i, vocab)
    if reason is None:
        try:
            return _media_block(coded_doc, i, vocab)
        except MMGenError:
            reason = f"{item.kind}_codes_not_in_vocab"
    skipped[reason] += 1
    return []


def _no_block_reason(coded_doc, i: int, vocab: Vocab) -> str | None:
    """Why item ``i`` cannot become a block whatever its codes hold; None when it can."""
    item = coded_doc.doc.items[i]
    kind = getattr(item, "kind", type(item).__name__)
    if isinstance(item, Audio) and not vocab.has("audio"):
        return "audio_without_codes"  # with no audio range, codes would have nowhere to go
    if isinstance(item, Video) and not vocab.has_video:
        return "video_not_supported"
    if not isinstance(item, (Image, Audio, Video)):
        return f"{kind}_not_supported"
    if i not in coded_doc.codes:
        return f"{kind}_without_codes"
    if isinstance(item, Video) and i not in coded_doc.frames:
        return "video_without_frame_times"
    return None


def _media_block(coded_doc, i: int, vocab: Vocab) -> list[int]:
    item, codes = coded_doc.doc.items[i], np.asarray(coded_doc.codes[i])
    sem = coded_doc.sem.get(i) if vocab.has("sem") else None
    if isinstance(item, Image):
        return vocab.image_block(codes[0] if codes.ndim == 3 and codes.shape[0] == 1 else codes, sem=sem)
    if isinstance(item, Audio):
        return vocab.audio_block(codes)
    frames = coded_doc.frames[i]
    return vocab.video_block(codes, frames[:, 0], frames[:, 1] > 0, sem=sem)


def _cond_span(ids: np.ndarray, boundaries: list[int], vocab: Vocab) -> tuple[int, int] | None:
    """The caption a text-to-image document opens with: ``[start, end)`` of the text right before
    the first image block, which prompt dropout for classifier-free guidance may remove."""
    if len(boundaries) >= 2 and boundaries[0] == 1 and ids[boundaries[1]] == vocab["<image>"]:
        return (boundaries[0], boundaries[1])
    return None


# -- SFT: the chat template ------------------------------------------------------------------------
USER_ROLES = {"user", "human", "question", "system"}
ASSISTANT_ROLES = {"assistant", "gpt", "answer", "model"}
USER_TAG, ASSISTANT_TAG = "User:", "Assistant:"


def chat_layout(stage: str, chat: str = "auto") -> str:
    """Which documents a run builds in the chat template (``data.chat``): as set, or by default every
    one in the sft stage and none before it."""
    return chat if chat != "auto" else ("all" if stage == "sft" else "none")


def has_roles(doc) -> bool:
    """Whether any item names its speaker (a conversation rather than a plain document)."""
    return any(item.meta.get("role") in USER_ROLES | ASSISTANT_ROLES for item in doc.items)


def _turns(doc) -> list[tuple[str, list[int]]]:
    """Items grouped into (role, item indices) turns. Items carry ``meta["role"]`` (LLaVA's
    ``from``, ShapesWorld's question/answer); an item without one continues the current turn. A
    document without any role is an instruction: its first item is the user's, the rest the answer."""
    roles = [item.meta.get("role") for item in doc.items]
    if not has_roles(doc):
        return [("user", [0]), ("assistant", list(range(1, len(doc.items))))] if doc.items else []
    turns: list[tuple[str, list[int]]] = []
    current = "user"
    for i, r in enumerate(roles):
        if r in USER_ROLES:
            role = "user"
        elif r in ASSISTANT_ROLES:
            role = "assistant"
        else:
            role = current
        if not turns or turns[-1][0] != role:
            turns.append((role, []))
        turns[-1][1].append(i)
        current = role
    return turns


def _item_ids(coded_doc, i: int, text_tokenizer, vocab: Vocab, skipped: Counter) -> list[int]:
    """Token ids of one item (text span, image, audio or video block); [] and a counted reason if none."""
    item = coded_doc.doc.items[i]
    if isinstance(item, Text):
        return encode_text(item.text, text_tokenizer) if item.text.strip() else []
    return media_ids(coded_doc, i, vocab, skipped)


def build_chat_sequence(
    coded_doc,
    text_tokenizer,
    vocab: Vocab,
    user_targets: bool = False,
    user_tag: str = USER_TAG,
    assistant_tag: str = ASSISTANT_TAG,
) -> dict:
    """One conversation -> ``<s> User: … Assistant: … </s> User: … Assistant: … </s>``.

    Only the assistant's tokens and the ``</s>`` that ends each assistant turn are targets (the
    model learns to answer and to stop, never to imitate the user); multi-turn, multi-image and
    interleaved text+image answers all follow from the item order. ``user_targets`` (pretraining on
    conversations) makes the user's items targets too, so their pictures still teach the image codes;
    the role tags (``user_tag``, ``assistant_tag``: a bundle's :class:`~mmgen.processing.processor.ChatTemplate`
    holds them) never are. Same keys as :func:`build_sequence`."""
    bos, eos = _bos_eos(text_tokenizer)
    user_ids = encode_text(user_tag, text_tokenizer)
    asst_ids = encode_text(assistant_tag, text_tokenizer)
    ids, mask, boundaries = [bos], [False], []
    skipped: Counter = Counter()
    for role, items in _turns(coded_doc.doc):
        boundaries.append(len(ids))
        tag = asst_ids if role == "assistant" else user_ids
        ids += tag
        mask += [False] * len(tag)
        for i in items:
            piece = _item_ids(coded_doc, i, text_tokenizer, vocab, skipped)
            ids += piece
            mask += [role == "assistant" or user_targets] * len(piece)
        if role == "assistant":
            ids.append(eos)
            mask.append(True)
    if not ids or ids[-1] != eos:
        ids.append(eos)
        mask.append(False)
    arr = np.asarray(ids, dtype=np.int64)
    return {
        "input_ids": arr,
        "loss_mask": np.asarray(mask, dtype=bool),
        "modality": vocab.modality_of(arr).astype(np.int8),
        "boundaries": boundaries,
        "cond_span": None,
        "skipped": dict(skipped),
        "doc_id": getattr(coded_doc.doc, "id", None),
    }


def encode_chat_prompt(
    text: str,
    text_tokenizer,
    image_ids: list[int] | None = None,
    user_tag: str = USER_TAG,
    assistant_tag: str = ASSISTANT_TAG,
) -> list[int]:
    """The prefix a chat turn is answered from: ``<s> User: [image] text Assistant:`` (what
    :func:`build_chat_sequence` trains on with the same tags, so inference sees the trained layout)."""
    bos, _ = _bos_eos(text_tokenizer)
    return [
        bos,
        *encode_text(user_tag, text_tokenizer),
        *(image_ids or []),
        *encode_text(text, text_tokenizer),
        *encode_text(assistant_tag, text_tokenizer),
    ]


@dataclass
class SequenceStats:
    docs_in: int = 0
    sequences: int = 0
    bad_records: int = 0
    empty_docs: int = 0  # nothing left to learn from once unsupported items were skipped
    tokens: int = 0
    skipped_items: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "sequences": self.sequences,
            "bad_records": self.bad_records,
            "empty_docs": self.empty_docs,
            "tokens": self.tokens,
            "skipped_items": dict(self.skipped_items),
        }


def build_sequences(
    records,
    text_tokenizer,
    vocab: Vocab,
    targets: Iterable[str] = TARGET_KINDS,
    max_docs: int | None = None,
    chat: str = "none",
    user_targets: bool = False,
) -> tuple[list[dict], SequenceStats]:
    """:func:`build_sequence` (or :func:`build_chat_sequence`) over a stream of CodedDocs (BadRecords are
    counted, not raised). ``chat``: ``"all"`` puts every document in the chat template, ``"roles"`` only
    those whose items carry roles (:func:`has_roles`), ``"none"`` none; ``user_targets`` as in
    :func:`build_chat_sequence`.

    Counts add up: ``docs_in = sequences + bad_records + empty_docs``."""
    stats = SequenceStats()
    out: list[dict] = []
    targets = tuple(targets)
    for rec in records:
        if max_docs is not None and stats.docs_in >= max_docs:
            break
        stats.docs_in += 1
        if isinstance(rec, BadRecord):
            stats.bad_records += 1
            continue
        as_chat = chat == "all" or (chat == "roles" and has_roles(rec.doc))
        seq = (
            build_chat_sequence(rec, text_tokenizer, vocab, user_targets)
            if as_chat
            else build_sequence(rec, text_tokenizer, vocab, targets)
        )
        stats.skipped_items.update(seq["skipped"])
        if len(seq["input_ids"]) <= 2 or not seq["loss_mask"].any():  # only <s> </s>, or no target left
            stats.empty_docs += 1
            continue
        stats.sequences += 1
        stats.tokens += len(seq["input_ids"])
        out.append(seq)
    return out, stats


def doc_texts(records) -> Iterable[str]:
    """All Text items of a stream of CodedDocs/Docs (what the text tokenizer is trained on)."""
    for rec in records:
        if isinstance(rec, BadRecord):
            continue
        doc = getattr(rec, "doc", rec)
        for item in doc.items:
            if isinstance(item, Text) and item.text.strip():
                yield item.text.strip()
