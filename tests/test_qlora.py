"""QLoRA SFT (lora.quantize): a tiny unified LM whose decoder Linear layers are bitsandbytes 4-bit on the
CPU backend, LoRA adapters learning on top, and a plain full-precision bundle at the end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmgen.errors import MMGenError

from trainkit import CODEBOOK, COLORS, tiny_run, write_color_shard

UP = "lm.model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_color_shard(tmp_path_factory.mktemp("codes"), 16)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The bundle SFT starts from: a tiny unified LM with a code head, built from config and saved."""
    from mmgen.models.bundle import Bundle
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.models.unified_build import build_unified_lm
    from mmgen.processing.vocab import Vocab

    texts = [f"a {c} circle. What color is the circle? {c}" for c in COLORS] * 8
    tok = train_text_tokenizer(texts, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": CODEBOOK}, max_grid=8)
    model = build_unified_lm(
        vocab, hidden=64, layers=2, heads=2, max_len=64, seed=0, code_head=True, text_tokenizer=tok
    )
    out = tmp_path_factory.mktemp("start")
    Bundle(model, tok, vocab, None, {"stage": "pretrain"}).save(out)
    return out


def _over(shards, start, out_dir, **kw):
    return tiny_run(
        shards,
        out_dir,
        {
            "data.seq_len": 64,
            "init_from": str(start),
            "model.code_head": "true",
            "save_every": 10,
            "tensorboard": False,
            "optim.lr": 1e-2,
            "steps": 2,
            "lora.enabled": "true",
            "lora.r": 4,
            "lora.quantize": "4bit",
            "lora.modules_to_save": "[code_head]",
        },
        **kw,
    )


def _quantized_start(start, overrides):
    from mmgen.training.config import load_train_config
    from mmgen.training.qlora import load_quantized

    return load_quantized(start, load_train_config("tiny_sft", overrides))


# 4-bit from a bundle (quantized while loading); 8-bit on a model built from config (through a temp save)
@pytest.mark.parametrize("quantize, from_bundle", [("4bit", True), ("8bit", False)])
def test_qlora_step_trains_only_adapters_on_a_quantized_base(shards, start, tmp_path, quantize, from_bundle):
    import bitsandbytes as bnb

    from mmgen.models.bundle import load_bundle
    from mmgen.training.config import load_train_config
    from mmgen.training.model_setup import build_model
    from mmgen.training.optim import build_optimizer
    from mmgen.training.qlora import parameter_bytes

    extra = (
        {"lora.quantize": quantize}
        if from_bundle
        else {"lora.quantize": quantize, "init_from": "null", "model.hidden": 64, "model.layers": 2, "model.heads": 2}
    )
    cfg = load_train_config("tiny_sft", _over(shards, start, tmp_path, **extra))
    ref = load_bundle(start)
    model = build_model(cfg, ref.vocab, ref.text_tokenizer)
    base = model.get_base_model()
    kind, dtype = (bnb.nn.Linear4bit, torch.uint8) if quantize == "4bit" else (bnb.nn.Linear8bitLt, torch.int8)
    up = base.get_submodule(UP)
    assert isinstance(up, kind) and up.weight.dtype == dtype
    if quantize == "4bit":
        assert up.weight.quant_state.quant_type == "nf4" and up.weight.quant_state.nested  # double quantization
    assert isinstance(base.get_submodule("lm.model.layers.0.self_attn.q_proj").base_layer, kind)
    # what must stay in full precision: embeddings, the (tied) output head over the extended vocab, the code head
    assert type(base.lm.lm_head) is torch.nn.Linear and base.lm.lm_head.weight.dtype == torch.float32
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert type(base.code_head.modules_to_save["default"]) is torch.nn.Linear
    assert parameter_bytes(model) < parameter_bytes(ref.model)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, _ = build_optimizer(model, cfg)
    ids = torch.randint(0, ref.vocab.size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # the forward above ran in eval mode: on AVX512-BF16 CPUs bitsandbytes would have repacked the
    # 4-bit weights in place unless mmgen turns that off (training.qlora.keep_4bit_layout)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_B" in n for n in changed) and any("code_head.modules_to_save" in n for n in changed)
    assert all(".lora_" in n or "modules_to_save" in n for n in changed), changed
    assert isinstance(base.get_submodule(UP), kind) and base.get_submodule(UP).weight.dtype == dtype  # still quantized


def test_qlora_sft_writes_a_plain_bundle_that_generates(shards, start, tmp_path):
    import bitsandbytes.functional as bnb_functional
    from peft import PeftModel

    from mmgen.inference.generate import generate_interleaved
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified import MMGenForCausalLM
    from mmgen.training.trainer import sft

    out = tmp_path / "sft"
    sft("tiny_sft", _over(shards, start, out))
    # resume (DeepSpeed checkpoint of step 2) runs one more step on the quantized model
    final = sft("tiny_sft", _over(shards, start, out, steps=3))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    assert summary["parameter_bytes"] < sum(
        t.numel() * t.element_size() for t in load_file(start / "model.safetensors").values()
    )

    bundle = load_bundle(final)
    assert isinstance(bundle.model, MMGenForCausalLM)
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    assert type(bundle.model.get_submodule(UP)) is torch.nn.Linear  # loads without bitsandbytes layers
    got, init = bundle.model.state_dict(), load_file(start / "model.safetensors")
    assert torch.equal(got["lm.model.embed_tokens.weight"], init["lm.model.embed_tokens.weight"])
    assert not torch.equal(got["code_head.weight"], init["code_head.weight"])

    # The bundle is the trained function: the 4-bit base with the saved adapter, dequantized and merged.
    overrides = _over(shards, start, tmp_path / "unused")
    trained = PeftModel.from_pretrained(_quantized_start(start, overrides), str(out / "lora_adapter")).eval()
    ids = torch.randint(0, bundle.vocab.size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, have = trained(input_ids=ids).logits, bundle.model(input_ids=ids).logits
    torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[UP + ".weight"], init[UP + ".weight"])  # the 4-bit rounding of the base is in
    four_bit = trained.get_base_model().get_submodule(UP).weight
    dequantized = bnb_functional.dequantize_4bit(four_bit.data, four_bit.quant_state)
    assert torch.equal(got[UP + ".weight"], dequantized)  # outside the LoRA targets: exactly the dequantized base

    doc = generate_interleaved(bundle, "What color is the circle?", max_new_tokens=6, mode="text", seed=0)
    assert doc.meta["new_tokens"] >= 1


@pytest.mark.parametrize(
    "over, message",
    [
        ({"lora.enabled": "false"}, "lora.enabled=true"),
        ({"stage": "pretrain"}, "stage=sft"),
        ({"deepspeed": "training/ds_zero3_cpu.json"}, "ZeRO stage 3"),
        ({"lora.bnb_4bit_quant_type": "nf5"}, "nf4"),
    ],
)
def test_qlora_config_errors(shards, start, tmp_path, over, message):
    from mmgen.training.config import load_train_config

    with pytest.raises(MMGenError, match=message):
        load_train_config("tiny_sft", _over(shards, start, tmp_path, **over))


def test_qlora_without_bitsandbytes_or_its_backend(shards, start, tmp_path, monkeypatch):
    from mmgen.training.config import load_train_config
    from mmgen.training.qlora import check_bitsandbytes

    cfg = load_train_config("tiny_sft", _over(shards, start, tmp_path))
    check_bitsandbytes(cfg, "cpu")  # the CPU backend runs 4-bit here
    with pytest.raises(MMGenError, match="cannot run lora.quantize=4bit on meta"):
        check_bitsandbytes(cfg, "meta")  # a device with no bitsandbytes kernels
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(MMGenError, match="needs bitsandbytes"):
        check_bitsandbytes(cfg, "cpu")
