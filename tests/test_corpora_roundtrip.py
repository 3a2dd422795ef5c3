"""Real-schema corpus records through every format and back, field by field: MMC4 (URL images with
``image_name`` and ``raw_url``, ``image_info`` out of document order with its ``similarity_matrix``,
``face_detections``), OBELICS, OmniCorpus and the real Data-Juicer demo records; fetched media keep
their URLs; LLaVA refuses what it cannot hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.formats import FORMATS, convert, read_records, write_records
from mmgen.errors import MMGenError

from corpus_server import records

DATA = Path(__file__).parent / "data"
LOSSLESS = [f for f in FORMATS if f != "llava"]
SAMPLES = {"mmc4": "mmc4_sample.jsonl", "obelics": "obelics_sample.jsonl", "omnicorpus": "omnicorpus_sample.jsonl"}


def _target(tmp: Path, fmt: str, name: str) -> Path:
    return tmp / name if fmt == "wds" else tmp / f"{name}.jsonl"


def _docs(path, fmt, **kw) -> list[Doc]:
    out = list(read_records(path, fmt, **kw))
    assert all(isinstance(d, Doc) for d in out), [str(b) for b in out if not isinstance(b, Doc)]
    return out


def fields(doc: Doc):
    """Everything a lossless conversion keeps, item by item."""
    return (
        [
            (
                it.kind,
                it.text
                if isinstance(it, Text)
                else (hashlib.sha1(it.load()).hexdigest() if it.fetched else None, it.url),
                it.meta,
            )
            for it in doc.items
        ],
        doc.meta,
        doc.id,
    )


@pytest.mark.parametrize("via", LOSSLESS)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_sample_to_format_and_back_is_identical(sample, via, tmp_path):
    fmt = "obelics" if sample == "omnicorpus" else sample
    src = DATA / SAMPLES[sample]
    mid = _target(tmp_path, via, "mid")
    s1 = convert(src, mid, fmt, via, progress=False)
    back = tmp_path / "back.jsonl"
    s2 = convert(mid, back, via, fmt, progress=False)
    assert (s1["bad"], s2["bad"], s2["written"]) == (0, 0, len(records(src)))
    assert records(back) == records(src)  # every field, every URL, every order, as published
    assert [fields(d) for d in _docs(back, fmt)] == [fields(d) for d in _docs(src, fmt)]


def test_mmc4_keeps_url_name_order_and_similarity_rows(tmp_path):
    src = DATA / SAMPLES["mmc4"]
    doc = _docs(src, "mmc4")[0]
    # image_info lists the portrait (sentence 2) before the cat (sentence 0): the document order puts
    # the cat first, and the info order is kept so similarity_matrix row k still belongs to image k.
    imgs = doc.images
    assert [i.url.rsplit("/", 1)[1] for i in imgs] == ["cat.jpg", "lena.jpg"]
    assert [i.meta["mmc4_info_index"] for i in imgs] == [1, 0]
    assert imgs[1].meta["image_name"] == "5e0d3c1f2a7b.jpg" and imgs[1].meta["face_detections"] == [
        [0.31, 0.22, 0.58, 0.61, 0.998]
    ]
    assert not imgs[0].fetched and imgs[0].meta["face_detections"] is None
    for via in ("obelics", "dj", "wds", "mmgen"):
        mid = _target(tmp_path, via, via)
        convert(src, mid, "mmc4", via, progress=False)
        convert(mid, tmp_path / f"{via}.back.jsonl", via, "mmc4", progress=False)
        for a, b in zip(records(src), records(tmp_path / f"{via}.back.jsonl")):
            assert [e["raw_url"] for e in a["image_info"]] == [e["raw_url"] for e in b["image_info"]]
            assert a["similarity_matrix"] == b["similarity_matrix"]


def test_fetched_media_keep_their_url_through_every_format(real_dir, tmp_path):
    doc = Doc(
        id="f1",
        items=[
            Text("A bus."),
            Image(
                data=(real_dir / "img2.jpg").read_bytes(),
                url="https://cdn.example.org/bus.jpg",
                meta={"matched_sim": 0.27},
            ),
            Image(url="https://cdn.example.org/gone.jpg", meta={"fetch_error": "HTTP Error 404: Not Found"}),
            Text("The end."),
        ],
        meta={"url": "https://example.org/page"},
    )
    for via in LOSSLESS:
        out = _target(tmp_path, via, via)
        assert write_records([doc], out, via)["written"] == 1
        (back,) = _docs(out, via)
        assert fields(back) == fields(doc), via


def test_real_data_juicer_records_round_trip(real_dir, tmp_path):
    for name in ("dj-demo-images.jsonl", "dj-demo-dedup.jsonl"):
        src = real_dir / name
        first = _docs(src, "dj", media_root=str(real_dir))
        for via in LOSSLESS:
            mid = _target(tmp_path, via, f"{name}.{via}")
            assert write_records(first, mid, via)["bad"] == 0
            again = _docs(mid, via)
            assert [fields(d) for d in again] == [fields(d) for d in first], (name, via)


def test_llava_refuses_interleaved_documents_unless_lossy(tmp_path):
    src = DATA / SAMPLES["mmc4"]
    out = tmp_path / "chat.json"
    with pytest.raises(
        MMGenError, match=r"cannot be written as LLaVA turns without loss: .*texts would merge.*--lossy"
    ):
        convert(src, out, "mmc4", "llava", progress=False)
    assert not out.exists()
    s = convert(src, out, "mmc4", "llava", progress=False, lossy=True)
    assert s["written"] == 3 and len(json.loads(out.read_text())) == 3
