"""`mmgen filter`: operators, dedup, the runner (quarantine, counts, workers, resume) and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.filter_worker import process_doc
from mmgen.data.ops import build_op, hamming, phash
from mmgen.data.pipeline import run_filter
from mmgen.data.shards import read_shard, write_shards
from mmgen.errors import MMGenError

CAPTION = "A large blue square sits at the top left of a gray background."


def picture(seed: int, w: int = 64, h: int = 64) -> Image:
    """A distinct blocky picture per seed (PNG)."""
    a = np.random.default_rng(seed).integers(0, 255, (4, 4, 3)).astype("uint8")
    return Image.from_pil(PILImage.fromarray(a).resize((w, h), PILImage.Resampling.NEAREST))


def run_ops(specs: list[tuple], doc: Doc) -> dict:
    ops = [build_op(name, level, params) for name, level, params in specs]
    return process_doc(ops, doc)


def fate_of(res) -> str | None:
    return res["fate"]["reason"] if res["fate"] else None


@pytest.mark.parametrize(
    "op,params,bad_text,reason",
    [
        ("text_length", {"min_words": 4}, "Too short.", "too_short"),
        ("char_repetition", {"n": 10, "max_ratio": 0.5}, "buy cheap pills now " * 12, "ngram_repetition"),
        ("special_chars", {}, "@@## $$%% ^^&& **(( )) !!~~ ++== <<>>", "special_characters"),
        ("gibberish", {}, "xqzt vbnrk pwqlm jjxkq zzvtr", "gibberish"),
        ("stopwords", {}, "Un grand carré bleu est en haut à gauche sur un fond gris.", "non_english"),
        ("stopwords", {}, "大きな青い四角が左上にあります", "non_english"),
    ],
)
def test_text_ops_node_and_doc_level(op, params, bad_text, reason):
    doc = Doc([Text(CAPTION), picture(0), Text(bad_text)])
    # node level: only the bad paragraph goes, the document survives with its other items
    res = run_ops([(op, "node", params)], doc)
    assert res["fate"] is None and res["alive"] == [0, 1]
    assert [(e["item"], e["reason"]) for e in res["events"]] == [(2, reason)]
    assert res["stats"]["items"]["2"][op] and res["stats"]["items"]["0"][op]
    # doc level on the bad text alone: the whole document goes
    res = run_ops([(op, "doc", params)], Doc([Text(bad_text), picture(1)]))
    assert fate_of(res) == reason and res["fate"]["status"] == "rejected"
    # a clean English caption passes at either level
    for level in ("node", "doc"):
        res = run_ops([(op, level, params)], Doc([Text(CAPTION), picture(2)]))
        assert res["fate"] is None and not res["events"] and res["alive"] == [0, 1]


def test_empty_items_and_image_checks():
    empty = Image(data=b"", format="png")
    res = run_ops([("empty_items", "node", {})], Doc([Text("   "), picture(0), empty, Text(CAPTION)]))
    assert [(e["item"], e["reason"]) for e in res["events"]] == [(0, "empty_text"), (2, "empty_image")]
    assert fate_of(run_ops([("empty_items", "doc", {})], Doc([Text(CAPTION), empty]))) == "empty_image"
    # every item removed -> the document is rejected, not kept empty
    assert fate_of(run_ops([("empty_items", "node", {})], Doc([Text("")]))) == "no_items_left"

    tiny, wide = picture(1, 16, 16), picture(2, 200, 40)
    res = run_ops(
        [("image_size", "node", {"min_side": 32}), ("image_aspect", "node", {"max_aspect": 3.0})],
        Doc([Text(CAPTION), tiny, picture(3), wide]),
    )
    assert [(e["item"], e["reason"]) for e in res["events"]] == [(1, "image_too_small"), (3, "extreme_aspect")]
    assert res["alive"] == [0, 2] and res["stats"]["items"]["3"]["image_aspect"]["aspect"] == 5.0
    assert fate_of(run_ops([("image_aspect", "doc", {})], Doc([Text(CAPTION), wide]))) == "extreme_aspect"

    good = picture(4).data
    corrupt = Image(data=good[: len(good) // 2], format="png")  # truncated: header fine, pixels not
    res = run_ops([("image_decode", "node", {})], Doc([Text(CAPTION), corrupt, picture(5)]))
    assert res["events"][0]["reason"] == "corrupt_image" and res["events"][0]["status"] == "quarantined"
    assert res["alive"] == [0, 2]
    res = run_ops([("image_decode", "doc", {})], Doc([Text(CAPTION), corrupt]))
    assert res["fate"]["status"] == "quarantined"


def test_phash_near_duplicates_on_real_photos(real_dir):
    lena = PILImage.open(real_dir / "lena.jpg").convert("RGB")
    buf = io.BytesIO()
    lena.resize((300, 300), PILImage.Resampling.BILINEAR).save(buf, "JPEG", quality=35)
    copy = PILImage.open(io.BytesIO(buf.getvalue()))
    cat = PILImage.open(real_dir / "cat.jpg")
    h = phash(lena)
    assert hamming(h, phash(copy)) <= 4
    assert hamming(h, phash(cat)) >= 20
    assert hamming(h, phash(PILImage.open(real_dir / "img2.jpg"))) >= 20


def _shard_docs(out: Path) -> list[Doc]:
    return [d for p in sorted((out / "shards").glob("*.tar")) for d in read_shard(p)]


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").glob("*.jsonl")) for line in p.open()]


def test_dedup_across_shards_with_real_images(tmp_path, real_dir):
    lena = (real_dir / "lena.jpg").read_bytes()
    buf = io.BytesIO()
    PILImage.open(real_dir / "lena.jpg").resize((256, 256)).save(buf, "JPEG", quality=40)
    cat = (real_dir / "cat.jpg").read_bytes()
    story = "The portrait was scanned in the lab and it has been used by many people for their tests since then."
    docs_a = [
        Doc([Text("A portrait of a woman with a hat."), Image(data=lena)]),
        Doc([Text("A cat is sitting and looking at the camera."), Image(data=cat)]),
        Doc([Text(story), Image(data=lena)], id="story"),
    ]
    docs_b = [
        Doc([Text("a portrait of a WOMAN,  with a hat!"), Image(data=lena)]),  # exact dup after normalising
        Doc([Text("Another photo of the same portrait."), Image(data=buf.getvalue())]),  # near-dup image
        Doc([Text(story.replace("many", "a lot of")), Image(data=buf.getvalue())]),  # near-dup doc
        Doc([Text("The cat again, a second time."), Image(data=cat)]),
    ]  # exact dup image
    write_shards(docs_a, tmp_path / "in", prefix="a")
    write_shards(docs_b, tmp_path / "in", prefix="b")
    recipe = {
        "name": "dd",
        "ops": [
            {"op": "doc_dedup"},
            {"op": "doc_near_dedup", "params": {"threshold": 0.5}},
            {"op": "image_dedup", "level": "node"},
            {"op": "image_near_dedup", "level": "node", "params": {"radius": 8}},
        ],
    }
    s = run_filter(recipe, str(tmp_path / "in"), tmp_path / "out", workers=1, progress=False)
    ids_a = [d.id for d in docs_a]
    rej = {(r["reason"], r["id"]): r["duplicate_of"] for r in _rejects(tmp_path / "out")}
    assert rej[("duplicate_doc", docs_b[0].id)] == ids_a[0]
    assert rej[("near_duplicate_image", docs_b[1].id)] == ids_a[0]
    assert rej[("near_duplicate_doc", docs_b[2].id)] == "story"
    assert rej[("duplicate_image", docs_b[3].id)] == ids_a[1]
    # the story doc shares lena's bytes with doc 0: its image goes, its text stays
    assert rej[("duplicate_image", "story")] == ids_a[0]
    kept = {d.id: d for d in _shard_docs(tmp_path / "out")}
    assert set(kept) == set(ids_a) | {docs_b[1].id, docs_b[3].id}
    assert [it.kind for it in kept["story"].items] == ["text"]
    assert (s["kept"], s["rejected"], s["nodes_removed"], s["kept_with_nodes_removed"]) == (5, 2, 3, 3)


def _corpus(tmp_path: Path) -> Path:
    """Three input shards with a mix of clean docs and defects, plus a corrupt tar."""
    src = tmp_path / "in"
    docs = []
    for i in range(18):
        d = Doc([Text(f"Picture {i}: " + CAPTION), picture(i)])
        if i % 6 == 1:
            d = Doc([Text("zxqv kkrtp wqlmn vbbxz"), picture(i)])  # gibberish paragraph
        if i % 6 == 2:
            d = Doc([Text(f"Picture {i}: " + CAPTION), Image(data=picture(i).data[:40], format="png")])
        if i % 6 == 3:
            d = Doc([Text("Photo again: " + CAPTION), picture(i - 3)])  # the image of doc i-3
        docs.append(d)
    docs.append(Doc([Text(f"Picture {0}: " + CAPTION), picture(0)]))  # exact duplicate of doc 0
    for k in range(3):
        write_shards(docs[k * 6 : (k + 1) * 6 + (k == 2)], src, prefix=f"s{k}")
    good = (src / "s0-000000.tar").read_bytes()
    (src / "s3-000000.tar").write_bytes(good[: len(good) // 2] + b"\x00garbage" * 10)
    return src


def _recipe():
    return {
        "name": "t",
        "ops": [
            {"op": "empty_items", "level": "node"},
            {"op": "gibberish", "level": "node"},
            {"op": "image_decode", "level": "node"},
            {"op": "doc_dedup"},
            {"op": "image_dedup", "level": "node"},
        ],
    }


def _snapshot(out: Path) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("manifest.json",):
            files[str(p.relative_to(out))] = p.read_bytes()
    return files


def test_runner_quarantine_counts_workers_and_resume(tmp_path, monkeypatch):
    src = _corpus(tmp_path)
    s1 = run_filter(_recipe(), str(src / "*.tar"), tmp_path / "o1", workers=1, shard_size=4, progress=False)
    assert s1["input"] == s1["kept"] + s1["rejected"] + s1["quarantined"] and s1["balanced"]
    q = [json.loads(line) for p in sorted((tmp_path / "o1/quarantine").glob("*.jsonl")) for line in p.open()]
    reasons = sorted(r["reason"] for r in q)
    assert "corrupt_tar" in reasons and reasons.count("corrupt_image") == 3
    assert s1["per_reason"]["nodes_quarantined"] == {"corrupt_image": 3}
    # the truncated tar still yields the docs before the break: exact copies of s0's, so duplicates
    readable = sum(isinstance(d, Doc) for d in read_shard(src / "s3-000000.tar"))
    assert readable >= 1
    assert s1["per_op"]["gibberish"]["nodes_removed"] == 3 and s1["per_op"]["doc_dedup"]["rejected"] == 1 + readable
    assert s1["per_op"]["image_dedup"]["nodes_removed"] == 3
    # every rejected doc or node and every quarantined one has a line
    assert len(_rejects(tmp_path / "o1")) == s1["rejected"] + s1["nodes_removed"]
    assert len(q) == s1["quarantined"] + s1["nodes_quarantined"]
    kept = _shard_docs(tmp_path / "o1")
    assert len(kept) == s1["kept"] and all(len(d.items) >= 1 for d in kept)
    assert max(len(list(read_shard(p))) for p in (tmp_path / "o1/shards").glob("*.tar")) <= 4

    # parallel workers give byte-identical output
    s2 = run_filter(_recipe(), str(src / "*.tar"), tmp_path / "o2", workers=2, shard_size=4, progress=False)
    assert s2 == s1 and _snapshot(tmp_path / "o2") == _snapshot(tmp_path / "o1")

    # simulate a crash during the last two inputs: their done markers are gone, partial output left
    out = tmp_path / "o1"
    for k in ("00002", "00003"):
        (out / "done" / f"{k}.json").unlink()
    (out / "rejects" / "00002.jsonl").write_text("partial")
    import mmgen.data.executors as pl  # where the runner looks process_unit up

    seen = []
    real = pl.process_unit
    monkeypatch.setattr(
        pl, "process_unit", lambda ops, unit, *a: seen.append(Path(unit.path).name) or real(ops, unit, *a)
    )
    s3 = run_filter(_recipe(), str(src / "*.tar"), out, workers=1, shard_size=4, progress=False)
    assert seen == ["s2-000000.tar", "s3-000000.tar"]
    assert s3 == s1 and _snapshot(out) == _snapshot(tmp_path / "o2")

    # a different recipe into the same folder is refused instead of mixing runs
    with pytest.raises(MMGenError, match="new --out"):
        run_filter({"name": "t", "ops": [{"op": "gibberish"}]}, str(src / "*.tar"), out, workers=1, progress=False)


def test_operator_modules_register_their_operators_in_spawned_workers(tmp_path):
    """ShapesWorld's operators live beside its scene parser (mmgen.world.ops); a recipe that names the
    module runs them in this process and in worker processes that start clean, with one result."""
    from mmgen.world.documents import write_world

    write_world(tmp_path / "w", n_docs=40, seed=5, defect_rate=0.6, shard_size=10, mix="caption=1", progress=False)
    labels = [json.loads(x) for x in (tmp_path / "w" / "labels.jsonl").open()]
    mismatched = sum(any(d["type"] == "mismatched_caption" for d in lab["defects"]) for lab in labels)
    recipe = {
        "name": "scenes",
        "operator_modules": ["mmgen.world.ops"],
        "ops": [{"op": "scene_caption_match", "level": "node"}],
    }
    src = str(tmp_path / "w" / "*.tar")
    one = run_filter(recipe, src, tmp_path / "one", workers=1, progress=False, report=False)
    two = run_filter(recipe, src, tmp_path / "two", workers=2, progress=False, report=False)
    assert mismatched >= 1 and one["per_op"]["scene_caption_match"]["nodes_removed"] == mismatched
    assert two == one and _snapshot(tmp_path / "two") == _snapshot(tmp_path / "one")
    with pytest.raises(MMGenError, match="cannot import operator module 'mmgen.no_such_ops'"):
        run_filter({**recipe, "operator_modules": ["mmgen.no_such_ops"]}, src, tmp_path / "bad", progress=False)


def test_recipe_errors():
    with pytest.raises(MMGenError, match=r"ops\[1\] \(gibberish\).*'params.max_scor'.*did you mean 'max_score'"):
        run_filter(
            {"name": "x", "ops": [{"op": "text_length"}, {"op": "gibberish", "params": {"max_scor": 0.2}}]},
            "unused",
            "unused",
        )
    with pytest.raises(MMGenError, match="did you mean 'image_near_dedup'"):
        run_filter({"ops": [{"op": "image_near_dedupe"}]}, "unused", "unused")
    with pytest.raises(MMGenError, match="move deduplication ops to the end"):
        run_filter({"ops": [{"op": "doc_dedup"}, {"op": "gibberish"}]}, "unused", "unused")
    with pytest.raises(MMGenError, match="does not support level 'node'"):
        run_filter({"ops": [{"op": "doc_dedup", "level": "node"}]}, "unused", "unused")
    with pytest.raises(MMGenError, match="multiple of bands"):
        build_op("doc_near_dedup", params={"num_perm": 100, "bands": 32})


def test_cli_filter_named_recipe_and_dry_run(tmp_path, capsys):
    from mmgen.cli import main

    docs = [Doc([Text(f"Scene {i}. " + CAPTION), picture(i)]) for i in range(4)]
    docs += [Doc([Text("qqqq zzzz xxxx vvvv"), picture(9, 8, 8)])]  # gibberish text and a tiny image
    write_shards(docs, tmp_path / "in")
    rc = main(
        [
            "filter",
            "--recipe",
            "shapesworld",
            "--input",
            str(tmp_path / "in" / "*.tar"),
            "--out",
            str(tmp_path / "dry"),
            "--workers",
            "1",
            "--dry-run",
        ]
    )
    assert rc == 0 and "4 kept" in capsys.readouterr().out
    s = json.loads((tmp_path / "dry" / "summary.json").read_text())
    assert s["dry_run"] and s["rejected"] == 1 and not list((tmp_path / "dry" / "shards").glob("*.tar"))
    assert "| gibberish | node |" in (tmp_path / "dry" / "report.md").read_text()
    import pyarrow.parquet as pq

    stats = pq.read_table(tmp_path / "dry" / "stats" / "00000.parquet").to_pylist()
    assert len({r["id"] for r in stats}) == 5
    assert any(r["op"] == "stopwords" and r["item"] == 0 and r["value"] is not None for r in stats)
    assert main(["filter", "--recipe", "nope", "--input", "x", "--out", str(tmp_path / "o")]) == 2
    assert "recipe 'nope' not found" in capsys.readouterr().err
