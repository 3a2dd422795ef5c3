"""Code shards: Docs whose media are pre-tokenized into discrete codes (offline, as ILLUME+/Emu3 do).

Same WebDataset layout as :mod:`mmgen.data.shards`, plus one member per tokenized media item,
``KEY.I.codes.npy`` (item I's code array: ``(h, w)`` for an image, ``(levels, T)`` for audio,
``(T, h, w)`` for a video's sampled frames with -1 at the cells temporal merging left out), and,
for DualViTok-style tokenizers, ``KEY.I.sem.npy`` for the semantic grid(s). A video also has
``KEY.I.frames.npy``: ``(T, 2)`` float64, each frame's time in seconds and keyframe flag (1.0 / 0.0).
The media bytes are kept only when asked (``keep_media``), so code shards stay small.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.data.shards import expand_inputs, sample_key, tar_samples


@dataclass
class CodedDoc:
    doc: Doc  # media items may be by-reference placeholders when bytes were not kept
    codes: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> codes
    sem: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> semantic codes
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # video item index -> (T, 2) time, keyframe


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=1024)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    d = ast.literal_eval(header.decode("latin1"))
    dtype = np.dtype(d["descr"])
    if dtype.hasobject:
        raise ValueError("object arrays are not code arrays")
    return dtype, tuple(d["shape"]), bool(d["fortran_order"])


def load_npy(buf: bytes) -> np.ndarray:
    """``np.load`` of one ``.npy`` member's bytes, with the header parsed once per distinct header: a
    corpus's code arrays share a few shapes, and np.load's per-array header parsing was a third of the
    time to read code shards."""
    if buf[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array")
    size = 2 if buf[6] == 1 else 4  # format 1.0: a 2-byte header length, 2.0 and 3.0: 4 bytes
    start = 8 + size
    end = start + int.from_bytes(buf[8:start], "little")
    dtype, shape, fortran = _npy_header(bytes(buf[start:end]))
    count = int(np.prod(shape)) if shape else 1
    if len(buf) - end < count * dtype.itemsize:
        raise ValueError("truncated .npy array")
    arr = np.frombuffer(buf, dtype, count=count, offset=end)
    return (arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)).copy()


def coded_to_sample(cd: CodedDoc, key: str, keep_media: bool = False) -> dict:
    sample: dict = {"__key__": key}
    names: list[str | None] = []
    for i, item in enumerate(cd.doc.items):
        if isinstance(item, Text) or not keep_media:
            names.append(None)
        else:
            names.append(f"{i}.{item.ext}")
            sample[names[-1]] = item.load()
    obj = cd.doc.to_json(names)
    if not keep_media:  # media become placeholders that remember their format and size facts
        for entry in obj["items"]:
            entry.pop("path", None)
    for i, codes in cd.codes.items():
        sample[f"{i}.codes.npy"] = _npy(codes)
    for i, sem in cd.sem.items():
        sample[f"{i}.sem.npy"] = _npy(sem)
    for i, frames in cd.frames.items():
        sample[f"{i}.frames.npy"] = _npy(frames)
    sample["json"] = json.dumps(obj, ensure_ascii=False).encode()
    return sample


def sample_to_coded(sample: dict) -> CodedDoc:
    obj = json.loads(sample["json"])
    media = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json" and not k.endswith(".npy")}
    items = []
    for i, entry in enumerate(obj["items"]):
        if entry["type"] != "text" and "member" not in entry and "path" not in entry:
            entry = dict(entry, path=f"<codes:{i}>")  # a placeholder: the codes stand for the media
        items.append(entry)
    doc = Doc.from_json(dict(obj, items=items), media=media)
    arrays: dict[str, dict[int, np.ndarray]] = {"codes": {}, "sem": {}, "frames": {}}
    for k, v in sample.items():
        parts = k.split(".")
        if len(parts) == 3 and parts[2] == "npy" and parts[1] in arrays:
            arrays[parts[1]][int(parts[0])] = load_npy(v)
    return CodedDoc(doc, **arrays)


class CodeShardWriter:
    def __init__(self, out_dir: str | Path, prefix: str = "codes", max_docs: int = 5000, keep_media: bool = False):
        import webdataset as wds

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.keep_media = keep_media
        self.count = 0
        # a fixed mtime: the same documents give the same bytes, whenever and wherever they are written; an
        # int, since a float one costs a pax header per member (1 KiB each, and twice the headers to parse)
        self._w = wds.ShardWriter(str(Path(out_dir) / f"{prefix}-%06d.tar"), maxcount=max_docs, verbose=0, mtime=0)

    def write(self, cd: CodedDoc) -> None:
        self._w.write(coded_to_sample(cd, sample_key(cd.doc, self.count), self.keep_media))
        self.count += 1

    def close(self):
        self._w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_code_shards(paths) -> Iterator[CodedDoc | BadRecord]:
    for path in expand_inputs(paths, (".tar",)):
        try:
            tf = tarfile.open(path, "r|*")
        except (tarfile.TarError, OSError) as e:
            yield BadRecord(source=path, reason="corrupt_tar", detail=str(e))
            continue
        with tf:
            for sample in tar_samples(tf, path):
                if isinstance(sample, BadRecord):
                    yield sample
                    continue
                try:
                    yield sample_to_coded(sample)
                except (KeyError, ValueError) as e:
                    yield BadRecord(source=path, reason="bad_sample", member=sample.get("__key__"), detail=str(e))


def read_code_shards_of_splits(paths, splits=None) -> Iterator[CodedDoc | BadRecord]:
    """:func:`read_code_shards`, keeping the documents whose ``meta["split"]`` is one of ``splits`` (or
    that name none); every record when ``splits`` is empty. Bad records pass through, to be counted."""
    wanted = set(splits or [])
    for r in read_code_shards(paths):
        if not wanted or isinstance(r, BadRecord) or r.doc.meta.get("split") in wanted | {None}:
            yield r
