"""WebDataset shards of Docs: the storage format between mmgen's stages.

One sample per Doc: ``KEY.json`` (the Doc's canonical JSON, see :meth:`Doc.to_json`) plus one member
per media item, ``KEY.I.EXT`` (I = the item's index in the Doc, EXT its format), holding the original
encoded bytes; a URL reference not fetched has no member, its ``url`` is in the json. Shards are plain
POSIX tars, readable by ``tar``, by ``webdataset.WebDataset`` and by
:func:`read_shard` here, which — unlike webdataset's loader — turns a corrupt or truncated tar into
:class:`BadRecord` entries and goes on, so one bad shard never stops a run.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.data.formats import read_records
from mmgen.data.formats.common import ReadContext, RecordError
from mmgen.data.input_kind import compression_of, open_decompressed
from mmgen.errors import MMGenError
from mmgen.paths import expand_inputs

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(doc: Doc, index: int | None = None) -> str:
    """A webdataset key for ``doc``: no dots (webdataset splits member names at the first dot)."""
    key = _KEY_BAD.sub("_", str(doc.id))[:120] or "doc"
    return f"{index:08d}_{key}" if index is not None else key


def doc_to_sample(doc: Doc, key: str) -> dict:
    """Doc -> a webdataset sample dict ({'__key__', 'json', 'I.EXT': bytes, ...})."""
    sample: dict = {"__key__": key}
    names: list[str | None] = []
    for i, item in enumerate(doc.items):
        if isinstance(item, Text) or not item.fetched:  # a URL reference travels in the json only
            names.append(None)
            continue
        name = f"{i}.{item.ext}"
        sample[name] = item.load()
        names.append(name)
    sample["json"] = json.dumps(doc.to_json(names), ensure_ascii=False).encode("utf-8")
    return sample


def sample_to_doc(sample: dict) -> Doc:
    """Inverse of :func:`doc_to_sample`; accepts raw webdataset samples (bytes values)."""
    raw = sample["json"]
    obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    media = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
    return Doc.from_json(obj, media=media)


class ShardWriter:
    """Writes Docs into numbered shards ``PREFIX-000000.tar`` of at most ``max_docs`` docs / ``max_bytes``.

    The members are laid out as ``webdataset.TarWriter`` lays them out (USTAR, sorted member names per
    sample, mode 0444, owner ``bigdata``), so ``webdataset.WebDataset`` reads the shards as its own. It
    writes with :mod:`tarfile` directly: importing webdataset imports torch, seconds of start-up that a
    filter or converter run would pay for nothing. It records the shard names it wrote."""

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_docs: int = 1000,
        max_bytes: int = 256 << 20,
        start_shard: int = 0,
        mtime: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_docs, self.max_bytes, self.mtime = prefix, max_docs, max_bytes, mtime
        self.count = 0
        self._shard = start_shard
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._bytes = 0

    def _next(self) -> None:
        self._close_tar()
        path = self.out_dir / f"{self.prefix}-{self._shard:06d}.tar"
        self._shard += 1
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = self._bytes = 0

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def write(self, doc: Doc) -> None:
        self.write_sample(doc, doc_to_sample(doc, ""))

    def write_sample(self, doc: Doc, sample: dict) -> None:
        """Write ``doc`` from its members already encoded by :func:`doc_to_sample` (key ignored)."""
        sample = {k: v for k, v in sample.items() if k != "__key__"}
        sample["__key__"] = sample_key(doc, self.count)
        if self._tar is None or self._in_shard >= self.max_docs or self._bytes >= self.max_bytes:
            self._next()
        key = sample.pop("__key__")
        # whole seconds: a float mtime makes tarfile write a pax header (1 KiB) before every member, which
        # doubled the headers a reader parses
        now = int(time.time())
        for name in sorted(sample):
            data = sample[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mode, info.uname, info.gname = len(data), 0o444, "bigdata", "bigdata"
            info.mtime = self.mtime if self.mtime is not None else now
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._in_shard += 1
        self.count += 1

    @property
    def shards(self) -> list[str]:
        return sorted(str(p) for p in self.out_dir.glob("*.tar"))

    def close(self) -> None:
        self._close_tar()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_shards(docs: Iterable[Doc], out_dir: str | Path, prefix: str = "shard", max_docs: int = 1000) -> list[str]:
    with ShardWriter(out_dir, prefix=prefix, max_docs=max_docs) as w:
        for doc in docs:
            w.write(doc)
    return sorted(str(p) for p in Path(out_dir).glob(f"{prefix}-*.tar"))


def tar_samples(tf: tarfile.TarFile, source: str) -> Iterator[dict | BadRecord]:
    """Yield webdataset-style samples from an open tar, grouping consecutive members by key."""
    current: dict | None = None
    try:
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            key, suffix = base.split(".", 1)
            key = os.path.join(os.path.dirname(member.name), key)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            f = tf.extractfile(member)
            current[suffix] = f.read() if f else b""
    except Exception as e:  # noqa: BLE001 - tarfile, zlib, zstd: any broken stream ends the shard here
        # The sample being read when the tar broke is incomplete: report it, keep what came before.
        yield BadRecord(
            source=source,
            reason="corrupt_tar",
            detail=f"tar unreadable after this point: {e}",
            member=current["__key__"] if current else None,
        )
        return
    if current is not None:
        yield current


def _outside_refs(doc: Doc, ctx) -> str | None:
    """A media item of a sample that names a file instead of a member must stay inside the corpus
    (the shard's folder or ``media_root``, held by the shard's ``ReadContext``): the reason to refuse
    the sample, or None."""
    for it in doc.media:
        if it.data is None and it.path is not None:
            ref = it.path
            if not os.path.isabs(ref):
                ref = os.path.join(ctx.base_dir, ref)
            try:
                it.path = ctx.check_inside(ref, it.path)
            except RecordError as e:
                return e.detail
    return None


def read_shard(
    path: str | Path, media_root: str | None = None, allow_outside_root: bool = False, compression: str | None = "sniff"
) -> Iterator[Doc | BadRecord]:
    """Docs of one shard (plain, gzip or zstd tar), in order; a bad sample or a broken tar becomes a
    BadRecord. A sample whose media name a file outside the corpus is refused (``path_outside_root``).
    ``compression``: ``gzip``, ``zstd`` or None when already known, else told by the first bytes."""
    source = str(path)
    try:
        if compression == "sniff":
            with open(source, "rb") as f:
                compression = compression_of(f.read(4))
        stream = open_decompressed(source, compression)
        tf = tarfile.open(fileobj=stream, mode="r|*" if compression is None else "r|")  # r|*: bz2, xz too
    except (tarfile.TarError, OSError, EOFError, MMGenError) as e:
        yield BadRecord(source=source, reason="corrupt_tar", detail=str(e))
        return
    broken = False
    ctx = ReadContext(source=source, media_root=media_root)  # one per shard: its folder resolutions are cached
    with tf, stream:
        for sample in tar_samples(tf, source):
            if isinstance(sample, BadRecord):
                broken = broken or sample.reason == "corrupt_tar"
                yield sample
                continue
            if "json" not in sample:
                yield BadRecord(
                    source=source,
                    reason="incomplete_sample",
                    member=sample["__key__"],
                    detail="sample has no .json member",
                )
                continue
            try:
                doc = sample_to_doc(sample)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, MMGenError) as e:
                yield BadRecord(source=source, reason="bad_sample", member=sample["__key__"], detail=str(e)[:300])
                continue
            outside = None if allow_outside_root else _outside_refs(doc, ctx)
            if outside is not None:
                yield BadRecord(source=source, reason="path_outside_root", member=sample["__key__"], detail=outside)
                continue
            doc.provenance.setdefault("shard", source)
            doc.provenance.setdefault("member", sample["__key__"])
            yield doc
        junk = 0 if broken or compression else _bytes_after_archive(source, tf.offset)
        if junk:
            # tarfile ends its iteration quietly at a header it cannot read: say so, or a cut shard
            # would lose its remaining samples without a trace
            yield BadRecord(
                source=source,
                reason="corrupt_tar",
                member=None,
                detail=f"{junk} bytes after offset {tf.offset} are not tar members (file cut or damaged)",
            )


def _bytes_after_archive(path: str, offset: int) -> int:
    """Non-zero bytes after the end of a plain tar's last member (0 for a whole file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        junk = 0
        while chunk := f.read(1 << 20):
            junk += len(chunk) - chunk.count(0)
        return junk


def read_docs(paths: str | Path | list, strict: bool = False) -> Iterator[Doc | BadRecord]:
    """Docs from shards (``.tar``) or mmgen jsonl (one ``Doc.to_json`` per line, media by path)."""
    for path in expand_inputs(paths):
        if path.endswith(".jsonl"):
            yield from read_records(path, "mmgen")
        else:
            yield from read_shard(path)


def iter_good_docs(paths) -> Iterator[Doc]:
    for d in read_docs(paths):
        if isinstance(d, Doc):
            yield d
