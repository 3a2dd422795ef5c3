"""snapshot_every: loadable bundles during training, at the right steps, identical after a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmgen.errors import MMGenError

from trainkit import tiny_run, write_caption_shard

CODEBOOK = 16


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    return write_caption_shard(
        tmp_path_factory.mktemp("codes"),
        24,
        ["red", "blue", "green"],
        ["circle", "square", "star"],
        CODEBOOK,
        grid=3,
        seed=1,
    )


def _overrides(code_shards, out_dir, **kw):
    return tiny_run(
        code_shards,
        out_dir,
        {
            "data.codebook_size": CODEBOOK,
            "data.text_vocab_size": 280,
            "data.max_grid": 4,
            "data.seq_len": 64,
            "model.hidden": 32,
            "model.layers": 1,
            "model.heads": 2,
            "save_every": 2,
            "keep_checkpoints": 3,
            "tensorboard": False,
            "steps": 5,
            "snapshot_every": 2,
            # drawn per step: resume must reproduce the drops
            "loss.prompt_dropout": 0.3,
        },
        **kw,
    )


@pytest.fixture(scope="module")
def snapshot_run(code_shards, tmp_path_factory):
    from mmgen.training.trainer import pretrain

    out = tmp_path_factory.mktemp("snap_run")
    pretrain(None, _overrides(code_shards, out))
    return out


def _weights(bundle_dir):
    from safetensors.torch import load_file

    return load_file(bundle_dir / "model.safetensors")


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_snapshots_at_every_interval_but_the_last_step_hold_that_steps_weights(snapshot_run):
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.sequence import encode_prompt

    snaps = snapshot_run / "snapshots"
    # Step 5 is the last: final/ is its bundle, so no snapshot repeats it.
    assert sorted(p.name for p in snaps.iterdir()) == ["step-000002", "step-000004"]
    seconds = []
    for step in (2, 4):
        bundle = load_bundle(snaps / f"step-{step:06d}")
        assert bundle.meta["snapshot"]["step"] == step and bundle.meta["train"]["steps"] == step
        seconds.append(bundle.meta["snapshot"]["train_seconds"])
        # The engine's weights at that step, as the DeepSpeed checkpoint of the same step holds them.
        states = torch.load(
            snapshot_run / "checkpoints" / f"step_{step}" / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )["module"]
        got = bundle.model.state_dict()
        for k, v in states.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
        prompt = torch.tensor([encode_prompt("a red star.", bundle.text_tokenizer, bundle.vocab)])
        with torch.no_grad():
            logits = bundle.model(input_ids=prompt).logits
            out = bundle.model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert logits.shape[-1] == bundle.vocab.size and torch.isfinite(logits).all()
        assert out.shape[1] == prompt.shape[1] + 4
    assert 0 < seconds[0] < seconds[1] <= json.loads((snapshot_run / "summary.json").read_text())["train_seconds"]
    w2, w4, wf = _weights(snaps / "step-000002"), _weights(snaps / "step-000004"), _weights(snapshot_run / "final")
    assert any(not torch.equal(w2[k], w4[k]) for k in w2) and any(not torch.equal(w4[k], wf[k]) for k in w4)


def test_a_resumed_run_writes_the_snapshots_an_uninterrupted_one_did(snapshot_run, code_shards, tmp_path):
    from mmgen.training.trainer import pretrain

    # A crash after the step-2 checkpoint: later checkpoints, snapshots and the final bundle never written.
    crashed = tmp_path / "crashed"
    shutil.copytree(snapshot_run, crashed)
    for gone in ("final", "snapshots/step-000004", "checkpoints/step_4", "checkpoints/step_5"):
        shutil.rmtree(crashed / gone)
    (crashed / "checkpoints" / "latest").write_text("step_2")
    rows = (crashed / "metrics.jsonl").read_text().splitlines()[:2]
    (crashed / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    pretrain(None, _overrides(code_shards, crashed))
    assert json.loads((crashed / "summary.json").read_text())["resumed_from"] == 2
    assert sorted(p.name for p in (crashed / "snapshots").iterdir()) == ["step-000002", "step-000004"]
    _assert_same(_weights(crashed / "snapshots" / "step-000004"), _weights(snapshot_run / "snapshots" / "step-000004"))
    _assert_same(_weights(crashed / "final"), _weights(snapshot_run / "final"))
    # Training seconds carry over the checkpoint: the resumed snapshot counts the first two steps too. The
    # baseline is the checkpoint's own count (the step-2 snapshot was written after the checkpoint was
    # saved, so its count holds the save's seconds, which steps 3-4 need not exceed).
    meta = json.loads((crashed / "snapshots" / "step-000004" / "mmgen.json").read_text())
    carried = torch.load(
        crashed / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["train_s"]
    assert 0 < carried < meta["snapshot"]["train_seconds"]


def test_no_snapshots_when_zero_and_a_negative_interval_is_an_error(snapshot_run, code_shards, tmp_path):
    from mmgen.training.config import load_train_config
    from mmgen.training.trainer import pretrain

    out = tmp_path / "plain"
    pretrain(None, _overrides(code_shards, out, snapshot_every=0))
    assert not (out / "snapshots").exists() and (out / "final" / "model.safetensors").is_file()
    # Snapshots leave training untouched: the same final weights as the run that wrote them.
    _assert_same(_weights(out / "final"), _weights(snapshot_run / "final"))
    with pytest.raises(MMGenError, match="snapshot_every"):
        load_train_config(None, _overrides(code_shards, out, snapshot_every=-1))
