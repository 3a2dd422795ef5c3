"""DeepSpeed pretraining of the unified LM: config, sampler, schedule, a real engine step, bundle, resume, launcher."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError

from trainkit import assert_logged_run, tiny_run, write_caption_shard

COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "cross", "triangle"]
PLACES = ["top left", "center", "bottom right"]
CODEBOOK = 32


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    """40 caption docs whose 4x4 code grids depend on the caption (so there is something to learn), two shards."""
    return write_caption_shard(
        tmp_path_factory.mktemp("codes"), 40, COLORS, SHAPES, CODEBOOK, grid=4, seed=0, places=PLACES, max_docs=25
    )


def _overrides(code_shards, out_dir, **kw):
    return tiny_run(
        code_shards,
        out_dir,
        {
            "data.codebook_size": CODEBOOK,
            "data.text_vocab_size": 300,
            "data.max_grid": 8,
            "data.seq_len": 96,
            "model.hidden": 32,
            "model.layers": 2,
            "model.heads": 2,
            "grad_accum": 2,
            "save_every": 1,
            "steps": 1,
            # drawn per step: resume must reproduce the drops too
            "loss.prompt_dropout": 0.3,
        },
        **kw,
    )


@pytest.fixture(scope="module")
def one_step_run(code_shards, tmp_path_factory):
    from mmgen.training.trainer import pretrain

    out = tmp_path_factory.mktemp("run_a")
    final = pretrain(None, _overrides(code_shards, out))
    return out, final


def test_config_errors_are_one_line_and_name_the_key(code_shards, tmp_path, capsys):
    from mmgen.cli import main
    from mmgen.training.config import load_train_config

    cfg = load_train_config("tiny_pretrain", ["steps=7", f"data.code_shards={code_shards}"])
    assert cfg.steps == 7 and cfg.model.layers == 2 and cfg.data.code_shards == str(code_shards)
    assert cfg.data.chat == "roles"  # QA conversations in pretraining (tiny_pretrain.yaml says why)
    with pytest.raises(MMGenError, match="did you mean 'steps'"):
        load_train_config(None, ["stepz=3", "data.code_shards=x"])
    with pytest.raises(MMGenError, match="data.code_shards"):
        load_train_config(None, [])
    rc = main(["train", "tiny_pretrain", "model.hiden=64", "--launcher", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'hidden'" in err and len(err.strip().splitlines()) == 1
    from mmgen.training.trainer import pretrain

    with pytest.raises(MMGenError, match="codebook"):
        pretrain(None, _overrides(code_shards, tmp_path, **{"data.codebook_size": 0}))


def test_row_sampler_splits_ranks_and_schedule_warms_up():
    from mmgen.training.config import TrainConfig
    from mmgen.training.data import RowSampler
    from mmgen.training.optim import build_optimizer

    n, mb, ga, world = 12, 2, 1, 2
    samplers = [RowSampler(n, mb, ga, r, world, seed=5) for r in range(world)]
    epoch = [i for step in range(3) for s in samplers for i in s.indices(step, 0)]
    assert sorted(epoch) == list(range(n))  # one epoch covers every row once, ranks disjoint
    again = RowSampler(n, mb, ga, 1, world, seed=5)
    assert np.array_equal(again.indices(7, 0), samplers[1].indices(7, 0))  # a function of the step only

    cfg = TrainConfig(steps=100)
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 10, 0.1
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, cfg)
    f = []
    for _ in range(100):  # the lr each optimizer step trains at, as a fraction of the peak
        f.append(opt.param_groups[0]["lr"] / cfg.optim.lr)
        opt.step()
        sched.step()
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)  # transformers' warmup
    assert f[55] < f[20] and f[99] == pytest.approx(0.1, abs=0.01)


def test_one_deepspeed_step_writes_checkpoint_metrics_and_a_bundle_that_reloads(one_step_run):
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified_build import build_unified_lm
    from mmgen.processing.sequence import encode_prompt

    out, final = one_step_run
    assert final == out / "final"
    rows = assert_logged_run(out)
    assert [r["step"] for r in rows] == [1]
    assert np.isfinite(rows[0]["loss"]) and rows[0]["tokens_per_s"] > 0 and rows[0]["fill_rate"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["sequences"]["sequences"] == 40 and summary["data"]["image_grids"] == {"4x4": 40}

    bundle = load_bundle(final)
    assert (
        bundle.vocab.size == bundle.model.config.vocab_size
        and bundle.vocab.code_range("pix")[1] - bundle.vocab.code_range("pix")[0] == CODEBOOK
    )
    assert bundle.meta["train"]["steps"] == 1 and bundle.meta["stage"] == "pretrain"
    prompt = torch.tensor([encode_prompt("a red circle at the top left.", bundle.text_tokenizer, bundle.vocab)])

    # The DeepSpeed checkpoint (our own file from this run) holds the engine's weights after the step.
    states = torch.load(
        out / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    engine_model = build_unified_lm(
        bundle.vocab, hidden=32, layers=2, heads=2, max_len=96, text_tokenizer=bundle.text_tokenizer
    ).eval()
    engine_model.load_state_dict(states["module"])
    init_model = build_unified_lm(
        bundle.vocab, hidden=32, layers=2, heads=2, max_len=96, text_tokenizer=bundle.text_tokenizer, seed=0
    ).eval()
    with torch.no_grad():
        got = bundle.model(input_ids=prompt).logits
        want = engine_model(input_ids=prompt).logits
        before = init_model(input_ids=prompt).logits
    assert torch.equal(got, want)
    assert (got - before).abs().max() > 1e-4  # the step changed the weights


def test_resume_continues_at_the_right_step_and_matches_an_uninterrupted_run(one_step_run, code_shards, tmp_path):
    from mmgen.training.trainer import pretrain

    src, _ = one_step_run
    resumed = tmp_path / "resumed"
    shutil.copytree(src, resumed)
    (resumed / "final").exists() and shutil.rmtree(resumed / "final")
    pretrain(None, _overrides(code_shards, resumed, steps=3, keep_checkpoints=2))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 1
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step_*")) == ["step_2", "step_3"]

    fresh = tmp_path / "fresh"
    pretrain(None, _overrides(code_shards, fresh, steps=3))
    from safetensors.torch import load_file

    a = load_file(resumed / "final" / "model.safetensors")
    b = load_file(fresh / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    fresh_rows = [json.loads(line) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in fresh_rows] == pytest.approx([r["loss"] for r in rows], rel=1e-5)


def test_cli_train_through_the_deepspeed_launcher(code_shards, tmp_path, monkeypatch, capsys):
    from mmgen.cli import main
    from mmgen.models.bundle import load_bundle

    monkeypatch.chdir(tmp_path)  # pretrain.sh works from any directory; out_dir is relative to here
    over = _overrides(code_shards, "run_cli", **{"model.layers": 1, "data.image_tokenizer": "null"})
    rc = main(["train", "tiny_pretrain", *over, "threads=1", "--launcher", "deepspeed"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert "bundle: run_cli/final" in capsys.readouterr().out
    bundle = load_bundle(tmp_path / "run_cli" / "final")
    assert bundle.model.config.num_hidden_layers == 1
    assert json.loads((tmp_path / "run_cli" / "summary.json").read_text())["world_size"] == 1


def test_stale_extension_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """A build killed mid-way leaves torch's extension lock behind, and the next DeepSpeed start would
    wait on it forever; init_distributed clears locks old enough to have no live builder."""
    import os
    import time

    from mmgen.utils.compat import STALE_LOCK_SECONDS, clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    # an old lock whose directory a process still builds in (a slow build under load) stays
    import subprocess
    import sys

    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=stale.parent)
    try:
        time.sleep(0.2)
        assert clear_stale_extension_locks() == [] and stale.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_extension_locks() == [str(stale)]
    assert not stale.exists() and live.exists()
    assert "stale torch extension build lock" in capsys.readouterr().err
