"""Corpus-wide selectors through `mmgen filter`: pass 1 observes, the selection is fixed over the
whole corpus, pass 2 rejects the unselected; the same output for any worker count and after a
SIGKILL in either pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from mmgen.data.doc import Doc, Text
from mmgen.data.filter_commit import KILL_ENV
from mmgen.data.shards import read_shard, write_shards

FRACTION = 0.4
RECIPE = {
    "name": "select",
    "ops": [
        {"op": "gibberish", "level": "node"},
        {"op": "text_length", "level": "doc", "params": {"min_words": 3}},
        {"op": "doc_dedup"},
        {"op": "top_fraction", "params": {"op": "text_length_filter", "stat": "text_len", "fraction": FRACTION}},
    ],
}
WORDS = "red blue green circle square star small large left right top bottom".split()


def corpus(k: int) -> list[Doc]:
    """Docs of varied length (some of equal length, to exercise the tie order), a gibberish
    paragraph (node removed), a too-short doc and a copy of an earlier doc (rejected before selection)."""
    docs = []
    for i in range(8):
        n = 3 + (7 * i + 3 * k) % 11
        words = [WORDS[(i + j + k) % len(WORDS)] for j in range(n)]
        items = [Text(f"Doc {k}-{i}: " + " ".join(words) + ".")]
        if i == 2:
            items.append(Text("zxqv kkrtp wqlmn vbbxz"))
        docs.append(Doc(items))
    docs.append(Doc([Text("Too short")]))
    docs.append(Doc([Text(docs[0].items[0].text)]))
    return docs


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "filter", *args], env=e, capture_output=True, text=True, timeout=300
    )


def output(out: Path) -> dict:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and p.suffix != ".png"
    }


def test_top_fraction_selects_exactly_the_best_across_the_corpus(tmp_path):
    src = tmp_path / "in"
    for k in range(3):
        write_shards(corpus(k), src, prefix=f"s{k}")
    recipe = tmp_path / "select.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    base = ["--recipe", str(recipe), "--input", str(src / "*.tar"), "--shard-size", "4"]
    runs = {}
    for w in ("1", "2"):
        p = _cli(base + ["--out", str(tmp_path / f"w{w}"), "--workers", w])
        assert p.returncode == 0, p.stderr[-2000:]
        runs[w] = tmp_path / f"w{w}"
    out = runs["1"]
    s = json.loads((out / "summary.json").read_text())
    assert s["balanced"] and s["input"] == 30 == s["kept"] + s["rejected"] + s["quarantined"]

    # the expected selection, from pass 1's observations in the stats: best text_len first, ties by input order
    rows = [r for p in sorted((out / "stats").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    observed = [(r["id"], r["value"]) for r in rows if r["op"] == "top_fraction" and r["stat"] == "value"]
    assert len(observed) == 24  # 30 - 3 too short - 3 copies
    ranked = sorted(range(len(observed)), key=lambda i: (-observed[i][1], i))
    want = {observed[i][0] for i in ranked[: round(FRACTION * len(observed))]}
    assert len({v for _, v in observed}) < len(observed)  # there are ties to break

    kept = [d.id for p in sorted((out / "shards").glob("*.tar")) for d in read_shard(p)]
    assert set(kept) == want and len(kept) == len(want) == s["kept"]
    assert kept == [i for i, _ in observed if i in want]  # input order kept
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.open()]
    not_sel = [r for r in rejects if r["reason"] == "not_selected"]
    assert {r["id"] for r in not_sel} == {i for i, _ in observed} - want
    assert all(r["op"] == "top_fraction" and r["stats"]["value"] == dict(observed)[r["id"]] for r in not_sel)
    assert all(r["doc"]["items"] for r in not_sel)  # the rejected document itself, to inspect
    assert s["per_reason"]["rejected"] == {"duplicate_doc": 3, "not_selected": 24 - len(want), "too_short": 3}
    assert s["per_op"]["top_fraction"]["rejected"] == 24 - len(want)
    assert s["selection"] == {"top_fraction": {"observed": 24, "selected": len(want), "rejected": 24 - len(want)}}
    assert s["kept_with_nodes_removed"] == sum(1 for r in rejects if r["level"] == "node" and r["id"] in want)
    status = {r["id"]: r["status"] for r in rows if r["op"] == "top_fraction"}
    assert {i for i, st in status.items() if st == "kept"} == want
    assert "| top_fraction | doc | " + str(24 - len(want)) in (out / "report.md").read_text()
    assert not (out / "pass1").exists()
    assert output(runs["2"]) == output(out)

    # killed in pass 1 (after 12 docs) and in pass 2 (30 docs of pass 1, then 5 of pass 2), then resumed
    for kill_after in (12, 35):
        run = tmp_path / f"kill{kill_after}"
        p = _cli(base + ["--out", str(run), "--workers", "2"], {KILL_ENV: str(kill_after)})
        assert p.returncode == -9, p.stderr[-2000:]
        assert (run / "pass1").exists() and not (run / "summary.json").exists()
        p = _cli(base + ["--out", str(run), "--workers", "2"])
        assert p.returncode == 0, p.stderr[-2000:]
        assert output(run) == output(out)
