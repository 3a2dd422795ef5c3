"""The inference benchmark's substrate: its recipes, and how it finds a quick-start run's codes."""

from __future__ import annotations

import json

import pytest

from mmgen.errors import MMGenError


def _load(name, overrides=()):
    from mmgen.training.config import load_train_config

    return load_train_config(name, list(overrides))


def test_substrate_recipe_is_the_quick_start_recipe_on_pixel_codes_with_four_layers():
    from mmgen.training.data import run_vocab

    base, sub = _load("tiny_pretrain"), _load("inference_substrate")
    assert sub.model.layers >= 4 and sub.data.image_levels == ["pix"] and sub.stage == "pretrain"
    assert sub.model.hidden % sub.model.heads == 0
    # everything else is the quick start's pretraining
    assert (sub.model.heads, sub.model.grid_positions) == (base.model.heads, True)
    assert (sub.optim, sub.loss, sub.data.chat) == (base.optim, base.loss, base.data.chat)
    # ... with rows twice as long, at the same tokens a step (a picture is 96 tokens here, 12 there)
    assert sub.data.seq_len * sub.micro_batch == base.data.seq_len * base.micro_batch
    # DualViTok's two levels reach the vocab as the pixel range alone: a 9x9 picture is 96 tokens
    vocab = run_vocab(sub, n_text=1000, image_books={"sem": 128, "pix": 512})
    assert list(vocab.ranges) == ["pix"] and vocab.image_block_len(9, 9) == 96
    assert sub.data.seq_len >= 5 * 96  # a build-up document's five pictures fit one row


def test_continuous_variant_aligns_a_projector_for_the_tokenizers_pixel_vectors():
    from mmgen.config import load_config
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.train import TokenizerTrainConfig

    sub = _load("inference_substrate")
    cont = _load("inference_substrate_continuous", ["init_from=null"])
    tok = load_config(TokenizerTrainConfig, recipe_path("tiny_dualvitok", "tokenizers"))
    assert cont.stage == "align" and cont.model.image_feature_dim == tok.dualvitok.pix_code_dim
    assert cont.model.input_placement == "codes" and cont.model.image_input_range == "pix"
    assert cont.out_dir != sub.out_dir
    assert {**vars(cont.model), "image_feature_dim": None} == vars(sub.model)
    assert cont.data == sub.data


def test_lm_inputs_finds_a_runs_codes_through_its_markers(tmp_path):
    from mmgen.quickstart import lm_inputs

    run = tmp_path / "runs" / "qs"
    done = run / ".done"
    done.mkdir(parents=True)
    with pytest.raises(MMGenError, match="no finished tokenizer_text stage"):
        lm_inputs(run, code_blocks=False)
    for d in ("codes", "blocks/codes", "tok1", "tok2", "blocktok"):
        (run / d).mkdir(parents=True)

    def mark(stage, result):
        (done / f"{stage}.json").write_text(json.dumps({"seconds": 1, "result": result}))

    mark("tokenizer", str(run / "tok1"))
    mark("tokenize", {})
    assert lm_inputs(run) == (run / "codes", run / "tok1")
    mark("tokenizer_text", str(run / "tok2"))  # the second stage's tokenizer made the codes
    assert lm_inputs(run) == (run / "codes", run / "tok2")
    mark("blocks", str(run / "blocktok"))
    assert lm_inputs(run) == (run / "blocks" / "codes", run / "blocktok")
    assert lm_inputs(run, code_blocks=False) == (run / "codes", run / "tok2")
    # markers written by a run started from the repository root hold paths relative to it
    mark("blocks", "runs/qs/blocktok")
    assert lm_inputs(run)[1] == tmp_path / "runs" / "qs" / "blocktok"


def test_align_from_a_bundle_adds_the_projector_it_lacks(tmp_path):
    """The continuous variant's route: a trained bundle without a projector, then the align stage with
    model.image_feature_dim: the projector is added and learns, the decoder does not move."""
    import torch

    from mmgen.models.bundle import load_bundle
    from mmgen.training.trainer import pretrain

    from trainkit import tiny_pixel_vq, tiny_run, write_color_shard

    shards = write_color_shard(tmp_path / "codes", 24)
    vq_dir = tmp_path / "vq"
    tiny_pixel_vq().save_pretrained(vq_dir)
    base = {
        "data.image_tokenizer": str(vq_dir),
        "data.text_vocab_size": 300,
        "data.max_grid": 8,
        "data.seq_len": 64,
        "model.hidden": 32,
        "model.layers": 2,
        "model.heads": 2,
        "save_every": 10,
        "tensorboard": False,
        "optim.lr": 1e-2,
        "steps": 2,
    }
    first = pretrain("tiny_pretrain", tiny_run(shards, tmp_path / "lm", base))
    before = load_bundle(first).model
    assert before.image_projector is None
    run = tiny_run(shards, tmp_path / "align", base, init_from=str(first), **{"model.image_feature_dim": 4})
    aligned = pretrain("inference_substrate_continuous", run)
    after = load_bundle(aligned).model
    assert after.config.image_feature_dim == 4 and after.config.code_vectors == ["image"]
    got, was = after.state_dict(), before.state_dict()
    projector = {k for k in got if k.startswith("image_projector.")}
    assert {k for k in got if k not in was} == {"image_code_vectors", *projector}
    frozen = [k for k in was if k.startswith("lm.model.layers.")]
    assert frozen and all(torch.equal(got[k], was[k]) for k in frozen)
    # the bundle's own projector stays; one of another width is refused in one line
    from mmgen.models.unified_build import add_feature_inputs

    assert add_feature_inputs(after, image_feature_dim=4) is after
    with pytest.raises(MMGenError, match="image_feature_dim=8 but the model being trained reads 4"):
        add_feature_inputs(after, image_feature_dim=8)
