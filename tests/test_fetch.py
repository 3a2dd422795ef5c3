"""`mmgen fetch`: URL media downloaded with img2dataset from a server on 127.0.0.1 that serves good,
slow, missing, truncated, corrupt and oversized files; failures recorded per item and in a file;
counts add up; a resumed run asks the server for nothing it already has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmgen.data.doc import Doc
from mmgen.data.fetch import fetch
from mmgen.data.formats import read_records

from corpus_server import localize, records, serve

DATA = Path(__file__).parent / "data"
# The timeout leaves a loaded CI machine room for the good files; the slow route outlasts it by far.
LIMITS = dict(timeout=4, max_bytes=400_000, max_image_area=20e6, threads=4, progress=False)


def _inputs(base: str, tmp: Path) -> Path:
    d = tmp / "in"
    d.mkdir()
    for name in ("mmc4_sample.jsonl", "obelics_sample.jsonl", "omnicorpus_sample.jsonl"):
        localize(DATA / name, base, d / name)
    return d


def test_fetch_attaches_media_records_failures_and_resumes(real_dir, tmp_path):
    with serve(real_dir, slow_s=12) as (base, hits):
        inp = _inputs(base, tmp_path)
        s = fetch(inp, tmp_path / "out", **LIMITS)
        assert (s["records"], s["docs"], s["written"], s["bad"]) == (6, 6, 6, 0)
        assert (s["urls"], s["fetched"], s["failed"]) == (10, 5, 5)
        assert (s["media_refs"], s["media_fetched"], s["media_failed"]) == (11, 6, 5)
        fails = {
            Path(f["url"]).parent.name + "/" + Path(f["url"]).name: f for f in records(tmp_path / "out/failures.jsonl")
        }
        assert set(fails) == {
            "missing/bus2.jpg",
            "slow/bed.jpg",
            "truncated/cat.jpg",
            "huge/poster.png",
            "img/blip.jpg",
        }
        assert "404" in fails["missing/bus2.jpg"]["reason"]
        assert "timed out" in fails["slow/bed.jpg"]["reason"]
        assert "corrupt image" in fails["truncated/cat.jpg"]["reason"]
        assert fails["huge/poster.png"]["reason"].startswith("image area too large: image of 6000x6000 = ")
        assert fails["img/blip.jpg"]["reason"].startswith("file too large (496395 bytes")
        assert all(f["docs"] for f in fails.values())

        docs = [d for d in read_records(tmp_path / "out/docs.jsonl", "mmgen") if isinstance(d, Doc)]
        assert len(docs) == 6
        media = [m for d in docs for m in d.media]
        assert all(m.url and m.url.startswith(base) for m in media)  # every item keeps its URL
        for m in media:
            name = m.url.rsplit("/", 1)[1]
            if m.fetched:  # a local copy, byte for byte what the server sent
                assert "/img/" in m.url and m.load() == (real_dir / name).read_bytes() and "fetch_error" not in m.meta
            else:
                assert m.meta["fetch_error"] == fails[m.url.split("/", 3)[3]]["reason"]
        assert sum(m.fetched for m in media) == 6

        # An interruption inside a shard leaves the files of its finished samples and no parquet:
        # simulate it, then resume. Nothing downloaded is asked for again (bytes that failed mmgen's
        # checks are checked again, not downloaded again); the URLs that failed to download are retried.
        for p in (tmp_path / "out/download").glob("*/*.parquet"):
            p.unlink()
        for p in (tmp_path / "out/download").glob("*/*_stats.json"):
            p.unlink()
        before = dict(hits)
        s2 = fetch(inp, tmp_path / "out", **LIMITS)
        assert (s2["urls"], s2["fetched"], s2["failed"], s2["already_fetched"], s2["downloaded_now"]) == (
            10,
            5,
            5,
            8,
            2,
        )
        again = {p: hits[p] - before.get(p, 0) for p in hits if hits[p] != before.get(p, 0)}
        assert again == {"/missing/bus2.jpg": 1, "/slow/bed.jpg": 1}
        assert records(tmp_path / "out/failures.jsonl") == list(fails.values())


def test_per_host_rate_splits_into_waves_and_cli(real_dir, tmp_path, capsys):
    from mmgen.cli import main

    with serve(real_dir) as (base, hits):
        src = localize(DATA / "obelics_sample.jsonl", base, tmp_path / "o.jsonl")
        rc = main(
            [
                "fetch",
                str(src),
                str(tmp_path / "out"),
                "--per-host-rate",
                "2",
                "--timeout",
                "5",
                "--max-image-area",
                "20000000",
                "--to",
                "wds",
            ]
        )
        out = capsys.readouterr()
        assert rc == 0, out.err
        s = json.loads(out.out[out.out.index("{") : out.out.rindex("}") + 1])
        # 3 URLs on one host at 2 requests/s: two waves, a second apart.
        assert (s["urls"], s["fetched"], s["failed"], s["waves"]) == (3, 2, 1, 2)
        assert "3 URLs: 2 fetched" in out.err
        docs = [d for d in read_records(tmp_path / "out/shards", "wds") if isinstance(d, Doc)]
        assert [sum(m.fetched for m in d.media) for d in docs] == [1, 1]
    rc = main(["fetch", str(src), str(tmp_path / "o2"), "--per-host-rate", "0"])
    assert rc == 2 and "per_host_rate must be positive" in capsys.readouterr().err


def test_not_fetched_media_never_read_implicitly():
    from mmgen.data.doc import Image
    from mmgen.errors import NotFetchedError

    img = Image(url="https://example.org/a.jpg")
    assert not img.fetched and img.format == "jpeg" and img.content_key() == "url:https://example.org/a.jpg"
    with pytest.raises(NotFetchedError, match="not fetched: https://example.org/a.jpg .*mmgen fetch"):
        img.load()
    assert Image(path="https://example.org/b.png").url == "https://example.org/b.png"  # a URL is never a path


def test_area_limit_above_pillows_own_bomb_check():
    """The area limit is mmgen's alone: an image over twice Pillow's warning threshold passes a limit
    set above it (Pillow's own check would call it corrupt) and is refused by a limit below it."""
    import io

    from PIL import Image

    from mmgen.data import media
    from mmgen.data.fetch import download_problem

    buf = io.BytesIO()
    Image.new("1", (13600, 13600)).save(buf, "PNG")  # 185 M pixels in 22 KB
    try:
        media.set_max_image_pixels(200_000_000)
        assert download_problem(buf.getvalue(), "image", None, 0, None) is None
        media.set_max_image_pixels(100_000_000)
        assert download_problem(buf.getvalue(), "image", None, 0, None).startswith(
            "image area too large: image of 13600x13600"
        )
    finally:
        media.set_max_image_pixels(None)


def test_records_the_writer_refuses_keep_their_reasons(tmp_path, monkeypatch):
    """An input record that could not be read and a document whose file is gone by the time it is written
    both land in errors.jsonl with their reasons, and the counts add up."""
    import mmgen.data.fetch as fetch_module
    from mmgen.data.doc import BadRecord, Image, Text

    gone = Doc(items=[Text("a picture"), Image(path=str(tmp_path / "gone.png"))], id="gone")
    kept = Doc(items=[Text("no media at all")], id="kept")
    unread = BadRecord(source="in.jsonl", reason="bad_json", line=2)
    monkeypatch.setattr(fetch_module, "input_docs", lambda *a: iter([gone, unread, kept]))
    monkeypatch.setattr(fetch_module, "download_urls", lambda *a: None)  # no URL to download
    s = fetch(tmp_path / "in", tmp_path / "out", progress=False)
    assert (s["records"], s["docs"], s["written"], s["bad"]) == (3, 2, 1, 1)
    errors = records(tmp_path / "out/errors.jsonl")
    assert [e["reason"] for e in errors] == ["missing_media", "bad_json"]
    assert "gone.png" in errors[0]["detail"]


def test_a_folder_of_compressed_jsonl_is_read(tmp_path, monkeypatch):
    """A folder input is searched for every input name the filter reads (.jsonl.gz among them)."""
    import gzip

    import mmgen.data.fetch as fetch_module

    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "part.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"d{i}", "items": [{"type": "text", "text": f"doc {i}"}]}) + "\n")
    monkeypatch.setattr(fetch_module, "download_urls", lambda *a: None)  # no URL to download
    s = fetch(tmp_path / "in", tmp_path / "out", progress=False)
    assert (s["records"], s["docs"], s["written"]) == (3, 3, 3)
