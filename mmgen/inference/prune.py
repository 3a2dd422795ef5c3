"""Prefill pruning and merging of the visual tokens a prompt shows (training-free).

A picture the model *reads* costs tens to hundreds of code tokens at every layer of the prefill, while
the answer depends on a few of them. The pipeline's prefill can drop or merge them, per code grid of every
image or video block that the prompt closes (never the block the model is writing: its opener ends the
prompt and it has no closer yet). ``prune_method``:

- ``fastv`` -- FastV: layers ``0 .. K-1`` read every token; layer ``K-1``'s attention from the last
  token ranks each grid's codes and only the top ``ratio`` of them go on to layers ``K ..``;
- ``text`` -- the SparseVLM idea: the ranking attention comes from the prompt's text tokens that read the
  picture, and among them only the *raters*, the ones whose attention to the grid is above the mean of
  theirs (the words about the picture, not the filler);
- ``pyramid`` -- the PyramidDrop idea: several (layer, ratio) stages, each ranking by the last token's
  attention at its layer, so the cut deepens with depth (``prune_schedule``; by default three stages
  from ``prune_layer`` to the top, keeping ``ratio ** (1/3)``, ``ratio ** (2/3)``, ``ratio``);
- ``merge`` -- before the LLM: similarity-based selection and merging of each grid's tokens
  (:mod:`mmgen.inference.token_merge`, VisionZip / ToMe), on the route the model reads them by: input
  embeddings of discrete codes, or, for a model that reads continuous tokenizer features through its
  projector, the features before the projector;
- ``random``, ``stride`` -- the baselines any ranking must beat: before the LLM, keep a seeded uniform draw
  of each grid's tokens, or evenly spaced ones.

How the in-LLM methods stay cheap and exact where nothing is dropped:

- only the q.k sub-block the ranking needs is computed, eagerly, from the scoring layer's input (its
  queries for the ranking rows) and the keys that layer just wrote to the cache; every layer still runs
  on its own attention kernel (SDPA / flash attention), with no attention weights materialised;
- from layer ``K`` on, hooks on the decoder layers feed them the kept tokens only, with the positions,
  rotary embeddings and causal mask of the kept tokens: kept tokens keep their **original RoPE
  positions** (``position_ids``; transformers 5 has no ``cache_position``);
- rows are re-left-padded to the longest kept row, so batches of different prompt lengths stay one
  rectangular batch; the decode steps continue at the next original position with an attention mask of
  the pruned length;
- the cache ends up holding **only the kept tokens' keys and values, in every layer** (the early layers'
  entries for dropped tokens are removed too, so every layer has one length and one mask); the prefill
  runs on a scratch ``DynamicCache`` and the kept entries are then written into the pipeline's cache with
  its own ``update``, so any transformers ``Cache`` (fp8, a compressed one) receives them as a prefill;
- with guidance, the unconditional row of a pair takes the conditional row's decision for every block the
  two rows share (identical kept indices), so the guided pair reads the same picture tokens.

Keep ratio 1 runs all of this and reproduces the plain pipeline's tokens exactly (``tests/test_prune.py``).

The in-LLM methods' hooks live in :mod:`mmgen.inference.prune_layers`.

For benchmarks: :func:`prefill_flops` (analytic FLOPs of one sequence's prefill from its token count per
layer), :class:`PrefillPruner` (``pruner.prefill(...)``, then ``pruner.report``: tokens in / kept per
block, FLOPs with and without pruning) and :func:`prefill_only` (one timed prefill, plain or pruned).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mmgen.errors import MMGenError
from mmgen.inference.token_merge import kept_count, merge_flops, merge_plan, merge_vectors
from mmgen.processing.vocab import GRID_BRANCHES, Vocab

PRUNE_METHODS = ("none", "fastv", "text", "pyramid", "merge", "random", "stride")
IN_LLM = ("fastv", "text", "pyramid")  # the methods that rank inside the decoder, at a layer
BEFORE_LLM = ("merge", "random", "stride")  # the methods that cut the input embeddings
PYRAMID_STAGES = 3  # default stages of pyramid (PyramidDrop uses 4 on 32-36 layers; small models have few)


# -- options -------------------------------------------------------------------------------------------------
def _depth(model_config) -> int | None:
    return None if model_config is None else int(model_config.num_hidden_layers)


def parse_schedule(text: str) -> list[list[float]]:
    """``"1:0.5,2:0.25"`` -> ``[[1, 0.5], [2, 0.25]]`` (the ``--prune-schedule`` flag)."""
    stages = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            layer, ratio = part.split(":")
            stages.append([int(layer), float(ratio)])
        except ValueError:
            raise MMGenError(f"prune_schedule stage '{part}' is not LAYER:RATIO (e.g. 1:0.5,2:0.25)") from None
    return stages


def check_prune_options(options, model_config=None) -> None:
    """One-line MMGenError for any ``prune_*`` option outside its range; with ``model_config`` also the
    layers against the model's depth. ``options`` is a GenerationOptions (or anything with its fields)."""
    method, ratio, layer = options.prune_method, options.prune_ratio, options.prune_layer
    schedule = options.prune_schedule
    if method not in PRUNE_METHODS:
        raise MMGenError(f"unknown prune_method '{method}' (use one of: {', '.join(PRUNE_METHODS)})")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise MMGenError(f"prune_ratio must be in (0, 1] (the share of each picture's tokens kept), got {ratio}")
    if schedule and method != "pyramid":
        raise MMGenError(f"prune_schedule sets the stages of prune_method=pyramid, not of '{method}'")
    # prune_layer is checked whatever the method (it must make sense when the method changes), against the
    # depth only where it is used
    _check_layer("prune_layer", layer, _depth(model_config) if method in IN_LLM and not schedule else None)
    depth = _depth(model_config)
    last = (0, 1.0)
    for i, stage in enumerate(schedule or []):
        if not isinstance(stage, (list, tuple)) or len(stage) != 2:
            raise MMGenError(f"prune_schedule[{i}] must be a [layer, ratio] pair, got {stage!r}")
        k, r = stage
        if isinstance(k, float) and k != int(k):
            raise MMGenError(f"prune_schedule[{i}]: layer must be an integer, got {k}")
        _check_layer(f"prune_schedule[{i}] layer", int(k), depth)
        if not 0 < r <= 1:
            raise MMGenError(f"prune_schedule[{i}]: ratio must be in (0, 1], got {r}")
        if int(k) <= last[0] or r > last[1]:
            raise MMGenError(
                f"prune_schedule[{i}] = {list(stage)}: stages go deeper (layers increasing) and keep no "
                f"more (ratios not increasing) than the stage before, {list(last)}"
            )
        last = (int(k), r)


def _check_layer(name: str, layer, depth: int | None) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
        raise MMGenError(f"{name} must be an integer >= 1 (layer K ranks by the attention of layer K-1), got {layer}")
    if depth is not None and layer >= depth:
        raise MMGenError(
            f"{name} {layer} >= the model's depth {depth}: tokens are dropped from layer K on, "
            f"so K must be below {depth}"
        )


def make_pruner(options) -> PrefillPruner | None:
    """The pruner ``options`` ask for (None for ``prune_method=none``)."""
    if options.prune_method == "none":
        return None
    return PrefillPruner(
        options.prune_method,
        options.prune_ratio,
        options.prune_layer,
        [list(s) for s in options.prune_schedule or []],
        seed=options.seed,
    )


# -- analytic cost --------------------------------------------------------------------------------------------
def prefill_flops(config, n_tokens_per_layer: Sequence[int]) -> int:
    """Analytic FLOPs (2 per multiply-add) of one sequence's prefill through a Llama-style decoder
    (Llama, Qwen2, Mistral: GQA attention, gated MLP) when layer ``l`` reads ``n_tokens_per_layer[l]``
    tokens: the q/k/v/o projections, causal attention (``q.k`` and ``p.v`` over ``n (n + 1) / 2`` pairs),
    the gated MLP, and the output head for the last position (the prefill's only logits)."""
    depth = int(config.num_hidden_layers)
    if len(n_tokens_per_layer) != depth:
        raise MMGenError(f"{len(n_tokens_per_layer)} token counts for a model of {depth} layers; give one per layer")
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or d // heads)
    inter = int(config.intermediate_size)
    total = 0
    for n in n_tokens_per_layer:
        n = int(n)
        proj = 2 * n * d * (2 * heads * hd + 2 * kv * hd)
        attn = 2 * 2 * heads * hd * (n * (n + 1) // 2)
        mlp = 2 * 3 * n * d * inter
        total += proj + attn + mlp
    return total + 2 * d * int(config.vocab_size)


# -- which tokens a prompt shows -----------------------------------------------------------------------------
@dataclass
class Block:
    """One image or video block a row reads: where it is and its code grids (positions in the row)."""

    kind: str  # "image" | "video"
    start: int
    end: int  # position of its closer
    grids: list[list[int]] = field(default_factory=list)  # per code grid (sem, pix, each video frame's)


def read_blocks(row: Sequence[int], vocab: Vocab) -> list[Block]:
    """The closed image and video blocks of ``row`` (a keyframe's image block belongs to its video) and
    the positions of each one's code grids. A block still open at the end of the row is the one being
    written: it is not read, so it is not returned."""
    ids = [int(t) for t in row]
    s = vocab.structural_ids
    opener = {s["<image>"]: "image", s["<video>"]: "video"}
    closer = {s["</image>"], s["</video>"]}
    grid_open = {s[f"<{b}>"]: vocab.code_range(b) for b in GRID_BRANCHES if vocab.has(b)}
    grid_close = {s[f"</{b}>"] for b in GRID_BRANCHES if vocab.has(b)}
    blocks, outer, depth, span, grid = [], None, 0, None, None
    for i, t in enumerate(ids):
        if t in opener:
            if outer is None:
                outer = Block(opener[t], i, -1)
            depth += 1
        elif t in closer and outer is not None:
            depth -= 1
            if depth == 0:
                outer.end = i
                if outer.grids:
                    blocks.append(outer)
                outer, span, grid = None, None, None
        elif outer is None:
            continue
        elif t in grid_open:
            span, grid = grid_open[t], []
        elif t in grid_close:
            if grid:
                outer.grids.append(grid)
            span, grid = None, None
        elif span is not None and span[0] <= t < span[1]:
            grid.append(i)
    return blocks


def _shared_blocks(rows_ids: Sequence[Sequence[int]], blocks: list[list[Block]], n_cond: int) -> dict:
    """``{(uncond_row, block): (cond_row, block)}`` for every block an unconditional row shares (same ids)
    with its conditional row: the unconditional row takes that decision."""
    out = {}
    if len(rows_ids) != 2 * n_cond:
        return out
    for u in range(n_cond, 2 * n_cond):
        c = u - n_cond
        free = {j: tuple(rows_ids[c][b.start : b.end + 1]) for j, b in enumerate(blocks[c])}
        for j, b in enumerate(blocks[u]):
            key = tuple(rows_ids[u][b.start : b.end + 1])
            match = next((i for i, k in free.items() if k == key), None)
            if match is not None:
                out[(u, j)] = (c, match)
                del free[match]
    return out


# -- the pruner ------------------------------------------------------------------------------------------------
class PrefillPruner:
    """Prefill pruning for :func:`mmgen.inference.pipeline.decode_loop` (see the module docstring).

    ``prefill(model, vocab, ids, attn, position, cache, n_cond)`` runs the prefill of a left-padded batch
    into ``cache`` and returns ``(output, attention_mask)``: the model output (last-position logits) and
    the 2-D mask of the pruned cache. ``report`` then holds what it did: per row and block the code
    tokens in and kept, the tokens per layer, and the prefill FLOPs with and without pruning."""

    def __init__(
        self, method: str, ratio: float = 1.0, layer: int = 2, schedule: Sequence[Sequence[float]] = (), seed: int = 0
    ):
        if method not in PRUNE_METHODS or method == "none":
            raise MMGenError(f"unknown prune_method '{method}' (use one of: {', '.join(PRUNE_METHODS[1:])})")
        self.method, self.ratio, self.layer, self.seed = method, float(ratio), int(layer), int(seed)
        self.schedule = [[int(k), float(r)] for k, r in schedule]
        self.report: dict = {}
        self.kept: list[list[list[int]]] = []  # per row and block: its kept code tokens (reading order)

    def stages(self, depth: int) -> list[tuple[int, float]]:
        """The (layer, ratio) stages of an in-LLM method on a ``depth``-layer model."""
        if self.method != "pyramid":
            return [(self.layer, self.ratio)]
        if self.schedule:
            return [(k, r) for k, r in self.schedule]
        span = depth - self.layer
        layers = sorted({self.layer + (span * i) // PYRAMID_STAGES for i in range(PYRAMID_STAGES)})
        return [(k, self.ratio ** ((i + 1) / len(layers))) for i, k in enumerate(layers)]

    @torch.no_grad()
    def prefill(
        self,
        model,
        vocab: Vocab,
        ids: torch.Tensor,
        attn: torch.Tensor,
        position: torch.Tensor,
        cache,
        n_cond: int | None = None,
    ):
        from mmgen.inference.pipeline import prepare_inputs_for

        if cache.get_seq_length() != 0:
            raise MMGenError("prefill pruning fills an empty cache; this one already holds tokens")
        n_cond = ids.shape[0] if n_cond is None else n_cond
        rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), attn.cpu())]
        pad = (attn == 0).sum(-1).tolist()  # left padding per row: a row's position p is column pad + p
        blocks = [read_blocks(r, vocab) for r in rows]
        # grids as batch columns, the per-row lists shared by every stage
        grids = [
            [[torch.tensor([pad[b] + p for p in g], dtype=torch.long) for g in blk.grids] for blk in blocks[b]]
            for b in range(len(rows))
        ]
        shared = _shared_blocks(rows, blocks, n_cond)
        how = prepare_inputs_for(model)
        depth = int(model.config.num_hidden_layers)
        if self.method in BEFORE_LLM:
            run = BeforeLLMRun(model, ids, attn, position, grids, shared, self.ratio, self.method, self.seed)
            out = run.forward(cache, how)
            counts = [[int(n)] * depth for n in run.valid.sum(-1).tolist()]
        else:
            from mmgen.inference.prune_layers import LayerPruning

            run = LayerPruning(self, model, vocab, ids, attn, position, grids, shared, self.stages(depth))
            out = run.forward(cache, how)
            counts = run.tokens_per_layer()
        self.report = self._report(model.config, blocks, grids, run, counts, attn)
        self.kept = [
            [_block_kept(run.alive[b][j], [len(g) for g in grids[b][j]]) for j in range(len(blocks[b]))]
            for b in range(len(rows))
        ]
        return out, run.valid.long()

    def _report(self, config, blocks, grids, run, counts, attn) -> dict:
        full = [int(n) for n in attn.sum(-1).tolist()]
        depth = int(config.num_hidden_layers)
        rows = []
        for b, row_blocks in enumerate(blocks):
            rows.append(
                [
                    {
                        "kind": blk.kind,
                        "tokens": sum(len(g) for g in blk.grids),
                        "kept": sum(int(run.alive[b][j][k].numel()) for k in range(len(blk.grids))),
                    }
                    for j, blk in enumerate(row_blocks)
                ]
            )
        flops = sum(prefill_flops(config, c) for c in counts) + run.overhead_flops
        flops_full = sum(prefill_flops(config, [n] * depth) for n in full)
        stages = [[k, round(r, 6)] for k, r in run.stages]
        return {
            "method": self.method,
            "ratio": self.ratio,
            "stages": stages,
            "blocks": rows,
            "tokens": full,
            "tokens_kept": [c[-1] for c in counts],
            "tokens_per_layer": counts,
            "flops": int(flops),
            "flops_full": int(flops_full),
            "flops_ratio": round(flops / flops_full, 6),
        }


def _block_kept(alive: list[torch.Tensor], sizes: list[int]) -> list[int]:
    """Kept tokens of one block as indices into its code tokens in reading order (grid after grid)."""
    out, offset = [], 0
    for grid, n in zip(alive, sizes):
        out += [offset + int(i) for i in grid]
        offset += n
    return out


def left_pad_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, L) keep mask: the (B, L') gather index of each row's kept columns, left-padded (pads
    point at column 0), and the (B, L') mask of real entries."""
    n = keep.sum(-1)
    width = int(n.max())
    # stable sort puts dropped columns first and keeps the kept ones in order
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, -width:] if width else keep[:, :0].long()
    valid = torch.arange(width, device=keep.device)[None, :] >= (width - n)[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings the model's forward would compute for ``ids``."""
    return model.embed(ids) if hasattr(model, "embed") else model.get_input_embeddings()(ids)


def model_call(model, how, cache, **inputs):
    """One prefill forward into ``cache`` (last-position logits where the model can limit them)."""
    keep = {"logits_to_keep": 1} if how["logits_to_keep"] else {}
    return model(use_cache=True, **{how["cache_kw"]: cache}, **inputs, **keep)


def baseline_plan(method: str, n: int, keep: int, seed: int = 0) -> torch.Tensor:
    """The kept indices of an ``n``-token grid under a baseline that looks at nothing: ``stride`` (evenly
    spaced in reading order) or ``random`` (a uniform draw, reproducible from ``seed``)."""
    if method == "stride":
        return torch.linspace(0, n - 1, keep).round().long().unique()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:keep].sort().values


class BeforeLLMRun:
    """``merge``, ``random``, ``stride``: each grid cut in the input embeddings (merged into the kept tokens,
    or just dropped), then one plain forward of what is left."""

    def __init__(self, model, ids, attn, position, grids, shared, ratio, method="merge", seed=0):
        self.overhead_flops = 0
        self.stages: list = []  # no layer stages: every layer reads the cut grids
        embeds = _embed(model, ids)
        feats = _continuous_features(model, ids)
        proj = getattr(model, "image_projector", None)
        keep = attn.bool().clone()
        self.alive = [[[torch.arange(len(g)) for g in blk] for blk in row] for row in grids]
        plans: dict = {}
        for b, row in enumerate(grids):
            for j, blk in enumerate(row):
                for k, cols in enumerate(blk):
                    n = len(cols)
                    n_keep = kept_count(ratio, n)
                    route = feats is not None and bool(feats[1][b, cols[0]])
                    sim_vectors = feats[0][b, cols] if route else embeds[b, cols]
                    if (b, j) in shared:
                        c, cj = shared[(b, j)]
                        kept, assign = plans[(c, cj, k)]
                    elif method == "merge":
                        kept, assign = merge_plan(sim_vectors, n_keep)
                        self.overhead_flops += merge_flops(n, sim_vectors.shape[-1]) if n_keep < n else 0
                    else:  # the draw depends on the grid's place in its row only, not on the batch around it
                        kept, assign = baseline_plan(method, n, n_keep, seed + 7919 * (j * 64 + k)), None
                    plans[(b, j, k)] = (kept, assign)
                    self.alive[b][j][k] = kept.cpu()
                    if len(kept) == n:
                        continue
                    if assign is not None:
                        merged = merge_vectors(sim_vectors, assign, len(kept))
                        if route:  # continuous features merge before the projector, as a vision encoder's would
                            merged = proj(merged.to(embeds.dtype))
                        embeds[b, cols[kept.cpu()].to(ids.device)] = merged.to(embeds.dtype)
                    dropped = torch.ones(n, dtype=torch.bool)
                    dropped[kept.cpu()] = False
                    keep[b, cols[dropped].to(ids.device)] = False
        self.index, self.valid = left_pad_index(keep)
        self.embeds = embeds.gather(1, self.index[..., None].expand(-1, -1, embeds.shape[-1]))
        self.position = torch.where(self.valid, position.gather(1, self.index), torch.zeros_like(self.index))
        self.model = model

    def forward(self, cache, how):
        from mmgen.inference.kv_cache import attention_mask_for

        return model_call(
            self.model,
            how,
            cache,
            inputs_embeds=self.embeds,
            attention_mask=attention_mask_for(cache, self.valid.long()),
            position_ids=self.position,
        )


def _continuous_features(model, ids: torch.Tensor):
    """``(features, where)`` when the model reads its image codes as continuous tokenizer features through
    its projector (stored code vectors, ``input_placement=codes``): the ``(B, L, F)`` features (zero
    elsewhere) and the ``(B, L)`` positions that carry them. None when it reads embeddings only."""
    cfg = model.config
    if getattr(model, "image_projector", None) is None or "image" not in (getattr(cfg, "code_vectors", None) or []):
        return None
    where = model.feature_positions(ids, "image")
    table = model.image_code_vectors
    a, _ = model._vocab.code_range(model.input_range("image"))
    feats = table[(ids - a).clamp(0, table.shape[0] - 1)] * where[..., None]
    return feats, where


# -- a prefill on its own (benchmarks) ---------------------------------------------------------------------------
@torch.no_grad()
def prefill_only(
    model,
    vocab: Vocab,
    rows: Sequence[Sequence[int]],
    pruner: PrefillPruner | None = None,
    uncond_rows: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
) -> dict:
    """One prefill of ``rows`` (and ``uncond_rows`` after them, as guidance batches them), plain or through
    ``pruner``: ``{"seconds", "tokens", "logits", "report"}`` with the wall time of the forward alone, the
    cache length it left, the last-position logits and the pruner's report (None when plain)."""
    from mmgen.inference.pipeline import left_pad, make_cache, prepare_inputs_for

    device = next(model.parameters()).device
    all_rows = list(rows) + list(uncond_rows or [])
    ids, attn = left_pad(all_rows, pad_id, device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if pruner is None:
        out = model_call(
            model, prepare_inputs_for(model), cache, input_ids=ids, attention_mask=attn, position_ids=position
        )
    else:
        out, _ = pruner.prefill(model, vocab, ids, attn, position, cache, n_cond=len(rows))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - t0,
        "tokens": cache.get_seq_length(),
        "logits": out.logits[:, -1],
        "report": None if pruner is None else pruner.report,
    }
