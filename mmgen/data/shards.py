"""WebDataset shards of Docs: the storage format between mmgen's stages.

One sample per Doc: ``KEY.json`` (the Doc's canonical JSON, see :meth:`Doc.to_json`) plus one member
per media item, ``KEY.I.EXT`` (I = the item's index in the Doc, EXT its format), holding the original
encoded bytes. Shards are plain POSIX tars, readable by ``tar``, by ``webdataset.WebDataset`` and by
:func:`read_shard` here, which — unlike webdataset's loader — turns a corrupt or truncated tar into
:class:`BadRecord` entries and goes on, so one bad shard never stops a run.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.paths import expand_inputs
from mmgen.errors import MMGenError

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
        if isinstance(item, Text):
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

    Thin wrapper over :class:`webdataset.ShardWriter`; it records the shard names it wrote."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_docs: int = 1000,
                 max_bytes: int = 256 << 20, start_shard: int = 0, mtime: float | None = None):
        import webdataset as wds

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._writer = wds.ShardWriter(str(self.out_dir / f"{prefix}-%06d.tar"), maxcount=max_docs,
                                       maxsize=max_bytes, verbose=0, start_shard=start_shard,
                                       # a fixed member mtime makes shards byte-reproducible
                                       **({"mtime": mtime} if mtime is not None else {}))

    def write(self, doc: Doc) -> None:
        self._writer.write(doc_to_sample(doc, sample_key(doc, self.count)))
        self.count += 1

    @property
    def shards(self) -> list[str]:
        return sorted(str(p) for p in self.out_dir.glob("*.tar"))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_shards(docs: Iterable[Doc], out_dir: str | Path, prefix: str = "shard", max_docs: int = 1000) -> list[str]:
    with ShardWriter(out_dir, prefix=prefix, max_docs=max_docs) as w:
        for doc in docs:
            w.write(doc)
    return sorted(str(p) for p in Path(out_dir).glob(f"{prefix}-*.tar"))


def _group_members(tf: tarfile.TarFile, source: str) -> Iterator[dict | BadRecord]:
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
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # The sample being read when the tar broke is incomplete: report it, keep what came before.
        yield BadRecord(source=source, reason="corrupt_tar", detail=f"tar unreadable after this point: {e}",
                        member=current["__key__"] if current else None)
        return
    if current is not None:
        yield current


def read_shard(path: str | Path) -> Iterator[Doc | BadRecord]:
    """Docs of one shard, in order; a bad sample or a broken tar becomes a BadRecord."""
    source = str(path)
    try:
        tf = tarfile.open(source, "r|*")
    except (tarfile.TarError, OSError) as e:
        yield BadRecord(source=source, reason="corrupt_tar", detail=str(e))
        return
    with tf:
        for index, sample in enumerate(_group_members(tf, source)):
            if isinstance(sample, BadRecord):
                yield sample
                continue
            if "json" not in sample:
                yield BadRecord(source=source, reason="incomplete_sample", member=sample["__key__"],
                                detail="sample has no .json member")
                continue
            try:
                doc = sample_to_doc(sample)
            except (ValueError, KeyError, MMGenError) as e:
                yield BadRecord(source=source, reason="bad_sample", member=sample["__key__"], detail=str(e))
                continue
            doc.provenance.setdefault("shard", source)
            doc.provenance.setdefault("member", sample["__key__"])
            yield doc


def read_docs(paths: str | Path | list, strict: bool = False) -> Iterator[Doc | BadRecord]:
    """Docs from shards (``.tar``) or mmgen jsonl (one ``Doc.to_json`` per line, media by path)."""
    for path in expand_inputs(paths):
        if path.endswith(".jsonl"):
            from mmgen.data.formats import read_records

            yield from read_records(path, "mmgen")
        else:
            yield from read_shard(path)


def iter_good_docs(paths) -> Iterator[Doc]:
    for d in read_docs(paths):
        if isinstance(d, Doc):
            yield d
