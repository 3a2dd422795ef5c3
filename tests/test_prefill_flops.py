"""The pruner's analytic prefill FLOPs (what benchmarks/inference.py reports) against torch's own FLOP
counter on real Llama and Qwen2 decoders."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_flops_match_torch_flop_counter(kind):
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.inference.prune import prefill_flops
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()  # transformers' model modules import torchvision, broken next to CPU torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        kind,
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    n, layers, heads, head_dim = 11, 3, 4, 8
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.randint(0, 50, (1, n)))
    # Eager attention multiplies every (query, key) pair under the mask and the forward computes logits at
    # every position; the analytic count takes the n (n + 1) / 2 causal pairs and the last position's logits.
    masked_pairs = n * n - n * (n + 1) // 2
    dense = prefill_flops(cfg, [n] * layers) + layers * 4 * heads * head_dim * masked_pairs + 2 * 32 * 50 * (n - 1)
    assert counter.get_total_flops() == dense
