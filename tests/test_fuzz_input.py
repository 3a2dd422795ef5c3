"""Seeded fuzzing of ``filter`` and ``convert``: a few hundred randomly corrupted records (cut and
bit-flipped lines, wrong JSON types, huge numbers, deep nesting, bad UTF-8, paths out of the corpus)
and media (cut, bit-flipped, bombs, text named .png), plus a damaged shard. Whatever comes in: no
traceback, the right exit status, input = kept + rejected + quarantined, and a run killed midway
resumes to the uninterrupted run's output."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.filter_commit import KILL_ENV
from mmgen.data.formats import convert
from mmgen.data.pipeline import run_filter
from mmgen.data.shards import read_shard, write_shards

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261207
N_RECORDS = 320
UNIT_BYTES = 6000
RECIPE = {
    "name": "fuzz",
    "max_image_pixels": 4_000_000,
    "ops": [
        {"op": "empty_items", "level": "node"},
        {"op": "image_shape_filter", "level": "node", "params": {"min_width": 8, "min_height": 8}},
        {"op": "image_decode", "level": "node"},
        {"op": "text_length", "level": "doc", "params": {"min_words": 2}},
        {"op": "special_characters_filter", "level": "doc", "params": {"max_value": 0.4}},
        {"op": "doc_dedup"},
        {"op": "image_near_dedup"},
    ],
}
WORDS = "a red circle and blue square sit on the gray background left right top bottom".split()
JUNK_VALUES = [None, 0, -1, 1.5, True, "", "x", [], {}, [None], [1, [2, [3]]], {"a": {"b": []}}, 10**30, -1e308]


def _png(rng: random.Random, w: int, h: int) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def _flip(data: bytes, rng: random.Random, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _media(root: Path, rng: random.Random) -> list[str]:
    """Media files in the corpus: good ones, damaged copies, a bomb, text and nothing named as images."""
    from bundlekit import bomb_png

    names = []
    for i in range(6):
        good = _png(rng, rng.choice([4, 16, 40]), rng.choice([16, 40, 120]))
        (root / f"good{i}.png").write_bytes(good)
        (root / f"cut{i}.png").write_bytes(good[: rng.randrange(1, len(good))])
        (root / f"flip{i}.png").write_bytes(_flip(good, rng, rng.randrange(1, 20)))
        (root / f"png_as_jpg{i}.jpg").write_bytes(good)
        names += [f"good{i}.png"] * 3 + [f"cut{i}.png", f"flip{i}.png", f"png_as_jpg{i}.jpg"]
    (root / "bomb.png").write_bytes(bomb_png(4000, 4000))  # 16M pixels: over the recipe's 4M
    (root / "text.png").write_text("not a picture\n")
    (root / "empty.png").write_bytes(b"")
    return names + [
        "bomb.png",
        "text.png",
        "empty.png",
        "missing.png",
        "../outside.png",
        "/etc/hostname",
        "~/x.png",
        "sub/../../outside.png",
    ]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 12)))


def _junk(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice(JUNK_VALUES + [_text(rng)])
    if r < 0.75:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["text", "images", "items", "id", "type", "path", "meta", "k"]): _junk(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def _record(rng: random.Random, fmt: str, media: list[str]) -> dict:
    refs = [rng.choice(media) for _ in range(rng.randrange(0, 3))]
    if fmt == "dj":
        text = " ".join(f"<__dj__image> {_text(rng)}" for _ in refs) or _text(rng)
        return {"id": f"r{rng.randrange(10**6)}", "text": text, "images": refs}
    items = [{"type": "text", "text": _text(rng)}] + [{"type": "image", "path": r} for r in refs]
    rng.shuffle(items)
    return {"id": f"m{rng.randrange(10**6)}", "items": items, "meta": {"n": rng.randrange(9)}}


def _mutate(rng: random.Random, rec: dict, fmt: str) -> bytes:
    """One line of bytes: the record as it is, or corrupted in one of many ways."""
    kind = rng.randrange(12)
    line = json.dumps(rec)
    if kind == 0:  # a field of the wrong type
        key = rng.choice(list(rec) + ["text", "images", "items", "item_meta", "text_lengths", "dj_spacing"])
        rec[key] = _junk(rng)
        line = json.dumps(rec)
    elif kind == 1 and fmt == "mmgen" and rec["items"]:  # a wrong item
        rec["items"][rng.randrange(len(rec["items"]))] = _junk(rng)
        line = json.dumps(rec)
    elif kind == 2:  # numbers no parser likes
        line = line[:-1] + rng.choice([', "n": 1e999', ', "n": -1e999', ', "n": ' + "9" * 5000, ', "n": NaN'])
        line += "}"
    elif kind == 3:  # nesting deeper than any parser goes
        depth = rng.choice([50, 5000, 200000])
        line = line[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    elif kind == 4:  # cut short
        line = line[: rng.randrange(len(line))]
    elif kind == 5:  # bad UTF-8
        raw = line.encode()
        i = rng.randrange(len(raw))
        return raw[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + raw[i:]
    elif kind == 6:  # bit flips (may split the line in two or join it with the next)
        return _flip(line.encode(), rng, rng.randrange(1, 6))
    elif kind == 7:  # random bytes
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 80))).replace(b"\n", b" ")
    elif kind == 8:  # not an object
        line = json.dumps(_junk(rng))
    return line.encode()


def build_corpus(root: Path) -> tuple[list[Path], int]:
    """The fuzzed inputs and how many records they hold (non-blank lines; samples of the shard)."""
    rng = random.Random(SEED)
    root.mkdir(parents=True)
    (root.parent / "outside.png").write_bytes(_png(rng, 20, 20))
    media = _media(root, rng)
    files, expected = [], 0
    per = N_RECORDS // 2
    for fmt in ("dj", "mmgen"):
        lines = [json.dumps(_record(random.Random(SEED), fmt, ["good0.png"])).encode()]  # names the format
        lines += [_mutate(rng, _record(rng, fmt, media), fmt) for _ in range(per - 1)]
        data = b"\n".join(lines) + b"\n"
        path = root / f"fuzz_{fmt}.jsonl"
        path.write_bytes(data)
        files.append(path)
        expected += sum(1 for x in data.split(b"\n") if x.decode("utf-8", "replace").strip())
    docs = [Doc([Text(_text(rng) + " words here"), Image(data=_png(rng, 24, 24))]) for _ in range(30)]
    write_shards(docs, root / "shard", prefix="s")
    raw = (root / "shard" / "s-000000.tar").read_bytes()
    broken = _flip(raw[: len(raw) * 2 // 3], rng, 30)
    tar = root / "broken.tar"
    tar.write_bytes(broken)
    (root / "shard" / "s-000000.tar").unlink()
    (root / "shard").rmdir()
    expected += len(list(read_shard(tar)))
    return files + [tar], expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "corpus"
    return build_corpus(root)


def snapshot(out: Path) -> dict:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmgen", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_fuzzed_filter_python_cli_and_resume(corpus, tmp_path):
    files, expected = corpus
    ref = run_filter(
        RECIPE,
        str(files[0].parent),
        tmp_path / "py",
        workers=1,
        progress=False,
        unit_bytes=UNIT_BYTES,
        save_reject_media=True,
    )
    assert ref["balanced"] and ref["input"] == expected >= N_RECORDS
    assert ref["kept"] > 20 and ref["rejected"] > 10 and ref["quarantined"] > 50
    reasons = set(ref["per_reason"]["quarantined"]) | set(ref["per_reason"]["nodes_quarantined"])
    assert {"bad_json", "bad_schema", "path_outside_root", "too_many_pixels", "corrupt_tar"} <= reasons, reasons
    assert len(list((tmp_path / "py" / "done").glob("*.json"))) == ref["units"] > 3
    # nothing from outside the corpus was copied into rejects/media
    outside = (files[0].parent.parent / "outside.png").read_bytes()
    assert all(p.read_bytes() != outside for p in (tmp_path / "py" / "rejects" / "media").rglob("*") if p.is_file())

    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(json.dumps(RECIPE))  # JSON is YAML
    args = [
        "filter",
        "--recipe",
        str(recipe),
        "--out",
        None,
        "--workers",
        "2",
        "--unit-bytes",
        str(UNIT_BYTES),
        "--save-reject-media",
        "--input",
        str(files[0].parent),
    ]
    args[4] = str(tmp_path / "cli")
    r = _cli(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "cli" / "summary.json").read_text()) == ref
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "py")

    # killed midway (SIGKILL after some documents are committed), then resumed: the same output
    args[4] = str(tmp_path / "killed")
    r = _cli(*args, env={KILL_ENV: str(ref["input"] // 2)})
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (tmp_path / "killed" / "summary.json").exists()
    r = _cli(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "py")


def test_fuzzed_convert_python_and_cli(corpus, tmp_path):
    files, _ = corpus
    for src, fmt, dst in ((files[0], "dj", "mmgen"), (files[1], "mmgen", "obelics"), (files[2], "wds", "dj")):
        n = (
            sum(1 for x in src.read_bytes().split(b"\n") if x.decode("utf-8", "replace").strip())
            if fmt != "wds"
            else len(list(read_shard(src)))
        )
        s = convert(src, tmp_path / f"{fmt}.out.jsonl", fmt, dst, progress=False)
        assert s["read"] == n == s["written"] + s["bad"] and s["written"] > 0 and s["bad"] > 0, (fmt, s)
        assert sum(s["bad_reasons"].values()) == s["bad"]
        if fmt == "dj":
            assert {"bad_json", "path_outside_root"} <= set(s["bad_reasons"])
    outside = (files[0].parent.parent / "outside.png").read_bytes()
    assert all(p.read_bytes() != outside for p in tmp_path.rglob("media/*"))
    r = _cli("convert", "--from", "dj", "--to", "wds", str(files[0]), str(tmp_path / "cli_wds"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["read"] == summary["written"] + summary["bad"] and summary["bad"] > 0
