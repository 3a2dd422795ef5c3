"""Data-Juicer multimodal jsonl: ``text`` with placeholders ``<__dj__image>``, ``<__dj__audio>``,
``<__dj__video>`` and chunk ends ``<|__dj__eoc|>``, plus media path lists ``images``, ``audios``,
``videos`` in placeholder order. Other keys (``__dj__stats__``, ids, ...) stay in ``Doc.meta``.

Text between placeholders becomes Text items with the surrounding whitespace removed. The writer puts
one space between pieces; when a record's spacing differs, the exact separators are kept in
``Doc.meta["dj_spacing"]`` so the text is rebuilt character for character. A chunk end is kept as
``meta["dj_eoc"]`` (a count) on the item before it. Item metadata Data-Juicer has no place for travels
in an ``item_meta`` list (one entry per item); consecutive Text items in ``text_lengths``.
"""

from __future__ import annotations

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
    record_id,
    write_jsonl,
)

TOKENS = {"image": "<__dj__image>", "audio": "<__dj__audio>", "video": "<__dj__video>"}
EOC = "<|__dj__eoc|>"
LISTS = {"image": "images", "audio": "audios", "video": "videos"}
_TOKEN_KIND = {v: k for k, v in TOKENS.items()}
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in [*TOKENS.values(), EOC]) + ")")
RESERVED = {"text", "id", "item_meta", "text_lengths", *LISTS.values()}
SPACING, LEADING_EOC = "dj_spacing", "dj_leading_eoc"
_STRUCTURAL_DOC = {SPACING, LEADING_EOC}


def _units(text: str, text_lengths: list[int] | None, spacing: list[str] | None):
    """Split a dj text into units: ('tok', token) or ('text', str), plus the separators around them."""
    if text_lengths is not None and spacing is not None:
        # The writer recorded exact layout (consecutive Text items): walk the text with it.
        units, seps, pos, lengths = [], [], 0, iter(text_lengths)
        for k, sep in enumerate(spacing):
            if not text.startswith(sep, pos):
                raise RecordError("bad_schema", "'dj_spacing' does not match 'text'")
            seps.append(sep)
            pos += len(sep)
            if k == len(spacing) - 1:
                break
            m = _SPLIT.match(text, pos)
            if m:
                units.append(("tok", m.group(0)))
                pos = m.end()
            else:
                n = next(lengths, None)
                if n is None:
                    raise RecordError("bad_schema", "'text_lengths' has fewer entries than text pieces")
                units.append(("text", text[pos : pos + n]))
                pos += n
        if pos != len(text):
            raise RecordError("bad_schema", "'text_lengths' / 'dj_spacing' do not cover 'text'")
        return units, seps
    units, seps = [], []
    pending = ""  # whitespace seen since the last unit
    for piece in _SPLIT.split(text):
        if not piece:
            continue
        if piece in _TOKEN_KIND or piece == EOC:
            seps.append(pending)
            pending = ""
            units.append(("tok", piece))
            continue
        stripped = piece.strip()
        if not stripped:
            pending += piece
            continue
        lead = piece[: len(piece) - len(piece.lstrip())]
        seps.append(pending + lead)
        units.append(("text", stripped))
        pending = piece[len(piece.rstrip()) :]
    seps.append(pending)
    return units, seps


def _default_spacing(n_units: int) -> list[str]:
    return [""] + [" "] * (n_units - 1) + [""] if n_units else [""]


def record_to_doc(rec: dict, ctx: ReadContext) -> Doc:
    text = rec.get("text")
    if not isinstance(text, str):
        raise RecordError("bad_schema", "record needs a 'text' string (Data-Juicer layout)")
    meta = meta_from_extras(rec, RESERVED)
    refs = {}
    for kind, key in LISTS.items():
        value = rec.get(key)
        if value is None:
            value = []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecordError("bad_schema", f"'{key}' must be a list of paths")
        refs[kind] = list(value)
    units, seps = _units(text, rec.get("text_lengths"), meta.get(SPACING))
    counts = {k: sum(1 for u in units if u == ("tok", t)) for k, t in TOKENS.items()}
    wrong = [f"{counts[k]} {TOKENS[k]} for {len(refs[k])} {LISTS[k]}" for k in TOKENS if counts[k] != len(refs[k])]
    if wrong:
        raise RecordError("media_count_mismatch", "; ".join(wrong))
    if seps == _default_spacing(len(units)):
        meta.pop(SPACING, None)
    else:
        meta[SPACING] = seps
    items = []
    next_ref = {k: 0 for k in TOKENS}
    missing = []
    for kind, value in units:
        if kind == "text":
            items.append(Text(value))
        elif value == EOC:
            target = items[-1].meta if items else meta
            key = "dj_eoc" if items else LEADING_EOC
            target[key] = target.get(key, 0) + 1
        else:
            mk = _TOKEN_KIND[value]
            ref = refs[mk][next_ref[mk]]
            next_ref[mk] += 1
            try:
                items.append(ctx.media(mk, ref))
            except RecordError as e:
                if e.reason != "missing_media":
                    raise
                missing.append(e.detail)
    if missing:
        raise RecordError("missing_media", "; ".join(missing))
    item_meta = rec.get("item_meta")
    if item_meta is not None:
        if not isinstance(item_meta, list) or len(item_meta) != len(items):
            raise RecordError("bad_schema", f"'item_meta' must hold one entry per item ({len(items)})")
        for it, m in zip(items, item_meta):
            it.meta.update(m or {})
    return doc_from_items(items, rec, meta)


def doc_to_record(doc: Doc, media: MediaExport) -> dict:
    units: list[str] = [EOC] * int(doc.meta.get(LEADING_EOC, 0))
    lists: dict[str, list] = {k: [] for k in LISTS}
    text_lengths, item_meta = [], []
    after_text = False
    consecutive = False
    for it in doc.items:
        if isinstance(it, Text):
            consecutive |= after_text
            units.append(it.text)
            text_lengths.append(len(it.text))
            after_text = True
        else:
            lists[it.kind].append(media.ref(it))
            units.append(TOKENS[it.kind])
            after_text = False
        eoc = int(it.meta.get("dj_eoc", 0))
        units += [EOC] * eoc
        after_text = after_text and not eoc
        rest = {k: v for k, v in (it.meta if isinstance(it, Text) else item_meta_out(it)).items() if k != "dj_eoc"}
        item_meta.append(rest or None)
    spacing = doc.meta.get(SPACING)
    if not (isinstance(spacing, list) and len(spacing) == len(units) + 1):
        spacing = _default_spacing(len(units))
    text = spacing[0] + "".join(u + s for u, s in zip(units, spacing[1:]))
    rec: dict = {}
    rid = record_id(doc)
    if rid is not None:
        rec["id"] = rid
    rec["text"] = text
    for kind, key in LISTS.items():
        if lists[kind]:
            rec[key] = lists[kind]
    if any(item_meta):
        rec["item_meta"] = item_meta
    extras = extras_from_meta(doc.meta, RESERVED, _STRUCTURAL_DOC)
    if consecutive or any(t != t.strip() or not t for t in (x.text for x in doc.texts)):
        # The plain reader would merge or trim these texts: record the exact layout.
        rec["text_lengths"] = text_lengths
        extras[SPACING] = spacing
    rec.update(extras)
    return rec


def read(path, **opts):
    return read_jsonl(path, record_to_doc, **opts)


def write(docs, out_path, **opts) -> dict:
    return write_jsonl(docs, out_path, doc_to_record, **opts)
