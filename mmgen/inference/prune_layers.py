"""The in-LLM half of prefill pruning (``fastv``, ``text``, ``pyramid``; :mod:`mmgen.inference.prune`).

One pruned prefill is one forward of the model with hooks, so every layer keeps its own attention kernel:

- a forward hook on each stage's scoring attention (layer ``K-1``) recomputes only the q.k sub-block the
  ranking needs -- the ranking rows' queries from that layer's input, the keys from what the layer just
  wrote to the scratch cache -- and decides which grid tokens go on;
- forward pre-hooks on the decoder layers from the first stage on gather the kept tokens' hidden states
  at a stage's first layer and hand every layer the kept tokens' original positions, rotary embeddings
  and causal mask (rows re-left-padded to the longest kept row);
- after the forward, every layer's keys and values of the finally kept tokens are written into the
  pipeline's cache, so the early layers too hold the kept tokens only and all layers share one mask.
"""

from __future__ import annotations

import sys

import torch

from mmgen.inference.prune import left_pad_index, model_call
from mmgen.inference.token_merge import kept_count


class LayerPruning:
    """One in-LLM pruned prefill: scoring hooks on the stages' scoring attentions, feeding hooks on the
    decoder layers from the first stage on, then the scratch cache compacted into the real one."""

    def __init__(self, pruner, model, vocab, ids, attn, position, grids, shared, stages):
        self.model, self.pruner, self.vocab = model, pruner, vocab
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.stages = stages
        self.ids, self.grids, self.shared = ids, grids, shared
        self.overhead_flops = 0
        B, L = ids.shape
        self.alive = [[[torch.arange(len(g)) for g in blk] for blk in row] for row in grids]
        cols = torch.arange(L, device=ids.device).expand(B, L)
        self.valid = attn.bool()
        self.attn0, self.position0 = attn, position
        self.orig = torch.where(self.valid, cols, torch.full_like(cols, -1))  # each column's column in the input
        self.history = [self.orig]  # per stage, from the full input on
        self.feed: dict | None = None  # what the layers of the current stage are fed
        self.index: torch.Tensor | None = None  # gather index into the previous stage, for the stage's first layer
        self.scratch = None

    # the hooks -------------------------------------------------------------------------------------------
    def _score_hook(self, stage: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            keys = self.scratch.layers[module.layer_idx].keys
            self._advance(stage, module, hidden, keys, cos, sin)

        return hook

    def _feed_hook(self, layer: int, starts: bool):
        layer_type = (getattr(self.decoder.config, "layer_types", None) or [None] * len(self.layers))[layer]

        def hook(module, args, kwargs):
            if self.feed is None:
                return None
            if starts:
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = hidden.gather(1, self.index[..., None].expand(-1, -1, hidden.shape[-1]))
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            kwargs["attention_mask"] = self.feed["masks"].get(layer_type, self.feed["masks"][None])
            kwargs["position_ids"] = self.feed["position"]
            kwargs["position_embeddings"] = self.feed["rope"]
            return args, kwargs

        return hook

    # one stage's decision --------------------------------------------------------------------------------
    def _advance(self, stage: int, attn_module, hidden, keys, cos, sin):
        ratio = self.stages[stage][1]
        valid, orig = self.valid, self.orig
        queries, qvalid = self._queries(valid, orig)
        probs = self._attention(attn_module, hidden, keys, cos, sin, valid, queries, qvalid)  # (B, Q, L)
        inverse = _inverse(orig, valid, self.ids.shape[1])
        keep = valid.clone()
        decided: dict = {}
        for b, row in enumerate(self.grids):
            for j, blk in enumerate(row):
                for k, cols in enumerate(blk):
                    alive = self.alive[b][j][k]
                    target = kept_count(ratio, len(cols))
                    if len(alive) <= target:
                        continue
                    if (b, j) in self.shared:
                        c, cj = self.shared[(b, j)]
                        new = decided[(c, cj, k)]
                    else:
                        at = inverse[b, cols[alive].to(inverse.device)]  # current columns of the alive tokens
                        score = self._grid_score(probs[b], queries[b], qvalid[b], at)
                        top = torch.topk(score.float().cpu(), target, sorted=False).indices
                        new = alive[top.sort().values]
                    decided[(b, j, k)] = new
                    gone = alive[~torch.isin(alive, new)]
                    keep[b, inverse[b, cols[gone].to(inverse.device)]] = False
                    self.alive[b][j][k] = new
        self.index, self.valid = left_pad_index(keep)
        self.orig = torch.where(self.valid, orig.gather(1, self.index), torch.full_like(self.index, -1))
        self.history.append(self.orig)
        position = torch.where(
            self.valid, self.position0.gather(1, self.orig.clamp(min=0)), torch.zeros_like(self.index)
        )
        rope = tuple(t.gather(1, self.index[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
        self.feed = {"position": position, "rope": rope, "masks": self._masks(hidden, position)}

    def _queries(self, valid, orig) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, Q) columns whose attention ranks the grids, and which of them are real: the last token
        (fastv, pyramid), or every text token after the row's first grid plus the last token (text)."""
        B, L = valid.shape
        last = torch.full((B, 1), L - 1, dtype=torch.long, device=valid.device)
        if self.pruner.method != "text":
            return last, torch.ones_like(last, dtype=torch.bool)
        ids = self.ids.gather(1, orig.clamp(min=0))
        first = torch.tensor(
            [min((int(g[0]) for blk in row for g in blk), default=ids.shape[1]) for row in self.grids],
            device=valid.device,
        )
        text = valid & (ids < self.vocab.text_size) & (orig > first[:, None])
        text[:, -1] = True
        index, qvalid = left_pad_index(text)
        return index, qvalid

    def _attention(self, module, hidden, keys, cos, sin, valid, queries, qvalid) -> torch.Tensor:
        """Softmax attention (mean over heads) of the ``queries`` columns over every column: the q.k
        sub-block the ranking needs, recomputed from this layer's input and the keys it just cached."""
        B, Q = queries.shape
        hd = keys.shape[-1]
        x = hidden.gather(1, queries[..., None].expand(-1, -1, hidden.shape[-1]))
        q = module.q_proj(x).view(B, Q, -1, hd)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        cq, sq = (t.gather(1, queries[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb  # the model's own RoPE
        q, _ = rope(q, q, cq, sq)
        heads = q.shape[1]
        k = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * float(getattr(module, "scaling", hd**-0.5))
        L = keys.shape[2]
        allowed = valid[:, None, None, :] & (
            torch.arange(L, device=valid.device)[None, None, None, :] <= queries[:, None, :, None]
        )
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        d = hidden.shape[-1]
        self.overhead_flops += int(qvalid.sum()) * (2 * d * heads * hd + 2 * 2 * heads * hd * L)
        return probs

    def _grid_score(self, probs, queries, qvalid, at) -> torch.Tensor:
        """How much attention each of a grid's alive tokens (columns ``at``) receives from the raters."""
        if self.pruner.method != "text":
            return probs[0, at]
        cand = qvalid & (queries > at.max())  # text that reads the grid (the last token always does)
        p = probs[cand][:, at]
        relevance = p.mean(-1)
        raters = relevance >= relevance.mean()  # SparseVLM: the text tokens about the picture
        return p[raters].mean(0)

    def _masks(self, hidden, position) -> dict:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        cfg = self.decoder.config
        shape = hidden.new_empty((self.valid.shape[0], self.valid.shape[1], 1))
        args = dict(
            config=cfg, inputs_embeds=shape, attention_mask=self.valid.long(), cache=None, position_ids=position
        )
        masks = {None: create_causal_mask(**args)}
        masks["full_attention"] = masks[None]
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
        return masks

    # the run ---------------------------------------------------------------------------------------------
    def forward(self, cache, how):
        from transformers import DynamicCache

        self.scratch = DynamicCache()
        first = self.stages[0][0]
        starts = {k for k, _ in self.stages}
        handles = [
            self.layers[k - 1].self_attn.register_forward_hook(self._score_hook(i), with_kwargs=True)
            for i, (k, _) in enumerate(self.stages)
        ]
        handles += [
            self.layers[i].register_forward_pre_hook(self._feed_hook(i, i in starts), with_kwargs=True)
            for i in range(first, len(self.layers))
        ]
        try:
            out = model_call(
                self.model,
                how,
                self.scratch,
                input_ids=self.ids,
                attention_mask=self.attn0,
                position_ids=self.position0,
            )
        finally:
            for h in handles:
                h.remove()
        self._compact_into(cache)
        self.scratch = None
        return out

    def stage_of(self, layer: int) -> int:
        return sum(1 for k, _ in self.stages if k <= layer)

    def tokens_per_layer(self) -> list[list[int]]:
        per_stage = [(h >= 0).sum(-1).tolist() for h in self.history]
        return [
            [int(per_stage[self.stage_of(i)][b]) for i in range(len(self.layers))] for b in range(self.ids.shape[0])
        ]

    def _compact_into(self, cache) -> None:
        """Write the kept tokens' keys and values of every layer into ``cache`` (in the final stage's
        columns), dropping the early layers' entries for tokens that later stages dropped."""
        from mmgen.inference.kv_cache import attention_mask_for

        attention_mask_for(cache, self.valid.long())  # a compressed cache takes these entries as its prefill
        final, width = self.history[-1], self.ids.shape[1]
        where = [_inverse(h, h >= 0, width) for h in self.history]
        for i, layer in enumerate(self.scratch.layers):
            inv = where[self.stage_of(i)]
            index = inv.gather(1, final.clamp(min=0))  # pads read column 0's entry; the mask hides them
            k, v = layer.keys, layer.values
            g = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            cache.update(k.gather(2, g), v.gather(2, g), i)


def _inverse(orig: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) map from an input column to its column in a stage whose columns came from ``orig``
    (0 for input columns the stage no longer has)."""
    B, L = orig.shape
    inv = torch.zeros((B, width + 1), dtype=torch.long, device=orig.device)
    slot = torch.where(valid, orig, torch.full_like(orig, width))
    inv.scatter_(1, slot, torch.arange(L, device=orig.device).expand(B, L).contiguous())
    return inv[:, :width]
