"""LLaVA / ShareGPT conversations (SFT data): ``{"id", "image": str | [str], "conversations":
[{"from": "human" | "gpt", "value": "...<image>..."}]}``; also ``video`` / ``<video>`` and
``audio`` / ``<audio>`` the same way. Reads ``.jsonl`` and LLaVA's ``.json`` arrays.

Each turn's text between placeholders becomes a Text item (verbatim, so the turn is rebuilt exactly);
a placeholder becomes the media item. Every item gets ``meta["role"]`` (the turn's ``from``) and
``meta["turn"]``; other keys of a turn are copied to its items' meta. Item metadata a turn cannot hold
goes to an ``item_meta`` list.

A turn holds one text between placeholders, so only a conversation converts without loss: every item
with its ``role`` and ``turn``, no two texts in a row inside a turn. Any other Doc (an interleaved web
document) raises :class:`LossyConversionError` unless written with ``lossy=True``: then a Doc without
roles becomes one ``human`` turn and consecutive texts are joined by a newline.
"""

from __future__ import annotations

import functools
import re

from mmgen.data.doc import Doc, Text
from mmgen.data.formats.common import (
    MediaExport,
    ReadContext,
    RecordError,
    doc_from_items,
    extras_from_meta,
    item_meta_out,
    meta_from_extras,
    read_jsonl,
    write_jsonl,
)
from mmgen.errors import LossyConversionError

TOKENS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
_TOKEN_KIND = {v: k for k, v in TOKENS.items()}
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TOKENS.values()) + ")")
RESERVED = {"id", "conversations", "item_meta", *TOKENS}
AS_LIST = "llava_media_as_list"  # Doc.meta: kinds whose single reference the source wrote as a list
_ITEM_STRUCTURAL = {"role", "turn"}


def record_to_doc(rec: dict, ctx: ReadContext) -> Doc:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        raise RecordError("bad_schema", "record needs a 'conversations' list of {from, value} turns (LLaVA layout)")
    meta = meta_from_extras(rec, RESERVED)
    refs, as_list = {}, []
    for kind in TOKENS:
        value = rec.get(kind)
        if value is None:
            value = []
        elif isinstance(value, list):
            if len(value) <= 1:
                as_list.append(kind)
        else:
            value = [value]
        refs[kind] = value
    if as_list:
        meta[AS_LIST] = as_list
    values = [t.get("value") for t in conv]
    if not all(isinstance(v, str) for v in values):
        raise RecordError("bad_schema", "every turn needs a string 'value'")
    counts = {k: sum(v.count(t) for v in values) for k, t in TOKENS.items()}
    wrong = [
        f"{counts[k]} {TOKENS[k]} for {len(refs[k])} '{k}' references" for k in TOKENS if counts[k] != len(refs[k])
    ]
    if wrong:
        raise RecordError("media_count_mismatch", "; ".join(wrong))
    items, missing, used = [], [], {k: 0 for k in TOKENS}
    for n, turn in enumerate(conv):
        base = {k: v for k, v in turn.items() if k not in ("from", "value")}
        base.update(role=turn.get("from"), turn=n)
        for piece in _SPLIT.split(turn["value"]):
            if not piece:
                continue
            if piece in _TOKEN_KIND:
                kind = _TOKEN_KIND[piece]
                ref = refs[kind][used[kind]]
                used[kind] += 1
                try:
                    items.append(ctx.media(kind, ref, dict(base)))
                except RecordError as e:
                    if e.reason != "missing_media":
                        raise
                    missing.append(e.detail)
            else:
                items.append(Text(piece, dict(base)))
    if missing:
        raise RecordError("missing_media", "; ".join(missing))
    item_meta = rec.get("item_meta")
    if item_meta is not None:
        if not isinstance(item_meta, list) or len(item_meta) != len(items):
            raise RecordError("bad_schema", f"'item_meta' must hold one entry per item ({len(items)})")
        for it, m in zip(items, item_meta):
            it.meta.update(m or {})
    return doc_from_items(items, rec, meta)


def loss(doc: Doc) -> str | None:
    """Why ``doc`` cannot become LLaVA turns without loss, or None when it can."""
    no_role = sum(1 for it in doc.items if "role" not in it.meta or "turn" not in it.meta)
    merged = sum(
        1
        for a, b in zip(doc.items, doc.items[1:])
        if isinstance(a, Text) and isinstance(b, Text) and a.meta.get("turn", -1) == b.meta.get("turn", -1)
    )
    if not no_role and not merged:
        return None
    n_texts = len(doc.texts)
    why = [f"{no_role} of its {len(doc.items)} items have no conversation role/turn"] if no_role else []
    if merged:
        why.append(f"its {n_texts} texts would merge into {n_texts - merged}")
    return "; ".join(why)


def doc_to_record(doc: Doc, media: MediaExport, lossy: bool = False) -> dict:
    if not lossy and (why := loss(doc)) is not None:
        where = ":".join(str(doc.provenance[k]) for k in ("source", "line") if k in doc.provenance)
        raise LossyConversionError(
            f"doc {doc.id!r}{f' ({where})' if where else ''} cannot be written as LLaVA turns without loss: {why}; "
            "pass --lossy (lossy=True) to convert anyway"
        )
    # Group items into turns: by the recorded turn index, else by runs of the same role.
    groups: list[list] = []
    key_prev = object()
    for it in doc.items:
        key = ("turn", it.meta["turn"]) if "turn" in it.meta else ("role", it.meta.get("role", "human"))
        if key != key_prev:
            groups.append([])
            key_prev = key
        groups[-1].append(it)
    refs: dict[str, list] = {k: [] for k in TOKENS}
    conversations, item_meta = [], []
    for group in groups:
        # Keys every item of the turn shares are the turn's own keys; the rest is per item.
        shared = dict(group[0].meta)
        for it in group[1:]:
            shared = {k: v for k, v in shared.items() if k in it.meta and it.meta[k] == v}
        role = shared.get("role", group[0].meta.get("role", "human"))
        turn = {"from": role, "value": ""}
        turn.update({k: v for k, v in shared.items() if k not in _ITEM_STRUCTURAL})
        prev_text = False
        for it in group:
            meta = it.meta if isinstance(it, Text) else item_meta_out(it)
            rest = {k: v for k, v in meta.items() if k not in shared and k not in _ITEM_STRUCTURAL}
            if isinstance(it, Text) and prev_text:
                # A turn holds one text between placeholders: consecutive texts merge (lossy, by design).
                turn["value"] += "\n" + it.text
                item_meta[-1] = {**(item_meta[-1] or {}), **rest} or None
                continue
            if isinstance(it, Text):
                turn["value"] += it.text
                prev_text = True
            else:
                refs[it.kind].append(media.ref(it))
                turn["value"] += TOKENS[it.kind]
                prev_text = False
            item_meta.append(rest or None)
        conversations.append(turn)
    rec: dict = {"id": doc.id}
    as_list = set(doc.meta.get(AS_LIST) or [])
    for kind, r in refs.items():
        if r or kind in as_list:
            rec[kind] = r if (len(r) != 1 or kind in as_list) else r[0]
    rec["conversations"] = conversations
    if any(item_meta):
        rec["item_meta"] = item_meta
    rec.update(extras_from_meta(doc.meta, RESERVED, {AS_LIST}))
    return rec


def read(path, **opts):
    return read_jsonl(path, record_to_doc, whole_json_ok=True, exts=(".jsonl", ".json"), **opts)


def write(docs, out_path, lossy: bool = False, **opts) -> dict:
    return write_jsonl(
        docs,
        out_path,
        functools.partial(doc_to_record, lossy=lossy),
        as_json_array=str(out_path).endswith(".json"),
        **opts,
    )
