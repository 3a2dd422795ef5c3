"""Packed shards and streamed training: `mmgen pack` packs as the trainer does, ranks read disjoint shards,
a streamed run resumes exactly, and two launcher "nodes" on this machine train like one node with the
doubled batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundlekit import free_port
from trainkit import tiny_run, write_caption_shard

COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "cross", "triangle"]
PLACES = ["top left", "center", "bottom right"]
CODEBOOK = 32


def _over(code_shards, out_dir, **kw):
    return tiny_run(
        code_shards,
        out_dir,
        {
            "data.codebook_size": CODEBOOK,
            "data.text_vocab_size": 300,
            "data.max_grid": 8,
            "data.seq_len": 64,
            "model.hidden": 32,
            "model.layers": 2,
            "model.heads": 2,
            "save_every": 1,
            "steps": 1,
            "grad_accum": 2,
            "loss.prompt_dropout": 0.3,
            "threads": 1,
            # packed with the default config, trained with tiny_pretrain's
            "data.prompt_variation": 0,
        },
        **kw,
    )


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    """96 caption docs (of uneven length: the place is optional) in 6 code shards."""
    root = tmp_path_factory.mktemp("codes")
    out = root / "codes"
    write_caption_shard(out, 96, COLORS, SHAPES, CODEBOOK, grid=4, seed=0, places=PLACES, max_docs=16)
    return out


@pytest.fixture(scope="module")
def packed(code_shards, tmp_path_factory):
    from mmgen.training.pack import pack

    out = tmp_path_factory.mktemp("packed")
    index = pack(None, _over(code_shards, out / "unused"), out, progress=False)
    return out, index


def test_pack_rows_are_the_trainers_packing_per_shard_and_any_worker_count_agrees(code_shards, packed, tmp_path):
    from transformers import AutoTokenizer

    from mmgen.data.code_shards import read_code_shards
    from mmgen.data.packed_shards import read_packed_shard
    from mmgen.data.packing import pack_sequences
    from mmgen.processing.sequence import build_sequences
    from mmgen.processing.vocab import Vocab
    from mmgen.training.pack import pack

    out, index = packed
    assert len(index["shards"]) == 6 and index["totals"]["packing"]["docs"] == 96
    assert index["totals"]["sequences"]["sequences"] == 96 and index["totals"]["image_grids"] == {"4x4": 96}
    assert sum(s["rows"] for s in index["shards"]) == index["totals"]["packing"]["rows"]
    tok, vocab = AutoTokenizer.from_pretrained(out / "text_tokenizer"), Vocab.load(out / "vocab.json")
    for entry in index["shards"]:
        seqs, _ = build_sequences(
            list(read_code_shards(entry["input"])),
            tok,
            vocab,
            chat="none",
            user_targets=True,
            targets=["text", "structural", "image", "audio"],
        )
        want, stats = pack_sequences(seqs, 64, pad_id=tok.pad_token_id or 0, algorithm="mbs")
        got = read_packed_shard(out / entry["name"])
        assert entry["packing"] == stats.to_dict()
        for k in got:
            assert np.array_equal(got[k], want[k]), k
    two = tmp_path / "two"
    pack(None, _over(code_shards, tmp_path / "unused"), two, workers=2, progress=False)
    for entry in index["shards"]:
        assert (two / entry["name"]).read_bytes() == (out / entry["name"]).read_bytes()


def test_pack_refuses_max_docs_rather_than_packing_every_document(code_shards, tmp_path):
    from mmgen.errors import MMGenError
    from mmgen.training.pack import pack

    with pytest.raises(MMGenError, match="data.max_docs applies to data.source=memory"):
        pack(
            None, _over(code_shards, tmp_path / "unused", **{"data.max_docs": 10}), tmp_path / "packed", progress=False
        )
    assert not (tmp_path / "packed").exists()


def test_ranks_never_read_the_same_shard_and_one_rank_with_both_streams_reads_the_same_rows(packed):
    from mmgen.data.packed_shards import read_index
    from mmgen.errors import MMGenError
    from mmgen.training.streaming import StreamBatches

    index = read_index(packed[0])
    ranks = [StreamBatches(index, 2, r, 3, seed=0, buffer=4) for r in range(3)]
    owned = [r.shard_paths() for r in ranks]
    assert all(owned) and set.union(*owned) == {s["path"] for s in index["shards"]}
    assert sum(len(o) for o in owned) == len(index["shards"])  # disjoint
    one = StreamBatches(index, 6, 0, 1, seed=0, buffer=4, streams=3)
    for _ in range(30):  # several epochs of every stream
        got = [rows for r in ranks for _, rows in r.next()]
        both = [rows for _, rows in one.next()]
        for a, b in zip(got, both):
            assert np.array_equal(a["input_ids"], b["input_ids"])
        assert all(len(st._buf) <= 4 for st in one.streams.values())  # the buffer stays bounded
    with pytest.raises(MMGenError, match="every stream needs a shard"):
        StreamBatches(index, 1, 0, 7, seed=0, buffer=4)


def test_a_stream_started_at_a_position_continues_the_uninterrupted_order(packed):
    from mmgen.data.packed_shards import read_index
    from mmgen.training.streaming import PackedRowStream

    shards = [(s["path"], s["rows"]) for s in read_index(packed[0])["shards"]]
    total = sum(n for _, n in shards)
    full = PackedRowStream(shards, seed=3, stream=1, buffer=5).take(3 * total)["input_ids"]
    rows_seen = {r.tobytes() for r in full[:total]}
    assert len(rows_seen) > total * 0.8  # a shuffle, not a repetition of a few rows
    for start in (1, 7, total + 3):
        resumed = PackedRowStream(shards, seed=3, stream=1, buffer=5, start=start).take(total)["input_ids"]
        assert np.array_equal(resumed, full[start : start + total])


def test_a_resumed_stream_reads_each_shard_once_up_to_its_first_rows(packed, monkeypatch):
    from mmgen.data.packed_shards import read_index
    from mmgen.training import streaming

    shards = [(s["path"], s["rows"]) for s in read_index(packed[0])["shards"]]
    total = sum(n for _, n in shards)
    reads = []
    read = streaming.read_packed_shard
    monkeypatch.setattr(streaming, "read_packed_shard", lambda path: reads.append(path) or read(path))
    for start in range(1, total + 10, 3):
        reads.clear()
        streaming.PackedRowStream(shards, seed=3, stream=1, buffer=5, start=start).take(1)
        assert len(reads) == len(set(reads)), (start, reads)


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_streamed_resume_reproduces_the_uninterrupted_loss_curve(code_shards, packed, tmp_path):
    from mmgen.training.trainer import pretrain

    stream = {"data.source": "packed", "data.packed_shards": str(packed[0]), "data.shuffle_buffer": 3}
    run = tmp_path / "run"
    pretrain(None, _over(code_shards, run, **stream))  # one step, checkpointed
    shutil.rmtree(run / "final")
    pretrain(None, _over(code_shards, run, steps=4, **stream))
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 1
    fresh = tmp_path / "fresh"
    pretrain(None, _over(code_shards, fresh, steps=4, **stream))
    assert _losses(run) == pytest.approx(_losses(fresh), rel=1e-6) and len(set(_losses(fresh))) == 4
    a, b = _final_weights(run), _final_weights(fresh)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    data = json.loads((fresh / "summary.json").read_text())["data"]
    assert data["packing"]["docs"] == 96 and len(data["shards_per_rank"][0]) == 6


def _two_nodes(overrides: list[str]) -> None:
    """Two torchrun launchers, one process each, meeting at a c10d store on 127.0.0.1: two "nodes"."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "mmgen.training.pretrain",
                "tiny_pretrain",
                *overrides,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]


def test_two_nodes_equal_one_node_with_the_doubled_batch_and_resume_across_them(code_shards, packed, tmp_path):
    """Each node's rank streams its own shards; one node reading both streams with the doubled micro-batch
    sees the same global batch, so the loss curve and weights agree. The two-node run is killed after
    its first step (it ends there) and resumed on both nodes."""
    from mmgen.training.trainer import pretrain

    stream = {
        "data.source": "packed",
        "data.packed_shards": str(packed[0]),
        "data.image_tokenizer": "null",
        "data.shuffle_buffer": 3,
        "data.streams": 2,
        "data.chat": "none",
    }
    two = tmp_path / "two"
    _two_nodes(_over(code_shards, two, micro_batch=1, **stream))
    shutil.rmtree(two / "final")
    _two_nodes(_over(code_shards, two, micro_batch=1, steps=3, **stream))
    one = tmp_path / "one"
    pretrain("tiny_pretrain", _over(code_shards, one, micro_batch=2, steps=3, **stream))

    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["resumed_from"] == 1
    per_rank = s2["data"]["shards_per_rank"]
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and len(per_rank[0]) + len(per_rank[1]) == 6
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5) and _losses(one)[0] != _losses(one)[1]
    a, b = _final_weights(two), _final_weights(one)
    # As for two ranks of one node: gradient sums in another order differ in the last float bits.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_run_whose_settings_differ_from_the_packed_shards_stops_with_one_line(code_shards, packed, tmp_path):
    from mmgen.errors import MMGenError
    from mmgen.training.trainer import pretrain

    stream = {"data.source": "packed", "data.packed_shards": str(packed[0])}
    with pytest.raises(MMGenError, match="built with seq_len=64, this run needs 96"):
        pretrain(None, _over(code_shards, tmp_path / "run", **{**stream, "data.seq_len": 96}))
    with pytest.raises(MMGenError, match="no packed shards at"):
        pretrain(None, _over(code_shards, tmp_path / "run2", **{**stream, "data.packed_shards": str(tmp_path)}))
