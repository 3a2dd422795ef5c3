"""The layers of a compressed KV cache (:mod:`mmgen.inference.kv_cache`, whose docstring says what each
method keeps): the policy that says which entries they keep, the state the layers of one cache share,
and the budgeted cache layers, in the model's precision or in 8-bit floats, that evict committed
entries, score entries by the attention they receive and roll back their last entries."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer, Fp8QuantizedLayer

from mmgen.errors import MMGenError

POOL = 7  # SnapKV's pooling width: neighbouring entries are kept together


@dataclass(frozen=True)
class KVPolicy:
    """Which entries a compressed cache keeps (the methods: :mod:`mmgen.inference.kv_cache`)."""

    method: str = "none"
    budget: int | None = None
    window: int = 32
    sinks: int = 4

    @property
    def scored(self) -> bool:
        """Whether the layers need attention scores (and the attention modules' input)."""
        return self.budget is not None and self.method in ("snapkv", "h2o")

    def evictions(self, held: int, new: int, prefill: bool) -> int:
        """How many committed entries each row drops in a forward that adds ``new`` entries to ``held``."""
        if self.budget is None or self.method == "none":
            return 0
        if prefill:
            return max(0, new - self.budget)
        if self.method == "snapkv":
            return 0
        return max(0, held - self.budget)


class CacheRows:
    """What the layers of one cache share: the plan of the forward under way (set by
    :meth:`~mmgen.inference.kv_cache.CompressedKVCache.attention_mask_for`) and each row's padding and tokens."""

    def __init__(self):
        self.forward = 0  # forwards planned so far
        self.prefill = False  # whether the forward under way is the prefill
        self.drop = 0  # entries each row evicts in it
        self.candidates: torch.Tensor | None = None  # (B, held) bool: the entries it may evict (not padding)
        self.mask: torch.Tensor | None = None  # (B, kept + new) bool: its mask over the entries it attends to
        self.seen = 0  # columns of the loop's mask so far (padding included)
        self.real: torch.Tensor | None = None  # (B,) tokens seen per row
        self.pads: torch.Tensor | None = None  # (B,) padding entries each row holds (at the front)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, h, idx[b, h, j]]`` along the entry axis (8-bit floats gathered as bytes: CPU has no fp8 gather)."""
    i = idx[..., None].expand(*idx.shape, t.shape[-1])
    if t.element_size() == 1 and t.is_floating_point():
        return torch.gather(t.view(torch.uint8), 2, i).view(t.dtype)
    return torch.gather(t, 2, i)


def rotary_function(module):
    """The rotary-embedding function of ``module``'s modeling module (the one its forward applies)."""
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise MMGenError(
            f"kv scoring needs the rotary function of {type(module).__name__}'s modeling module "
            "(apply_rotary_pos_emb); use kv_method=streaming or none for this model"
        )
    return fn


class _Budget:
    """Eviction on top of a transformers cache layer; the storage (``_keep``, ``_drop_last``) is the
    subclass's. ``update`` returns the keys and values the forward's mask was sized for: at the prefill
    every prompt entry (of which it stores the part it keeps), while decoding what the planned evictions
    leave plus the forward's own entries."""

    is_croppable = True

    def _init_budget(self, policy: KVPolicy, rows: CacheRows):
        self.policy, self.rows = policy, rows
        self.source = None  # (attention module, hidden states, (cos, sin)) of the forward under way
        self.scores: torch.Tensor | None = None  # h2o: attention each held entry has received, (B, Hkv, S)
        self.pending: torch.Tensor | None = None  # h2o: the last forward's queries' attention, (B, Hkv, q, S)
        self.planned = 0  # the forward this layer last ran in
        self.num_kv_heads = 0

    def update(self, key_states, value_states, *args, **kwargs):
        rows, policy = self.rows, self.policy
        if self.planned == rows.forward:
            raise MMGenError(
                "a forward over a compressed KV cache needs its attention mask from "
                "mmgen.inference.kv_cache.attention_mask_for(cache, mask)"
            )
        self.planned = rows.forward
        self.num_kv_heads = key_states.shape[1]
        source, self.source = self.source, None
        heavy = policy.method == "h2o" and policy.budget is not None
        if rows.prefill:  # the forward attends to the whole prompt; the layer keeps only the chosen part of it
            new = key_states.shape[-2]
            score = None
            if heavy or (policy.scored and rows.drop):
                attn = self._attention(source, key_states, min(policy.window, new)).sum(2)  # (B, Hkv, T)
                score = attn if heavy else torch.nn.functional.avg_pool1d(attn, POOL, stride=1, padding=POOL // 2)
                self.scores = attn if heavy else None
            if not rows.drop:
                return super().update(key_states, value_states, *args, **kwargs)
            idx = self._choose(score, new - rows.drop)
            if self.scores is not None:
                self.scores = torch.gather(self.scores, 2, idx)
            super().update(_gather(key_states, idx), _gather(value_states, idx), *args, **kwargs)
            return key_states, value_states
        # Decoding: the planned evictions come first, among the committed entries only, so that the
        # forward attends to what stays and a crop of its own entries undoes it exactly.
        if heavy and self.pending is not None:
            self.scores = self.scores + self.pending.sum(2)
            self.pending = None
        if rows.drop:
            self._evict(self.scores if heavy else None, self.get_seq_length() - rows.drop)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if heavy:
            new = key_states.shape[-2]
            self.pending = self._attention(source, keys, new)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(*self.scores.shape[:2], new)], -1)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """A decoding forward attends to what its planned evictions leave, then to its own entries."""
        drop = 0 if self.rows.prefill else self.rows.drop
        return self.get_seq_length() - drop + query_length, 0

    def _choose(self, score, keep: int) -> torch.Tensor:
        """(B, Hkv, keep) indices, in sequence order, of the candidate entries each row and head keeps:
        sinks and (snapkv, h2o) the recent window always, then the best ``score`` (streaming: the most
        recent); padding only when a row has too few tokens."""
        p, real = self.policy, self.rows.candidates
        (b, held), h = real.shape, self.num_kv_heads
        if score is None:
            score = torch.arange(held, device=real.device, dtype=torch.float32).expand(b, h, -1)
        protect = real & (real.cumsum(-1) <= p.sinks)
        if p.method != "streaming":
            protect = protect | (torch.arange(held, device=real.device) >= held - p.window)
        score = score.float().masked_fill(protect[:, None], float("inf")).masked_fill(~real[:, None], float("-inf"))
        return score.topk(keep, dim=-1).indices.sort(-1).values

    def _evict(self, score, keep: int) -> None:
        """Keep ``keep`` of the held entries (:meth:`_choose`)."""
        idx = self._choose(score, keep)
        self._keep(idx)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, idx)

    def _attention(self, source, keys: torch.Tensor, n: int) -> torch.Tensor:
        """(B, Hkv, n, K) float32: the softmax attention the last ``n`` queries of the forward give each of
        ``keys`` (the held entries and the forward's own), summed over the query heads of each KV head;
        zero for padding queries."""
        if source is None:
            raise MMGenError(
                "kv scoring got no attention input: build the cache with make_kv_cache(model, ...) "
                "for the model it runs with"
            )
        module, hidden, (cos, sin) = source
        bsz, hkv, total, dim = keys.shape
        q = module.q_proj(hidden[:, -n:]).view(bsz, n, -1, dim)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q, _ = rotary_function(module)(q.transpose(1, 2), q.transpose(1, 2), cos[:, -n:], sin[:, -n:])
        q = q.reshape(bsz, hkv, -1, n, dim).float()
        scale = getattr(module, "scaling", dim**-0.5)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) * scale
        mask = self.rows.mask
        causal = (
            torch.arange(total, device=keys.device)[None] <= torch.arange(total - n, total, device=keys.device)[:, None]
        )
        allowed = mask[:, None, None, None, :] & causal
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = probs.masked_fill(~mask[:, -n:][:, None, None, :, None], 0.0)  # padding queries (NaN rows) count 0
        return probs.sum(2)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` entries (a positive value is not an amount: an error, as
        transformers' DynamicLayer says), with the attention their queries gave that is not yet scored."""
        if tokens_to_remove > 0:
            raise MMGenError(f"crop takes minus the number of entries to drop, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        self._drop_last(n)
        if self.scores is not None:
            self.scores = self.scores[..., :-n]
        if self.pending is not None:
            q = self.pending.shape[2]
            self.pending = self.pending[:, :, : q - n, :-n] if n < q else None


class BudgetLayer(_Budget, DynamicLayer):
    """A budgeted layer holding its entries in the model's precision (a ``DynamicLayer``)."""

    def __init__(self, policy: KVPolicy, rows: CacheRows):
        DynamicLayer.__init__(self)
        self._init_budget(policy, rows)

    def _stored_keys(self):
        return self.keys

    def _keep(self, idx):
        self.keys, self.values = _gather(self.keys, idx), _gather(self.values, idx)

    def _drop_last(self, n):
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]


class Fp8BudgetLayer(_Budget, Fp8QuantizedLayer):
    """A budgeted layer holding its entries in 8-bit floats (transformers' ``Fp8QuantizedLayer``)."""

    def __init__(self, policy: KVPolicy, rows: CacheRows):
        Fp8QuantizedLayer.__init__(self)
        self._init_budget(policy, rows)

    def _stored_keys(self):
        return self._quantized_keys[0]

    def _keep(self, idx):
        (k, ks), (v, vs) = self._quantized_keys, self._quantized_values
        self._quantized_keys, self._quantized_values = (_gather(k, idx), ks), (_gather(v, idx), vs)
        self.cumulative_length = idx.shape[-1]

    def _drop_last(self, n):
        (k, ks), (v, vs) = self._quantized_keys, self._quantized_values
        self._quantized_keys, self._quantized_values = (k[..., :-n, :], ks), (v[..., :-n, :], vs)
        self.cumulative_length -= n
