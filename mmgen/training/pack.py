"""``mmgen pack``: code shards -> packed shards, once, before training (see :mod:`mmgen.data.packed_shards`).

    mmgen pack tiny_pretrain data.code_shards=runs/qs/codes --out runs/qs/packed --workers 2
    mmgen train tiny_pretrain data.source=packed data.packed_shards=runs/qs/packed

Steps, each resumable:

1. the text tokenizer, trained once on the first ``data.text_sample_docs`` documents (or the bundle's /
   ``data.text_tokenizer``), saved to ``OUT/text_tokenizer``, and the run's vocab to ``OUT/vocab.json``;
2. every code shard, a work unit on :func:`mmgen.data.executors.map_resumable`: its documents of
   ``data.splits`` become sequences (:func:`mmgen.processing.sequence.build_sequences`, the stage's chat
   layout and targets) and are packed by :func:`mmgen.data.packing.pack_sequences` exactly as the
   in-memory trainer packs them (the same algorithm, per shard rather than over the corpus), written
   to ``packed-IIIIII.tar`` with a done marker; a rerun skips the shards already done;
3. ``OUT/index.json``: the settings, each shard's rows and statistics, and the totals.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

from mmgen.data.executors import map_resumable
from mmgen.data.packed_shards import INDEX, shard_name, write_packed_shard
from mmgen.errors import MMGenError
from mmgen.paths import expand_inputs
from mmgen.processing.vocab import Vocab
from mmgen.training.config import load_train_config
from mmgen.utils.files import write_json


@functools.lru_cache(maxsize=1)
def _packer(out_dir: str):
    """(text tokenizer, vocab) of a pack output directory, loaded once per worker process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(out_dir) / "text_tokenizer"), Vocab.load(Path(out_dir) / "vocab.json")


def marker_path(out: Path, index: int) -> Path:
    """The done marker of packed shard ``index``: present only once its tar is complete."""
    return out / shard_name(index).replace(".tar", ".done.json")


def pack_shard(settings: dict, index: int, path: str, out_dir: str) -> dict:
    """One work unit: code shard ``path`` -> ``packed-IIIIII.tar`` and its done marker; returns its entry."""
    from mmgen.training.data import pack_records, training_records

    tok, vocab = _packer(out_dir)
    # the records' only reference goes to pack_records, which frees them before packing
    rows, seq_stats, pack_stats, grids = pack_records(list(training_records(path, settings)), tok, vocab, settings)
    entry = {
        "input": path,
        "settings": settings,
        "name": shard_name(index),
        "rows": 0,
        "sequences": seq_stats.to_dict(),
        "image_grids": {f"{h}x{w}": n for (h, w), n in sorted(grids.items())},
    }
    out = Path(out_dir)
    if rows is not None:
        entry["rows"], entry["packing"] = pack_stats.rows, pack_stats.to_dict()
        write_packed_shard(out / entry["name"], rows, {k: entry[k] for k in ("input", "packing", "sequences")})
    write_json(marker_path(out, index), entry, sort_keys=False)  # the index keeps the entries' key order
    return entry


def _totals(entries: list[dict], seq_len: int) -> dict:
    from mmgen.data.packing import PackStats

    seqs, skipped, grids = Counter(), Counter(), Counter()
    for e in entries:
        seqs.update({k: v for k, v in e["sequences"].items() if k != "skipped_items"})
        skipped.update(e["sequences"].get("skipped_items", {}))
        grids.update(e["image_grids"])
    packing = PackStats.total([e["packing"] for e in entries if "packing" in e], seq_len).to_dict()
    return {
        "packing": packing,
        "sequences": {**dict(seqs), "skipped_items": dict(skipped)},
        "image_grids": dict(grids.most_common()),
    }


def pack(
    config: str | Path | None,
    overrides: list[str] | None,
    out_dir: str | Path,
    executor: str = "local",
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write packed shards for the training run ``config`` + ``overrides`` describes; returns the index."""

    from mmgen.training.data import check_saved_vocab, media_tokenizers_and_vocab, sequence_settings, text_tokenizer_for

    cfg = load_train_config(config, [*(overrides or []), "data.source=memory"])
    if cfg.data.max_docs is not None:  # the in-memory source's cap: packed shards hold every document
        raise MMGenError("data.max_docs applies to data.source=memory; pack fewer code shards instead")
    if workers < 1:
        raise MMGenError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(cfg.data.code_shards, (".tar",))
    tok = text_tokenizer_for(cfg, out / "text_tokenizer", 0)
    vocab, _, _ = media_tokenizers_and_vocab(cfg, tok)
    check_saved_vocab(out / "vocab.json", vocab, "pack into a fresh --out directory")
    vocab.save(out / "vocab.json")
    settings = sequence_settings(cfg)

    ordered, _ = map_resumable(
        executor,
        workers,
        pack_shard,
        [(settings, i, p, str(out)) for i, p in enumerate(paths)],
        [marker_path(out, i) for i in range(len(paths))],
        lambda i, e: e["settings"] == settings and e["input"] == paths[i],
        "pack",
        progress,
    )
    totals = _totals(ordered, cfg.data.seq_len)
    if not totals["packing"]["rows"]:
        raise MMGenError(f"no trainable documents in {cfg.data.code_shards} ({totals['sequences']})")
    index = {
        "settings": settings,
        "code_shards": paths,
        "totals": totals,
        "shards": [
            {
                "name": e["name"],
                "rows": e["rows"],
                "input": e["input"],
                "packing": e["packing"],
                "sequences": e["sequences"],
            }
            for e in ordered
            if e["rows"]
        ],
    }
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index
