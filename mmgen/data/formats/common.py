"""Shared machinery of the jsonl-based converters: line reading, media path resolution, media export,
and the rules that keep unknown fields so that ``X -> Doc -> X`` is lossless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgen.data.doc import MEDIA_TYPES, BadRecord, Doc
from mmgen.data.input_kind import InputKind, open_decompressed, sniff_input
from mmgen.data.media import open_image
from mmgen.data.media_format import is_url
from mmgen.errors import MediaError, MMGenError
from mmgen.paths import expand_inputs

# Doc.meta keys that collide with a format's own field names travel inside this record key.
COLLISION_KEY = "mmgen_meta"
# Item metadata key carrying the source URL of a medium whose bytes the record references locally
# (a fetched image): the format's media field holds the local copy, this key the URL it came from.
URL_KEY = "mmgen_url"


class RecordError(Exception):
    """A record cannot become a Doc; ``reason`` is the BadRecord reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def expand_jsonl_inputs(path, exts: tuple[str, ...] = (".jsonl",)) -> list[str]:
    return expand_inputs(path, exts)


def checked_media_root(media_root) -> str | None:
    """``media_root`` as an absolute folder (None stays None); MMGenError if it is no folder."""
    if media_root is None:
        return None
    folder = os.path.expanduser(str(media_root))
    if not os.path.isdir(folder):
        raise MMGenError(f"media root '{media_root}' is not a directory (give the folder holding the media files)")
    return os.path.abspath(folder)


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies under ``root`` (both already absolute and resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class ReadContext:
    """Where a record came from, and how its media references map to files.

    A record's media paths stay inside the corpus: the input file's folder, ``media_root`` and the
    targets of ``path_map`` (folders the user named). A reference whose file resolves elsewhere (``..``,
    an absolute path, a symlink leading out) is refused with reason ``path_outside_root`` unless
    ``allow_outside_root``; ``~`` in a record is a plain folder name, never the user's home."""

    source: str
    media_root: str | None = None
    path_map: dict[str, str] = field(default_factory=dict)
    line: int | None = None
    allow_outside_root: bool = False

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.source))

    @functools.cached_property
    def roots(self) -> list[str]:
        """The corpus folders, symlinks resolved: media paths must stay inside one of them."""
        dirs = [self.base_dir] + ([os.path.expanduser(self.media_root)] if self.media_root else [])
        dirs += [v if v.endswith(os.sep) or os.path.isdir(v) else os.path.dirname(v) for v in self.path_map.values()]
        return [os.path.realpath(d) for d in dirs if d]

    @functools.cached_property
    def _real_dirs(self) -> dict[str, str]:
        return {}

    def _realpath(self, path: str) -> str:
        """``os.path.realpath`` with the folders' resolution cached: a corpus names thousands of files
        in a few folders, and resolving every component of every path is a system call each."""
        if os.path.islink(path):
            return os.path.realpath(path)
        cache = self._real_dirs
        folder, name = os.path.split(path)
        if folder not in cache:
            cache[folder] = os.path.realpath(folder)
        return os.path.join(cache[folder], name)

    def check_inside(self, path: str, ref: str) -> str:
        """``path`` with its symlinks resolved, or RecordError ``path_outside_root``."""
        real = self._realpath(os.path.abspath(path))
        if not self.allow_outside_root and not any(inside(real, r) for r in self.roots):
            raise RecordError(
                "path_outside_root",
                f"media path {ref!r} resolves to {real}, outside the corpus ({', '.join(self.roots)}); "
                "pass --media-root for the folder holding the media, or --allow-outside-root",
            )
        return real

    def resolve(self, ref: str) -> tuple[str, bool]:
        """``ref`` -> (path or URL, found). URLs are kept by reference and count as found.

        A relative path is tried against the input file's folder, then against ``media_root``, then
        against ``media_root`` with leading folders dropped one by one, so references written on
        another machine (``../../tests/ops/data/x.png``) find ``media_root/x.png``. A file found
        outside the corpus raises RecordError ``path_outside_root`` (see the class)."""
        ref = str(ref)
        if is_url(ref):
            return ref, True
        original = ref
        for prefix, repl in self.path_map.items():
            if ref.startswith(prefix):
                ref = repl + ref[len(prefix) :]
                break
        if "\x00" in ref:
            raise RecordError("bad_schema", f"media path {original!r} holds a NUL byte")
        if os.path.isabs(ref):
            candidates = [os.path.normpath(ref)]
        else:
            candidates = [os.path.normpath(os.path.join(self.base_dir, ref))]
            if self.media_root:
                root = os.path.abspath(os.path.expanduser(self.media_root))
                parts = [p for p in Path(ref).parts if p not in ("..", ".")]
                candidates += [os.path.join(root, *parts[k:]) for k in range(len(parts))]
        for c in candidates:
            try:
                found = os.path.isfile(c)
            except (OSError, ValueError):  # a name too long for the file system is no file
                found = False
            if found:
                return self.check_inside(c, original), True
        return candidates[0], False

    def media(self, kind: str, ref: Any, meta: dict | None = None):
        """A media item for ``ref`` (a path/URL, or a HF-datasets style ``{"bytes", "path"}`` dict)."""
        meta = dict(meta or {})
        if isinstance(ref, dict) and ref.get("bytes") is not None:
            data = ref["bytes"]
            return MEDIA_TYPES[kind](
                data=data if isinstance(data, bytes) else bytes(data), path=ref.get("path"), meta=meta
            )
        if isinstance(ref, dict):
            ref = ref.get("path")
        if not isinstance(ref, str) or not ref:
            raise RecordError("bad_schema", f"{kind} reference must be a path or URL string, got {ref!r}")
        path, found = self.resolve(ref)  # a URL stays a URL: a reference, fetched only by `mmgen fetch`
        if not found:
            where = (
                f"; also looked under media_root {self.media_root}"
                if self.media_root
                else "; relative paths are read from the input file's folder (mmgen convert takes --media-root)"
            )
            raise RecordError("missing_media", f"{kind} file not found: {ref} (resolved to {path}{where})")
        return MEDIA_TYPES[kind](path=path, meta=meta)

    def bad(self, reason: str, detail: str, raw: str | None = None) -> BadRecord:
        return BadRecord(source=self.source, reason=reason, detail=detail, line=self.line, raw=raw)


def iter_json_records(
    path: str, ctx: ReadContext, whole_json_ok: bool = False, byte_range: tuple[int, int, int] | None = None, kind=None
) -> Iterator[tuple[int, str, Any]]:
    """(line number, raw text, parsed object or a BadRecord) for each non-blank line.

    The file may be gzip or zstd compressed (told by its magic bytes, or by ``kind``, the
    :class:`~mmgen.data.input_kind.InputKind` already sniffed). With ``whole_json_ok`` a file
    holding one JSON array (LLaVA's ``.json`` files) yields its elements, numbered from 1 by position.
    ``byte_range = (start, end, first_line)`` reads only the lines that START in ``[start, end)`` of an
    uncompressed file, numbering them from ``first_line`` (a work unit of a large file)."""
    if kind is None:
        kind = InputKind("jsonl") if byte_range is not None else sniff_input(path)
    if kind.kind != "jsonl":
        hint = "format 'wds'" if kind.kind == "tar" else "mmgen filter, which reads parquet"
        raise MMGenError(
            f"{path} holds a {kind.kind}{' (' + kind.compression + ')' if kind.compression else ''}, "
            f"not jsonl: read it with {hint}"
        )
    f = open_decompressed(path, kind.compression)
    try:
        yield from _json_lines(f, ctx, whole_json_ok and kind.array, byte_range)
    except (OSError, EOFError, ValueError, MMGenError) as e:  # a damaged compressed stream: keep what came before
        ctx.line = None
        yield 0, "", ctx.bad("corrupt_input", f"{type(e).__name__}: {e}")
    finally:
        f.close()


def _json_lines(f, ctx: ReadContext, array: bool, byte_range):
    if array:
        try:
            arr = json.loads(f.read().decode("utf-8", "replace"))
        except (ValueError, RecursionError) as e:
            ctx.line = None
            yield 0, "", ctx.bad("bad_json", f"file is not valid JSON: {str(e)[:200]}")
            return
        if not isinstance(arr, list):
            arr = [arr]
        for i, obj in enumerate(arr, 1):
            yield i, "", obj
        return
    pos, lineno, end = 0, 0, None
    if byte_range is not None:
        start, end, lineno = byte_range
        lineno -= 1
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # to the first line that starts at or after ``start``
    for braw in f:
        if end is not None and pos >= end:
            break
        pos += len(braw)
        lineno += 1
        line = braw.decode("utf-8", "replace")
        if not line.strip():
            continue
        try:
            yield lineno, line, json.loads(line)
        except json.JSONDecodeError as e:
            ctx.line = lineno
            yield (
                lineno,
                line,
                ctx.bad("bad_json", f"line {lineno}: {e.msg} at column {e.colno}", raw=line.rstrip("\n")),
            )
        except (ValueError, RecursionError) as e:  # nesting deeper than the parser goes, huge numbers
            ctx.line = lineno
            yield (
                lineno,
                line,
                ctx.bad("bad_json", f"line {lineno}: {type(e).__name__}: {str(e)[:200]}", raw=line.rstrip("\n")),
            )


def read_jsonl(
    path,
    record_to_doc: Callable[[dict, ReadContext], Doc],
    media_root: str | None = None,
    path_map: dict | None = None,
    whole_json_ok: bool = False,
    exts=(".jsonl",),
    allow_outside_root: bool = False,
    byte_range: tuple[int, int, int] | None = None,
    kind=None,
    **_,
) -> Iterator[Doc | BadRecord]:
    """Docs from jsonl files via ``record_to_doc``; every failure becomes a BadRecord and the run goes on.

    ``byte_range``: only the lines starting in that range of the one file ``path``; ``kind``: what the
    one file ``path`` holds, already sniffed (see :func:`iter_json_records`)."""
    files = [str(path)] if byte_range is not None or kind is not None else expand_jsonl_inputs(path, exts)
    for file in files:
        ctx = ReadContext(
            source=file, media_root=media_root, path_map=dict(path_map or {}), allow_outside_root=allow_outside_root
        )
        for lineno, raw, obj in iter_json_records(file, ctx, whole_json_ok, byte_range, kind):
            if isinstance(obj, BadRecord):
                yield obj
                continue
            ctx.line = lineno
            raw_text = raw.rstrip("\n") or json.dumps(obj, ensure_ascii=False)
            if not isinstance(obj, dict):
                yield ctx.bad("bad_schema", f"record is a JSON {type(obj).__name__}, expected an object", raw_text)
                continue
            try:
                doc = record_to_doc(obj, ctx)
            except RecordError as e:
                yield ctx.bad(e.reason, e.detail, raw_text)
                continue
            except MediaError as e:  # unreadable file found only when hashing for the content id
                yield ctx.bad("missing_media", str(e), raw_text)
                continue
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError, OverflowError) as e:
                yield ctx.bad("bad_schema", f"{type(e).__name__}: {str(e)[:200]}", raw_text)
                continue
            doc.provenance.setdefault("source", file)
            doc.provenance.setdefault("line", lineno)
            yield doc


def checked_media(records: Iterable[Doc | BadRecord]) -> Iterator[Doc | BadRecord]:
    """Docs whose images pass the header checks of :func:`mmgen.data.media.open_image` (pixel limit,
    an image at all, the format it claims); a Doc that fails becomes a BadRecord with the reason.
    URL references are not fetched, so not checked; a missing file is left to the writer."""
    for rec in records:
        if isinstance(rec, Doc):
            try:
                for it in rec.images:
                    if not it.exists():  # a URL reference (no path) or a file gone: not checked here
                        continue
                    open_image(it.load(), it.path, it.declared_format()).close()
            except MediaError as e:
                rec = BadRecord(
                    source=str(rec.provenance.get("source", rec.provenance.get("shard", ""))),
                    line=rec.provenance.get("line"),
                    member=rec.provenance.get("member"),
                    reason=e.reason,
                    detail=f"doc {rec.id}: {e}",
                )
        yield rec


class MediaExport:
    """Writes media bytes into ``media/`` beside an output file, named by content hash, and returns the
    reference (relative to the output's folder) to put in the record. Same bytes -> one file."""

    def __init__(self, out_path: str | Path, subdir: str = "media"):
        self.base = Path(out_path).resolve().parent
        self.dir = self.base / subdir
        self.subdir = subdir
        self.files = 0
        self.bytes = 0

    def ref(self, item) -> str:
        if not item.fetched:
            return item.url  # kept by reference: nothing to copy, nothing lost
        data = item.load()  # MediaError for a missing file: the caller quarantines the doc
        name = f"{hashlib.sha1(data).hexdigest()}.{item.ext}"
        target = self.dir / name
        if not target.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            self.files += 1
            self.bytes += len(data)
        return f"{self.subdir}/{name}"


def write_jsonl(
    docs: Iterable,
    out_path,
    doc_to_record: Callable[[Doc, MediaExport], dict],
    on_bad: Callable[[BadRecord], None] | None = None,
    as_json_array: bool = False,
    **_,
) -> dict:
    """Write one record per Doc; a Doc whose media cannot be read is quarantined, not half-written."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    media = MediaExport(out)
    counts = {"written": 0, "bad": 0}
    records = []
    with open(out, "w", encoding="utf-8") as f:
        for doc in docs:
            if isinstance(doc, BadRecord):
                counts["bad"] += 1
                if on_bad:
                    on_bad(doc)
                continue
            try:
                rec = doc_to_record(doc, media)
            except (MediaError, RecordError) as e:
                counts["bad"] += 1
                if on_bad:
                    reason = e.reason if isinstance(e, RecordError) else "missing_media"
                    on_bad(
                        BadRecord(
                            source=str(doc.provenance.get("source", "")),
                            line=doc.provenance.get("line"),
                            reason=reason,
                            detail=f"doc {doc.id}: {e}",
                        )
                    )
                continue
            if as_json_array:
                records.append(rec)
            else:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts["written"] += 1
        if as_json_array:
            json.dump(records, f, ensure_ascii=False, indent=1)
    counts["media_files"] = media.files
    counts["media_bytes"] = media.bytes
    return counts


# -- keeping unknown fields -------------------------------------------------------------------------


def meta_from_extras(rec: dict, reserved: set[str]) -> dict:
    """Record keys a format does not own become Doc.meta (collisions come back from ``mmgen_meta``)."""
    meta = {k: v for k, v in rec.items() if k not in reserved and k != COLLISION_KEY}
    extra = rec.get(COLLISION_KEY)
    if isinstance(extra, dict):
        meta.update(extra)
    return meta


def extras_from_meta(meta: dict, reserved: set[str], structural: set[str] = frozenset()) -> dict:
    """Inverse of :func:`meta_from_extras`: Doc.meta keys named like one of the format's own fields are
    tucked under ``mmgen_meta`` instead of overwriting that field."""
    out = {k: v for k, v in meta.items() if k not in structural}
    clash = {k: out.pop(k) for k in list(out) if k in reserved or k == COLLISION_KEY}
    if clash:
        out[COLLISION_KEY] = clash
    return out


def record_id(doc: Doc) -> str | None:
    """The id to write: only one that is not derivable from the content (a source id), so that a record
    without an id round-trips without gaining one."""
    return None if doc.id == doc.content_id() else doc.id


def item_meta_out(item) -> dict:
    """An item's metadata as a record stores it: plus the source URL of a medium held locally."""
    if getattr(item, "url", None) and item.fetched:
        return {**item.meta, URL_KEY: item.url}
    return item.meta


def doc_from_items(items: list, rec: dict, meta: dict) -> Doc:
    for it in items:  # the inverse of item_meta_out
        if URL_KEY in it.meta and hasattr(it, "url"):
            url = it.meta.pop(URL_KEY)
            if it.fetched:
                it.url = url
    rid = rec.get("id")
    # The source id is kept as is (an int stays an int) so the record writes back unchanged.
    return Doc(items=items, id=rid if rid is not None and rid != "" else None, meta=meta)
