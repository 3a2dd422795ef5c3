"""Format converters: lossless round trips on real media, the real Data-Juicer demo records, a chain of
conversions, bad records with reasons, and the `mmgen convert` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mmgen.data.doc import Audio, BadRecord, Doc, Image, Text, Video
from mmgen.data.formats import FORMATS, convert, errors_path, read_records, write_records
from mmgen.errors import MMGenError

JSONL_FORMATS = [f for f in FORMATS if f != "wds"]


def out_for(tmp: Path, fmt: str, name: str = "out") -> Path:
    return tmp / fmt / (name if fmt == "wds" else f"{name}.jsonl")


def signature(doc: Doc):
    """What must survive a round trip: item kinds and order, texts, media bytes, all metadata, id."""
    items = [
        (it.kind, it.text if isinstance(it, Text) else hashlib.sha1(it.load()).hexdigest(), it.meta) for it in doc.items
    ]
    return items, doc.meta, doc.id


def read_all(path, fmt, **opts):
    out = list(read_records(path, fmt, **opts))
    return [d for d in out if isinstance(d, Doc)], [b for b in out if isinstance(b, BadRecord)]


def normalize(obj, base: Path, media_root: Path | None = None):
    """A record with every media reference replaced by the hash of the file it names, so records
    written with different media paths compare equal exactly when they hold the same bytes."""
    if isinstance(obj, dict):
        return {k: normalize(v, base, media_root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize(v, base, media_root) for v in obj]
    if isinstance(obj, str) and "." in obj[-5:] and len(obj) < 300 and "://" not in obj:
        for root in (base, media_root):
            if root is not None and (root / obj).is_file():
                return "sha1:" + hashlib.sha1((root / obj).read_bytes()).hexdigest()
        if media_root is not None and (media_root / Path(obj).name).is_file():
            return "sha1:" + hashlib.sha1((media_root / Path(obj).name).read_bytes()).hexdigest()
    return obj


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def rich_doc(real_dir) -> Doc:
    """Texts, every media kind from the real folder, item and doc metadata, a media-first opening,
    consecutive texts and a doc.meta key that collides with a format field."""
    return Doc(
        items=[
            Image(path=str(real_dir / "img1.png")),
            Text("A comfortable bed.", {"lang": "en"}),
            Text("Second sentence, same paragraph."),
            Audio(path=str(real_dir / "audio3.ogg"), meta={"speaker": "s1"}),
            Text("After the sound.  Two spaces inside."),
            Video(path=str(real_dir / "video1.mp4")),
            Image(data=(real_dir / "cat.jpg").read_bytes(), meta={"matched_sim": 0.31, "alt": "a cat"}),
            Text("你好，最后一句。"),
        ],
        meta={"url": "https://example.org/a", "texts": "a doc.meta key named like an OBELICS field"},
    )


@pytest.fixture()
def chat_doc(real_dir) -> Doc:
    return Doc(
        id="chat-7",
        items=[
            Image(path=str(real_dir / "img2.jpg"), meta={"role": "human", "turn": 0}),
            Text("\nWhat vehicle is this?", {"role": "human", "turn": 0}),
            Text("A bus.", {"role": "gpt", "turn": 1, "weight": 1.0}),
            Text("And this one?\n", {"role": "human", "turn": 2}),
            Image(path=str(real_dir / "cat.jpg"), meta={"role": "human", "turn": 2}),
            Video(path=str(real_dir / "video4.mp4"), meta={"role": "human", "turn": 2}),
            Text("A cat, then a street.", {"role": "gpt", "turn": 3}),
        ],
        meta={"source_set": "hand-made"},
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_doc_to_format_to_doc(fmt, rich_doc, chat_doc, tmp_path):
    docs = [chat_doc] if fmt == "llava" else [rich_doc, chat_doc]
    counts = write_records(docs, out_for(tmp_path, fmt), fmt)
    assert counts["written"] == len(docs) and counts["bad"] == 0
    back, bad = read_all(out_for(tmp_path, fmt), fmt)
    assert not bad
    assert [signature(d) for d in back] == [signature(d) for d in docs]
    if fmt != "wds":
        # Media live in media/ beside the output, one file per distinct content, named by hash.
        files = sorted((tmp_path / fmt / "media").iterdir())
        distinct = {hashlib.sha1(m.load()).hexdigest() for d in docs for m in d.media}
        assert {f.stem for f in files} == distinct
        assert all(hashlib.sha1(f.read_bytes()).hexdigest() == f.stem for f in files)


def _source_records(real_dir: Path) -> dict[str, list[dict]]:
    """Hand-made records in each format, with the fields real corpora carry, media named relative to
    the real folder (read with media_root)."""
    meta_img = {"src": "https://example.org/img1.png", "alt_text": "a bed", "rendered_width": 336}
    return {
        "obelics": [
            {
                "texts": ["First paragraph.", None, "Second paragraph.", None],
                "images": [None, "img1.png", None, "img8.jpg"],
                "metadata": json.dumps([None, meta_img, None, {"src": "b"}]),
                "general_metadata": json.dumps({"url": "https://example.org", "warc_record_offset": 12}),
            },
            {
                "id": "omni-1",
                "texts": [None, "Caption after a URL image."],
                "images": ["https://example.org/x.jpg", None],
                "metadata": [{"width": 10}, None],
                "general_metadata": {"url": "u"},
                "language": "en",
            },
        ],
        "mmc4": [
            {
                "url": "https://example.org/p",
                "text_list": ["Sentence one.", "Sentence two.", "Sentence three."],
                "image_info": [
                    {
                        "image_name": "cat.jpg",
                        "raw_url": "https://cdn/cat.jpg",
                        "matched_text_index": 0,
                        "matched_sim": 0.28,
                    },
                    {
                        "image_name": "img3.jpg",
                        "raw_url": "https://cdn/3.jpg",
                        "matched_text_index": 2,
                        "matched_sim": 0.22,
                    },
                ],
                "similarity_matrix": [[0.28, 0.1, 0.0], [0.0, 0.1, 0.22]],
                "could_have_url_duplicate": 0,
            },
            {"text_list": ["Only a URL."], "image_info": [{"raw_url": "https://cdn/u.png", "matched_text_index": 0}]},
        ],
        "dj": [
            {
                "text": "<__dj__image> A comfortable bed. <|__dj__eoc|> <__dj__audio> a sound <|__dj__eoc|>",
                "images": ["img1.png"],
                "audios": ["audio1.wav"],
                "__dj__stats__": {"lang": "en"},
            },
            {
                "text": "<__dj__video>  two spaces\nthen a line <__dj__image><__dj__image> end",
                "videos": ["video4.mp4"],
                "images": ["lena.jpg", "lena-face.jpg"],
                "id": 42,
            },
            {"text": "plain text only"},
        ],
        "llava": [
            {
                "id": "000001",
                "image": "img2.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": "A bus on a street."},
                ],
            },
            {
                "id": "000002",
                "image": ["cat.jpg", "blip.jpg"],
                "video": ["video1.mp4"],
                "conversations": [
                    {"from": "human", "value": "Compare <image> and <image>, then <video>"},
                    {"from": "gpt", "value": "Both are photos.", "weight": 0.5},
                    {"from": "gpt", "value": "A second gpt turn."},
                ],
            },
            {"id": "000003", "image": ["img10.jpg"], "conversations": [{"from": "human", "value": "<image>"}]},
        ],
    }


@pytest.mark.parametrize("fmt", ["obelics", "mmc4", "dj", "llava"])
def test_format_to_doc_to_format(fmt, real_dir, tmp_path):
    src = tmp_path / f"src.{fmt}.jsonl"
    recs = _source_records(real_dir)[fmt]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    docs, bad = read_all(src, fmt, media_root=str(real_dir))
    assert not bad and len(docs) == len(recs)
    assert all(d.provenance == {"source": str(src), "line": i} for i, d in enumerate(docs, 1))
    out = tmp_path / "again" / "out.jsonl"
    assert write_records(docs, out, fmt)["written"] == len(recs)
    assert normalize(records(out), out.parent) == normalize(recs, src.parent, real_dir)


def test_format_specific_structure(real_dir, tmp_path):
    recs = _source_records(real_dir)
    src = tmp_path / "dj.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs["dj"]))
    d0, d1, d2 = read_all(src, "dj", media_root=str(real_dir))[0]
    assert [it.kind for it in d0.items] == ["image", "text", "audio", "text"]
    assert d0.items[1].text == "A comfortable bed." and d0.items[1].meta == {"dj_eoc": 1}
    assert d0.meta == {"__dj__stats__": {"lang": "en"}} and len(d0.id) == 16  # content id
    assert d1.id == 42 and [it.kind for it in d1.items] == ["video", "text", "image", "image", "text"]
    assert d1.items[1].text == "two spaces\nthen a line" and "dj_spacing" in d1.meta
    assert d2.items == [Text("plain text only")] and d2.meta == {}
    src = tmp_path / "mmc4.jsonl"
    src.write_text(json.dumps(recs["mmc4"][0]) + "\n")
    (doc,), _ = read_all(src, "mmc4", media_root=str(real_dir))
    assert [getattr(it, "text", it.kind) for it in doc.items] == [
        "Sentence one.",
        "image",
        "Sentence two.",
        "Sentence three.",
        "image",
    ]
    assert doc.items[1].meta == {"matched_sim": 0.28}
    assert (doc.items[1].url, doc.items[1].path) == ("https://cdn/cat.jpg", str(real_dir / "cat.jpg"))
    src = tmp_path / "llava.json"  # LLaVA's own files are one JSON array
    src.write_text(json.dumps(recs["llava"]))
    docs, bad = read_all(src, "llava", media_root=str(real_dir))
    assert len(docs) == 3 and not bad
    assert [(it.kind, it.meta["role"]) for it in docs[0].items] == [
        ("image", "human"),
        ("text", "human"),
        ("text", "gpt"),
    ]
    assert docs[0].id == "000001"
    out = tmp_path / "o" / "llava.json"
    write_records(docs, out, "llava")
    assert normalize(json.loads(out.read_text()), out.parent) == normalize(recs["llava"], src.parent, real_dir)


def test_real_data_juicer_demos(real_dir, tmp_path):
    docs, bad = read_all(real_dir / "dj-demo-images.jsonl", "dj", media_root=str(real_dir))
    assert len(docs) == 3 and not bad
    assert [d.images[0].load() for d in docs] == [
        (real_dir / n).read_bytes() for n in ("img1.png", "img2.jpg", "img3.jpg")
    ]
    assert [d.texts[0].text for d in docs][:2] == ["A comfortable bed.", "A bus."]
    # The same via an explicit prefix rewrite instead of a media root.
    docs2, _ = read_all(real_dir / "dj-demo-images.jsonl", "dj", path_map={"../../tests/ops/data/": f"{real_dir}/"})
    assert [signature(d) for d in docs2] == [signature(d) for d in docs]
    # Without either, every record names the file it could not find; nothing raises.
    _, bad = read_all(real_dir / "dj-demo-images.jsonl", "dj")
    assert [b.reason for b in bad] == ["missing_media"] * 3 and "img1.png" in bad[0].detail

    docs, bad = read_all(real_dir / "dj-demo-videos.jsonl", "dj", media_root=str(real_dir))
    assert [d.texts[0].text for d in docs] == ["a cartoon", "一段卡通"]
    assert all(d.videos[0].load() == (real_dir / "video1.mp4").read_bytes() for d in docs)
    assert [(b.line, b.reason) for b in bad] == [
        (3, "missing_media"),
        (4, "missing_media"),
        (5, "missing_media"),
        (6, "missing_media"),
    ]
    assert ["video2.mp4" in bad[0].detail, "video3.mp4" in bad[3].detail] == [True, True]

    docs, bad = read_all(real_dir / "dj-demo-dedup.jsonl", "dj")
    lines = [ln for ln in (real_dir / "dj-demo-dedup.jsonl").read_text().splitlines() if ln.strip()]
    assert len(docs) == len(lines) and not bad and all(not d.media for d in docs)
    assert docs[0].text == json.loads(lines[0])["text"]


def test_chain_dj_wds_obelics_mmc4_dj(real_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = (real_dir / "dj-demo-images.jsonl").read_text().splitlines()
    lines += (real_dir / "dj-demo-videos.jsonl").read_text().splitlines()[:2]
    lines += [json.dumps(r) for r in _source_records(real_dir)["dj"]]
    src.write_text("\n".join(lines) + "\n")
    summaries = []
    steps = [
        ("dj", src),
        ("wds", tmp_path / "s1"),
        ("obelics", tmp_path / "s2.jsonl"),
        ("mmc4", tmp_path / "s3.jsonl"),
        ("dj", tmp_path / "s4.jsonl"),
    ]
    for (a, pa), (b, pb) in zip(steps, steps[1:]):
        summaries.append(convert(pa, pb, a, b, media_root=str(real_dir), progress=False))
    assert [(s["read"], s["written"], s["bad"]) for s in summaries] == [(len(lines), len(lines), 0)] * 4
    final = records(tmp_path / "s4.jsonl")
    assert normalize(final, tmp_path) == normalize([json.loads(x) for x in lines], src.parent, real_dir)
    first, _ = read_all(src, "dj", media_root=str(real_dir))
    last, _ = read_all(tmp_path / "s4.jsonl", "dj")
    assert [signature(d) for d in last] == [signature(d) for d in first]


def test_bad_records_have_reasons_and_counts_add_up(real_dir, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"text": "<__dj__image> fine", "images": [str(real_dir / "img1.png")]}),
                '{"text": "broken json", ',
                json.dumps({"texts_typo": "no text field"}),
                json.dumps({"text": "<__dj__image> <__dj__image> two", "images": [str(real_dir / "img1.png")]}),
                json.dumps({"text": "<__dj__audio> gone", "audios": ["nowhere/missing.wav"]}),
                "",
                json.dumps([1, 2]),
                json.dumps({"text": "ok again"}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    # the image lives outside the input's folder: media_root names its folder as part of the corpus
    s = convert(src, out, "dj", "obelics", media_root=str(real_dir), progress=False)
    assert (s["read"], s["written"], s["bad"]) == (7, 2, 5)
    assert s["bad_reasons"] == {"bad_json": 1, "bad_schema": 2, "media_count_mismatch": 1, "missing_media": 1}
    errs = records(errors_path(out, "obelics"))
    assert [(e["line"], e["reason"]) for e in errs] == [
        (2, "bad_json"),
        (3, "bad_schema"),
        (4, "media_count_mismatch"),
        (5, "missing_media"),
        (7, "bad_schema"),
    ]
    assert "missing.wav" in errs[3]["detail"] and errs[1]["raw"] == json.dumps({"texts_typo": "no text field"})
    assert len(records(out)) == 2
    # A media file that vanishes between reading and writing quarantines that doc, the rest is written.
    gone = tmp_path / "gone.png"
    gone.write_bytes((real_dir / "img1.png").read_bytes())
    doc = Doc(items=[Text("x"), Image(path=str(gone))], id="d1")
    gone.unlink()
    seen = []
    counts = write_records([doc, Doc(items=[Text("kept")])], tmp_path / "w", "wds", on_bad=seen.append)
    assert (counts["written"], counts["bad"]) == (1, 1) and seen[0].reason == "missing_media"


def test_argument_errors_name_the_fix(tmp_path):
    with pytest.raises(MMGenError, match="unknown format 'obelix': did you mean 'obelics'"):
        read_records(tmp_path, "obelix")
    with pytest.raises(MMGenError, match="no input files match"):
        read_records(tmp_path / "absent.jsonl", "dj")
    with pytest.raises(MMGenError, match=r"no input files match .*dir/\*.tar"):
        read_records(tmp_path / "absent", "wds")
    with pytest.raises(MMGenError, match="media root"):
        read_records(tmp_path, "dj", media_root=str(tmp_path / "nope"))


def test_cli_convert_end_to_end(real_dir, tmp_path, capsys):
    from mmgen.cli import main

    out = tmp_path / "shards"
    rc = main(
        [
            "convert",
            "--from",
            "dj",
            "--to",
            "wds",
            str(real_dir / "dj-demo-videos.jsonl"),
            str(out),
            "--media-root",
            str(real_dir),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads(captured.out[captured.out.index("{") : captured.out.rindex("}") + 1])
    assert (summary["read"], summary["written"], summary["bad"]) == (6, 2, 4)
    assert "4 bad record(s)" in captured.err
    errs = records(out / "errors.jsonl")
    assert [e["reason"] for e in errs] == ["missing_media"] * 4 and "video2.mp4" in errs[0]["detail"]
    docs, bad = read_all(out, "wds")
    assert len(docs) == 2 and not bad and docs[0].videos[0].load() == (real_dir / "video1.mp4").read_bytes()
    # wds -> llava through the CLI, then read back.
    capsys.readouterr()
    rc = main(["convert", "--from", "wds", "--to", "llava", str(out), str(tmp_path / "chat.json")])
    err = capsys.readouterr().err
    # An interleaved document is not a conversation: refused in one line, nothing left behind.
    assert rc == 2 and "cannot be written as LLaVA turns without loss" in err and "--lossy" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "chat.json").exists()
    rc = main(["convert", "--from", "wds", "--to", "llava", str(out), str(tmp_path / "chat.json"), "--lossy"])
    assert rc == 0 and len(json.loads((tmp_path / "chat.json").read_text())) == 2
    capsys.readouterr()
    rc = main(["convert", "--from", "dj", "--to", "webdatset", str(real_dir / "dj-demo-images.jsonl"), str(out)])
    assert rc == 2 and "did you mean 'wds'" in capsys.readouterr().err
    rc = main(["convert", "--from", "dj", "--to", "wds", str(tmp_path / "missing.jsonl"), str(out)])
    assert rc == 2 and "error: no input files match" in capsys.readouterr().err


def test_url_given_as_a_path_is_a_url_reference(tmp_path):
    url = "https://example.org/a.png"
    assert Doc.from_json({"items": [{"type": "image", "path": url}]}, base_dir=str(tmp_path)).items[0].url == url
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"items": [{"type": "text", "text": "hi"}, {"type": "image", "path": url}]}) + "\n")
    (doc,) = read_records(p, "mmgen")
    assert (doc.items[1].url, doc.items[1].path, doc.items[1].fetched) == (url, None, False)
