"""mmgen WebDataset shards (``KEY.json`` + ``KEY.I.EXT`` media members); see :mod:`mmgen.data.shards`.

Input: a ``.tar``, a directory of shards or a glob. Output: a directory of ``shard-NNNNNN.tar``."""

from __future__ import annotations

from mmgen.data.doc import BadRecord
from mmgen.data.shards import ShardWriter, read_shard
from mmgen.errors import MediaError
from mmgen.paths import expand_inputs


def expand_shards(path) -> list[str]:
    return expand_inputs(path, (".tar",))


def read(path, media_root=None, allow_outside_root: bool = False, **_):
    for shard in expand_shards(path):
        yield from read_shard(shard, media_root=media_root, allow_outside_root=allow_outside_root)


def write(docs, out_path, on_bad=None, prefix: str = "shard", max_docs: int = 1000, **_) -> dict:
    counts = {"written": 0, "bad": 0, "media_files": 0, "media_bytes": 0}
    with ShardWriter(out_path, prefix=prefix, max_docs=max_docs) as w:
        for doc in docs:
            if isinstance(doc, BadRecord):
                counts["bad"] += 1
                if on_bad:
                    on_bad(doc)
                continue
            try:
                # Load every medium first so a missing file quarantines the doc before anything is written.
                for it in doc.media:
                    if it.fetched:  # URL references stay references
                        it.load()
                w.write(doc)
            except MediaError as e:
                counts["bad"] += 1
                if on_bad:
                    on_bad(
                        BadRecord(
                            source=str(doc.provenance.get("source", "")),
                            line=doc.provenance.get("line"),
                            reason="missing_media",
                            detail=f"doc {doc.id}: {e}",
                        )
                    )
                continue
            counts["written"] += 1
            counts["media_files"] += sum(1 for it in doc.media if it.data is not None)
            counts["media_bytes"] += sum(len(it.data) for it in doc.media if it.data is not None)
        shards = w.shards
    counts["shards"] = len(shards)
    return counts
