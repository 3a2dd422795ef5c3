"""Packed shards: rows already packed for training, one tar per code shard, and a manifest.

``mmgen pack`` writes them (:mod:`mmgen.training.pack`); the trainer streams them
(:mod:`mmgen.training.streaming`), so a rank holds one shard and a shuffle buffer, never the corpus.

Layout of ``DIR``::

    index.json              seq_len, the data settings the rows were built with, every shard's row
                            count and statistics, and the totals
    vocab.json  text_tokenizer/   the ids the rows are written in
    packed-000000.tar       members rows.input_ids.npy, rows.labels.npy, rows.position_ids.npy,
                            rows.segment_ids.npy, rows.cond_mask.npy, rows.json (the shard's packing
                            and sequence statistics)
    packed-000000.done.json the shard's entry of index.json: present only once its tar is complete

Rows are :func:`mmgen.data.packing.pack_sequences` output (no cross-document attention, positions
restarting per document), stored narrower than the trainer reads them (ids int32, segments int16) and
widened to int64 when read. Tars are written with a fixed mtime, so the same inputs give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from mmgen.data.code_shards import load_npy
from mmgen.errors import MMGenError

ROW_ARRAYS = {
    "input_ids": np.int32,
    "labels": np.int32,
    "position_ids": np.int32,
    "segment_ids": np.int16,
    "cond_mask": np.bool_,
}
INDEX = "index.json"


def shard_name(index: int) -> str:
    return f"packed-{index:06d}.tar"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tf.addfile(info, io.BytesIO(data))


def write_packed_shard(path: Path, rows: dict, stats: dict) -> None:
    """Write one shard's rows (``pack_sequences`` output) and statistics; atomic (temp name, then rename)."""
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, dtype in ROW_ARRAYS.items():
            arr = np.asarray(rows[key])
            narrow = arr.astype(dtype)
            if dtype is not np.bool_ and not np.array_equal(narrow, arr):
                raise MMGenError(f"{key} does not fit {np.dtype(dtype).name} in packed shards")
            buf = io.BytesIO()
            np.save(buf, narrow, allow_pickle=False)
            _add(tf, f"rows.{key}.npy", buf.getvalue())
        _add(tf, "rows.json", json.dumps(stats, sort_keys=True).encode())
    tmp.replace(path)


def read_packed_shard(path: str | Path) -> dict:
    """The rows of one packed shard as int64 (bool for ``cond_mask``) arrays ``(R, seq_len)``."""
    rows = {}
    try:
        with tarfile.open(path, "r") as tf:
            for m in tf.getmembers():
                if m.name.startswith("rows.") and m.name.endswith(".npy"):
                    rows[m.name[5:-4]] = load_npy(tf.extractfile(m).read())
    except (tarfile.TarError, OSError, ValueError) as e:
        raise MMGenError(f"packed shard {path} is unreadable ({e}); rerun `mmgen pack` to rewrite it") from None
    missing = [k for k in ROW_ARRAYS if k not in rows]
    if missing:
        raise MMGenError(f"packed shard {path} lacks {', '.join(missing)}; rerun `mmgen pack` to rewrite it")
    return {k: (v if k == "cond_mask" else v.astype(np.int64)) for k, v in rows.items()}


def read_index(packed_dir: str | Path) -> dict:
    """The manifest of a ``mmgen pack`` output directory, with each shard's absolute ``path``."""
    d = Path(packed_dir)
    p = d / INDEX
    if not p.is_file():
        raise MMGenError(f"no packed shards at {d} (no {INDEX}); write them with `mmgen pack CONFIG --out {d}`")
    index = json.loads(p.read_text())
    for s in index["shards"]:
        s["path"] = str(d / s["name"])
    return index
