"""WebDataset shards of Docs: readable by webdataset and tar themselves, and robust to broken tars."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

from mmgen.data.doc import Audio, BadRecord, Doc, Image, Text, Video
from mmgen.data.formats import read_records, write_records
from mmgen.data.shards import read_docs, read_shard, write_shards


def _docs(real_dir) -> list[Doc]:
    return [
        Doc(items=[Text("a bus"), Image(path=str(real_dir / "img2.jpg"), meta={"alt": "bus"})], meta={"k": 1}),
        Doc(items=[Audio(path=str(real_dir / "audio1.wav")), Text("speech")], id="speech.1"),
        Doc(items=[Text("clip"), Video(path=str(real_dir / "video1.mp4")), Image(path=str(real_dir / "img1.png"))]),
        Doc(items=[Text("text only " * 20)]),
    ]


def test_shards_read_by_webdataset_and_tar(real_dir, tmp_path):
    import webdataset as wds

    docs = _docs(real_dir)
    counts = write_records(docs, tmp_path / "out", "wds", max_docs=3)
    assert counts["shards"] == 2 and counts["written"] == 4
    shards = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    samples = [s for shard in shards for s in wds.WebDataset(shard, shardshuffle=False)]
    assert len(samples) == 4
    # Keys carry no dots (webdataset splits at the first one), even for an id with a dot.
    assert samples[1]["__key__"].endswith("speech_1")
    for doc, s in zip(docs, samples):
        obj = json.loads(s["json"])
        assert obj["id"] == doc.id and [e["type"] for e in obj["items"]] == [it.kind for it in doc.items]
        media_keys = sorted(k for k in s if not k.startswith("__") and k != "json")
        assert media_keys == sorted(f"{i}.{it.ext}" for i, it in enumerate(doc.items) if not isinstance(it, Text))
        for i, it in enumerate(doc.items):
            if not isinstance(it, Text):
                assert hashlib.sha1(s[f"{i}.{it.ext}"]).digest() == hashlib.sha1(it.load()).digest()
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    first = [s for s in samples[:3]]  # max_docs=3: the first shard holds the first three samples
    expected = [f"{s['__key__']}.{k}" for s in first for k in s if not k.startswith("__")]
    assert sorted(names) == sorted(expected)
    listed = subprocess.run(["tar", "-tf", shards[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listed == names
    back = [d for d in read_records(tmp_path / "out", "wds")]
    assert [d.id for d in back] == [d.id for d in docs]
    assert back[2].videos[0].load() == (real_dir / "video1.mp4").read_bytes()


def test_truncated_and_garbage_shards_yield_good_docs_then_badrecord(real_dir, tmp_path):
    docs = _docs(real_dir)
    (shard,) = write_shards(docs, tmp_path / "s", max_docs=10)
    data = open(shard, "rb").read()
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    # Cut inside the video member of the third doc: docs 1-2 survive, then one corrupt_tar record.
    video = next(m for m in members if m.name.endswith(".mp4"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: video.offset_data + video.size // 2])
    out = list(read_shard(cut))
    assert [type(x).__name__ for x in out] == ["Doc", "Doc", "BadRecord"]
    assert [d.id for d in out[:2]] == [docs[0].id, docs[1].id] and out[2].reason == "corrupt_tar"
    assert out[1].audios[0].load() == (real_dir / "audio1.wav").read_bytes()
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(bytes(range(256)) * 40)
    out = list(read_shard(garbage))
    assert len(out) == 1 and isinstance(out[0], BadRecord) and out[0].reason == "corrupt_tar"
    # A directory with a good shard, a broken one and convert's quarantine file: errors.jsonl is not data.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.tar").write_bytes(data)
    (mixed / "b.tar").write_bytes(cut.read_bytes())
    (mixed / "errors.jsonl").write_text('{"reason": "missing_media"}\n')
    out = list(read_docs(mixed))
    assert [type(x).__name__ for x in out] == ["Doc"] * 6 + ["BadRecord"]


def test_read_docs_mmgen_jsonl(real_dir, tmp_path):
    docs = _docs(real_dir)
    write_records(docs, tmp_path / "docs.jsonl", "mmgen")
    line = json.loads((tmp_path / "docs.jsonl").read_text().splitlines()[0])
    assert line["items"][1]["path"].startswith("media/") and "source_path" not in line["items"][1]
    back = list(read_docs(tmp_path / "docs.jsonl"))
    assert [d.id for d in back] == [d.id for d in docs]
    assert back[0].images[0].load() == (real_dir / "img2.jpg").read_bytes() and back[0].images[0].meta == {"alt": "bus"}
    (tmp_path / "media" / line["items"][1]["path"].split("/")[1]).unlink()
    out = list(read_docs(tmp_path / "docs.jsonl"))
    assert isinstance(out[0], BadRecord) and out[0].reason == "missing_media" and out[0].line == 1
    assert all(isinstance(d, Doc) for d in out[1:])


def test_code_shards_have_no_pax_headers_and_arrays_read_back_exactly(tmp_path):
    import io

    import numpy as np
    import pytest

    from mmgen.data.code_shards import CodedDoc, CodeShardWriter, load_npy, read_code_shards

    arrays = [
        np.arange(81, dtype=np.int16).reshape(9, 9),
        np.full((2, 3, 3), -1, np.int32),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array(7, np.int64),
    ]
    with CodeShardWriter(tmp_path, max_docs=10) as w:
        for k in range(3):
            doc = Doc(
                items=[Text(f"doc {k}"), *[Image(path=f"<codes:{i}>", format="png") for i in range(len(arrays))]],
                id=f"d{k}",
            )
            w.write(CodedDoc(doc, codes={i + 1: a for i, a in enumerate(arrays)}))
    (shard,) = tmp_path.glob("*.tar")
    with tarfile.open(shard) as tf:  # a float mtime would put a pax header before every member
        members = tf.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members)
    docs = list(read_code_shards([str(shard)]))
    assert [d.doc.id for d in docs] == ["d0", "d1", "d2"]
    for d in docs:
        for i, a in enumerate(arrays):
            got = d.codes[i + 1]
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a) and got.flags.writeable
    buf = io.BytesIO()
    np.save(buf, arrays[0])
    with pytest.raises(ValueError, match="truncated"):
        load_npy(buf.getvalue()[:-3])
    with pytest.raises(ValueError, match="not a .npy"):
        load_npy(b"PK\x03\x04 not numpy")
