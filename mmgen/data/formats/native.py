"""mmgen's own jsonl: one :meth:`Doc.to_json` per line, media by path (relative to the file's folder)
or by ``url`` (a reference not fetched; a fetched medium has both).

Lossless by construction; it is what ``mmgen.data.shards.read_docs`` reads for ``.jsonl`` inputs."""

from __future__ import annotations

from mmgen.data.doc import Doc, Text
from mmgen.data.formats.common import MediaExport, ReadContext, RecordError, read_jsonl, write_jsonl


def record_to_doc(rec: dict, ctx: ReadContext) -> Doc:
    if not isinstance(rec.get("items"), list):
        raise RecordError("bad_schema", "record needs an 'items' list (mmgen Doc JSON)")
    missing = []
    for k, entry in enumerate(rec["items"]):
        if not isinstance(entry, dict):
            raise RecordError("bad_schema", f"items[{k}] is not an object")
        if entry.get("type") != "text" and entry.get("path") and not entry.get("member"):
            path, found = ctx.resolve(entry["path"])  # a URL stays a URL: the item is a reference
            if not found:
                missing.append(f"{entry.get('type')} file not found: {entry['path']} (resolved to {path})")
            entry = dict(entry, path=path)
            rec["items"][k] = entry
    if missing:
        raise RecordError("missing_media", "; ".join(missing))
    if any(e.get("member") for e in rec["items"]):
        raise RecordError(
            "bad_schema", "items name tar members: this is a WebDataset sample, read it with format 'wds'"
        )
    return Doc.from_json(rec, base_dir=ctx.base_dir)


def doc_to_record(doc: Doc, media: MediaExport) -> dict:
    obj = doc.to_json()
    for it, entry in zip(doc.items, obj["items"]):
        if not isinstance(it, Text) and it.fetched:
            entry["path"] = media.ref(it)
            entry.pop("source_path", None)  # absolute paths of this machine mean nothing elsewhere
    return obj


def read(path, **opts):
    return read_jsonl(path, record_to_doc, **opts)


def write(docs, out_path, **opts) -> dict:
    return write_jsonl(docs, out_path, doc_to_record, **opts)
