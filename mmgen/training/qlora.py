"""QLoRA: a bitsandbytes 4-bit/8-bit base under LoRA adapters, and what it takes to checkpoint and
measure such a model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmgen.errors import MMGenError
from mmgen.training.config import TrainConfig

# Never quantized: the output heads over the extended vocab (lm_head is tied to the embeddings in the tiny
# preset; its code rows are new and small), the code head and the projectors, which SFT may train in full
# (modules_to_save). Embeddings are nn.Embedding, which bitsandbytes' Linear replacement never touches.
QLORA_KEEP = ("lm_head", "code_head", "image_projector", "audio_projector")


def is_quantized(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def bitsandbytes_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    lc = cfg.lora
    keep = [*QLORA_KEEP, *lc.modules_to_save]
    if lc.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lc.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=lc.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, lc.compute_dtype),
        llm_int8_skip_modules=keep,
    )


def qlora_device() -> str:
    """This rank's device: bitsandbytes quantizes where the weights are placed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return "cpu" if acc.device_name() == "cpu" else acc.device_name(int(os.environ.get("LOCAL_RANK", "0")))


def check_bitsandbytes(cfg: TrainConfig, device: str) -> None:
    """Run one quantized Linear forward and backward on ``device``: a missing package or a backend that
    cannot run here (an old bitsandbytes without the CPU backend, an unsupported GPU) stops with one line
    before any model is loaded."""
    lc = cfg.lora
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise MMGenError(
            f"lora.quantize={lc.quantize} needs bitsandbytes ({e}); "
            "pip install 'bitsandbytes>=0.50', or set lora.quantize=none for plain LoRA"
        ) from None
    try:
        dense = torch.nn.Linear(64, 64)
        if lc.quantize == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            layer.load_state_dict(dense.state_dict())
        else:
            layer = bnb.nn.Linear4bit(
                64,
                64,
                compute_dtype=getattr(torch, lc.compute_dtype),
                compress_statistics=lc.double_quant,
                quant_type=lc.bnb_4bit_quant_type,
            )
            layer.weight = bnb.nn.Params4bit(
                dense.weight.data,
                requires_grad=False,
                quant_type=lc.bnb_4bit_quant_type,
                compress_statistics=lc.double_quant,
            )
            layer.bias = dense.bias
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer.to(device)(x).float().sum().backward()
    except Exception as e:  # noqa: BLE001 -- any backend failure, reported in one line with its cause
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise MMGenError(
            f"bitsandbytes {bnb.__version__} cannot run lora.quantize={lc.quantize} on {device}: "
            f"{type(e).__name__}: {why}; upgrade bitsandbytes or set lora.quantize=none"
        ) from None


def load_quantized(source: str | Path, cfg: TrainConfig):
    """``from_pretrained`` with a ``BitsAndBytesConfig``: the decoder's Linear layers become bitsandbytes
    4-bit/8-bit layers as the weights load, on this rank's device."""
    from transformers import AutoModelForCausalLM

    device = qlora_device()
    check_bitsandbytes(cfg, device)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=bitsandbytes_config(cfg), device_map={"": device}
    )
    if not is_quantized(model):
        raise MMGenError(
            f"lora.quantize={cfg.lora.quantize}: no Linear layer of {source} was quantized "
            "(the decoder has none outside the kept heads and projectors)"
        )
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every 4-bit layer.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode on an input without grad repacks its
    weight in place for a bf16 kernel, and from then on computes in bf16 (whatever the recipe's
    ``compute_dtype``) through an op without autograd. A QLoRA model evaluates between steps and is
    merged and saved from those weights, so mmgen keeps the one layout and dtype on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_for_qlora(model, cfg: TrainConfig):
    """A model built in memory (from config, or a base decoder wrapped here) quantized by the same
    transformers loader as a checkpoint, through a temporary save."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmgen_qlora_") as tmp:
        model.save_pretrained(tmp)
        quantized = load_quantized(tmp, cfg)
    quantized.generation_config = model.generation_config
    return quantized


# What bitsandbytes layers add to state_dict beside the weight (4-bit quant state, 8-bit row scales).
_QUANT_STATE_KEYS = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".SCB",
    ".weight_format",
)


def load_quantized_module(src: dict, dst) -> None:
    """Load a DeepSpeed checkpoint's module state into a QLoRA model (resume).

    bitsandbytes writes each quantized weight's quantization state into ``state_dict`` but its layers
    do not read those entries back; they describe the frozen base, which ``build_model`` has already
    quantized identically from the same source. Anything else missing or unexpected is an error."""
    result = dst.load_state_dict(src, strict=False)
    extra = [k for k in result.unexpected_keys if not k.endswith(_QUANT_STATE_KEYS)]
    if result.missing_keys or extra:
        raise MMGenError(
            f"the checkpoint does not match this QLoRA model (missing {result.missing_keys[:3]}, "
            f"unexpected {extra[:3]}); resume with the same lora.* settings or set resume=false"
        )


def parameter_bytes(model) -> int:
    """Bytes held by the weights: parameters and buffers plus bitsandbytes' quantization constants
    (4-bit absmax blocks and their nested quantization, 8-bit row scales)."""
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        n += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            n += sum(
                v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)
            )
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            n += scb.numel() * scb.element_size()
    return n
