"""OBELICS / OmniCorpus: parallel lists ``texts`` and ``images`` (each position holds one of them, the
other is None), ``metadata`` (one entry per position; OBELICS stores the whole list as a JSON string),
and ``general_metadata``.

mmgen extends the layout for speech and video the same way: optional parallel lists ``audios`` and
``videos``, written only when a Doc has such items. Every other record key is kept in ``Doc.meta``.
"""

from __future__ import annotations

import json

from mmgen.data.doc import Audio, Doc, Image, Text, Video
from mmgen.data.formats.common import (
    MediaExport,
    ReadContext,
    RecordError,
    doc_from_items,
    extras_from_meta,
    item_meta_out,
    meta_from_extras,
    read_jsonl,
    record_id,
    write_jsonl,
)

MEDIA_LISTS = {"images": "image", "audios": "audio", "videos": "video"}
RESERVED = {"id", "texts", "metadata", *MEDIA_LISTS}
# Doc.meta flag: the source stored ``metadata`` as a JSON string (OBELICS) rather than a list (OmniCorpus).
META_AS_STRING = "obelics_metadata_as_string"


def record_to_doc(rec: dict, ctx: ReadContext) -> Doc:
    texts = rec.get("texts")
    if not isinstance(texts, list):
        raise RecordError("bad_schema", "record needs a 'texts' list (OBELICS layout)")
    n = len(texts)
    lists = {}
    for key in MEDIA_LISTS:
        value = rec.get(key)
        if value is None and key != "images":
            continue
        if not isinstance(value, list) or len(value) != n:
            raise RecordError("bad_schema", f"'{key}' must be a list as long as 'texts' ({n})")
        lists[key] = value
    meta = meta_from_extras(rec, RESERVED)
    metadata = rec.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as e:
            raise RecordError("bad_schema", f"'metadata' is a string but not JSON: {e}") from None
        meta[META_AS_STRING] = True
    if metadata is None:
        metadata = [None] * n
    if not isinstance(metadata, list) or len(metadata) != n:
        raise RecordError("bad_schema", f"'metadata' must hold one entry per position ({n})")
    items = []
    for i in range(n):
        present = [(k, v[i]) for k, v in (("texts", texts), *lists.items()) if v[i] is not None]
        if len(present) != 1:
            what = "neither text nor media" if not present else "both " + " and ".join(k for k, _ in present)
            raise RecordError("bad_schema", f"position {i} holds {what}")
        key, value = present[0]
        m = metadata[i]
        item_meta = m if isinstance(m, dict) else ({} if m is None else {"obelics_metadata": m})
        if key == "texts":
            if not isinstance(value, str):
                raise RecordError("bad_schema", f"texts[{i}] is not a string")
            items.append(Text(value, dict(item_meta)))
        else:
            items.append(ctx.media(MEDIA_LISTS[key], value, item_meta))
    return doc_from_items(items, rec, meta)


def doc_to_record(doc: Doc, media: MediaExport) -> dict:
    n = len(doc.items)
    rec: dict = {}
    rid = record_id(doc)
    if rid is not None:
        rec["id"] = rid
    rec["texts"] = [None] * n
    rec["images"] = [None] * n
    kinds = {"audios": Audio, "videos": Video}
    for key, cls in kinds.items():
        if any(isinstance(it, cls) for it in doc.items):
            rec[key] = [None] * n
    metadata = []
    for i, it in enumerate(doc.items):
        if isinstance(it, Text):
            rec["texts"][i] = it.text
        else:
            key = {Image: "images", Audio: "audios", Video: "videos"}[type(it)]
            rec[key][i] = media.ref(it)
        m = it.meta if isinstance(it, Text) else item_meta_out(it)
        if set(m) == {"obelics_metadata"}:
            metadata.append(m["obelics_metadata"])
        else:
            metadata.append(dict(m) if m else None)
    as_string = bool(doc.meta.get(META_AS_STRING))
    rec["metadata"] = json.dumps(metadata, ensure_ascii=False) if as_string else metadata
    rec.update(extras_from_meta(doc.meta, RESERVED, {META_AS_STRING}))
    return rec


def read(path, **opts):
    return read_jsonl(path, record_to_doc, **opts)


def write(docs, out_path, **opts) -> dict:
    return write_jsonl(docs, out_path, doc_to_record, **opts)
