"""The decoder of the unified LM: one decoder-only transformer over the whole :class:`~mmgen.processing.vocab.Vocab`.

Text, structural, size and code tokens share one embedding table (Emu3 / Lumina-mGPT / Anole style).
:func:`build_tiny_lm` builds the ``tiny`` preset's ``transformers.LlamaForCausalLM`` from config;
training wraps it (or any pretrained decoder) in :class:`mmgen.models.unified.MMGenForCausalLM`, which
adds the vocabulary extension, the optional code head and the continuous-input projectors.

Packed rows (several documents in one row) are run with the 4-D additive block-diagonal causal mask
of :func:`mmgen.data.packing.packed_attention_mask`: transformers passes a 4-D mask to the attention
kernels as is (eager and sdpa), so no document attends to another.
"""

from __future__ import annotations

import torch

from mmgen.errors import MMGenError
from mmgen.models.text_tokenizer import BOS_ID, EOS_ID, PAD_ID, special_ids
from mmgen.processing.vocab import Vocab
from mmgen.utils.compat import ensure_torchvision  # transformers' model modules import torchvision


def build_tiny_lm(
    vocab: Vocab,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_len: int = 2048,
    rope_theta: float = 10000.0,
    tie_embeddings: bool = True,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
    text_tokenizer=None,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
):
    """A randomly initialised ``LlamaForCausalLM`` whose vocabulary is ``vocab.size``.

    bos/eos/pad default to the ids of :func:`mmgen.models.text_tokenizer.train_text_tokenizer`; pass
    ``text_tokenizer`` to take them from another tokenizer instead."""
    ensure_torchvision()
    from transformers import LlamaConfig, LlamaForCausalLM

    if text_tokenizer is not None:
        ids = special_ids(text_tokenizer)
        bos_token_id, eos_token_id, pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    if hidden % heads:
        raise MMGenError(f"model hidden size {hidden} is not divisible by heads {heads}")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise MMGenError(f"model heads {heads} is not divisible by kv_heads {kv_heads}")
    for name, i in (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id)):
        if i is None or not 0 <= i < vocab.text_size:
            raise MMGenError(f"{name} token id {i} is not a text id of the vocab (text size {vocab.text_size})")
    config = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=hidden,
        intermediate_size=intermediate or _swiglu_width(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_dropout=0.0,
    )
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model


def _swiglu_width(hidden: int) -> int:
    # Llama's 8/3 * hidden for SwiGLU, rounded up to a multiple of 64 for matmul-friendly shapes.
    return ((8 * hidden // 3) + 63) // 64 * 64


def extend_pretrained_lm(model, vocab: Vocab):
    """Grow a pretrained decoder's embeddings to ``vocab.size`` (text ids unchanged, new rows at the end)."""
    if model.config.vocab_size > vocab.size:
        raise MMGenError(
            f"model vocab {model.config.vocab_size} is larger than the mmgen vocab {vocab.size}; "
            "build the Vocab with the model's text_size"
        )
    model.resize_token_embeddings(vocab.size, mean_resizing=True)
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
