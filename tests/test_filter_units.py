"""Work units inside a file: a large jsonl is cut into byte ranges at line starts, a parquet file into
row groups. The output is the same document for document whatever the unit size, the same byte for
byte whatever the number of workers or the executor, and a run killed midway resumes to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmgen.data.doc import BadRecord
from mmgen.data.filter_commit import KILL_ENV
from mmgen.data.filter_inputs import plan_units, read_unit
from mmgen.data.pipeline import run_filter
from mmgen.data.shards import read_shard

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "name": "u",
    "ops": [
        {"op": "text_length", "level": "doc", "params": {"min_words": 3}},
        {"op": "special_characters_filter", "level": "doc", "params": {"max_value": 0.2}},
        {"op": "doc_dedup"},
    ],
}
WORDS = ["red", "square", "circle", "sits", "left", "of", "a", "blue", "gray", "background", "large", "small"]


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        if i % 53 == 7:
            lines.append('{"text": "a line cut in the middle')  # bad json
        elif i % 61 == 5:
            lines.append("")  # blank lines are not records
        elif i % 17 == 3 and i > 20:
            lines.append(lines[i - 20] if lines[i - 20].startswith('{"id"') else json.dumps({"text": "x"}))
        else:
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 16)))) + (" %%%&&&***" if i % 9 == 0 else "")
            lines.append(json.dumps({"id": f"doc-{i:05d}", "text": text, "meta": {"k": i}}))
    return lines


def canonical(out: Path) -> dict:
    """What a run decided, in input order, independent of how the inputs were cut into units."""
    kept = []
    for p in sorted((out / "shards").glob("*.tar")):
        for d in read_shard(p):
            d.provenance.pop("shard"), d.provenance.pop("member")  # where this run wrote it
            kept.append(d.to_json())
    lines = {
        sub: [json.loads(x) for p in sorted((out / sub).glob("*.jsonl")) for x in p.open()]
        for sub in ("rejects", "quarantine")
    }
    summary = json.loads((out / "summary.json").read_text())
    for k in ("units", "output_shards"):
        summary.pop(k)
    return {"kept": kept, **lines, "summary": summary}


def snapshot(out: Path) -> dict:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture()
def big_jsonl(tmp_path) -> Path:
    p = tmp_path / "in" / "corpus.jsonl"
    p.parent.mkdir()
    p.write_text("\n".join(corpus_lines()) + "\n")
    return p


def test_units_partition_the_lines(big_jsonl):
    n_lines = len(big_jsonl.read_text().splitlines())
    for unit_bytes in (1, 97, 1000, 4096, 10**9):
        units = plan_units([str(big_jsonl)], "auto", unit_bytes)
        assert all(u.fmt == "dj" for u in units)
        seen = []
        for u in units:
            for r in read_unit(u):
                seen.append(r.line if isinstance(r, BadRecord) else r.provenance["line"])
        blank = {i + 1 for i, x in enumerate(big_jsonl.read_text().splitlines()) if not x.strip()}
        assert seen == [i for i in range(1, n_lines + 1) if i not in blank], unit_bytes
        if unit_bytes == 1000:
            assert len(units) > 10 and all(u.path == str(big_jsonl) and u.end is not None for u in units)
        if unit_bytes == 10**9:
            assert len(units) == 1


def test_same_output_for_any_unit_size_and_worker_count(big_jsonl, tmp_path):
    whole = run_filter(RECIPE, str(big_jsonl), tmp_path / "whole", workers=1, progress=False)
    assert whole["units"] == 1 and whole["balanced"] and whole["quarantined"] > 0 and whole["rejected"] > 0
    one = run_filter(RECIPE, str(big_jsonl), tmp_path / "one", workers=1, progress=False, unit_bytes=2000)
    two = run_filter(RECIPE, str(big_jsonl), tmp_path / "two", workers=2, progress=False, unit_bytes=2000)
    other = run_filter(RECIPE, str(big_jsonl), tmp_path / "other", workers=2, progress=False, unit_bytes=3001)
    assert one["units"] > 5 and other["units"] != one["units"]
    assert one == two and snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    ref = canonical(tmp_path / "whole")
    assert canonical(tmp_path / "one") == ref and canonical(tmp_path / "other") == ref


def test_killed_run_resumes_to_the_same_output(big_jsonl, tmp_path):
    ref = run_filter(RECIPE, str(big_jsonl), tmp_path / "ref", workers=2, progress=False, unit_bytes=2000)
    out = tmp_path / "killed"
    code = (
        "from mmgen.data.pipeline import run_filter; import json, sys; "
        f"run_filter(json.loads(sys.argv[1]), {str(big_jsonl)!r}, {str(out)!r}, workers=2, progress=False, "
        "unit_bytes=2000)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(RECIPE)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), KILL_ENV: "150"},
    )
    assert r.returncode == -9, r.stderr[-2000:]
    done = len(list((out / "done").glob("*.json")))
    assert 0 < done < ref["units"]
    again = run_filter(RECIPE, str(big_jsonl), out, workers=1, progress=False, unit_bytes=2000)
    assert again == ref and snapshot(out) == snapshot(tmp_path / "ref")


def test_resume_takes_the_units_from_the_manifest(big_jsonl, tmp_path, monkeypatch):
    import mmgen.data.pipeline as filter_pipeline  # where the runner looks plan_units up

    ref = run_filter(RECIPE, str(big_jsonl), tmp_path / "run", workers=1, progress=False, unit_bytes=2000)
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())["units"]
    assert len(saved) == ref["units"] and saved[1]["start"] > 0 and saved[1]["first_line"] > 1

    def no_planning(*a, **k):
        raise AssertionError("a resumed run planned its units again")

    monkeypatch.setattr(filter_pipeline, "plan_units", no_planning)
    for p in (tmp_path / "run" / "done").glob("*.json"):
        if p.name >= "00003.json":
            p.unlink()
    assert run_filter(RECIPE, str(big_jsonl), tmp_path / "run", workers=1, progress=False, unit_bytes=2000) == ref


def test_parquet_row_groups_are_units(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in corpus_lines(300) if x.startswith('{"id"')]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=40)
    assert len(plan_units([str(path)], "auto", 1)) == pq.ParquetFile(path).metadata.num_row_groups
    whole = run_filter(RECIPE, str(path), tmp_path / "whole", workers=1, progress=False)
    split = run_filter(RECIPE, str(path), tmp_path / "split", workers=2, progress=False, unit_bytes=1)
    assert whole["units"] == 1 and split["units"] > 5
    assert canonical(tmp_path / "split") == canonical(tmp_path / "whole")


def test_ray_executor_matches_local_on_units(big_jsonl, tmp_path):
    ray = pytest.importorskip("ray")
    local = run_filter(RECIPE, str(big_jsonl), tmp_path / "local", workers=2, progress=False, unit_bytes=4000)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run_filter(
            RECIPE, str(big_jsonl), tmp_path / "ray", executor="ray", workers=2, progress=False, unit_bytes=4000
        )
    finally:
        ray.shutdown()
    assert s == local and snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")
