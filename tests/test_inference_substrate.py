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
    # everything else is the quick start's pretraining
    assert (sub.model.hidden, sub.model.heads, sub.model.grid_positions) == (base.model.hidden, base.model.heads, True)
    assert (sub.optim, sub.loss, sub.data.seq_len, sub.data.chat) == (base.optim, base.loss, base.data.seq_len, base.data.chat)
    # DualViTok's two levels reach the vocab as the pixel range alone: a 9x9 picture is 96 tokens
    vocab = run_vocab(sub, n_text=1000, image_books={"sem": 128, "pix": 512})
    assert list(vocab.ranges) == ["pix"] and vocab.image_block_len(9, 9) == 96
    assert sub.data.seq_len >= 5 * 96  # a build-up document's five pictures fit one row


def test_continuous_variant_reads_the_tokenizers_pixel_vectors():
    from mmgen.config import load_config
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.train import TokenizerTrainConfig

    sub, cont = _load("inference_substrate"), _load("inference_substrate_continuous")
    tok = load_config(TokenizerTrainConfig, recipe_path("tiny_dualvitok", "tokenizers"))
    assert cont.model.image_feature_dim == tok.dualvitok.pix_code_dim
    assert cont.model.input_placement == "codes" and cont.model.image_input_range == "pix"
    assert cont.out_dir != sub.out_dir
    # the same recipe otherwise
    assert {**vars(cont.model), "image_feature_dim": None} == vars(sub.model)
    assert (cont.data, cont.optim, cont.steps) == (sub.data, sub.optim, sub.steps)


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
