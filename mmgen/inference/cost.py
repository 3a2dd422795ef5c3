"""Analytic FLOPs of a decoder's prefill, for any layer-by-layer token count.

Prefill pruning changes how many tokens each decoder layer processes (FastV keeps all tokens up to its
scoring layer and a share after it; merging before the LLM shrinks every layer), so its cost is a sum
over layers rather than a function of the prompt length alone. :func:`prefill_flops` takes that count
per layer and returns the FLOPs of the matrix products, with a multiply-add counted as 2 FLOPs, as
``torch.utils.flop_counter`` counts them:

- attention projections: q and o are ``hidden x heads*head_dim``, k and v ``hidden x kv_heads*head_dim``
  (grouped-query attention shrinks the last two);
- attention itself: ``q k^T`` and ``softmax(.) v``, ``2 * 2 * heads * head_dim`` per (query, key) pair.
  A causal prefill of ``n`` tokens has ``n (n + 1) / 2`` such pairs (``causal=False``: ``n^2``, what a
  dense kernel with a mask computes);
- the gated MLP (Llama, Qwen2, Mistral): three ``hidden x intermediate`` products;
- the output head on the positions whose logits are computed (a prefill needs only the last one).

Norms, RoPE, softmax, residual additions and biases are linear in the token count with small
constants and are left out, as they are in the usual ``2 N`` per-token estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mmgen.errors import MMGenError


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder that its FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        """The shape of a transformers decoder config (or of a model, through its ``config``);
        :class:`~mmgen.models.unified.MMGenConfig` hands these names on to its decoder's config."""
        if isinstance(config, cls):
            return config
        config = getattr(config, "config", config)
        try:
            hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            return cls(hidden=hidden, layers=int(config.num_hidden_layers), heads=heads,
                       kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                       intermediate=int(config.intermediate_size), vocab=int(config.vocab_size))
        except AttributeError as e:
            raise MMGenError(f"not a decoder config with Llama-style sizes ({e}); give the model or its config") from None


def attention_pairs(n: int, causal: bool = True) -> int:
    """(query, key) pairs of a prefill of ``n`` tokens."""
    return n * (n + 1) // 2 if causal else n * n


def layer_flops(shape: DecoderShape, n: int, causal: bool = True) -> int:
    """FLOPs of one decoder layer over a prefill of ``n`` tokens."""
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * n * shape.hidden * (2 * q_width + 2 * kv_width)
    attention = 4 * shape.heads * shape.head_dim * attention_pairs(n, causal)
    mlp = 2 * n * 3 * shape.hidden * shape.intermediate
    return projections + attention + mlp


def prefill_flops(model_or_config, tokens_per_layer: int | Sequence[int], logits: int = 1, causal: bool = True) -> int:
    """FLOPs of one row's prefill: layer ``l`` processes ``tokens_per_layer[l]`` tokens (one int: every
    layer the same), then the output head runs on ``logits`` positions."""
    shape = DecoderShape.of(model_or_config)
    counts = [int(tokens_per_layer)] * shape.layers if isinstance(tokens_per_layer, int) else [int(t) for t in tokens_per_layer]
    if len(counts) != shape.layers:
        raise MMGenError(f"{len(counts)} token counts for a decoder of {shape.layers} layers; give one per layer")
    if any(t < 0 for t in counts) or logits < 0:
        raise MMGenError("token counts must be >= 0")
    return sum(layer_flops(shape, t, causal) for t in counts) + 2 * logits * shape.hidden * shape.vocab


def pruned_token_counts(layers: int, prompt: int, kept: int, from_layer: int) -> list[int]:
    """Tokens per layer when a prompt of ``prompt`` tokens keeps ``kept`` of them from layer
    ``from_layer`` on (0: pruned before the LLM; FastV: its scoring layer + 1)."""
    if not 0 <= from_layer <= layers:
        raise MMGenError(f"from_layer {from_layer} outside 0..{layers}")
    return [prompt] * from_layer + [kept] * (layers - from_layer)
