"""`mmgen tokenize` on executors: the same bytes for 1 or 2 workers and on Ray, resume after SIGKILL,
quarantine of undecodable media with reasons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainkit import tiny_pixel_vq

N_INPUTS = 4


def snapshot(out: Path) -> dict:
    """Every output file's bytes, but the summary (it names the executor) and the done markers' params."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "summary.json" and p.parent.name != "done"
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from PIL import Image as PILImage

    from mmgen.data.doc import Doc, Image, Text
    from mmgen.data.shards import write_shards

    root = tmp_path_factory.mktemp("tok")
    tiny_pixel_vq().save_pretrained(root / "vq")
    rng = np.random.default_rng(0)
    for k in range(N_INPUTS):
        docs = []
        for i in range(24):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            docs.append(Doc([Text(f"picture {k}-{i}"), Image.from_pil(PILImage.fromarray(pixels))]))
        docs.insert(5, Doc([Text("broken"), Image(data=b"\x89PNG\r\n\x1a\nnot really", format="png")]))
        write_shards(docs, root / "in", prefix=f"part{k}")
    (root / "in" / "zz-corrupt.tar").write_bytes(b"not a tar file")
    return root


def _tokenize(corpus, out, **kw):
    from mmgen.tokenizers.pretokenize import pretokenize

    return pretokenize(
        corpus / "vq", str(corpus / "in"), out, batch_size=8, max_docs_per_shard=10, progress=False, **kw
    )


@pytest.fixture(scope="module")
def one_worker(corpus):
    out = corpus / "one"
    return out, _tokenize(corpus, out)


def test_counts_add_up_and_undecodable_media_are_quarantined_with_reasons(one_worker):
    out, s = one_worker
    assert s["docs_in"] == N_INPUTS * 25 + 1 and s["docs_written"] == N_INPUTS * 24 and s["quarantined"] == N_INPUTS + 1
    # a PNG signature followed by garbage: the header cannot be read to the end
    assert s["quarantine_reasons"] == {"truncated_image": N_INPUTS, "corrupt_tar": 1}
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == s["quarantined"] and all(r["reason"] and "detail" in r for r in q)
    assert len(s["shards"]) == N_INPUTS * 3  # 24 docs per input, at most 10 per shard
    assert sorted(p.name for p in (out / "done").glob("*.json")) == [f"{i:06d}.json" for i in range(N_INPUTS + 1)]


def test_two_workers_write_the_same_bytes_as_one(corpus, one_worker):
    out1, s1 = one_worker
    s2 = _tokenize(corpus, corpus / "two", workers=2)
    assert snapshot(corpus / "two") == snapshot(out1)
    assert {k: v for k, v in s2.items() if k not in ("shards", "quarantine", "workers")} == {
        k: v for k, v in s1.items() if k not in ("shards", "quarantine", "workers")
    }


def test_ray_tasks_write_the_same_bytes_as_one_worker(corpus, one_worker):
    out1, s1 = one_worker
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s3 = _tokenize(corpus, corpus / "ray", executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert snapshot(corpus / "ray") == snapshot(out1) and s3["docs_written"] == s1["docs_written"]


def test_killed_and_resumed_gives_byte_identical_shards(corpus, one_worker, tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "mmgen.cli",
        "tokenize",
        "--tokenizer",
        str(corpus / "vq"),
        "--input",
        str(corpus / "in"),
        "--out",
        str(out),
        "--batch-size",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # max_docs_per_shard is a library argument; the CLI's default (5000) puts each input into one shard
    ref = tmp_path / "ref"
    from mmgen.tokenizers.pretokenize import pretokenize

    pretokenize(corpus / "vq", str(corpus / "in"), ref, batch_size=8, progress=False)
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "done" / "000000.json").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    done = list((out / "done").glob("*.json"))
    assert 0 < len(done) < N_INPUTS + 1, "the kill landed after the last input: nothing was left to resume"
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["inputs_resumed"] == len(done) and s["docs_in"] == s["docs_written"] + s["quarantined"]
    assert not (out / "partial").exists() or not any((out / "partial").iterdir())
    assert snapshot(out) == snapshot(ref)


def test_resume_into_a_directory_made_with_other_settings_is_refused(corpus, one_worker):
    from mmgen.errors import MMGenError

    with pytest.raises(MMGenError, match="other inputs or settings"):
        _tokenize(corpus, one_worker[0], keep_aspect=True)
