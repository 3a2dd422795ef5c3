"""The analytic prefill FLOPs against a hand count and against torch's own FLOP counter on real decoders."""

from __future__ import annotations

import pytest
import torch

from mmgen.errors import MMGenError
from mmgen.inference.cost import DecoderShape, prefill_flops, pruned_token_counts

SHAPE = DecoderShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_prefill_flops_by_hand():
    # one layer over 3 tokens: q, o 8x8 and k, v 8x4 -> 2*3*8*(8+8+4+4) = 1152; 6 causal pairs x 2 products
    # x 2*heads*head_dim = 4*2*4*6 = 192; MLP 3 products of 8x16 -> 2*3*3*8*16 = 2304. Head on 1 position: 2*8*10.
    assert prefill_flops(SHAPE, 3) == 2 * (1152 + 192 + 2304) + 160
    assert prefill_flops(SHAPE, 3, causal=False) == 2 * (1152 + 4 * 2 * 4 * 9 + 2304) + 160
    # pruning after the first layer: the second layer sees 2 tokens (3 causal pairs)
    second = 2 * 2 * 8 * 24 + 4 * 2 * 4 * 3 + 2 * 2 * 3 * 8 * 16
    assert prefill_flops(SHAPE, pruned_token_counts(2, 3, 2, 1)) == 1152 + 192 + 2304 + second + 160
    assert pruned_token_counts(4, 100, 25, 0) == [25] * 4
    assert pruned_token_counts(4, 100, 25, 2) == [100, 100, 25, 25]


def test_bad_counts_are_one_line_errors():
    with pytest.raises(MMGenError, match="2 layers"):
        prefill_flops(SHAPE, [3, 3, 3])
    with pytest.raises(MMGenError, match=">= 0"):
        prefill_flops(SHAPE, [3, -1])
    with pytest.raises(MMGenError, match="outside"):
        pruned_token_counts(4, 10, 5, 5)
    with pytest.raises(MMGenError, match="decoder config"):
        DecoderShape.of(object())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_flops_match_torch_flop_counter(kind):
    """Eager attention computes every (query, key) pair under the mask: the dense count, logits at every position."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()  # transformers' model modules import torchvision, broken next to CPU torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    n = 11
    ids = torch.randint(0, 50, (1, n))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids)
    assert counter.get_total_flops() == prefill_flops(model, n, logits=n, causal=False)
    assert DecoderShape.of(model).kv_heads == 2
