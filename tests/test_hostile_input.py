"""Hostile input: decompression bombs, mislabelled and truncated media, paths leading out of the
corpus, compressed and mislabelled input files. Each is quarantined with its reason (or, for an
unreadable input file, a one-line error), the run finishes, counts add up and a rerun resumes."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.formats import convert
from mmgen.data.pipeline import run_filter
from mmgen.data.shards import read_shard, write_shards
from mmgen.errors import MediaError, MMGenError

from bundlekit import bomb_png

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(seed: int, w: int = 40, h: int = 40) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (4, 4, 3)).astype("uint8")
    buf = io.BytesIO()
    PILImage.fromarray(a).resize((w, h), PILImage.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(png_bytes(seed))).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def balanced(s: dict) -> bool:
    return s["balanced"] and s["input"] == s["kept"] + s["rejected"] + s["quarantined"]


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for p in sorted((out / "quarantine").glob("*.jsonl")) for x in p.open()]


def kept_ids(out: Path) -> list[str]:
    return [str(d.id) for p in sorted((out / "shards").glob("*.tar")) for d in read_shard(p)]


def test_bomb_header_refused_before_decoding():
    bomb = bomb_png()
    assert len(bomb) < 2_000_000
    img = Image(data=bomb)
    with pytest.raises(MediaError) as e:
        img.to_pil()
    assert e.value.reason == "too_many_pixels" and "20000x20000" in str(e.value)
    with pytest.raises(MediaError, match="over the limit") as e:
        _ = img.size
    from mmgen.data.media import set_max_image_pixels

    set_max_image_pixels(1000)
    try:
        with pytest.raises(MediaError) as e:
            _ = Image(data=png_bytes(0, 40, 40)).size  # 1,600 pixels
        assert e.value.reason == "too_many_pixels"
    finally:
        set_max_image_pixels(None)
    with pytest.raises(MMGenError, match="positive integer"):
        set_max_image_pixels(0)


def test_truncated_and_mislabelled_media_have_reasons(tmp_path):
    png, jpg = png_bytes(1), jpeg_bytes(2)
    (tmp_path / "png_named.jpg").write_bytes(png)
    (tmp_path / "text.png").write_bytes(b"this is a caption, not a picture\n")
    cases = {
        "format_mismatch": Image(path=str(tmp_path / "png_named.jpg")),
        "not_an_image": Image(path=str(tmp_path / "text.png")),
        "truncated_image": Image(data=jpg[: len(jpg) // 2]),
    }
    for reason, img in cases.items():
        with pytest.raises(MediaError) as e:
            img.to_pil()
        assert e.value.reason == reason, (reason, str(e.value))
    assert Image(data=png).to_pil().size == (40, 40)


def _media_corpus(root: Path) -> Path:
    """A Data-Juicer jsonl with one good image per doc and the hostile ones (bomb, truncated, mislabelled)."""
    root.mkdir(parents=True)
    files = {
        "good1.png": png_bytes(1),
        "good2.png": png_bytes(2),
        "bomb.png": bomb_png(),
        "cut.jpg": jpeg_bytes(3)[:400],
        "png_named.jpg": png_bytes(4),
        "text.png": b"no picture here\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    lines = [
        {"id": f"d-{name}", "text": f"<__dj__image> A picture stored as {name}, described in words.", "images": [name]}
        for name in files
    ]
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return src


@pytest.mark.parametrize("level", ["doc", "node"])
def test_bomb_in_filter_is_quarantined_and_resumes(tmp_path, level):
    src = _media_corpus(tmp_path / "corpus")
    # image_near_dedup decodes pixels in its signature, where a bomb once stopped the whole run
    recipe = {"name": "r", "ops": [{"op": "image_shape_filter", "level": level}, {"op": "image_near_dedup"}]}
    out = tmp_path / "out"
    s = run_filter(recipe, str(src), out, workers=1, progress=False)
    assert balanced(s) and s["input"] == 6
    q = {r["id"]: r["reason"] for r in quarantine(out)}
    assert q == {
        "d-bomb.png": "too_many_pixels",
        "d-png_named.jpg": "format_mismatch",
        "d-text.png": "not_an_image",
        "d-cut.jpg": "truncated_image",
    }
    assert (out / "done" / "00000.json").exists()
    assert sum(s["per_reason"]["quarantined" if level == "doc" else "nodes_quarantined"].values()) == 4
    again = run_filter(recipe, str(src), out, workers=1, progress=False)
    assert again == s


def test_image_decode_and_pixel_limit_option(tmp_path):
    src = _media_corpus(tmp_path / "corpus")
    recipe = {"name": "r", "ops": [{"op": "image_decode", "level": "doc"}]}
    s = run_filter(recipe, str(src), tmp_path / "a", workers=1, progress=False)
    reasons = s["per_reason"]["quarantined"]
    # image_decode names a bomb and a mislabelled file as such; a truncated file and text are corrupt images
    assert reasons == {"too_many_pixels": 1, "format_mismatch": 1, "corrupt_image": 2} and s["kept"] == 2
    # a limit below the good images' 1,600 pixels quarantines them too; the recipe option does the same
    s = run_filter(recipe, str(src), tmp_path / "b", workers=1, progress=False, max_image_pixels=1000)
    assert s["per_reason"]["quarantined"]["too_many_pixels"] == 3 and s["kept"] == 0
    s2 = run_filter({**recipe, "max_image_pixels": 1000}, str(src), tmp_path / "c", workers=1, progress=False)
    assert s2["per_reason"] == s["per_reason"]


def _escape_corpus(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    outside_png = tmp_path / "outside.png"
    outside_png.write_bytes(png_bytes(9))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.png").write_bytes(png_bytes(1))
    (corpus / "link.png").symlink_to(outside_png)
    refs = ["ok.png", "../secret.txt", str(secret), "~/secret.txt", "link.png", "../outside.png"]
    recs = [
        {"id": f"r{i}", "text": f"<__dj__image> document number {i} with a picture in it.", "images": [ref]}
        for i, ref in enumerate(refs)
    ]
    src = corpus / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return src, secret


def test_paths_outside_the_corpus_are_refused(tmp_path):
    src, secret = _escape_corpus(tmp_path)
    # a recipe that rejects every document, so every readable medium would be saved to rejects/media
    recipe = {"name": "r", "ops": [{"op": "text_length", "level": "doc", "params": {"min_words": 1000}}]}
    out = tmp_path / "out"
    s = run_filter(recipe, str(src), out, workers=1, progress=False, save_reject_media=True)
    assert balanced(s) and s["input"] == 6 and s["rejected"] == 1
    q = {r["line"]: r["reason"] for r in quarantine(out)}
    assert q == {
        2: "path_outside_root",
        3: "path_outside_root",
        4: "missing_media",
        5: "path_outside_root",
        6: "path_outside_root",
    }
    saved = [p.read_bytes() for p in (out / "rejects" / "media").rglob("*") if p.is_file()]
    assert saved == [(src.parent / "ok.png").read_bytes()]
    # the folder named by --media-root is part of the corpus (where "~/secret.txt" finds secret.txt by
    # dropping leading folders); --allow-outside-root lifts the limit
    s = run_filter(recipe, str(src), tmp_path / "o2", workers=1, progress=False, media_root=str(tmp_path))
    assert s["quarantined"] == 0 and s["rejected"] == 6
    s = run_filter(recipe, str(src), tmp_path / "o3", workers=1, progress=False, allow_outside_root=True)
    assert s["per_reason"]["quarantined"] == {"missing_media": 1} and s["rejected"] == 5

    # convert: nothing outside the corpus reaches the output's media/
    out_file = tmp_path / "conv" / "out.jsonl"
    summary = convert(src, out_file, "dj", "mmgen", progress=False)
    assert (
        summary["read"] == 6
        and summary["written"] == 1
        and summary["bad_reasons"] == {"path_outside_root": 4, "missing_media": 1}
    )
    copied = [p.read_bytes() for p in (out_file.parent / "media").iterdir()]
    assert copied == [(src.parent / "ok.png").read_bytes()]
    assert secret.read_bytes() not in copied


def test_wds_sample_naming_a_file_outside(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(5))
    shard = tmp_path / "corpus" / "s-000000.tar"
    shard.parent.mkdir()
    good = Doc([Text("a good document with a picture"), Image(data=png_bytes(1))], id="good")
    write_shards([good], shard.parent, prefix="s")
    evil = json.dumps(
        {"id": "evil", "items": [{"type": "text", "text": "x"}, {"type": "image", "path": str(secret)}]}
    ).encode()
    with tarfile.open(shard, "a") as tf:
        info = tarfile.TarInfo("00000001_evil.json")
        info.size = len(evil)
        tf.addfile(info, io.BytesIO(evil))
    recs = list(read_shard(shard))
    assert [getattr(r, "reason", None) for r in recs] == [None, "path_outside_root"]
    assert [getattr(r, "reason", None) for r in read_shard(shard, allow_outside_root=True)] == [None, None]


def _dj_docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["red", "square", "circle", "sits", "left", "of", "a", "blue", "gray", "background", "large", "small"]
    out = []
    for i in range(n):
        k = int(rng.integers(1, 14))
        out.append({"id": f"doc-{i:05d}", "text": " ".join(rng.choice(words, k)) + ("" if i % 7 else " !!!###$$$")})
    return out


def test_compressed_and_mislabelled_inputs(tmp_path):
    recs = _dj_docs(40)
    body = "".join(json.dumps(r) + "\n" for r in recs).encode()
    import zstandard

    files = {
        "a.jsonl.gz": gzip.compress(body),
        "b.jsonl.zst": zstandard.ZstdCompressor().compress(body),
        "c.jsonl": gzip.compress(body),
    }  # gzip whatever its name says
    recipe = {"name": "r", "ops": [{"op": "text_length", "level": "doc", "params": {"min_words": 3}}]}
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(body)
    ref = run_filter(recipe, str(plain), tmp_path / "ref", workers=1, progress=False)
    for name, data in files.items():
        p = tmp_path / name
        p.write_bytes(data)
        s = run_filter(recipe, str(p), tmp_path / f"o-{name}", workers=1, progress=False)
        assert (s["input"], s["kept"], s["quarantined"]) == (40, ref["kept"], 0), name
        assert kept_ids(tmp_path / f"o-{name}") == kept_ids(tmp_path / "ref")
    # WebDataset shards compressed with gzip, named .tar.gz or anything else, are read as shards
    docs = [Doc([Text(f"document {i} of the shard, with words"), Image(data=png_bytes(i))]) for i in range(150)]
    write_shards(docs, tmp_path / "shards", prefix="w", max_docs=1000)
    raw = (tmp_path / "shards" / "w-000000.tar").read_bytes()
    for name in ("w.tar.gz", "w.jsonl"):
        (tmp_path / name).write_bytes(gzip.compress(raw))
        s = run_filter(recipe, str(tmp_path / name), tmp_path / f"o-{name}", workers=1, progress=False)
        assert (s["input"], s["kept"], s["quarantined"]) == (150, 150, 0), name
    assert convert(tmp_path / "a.jsonl.gz", tmp_path / "x.jsonl", "dj", "dj", progress=False)["written"] == 40
    # anything else is a one-line error before any work starts, from the library and the CLI
    (tmp_path / "pic.jsonl").write_bytes(png_bytes(3))
    with pytest.raises(MMGenError, match="is not jsonl, parquet or a tar shard"):
        run_filter(recipe, str(tmp_path / "pic.jsonl"), tmp_path / "o-pic", workers=1, progress=False)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmgen",
            "filter",
            "--recipe",
            "shapesworld",
            "--input",
            str(tmp_path / "pic.jsonl"),
            "--out",
            str(tmp_path / "o-cli"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tokenize_quarantines_bombs_and_mislabelled_images(tmp_path):
    from mmgen.tokenizers.pretokenize import pretokenize

    from trainkit import tiny_pixel_vq

    tiny_pixel_vq().save_pretrained(tmp_path / "vq")
    docs = [
        Doc([Text("a good picture"), Image(data=png_bytes(1, 32, 32))], id="good"),
        Doc([Text("a bomb"), Image(data=bomb_png())], id="bomb"),
        Doc([Text("png bytes said to be jpeg"), Image(data=png_bytes(2), format="jpeg")], id="mislabelled"),
        Doc([Text("cut"), Image(data=jpeg_bytes(3)[:600])], id="cut"),
    ]
    write_shards(docs, tmp_path / "in")
    s = pretokenize(tmp_path / "vq", str(tmp_path / "in"), tmp_path / "codes", progress=False)
    assert (s["docs_in"], s["docs_written"], s["quarantined"]) == (4, 1, 3)
    assert s["quarantine_reasons"] == {"too_many_pixels": 1, "format_mismatch": 1, "truncated_image": 1}
