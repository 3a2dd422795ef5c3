"""MMC4: ``text_list`` (the document's sentences) and ``image_info``, a list of
``{"image_name" | "raw_url", "matched_text_index", "matched_sim", ...}``.

An image is placed right after the sentence it was matched to. ``raw_url`` becomes the item's
``url`` and ``image_name`` its local file: an entry whose file is not here (MMC4 ships URLs) is a URL
reference, with ``image_name`` kept in its meta so that it is written back. mmgen extends the layout
without changing its meaning for other readers:

- ``audio_info`` / ``video_info`` (with ``audio_name`` / ``video_name``) for speech and video;
- ``"before_text": true`` on an entry whose item comes *before* its sentence (a Doc opening with media);
- ``"item_index"`` on every entry, written only when the placement rule cannot reproduce the Doc's
  order by itself (several media kinds after one sentence in an unusual order);
- ``text_meta``, a list parallel to ``text_list``, written only when a sentence carries metadata;
- in other formats, ``mmc4_info_index`` on a medium's meta when the record's ``image_info`` order is not
  the document order (rows of ``similarity_matrix`` follow ``image_info``, so that order is kept).

Every other entry field stays in the item's meta, every other record key in ``Doc.meta``.
"""

from __future__ import annotations

from mmgen.data.doc import MEDIA_TYPES, Audio, Doc, Image, Text, Video
from mmgen.data.formats.common import (
    MediaExport,
    ReadContext,
    RecordError,
    doc_from_items,
    extras_from_meta,
    meta_from_extras,
    read_jsonl,
    record_id,
    write_jsonl,
)

INFO_LISTS = {
    "image_info": ("image", "image_name"),
    "audio_info": ("audio", "audio_name"),
    "video_info": ("video", "video_name"),
}
RESERVED = {"id", "text_list", "text_meta", *INFO_LISTS}
INFO_INDEX = "mmc4_info_index"  # item meta: position in its info list, when that is not document order
_ENTRY_STRUCTURAL = {"matched_text_index", "before_text", "item_index", INFO_INDEX}
_KIND_LIST = {Image: "image_info", Audio: "audio_info", Video: "video_info"}


def _canonical_order(n_texts: int, entries: list[tuple[int, bool]]) -> list[tuple[str, int]]:
    """Item order the placement rule gives: ('t', sentence) / ('m', entry) in document order.

    ``entries`` are (matched_text_index, before_text) in reading order (image_info, audio_info, video_info)."""
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for k, (idx, is_before) in enumerate(entries):
        (before if is_before else after).setdefault(idx, []).append(k)
    order: list[tuple[str, int]] = []
    for t in range(n_texts):
        order += [("m", k) for k in before.get(t, [])]
        order.append(("t", t))
        order += [("m", k) for k in after.get(t, [])]
    if n_texts == 0:  # a text-free doc: every entry points at sentence 0, which does not exist
        order += [("m", k) for k in range(len(entries))]
    return order


def record_to_doc(rec: dict, ctx: ReadContext) -> Doc:
    texts = rec.get("text_list")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RecordError("bad_schema", "record needs a 'text_list' list of strings (MMC4 layout)")
    text_meta = rec.get("text_meta") or [None] * len(texts)
    if not isinstance(text_meta, list) or len(text_meta) != len(texts):
        raise RecordError("bad_schema", "'text_meta' must be parallel to 'text_list'")
    media_items, placement, explicit, lists = [], [], [], {}
    for key in INFO_LISTS:
        infos = rec.get(key)
        if infos is None:
            continue
        if not isinstance(infos, list):
            raise RecordError("bad_schema", f"'{key}' must be a list")
        for j, info in enumerate(infos):
            if not isinstance(info, dict):
                raise RecordError("bad_schema", f"{key}[{j}] is not an object")
            idx = info.get("matched_text_index", 0)
            if not isinstance(idx, int) or idx < 0 or (texts and idx >= len(texts)) or (not texts and idx != 0):
                raise RecordError(
                    "bad_schema",
                    f"{key}[{j}].matched_text_index {idx!r} is not a sentence index (text_list has {len(texts)})",
                )
            media_items.append(_entry_item(ctx, key, j, info))
            lists.setdefault(key, []).append(media_items[-1])
            placement.append((idx, bool(info.get("before_text"))))
            explicit.append(info.get("item_index"))
    sentences = [Text(t, dict(m or {})) for t, m in zip(texts, text_meta)]
    n = len(sentences) + len(media_items)
    if media_items and all(isinstance(x, int) for x in explicit):
        if sorted(explicit) != sorted(set(explicit)) or max(explicit) >= n:
            raise RecordError("bad_schema", "'item_index' values must be distinct positions in the document")
        slots: list = [None] * n
        for item, pos in zip(media_items, explicit):
            slots[pos] = item
        it = iter(sentences)
        items = [s if s is not None else next(it) for s in slots]
    else:
        items = [
            sentences[k] if kind == "t" else media_items[k] for kind, k in _canonical_order(len(sentences), placement)
        ]
    where = {id(x): p for p, x in enumerate(items)}
    for entries in lists.values():
        positions = [where[id(m)] for m in entries]
        if positions != sorted(positions):  # image_info is not in document order: keep its order
            for j, m in enumerate(entries):
                m.meta[INFO_INDEX] = j
    return doc_from_items(items, rec, meta_from_extras(rec, RESERVED))


def _entry_item(ctx: ReadContext, key: str, j: int, info: dict):
    """The medium of one info entry: the local file ``image_name`` if it is here, with ``raw_url`` as its
    URL; else a URL reference to ``raw_url`` (keeping ``image_name`` in its meta to write it back)."""
    kind, name_key = INFO_LISTS[key]
    name, url = info.get(name_key), info.get("raw_url")
    if not name and not url:
        raise RecordError("bad_schema", f"{key}[{j}] has neither '{name_key}' nor 'raw_url'")
    meta = {k: v for k, v in info.items() if k not in _ENTRY_STRUCTURAL and k not in (name_key, "raw_url")}
    if name:
        try:
            item = ctx.media(kind, name, meta)
        except RecordError as e:
            if e.reason != "missing_media" or not url:
                raise
            return MEDIA_TYPES[kind](url=url, meta={**meta, name_key: name})
        if url and item.url not in (None, url):
            item.meta["raw_url"] = url  # image_name is itself another URL: keep both
        elif url:
            item.url = url
        return item
    return MEDIA_TYPES[kind](url=url, meta=meta)


def doc_to_record(doc: Doc, media: MediaExport) -> dict:
    rec: dict = {}
    rid = record_id(doc)
    if rid is not None:
        rec["id"] = rid
    texts = [it for it in doc.items if isinstance(it, Text)]
    rec["text_list"] = [t.text for t in texts]
    if any(t.meta for t in texts):
        rec["text_meta"] = [dict(t.meta) if t.meta else None for t in texts]
    lists: dict[str, list] = {"image_info": []}
    doc_pos: dict[str, list[int]] = {}
    info_index: dict[str, list] = {}
    n_seen = 0
    for pos, it in enumerate(doc.items):
        if isinstance(it, Text):
            n_seen += 1
            continue
        key = _KIND_LIST[type(it)]
        name_key = INFO_LISTS[key][1]
        entry: dict = {}
        if it.fetched:
            entry[name_key] = media.ref(it)
        elif name_key in it.meta:
            entry[name_key] = it.meta[name_key]
        if it.url is not None and "raw_url" not in it.meta and entry.get(name_key) != it.url:
            entry["raw_url"] = it.url
        # Matched to the sentence just before it; a doc opening with media points at its first sentence.
        entry["matched_text_index"] = max(n_seen - 1, 0)
        if n_seen == 0 and texts:
            entry["before_text"] = True
        entry.update({k: v for k, v in it.meta.items() if k not in _ENTRY_STRUCTURAL and k != name_key})
        lists.setdefault(key, []).append(entry)
        doc_pos.setdefault(key, []).append(pos)
        info_index.setdefault(key, []).append(it.meta.get(INFO_INDEX))
    for key, idx in info_index.items():
        if all(isinstance(x, int) for x in idx) and sorted(idx) == list(range(len(idx))):
            order = sorted(range(len(idx)), key=idx.__getitem__)  # the source's image_info order
            lists[key] = [lists[key][k] for k in order]
            doc_pos[key] = [doc_pos[key][k] for k in order]
    entries = [e for key in INFO_LISTS for e in lists.get(key, [])]
    positions = [p for key in INFO_LISTS for p in doc_pos.get(key, [])]
    order = _canonical_order(len(texts), [(e["matched_text_index"], bool(e.get("before_text"))) for e in entries])
    text_pos = [p for p, it in enumerate(doc.items) if isinstance(it, Text)]
    rebuilt = [text_pos[k] if kind == "t" else positions[k] for kind, k in order]
    if rebuilt != list(range(len(doc.items))):
        for e, p in zip(entries, positions):
            e["item_index"] = p
    rec.update(lists)
    rec.update(extras_from_meta(doc.meta, RESERVED))
    return rec


def read(path, **opts):
    return read_jsonl(path, record_to_doc, **opts)


def write(docs, out_path, **opts) -> dict:
    return write_jsonl(docs, out_path, doc_to_record, **opts)
