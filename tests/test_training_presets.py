"""Real-scale presets on the meta device: parameter counts from the published sizes, vocab wiring,
DeepSpeed consistency. Nothing is downloaded and no weight memory is allocated."""

from __future__ import annotations

import pytest
import torch

from mmgen.errors import MMGenError

# Qwen2.5-1.5B as published: 1.54B parameters, 1.31B of them outside the (tied) embedding.
QWEN25_15B_PARAMS = 1_543_714_304
QWEN25_15B_EMBED = 151_936 * 1536


def _cfg():
    from mmgen.training.config import load_train_config

    return load_train_config("qwen2_5_1_5b_siglip", ["model.base=null"])


def test_qwen2_5_1_5b_preset_on_meta_device():
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmgen.models.unified import MMGenForCausalLM
    from mmgen.models.unified_build import build_unified_lm
    from mmgen.training.data import run_vocab

    cfg = _cfg()
    dec = dict(cfg.model.base_config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(dec.pop("model_type"), **dec))
    assert sum(p.numel() for p in plain.parameters()) == QWEN25_15B_PARAMS
    assert QWEN25_15B_PARAMS - QWEN25_15B_EMBED == pytest.approx(1.31e9, rel=0.01)

    vocab = run_vocab(cfg, n_text=151_665, image_books=None)  # the Qwen2.5 tokenizer's length
    assert vocab.text_size == 151_936 and list(vocab.ranges) == ["sem", "pix"]
    assert vocab.code_range("sem")[1] - vocab.code_range("sem")[0] == 32768
    m = cfg.model
    with torch.device("meta"):
        model = build_unified_lm(
            vocab,
            base=m.base_config,
            attn_implementation="sdpa",
            code_head=m.code_head,
            image_feature_dim=m.image_feature_dim,
            projector_depth=m.projector_depth,
        )
    assert isinstance(model, MMGenForCausalLM) and next(model.parameters()).device.type == "meta"
    h = 1536
    code_start = vocab.code_range("sem")[0]
    added = (
        (vocab.size - 151_936) * h  # new embedding rows (tied head: counted once)
        + (vocab.size - code_start) * h  # Janus code head
        + (1152 * h + h)
        + (h * h + h)
    )  # 2-layer MLP projector from SigLIP width
    assert sum(p.numel() for p in model.parameters()) == QWEN25_15B_PARAMS + added
    assert model.get_input_embeddings().weight.shape == (vocab.size, h)
    assert model.config.get_vocab() == vocab and model.config.vocab_size == vocab.size
    assert model.code_head.weight.shape == (vocab.size - code_start, h)
    assert model.config.image_input_range in vocab.ranges


def test_preset_deepspeed_config_is_consistent():
    from mmgen.training.config import check_global_batch
    from mmgen.training.optim import deepspeed_config

    cfg = _cfg()
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds.get("fp16", {}).get("enabled")
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch
    assert ds["gradient_accumulation_steps"] == cfg.grad_accum
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and "train_batch_size" not in ds
    check_global_batch(cfg, 8)  # the world size the preset is written for
    with pytest.raises(MMGenError, match="grad_accum=16 for 4 ranks"):
        check_global_batch(cfg, 4)
    assert cfg.model.gradient_checkpointing and cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.data.seq_len <= cfg.model.base_config["max_position_embeddings"]


@pytest.mark.parametrize(
    "name",
    [
        "ds_zero0_cpu",
        "ds_zero1_cpu",
        "ds_zero2_cpu",
        "ds_zero3_cpu",
        "ds_zero2_gpu",
        "ds_zero3_gpu",
        "ds_zero2_offload_gpu",
        "ds_zero3_offload_gpu",
    ],
)
def test_every_deepspeed_json_is_accepted_by_deepspeed(name):
    """DeepSpeed's own config model validates each file (stage, offload, precision keys)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from mmgen.training.config import TrainConfig
    from mmgen.training.optim import deepspeed_config

    ds = deepspeed_config(TrainConfig(deepspeed=f"training/{name}.json"))
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert int(zero.stage) == int(name.split("zero")[1][0])
    assert ("offload" in name) == (zero.offload_optimizer is not None)
    assert ds["bf16"]["enabled"] == name.endswith("gpu")


def test_run_vocab_follows_the_image_tokenizer_unless_the_recipe_narrows_it(tmp_path):
    """DualViTok's two levels become two code ranges (with its sem_ratio) by default; data.image_levels
    narrows them (sizes still from the tokenizer); explicit data.codebooks must match its sizes."""
    from mmgen.config import load_config
    from mmgen.paths import recipe_path
    from mmgen.training.config import TrainConfig
    from mmgen.training.data import run_vocab

    books = {"sem": 128, "pix": 512}
    both = run_vocab(
        load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), ["data.image_levels=null"]),
        n_text=300,
        image_books=books,
        sem_ratio=4,
    )
    assert list(both.ranges) == ["sem", "pix"] and both.config.sem_ratio == 4
    assert both.code_range("pix")[1] - both.code_range("pix")[0] == 512
    tiny = run_vocab(
        load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), []), n_text=300, image_books=books
    )
    # measured choice
    assert list(tiny.ranges) == ["pix"] and tiny.code_range("pix")[1] - tiny.code_range("pix")[0] == 512
    small = run_vocab(
        load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), []),
        n_text=300,
        image_books={"sem": 16, "pix": 32},
    )
    assert small.config.codebooks == {"pix": 32}  # sizes always come from the tokenizer
    with pytest.raises(MMGenError, match=r"data.image_levels=\['pixel'\]: the image tokenizer writes sem, pix"):
        run_vocab(
            load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), ["data.image_levels=[pixel]"]),
            n_text=300,
            image_books=books,
        )
    with pytest.raises(MMGenError, match="data.codebooks.pix=100 but the image tokenizer's pix codebook has 512"):
        run_vocab(
            load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), ["data.codebooks={pix: 100}"]),
            n_text=300,
            image_books=books,
        )
