"""Similarity-based selection and merging of one code grid's tokens before the LLM (VisionZip / ToMe idea).

A grid of ``n`` visual tokens is cut to ``k`` without training, in the vector space the model reads:

1. **dominant tokens** -- the ``~85%`` of the budget that stand out most from their grid (the lowest mean
   cosine similarity to the other tokens) are kept as they are. VisionZip ranks them by the attention
   the vision encoder's [CLS] token pays them; a code grid has no such encoder, so distinctiveness takes
   its place: on a picture of a few objects on a background the objects' codes are the rare ones;
2. **contextual tokens** -- the rest of the budget, spread evenly in reading order over the remaining
   tokens, each absorbing (by mean) every remaining token that is most similar to it, so what the
   dominant tokens leave out is summarised rather than dropped (VisionZip's contextual merging, ToMe's
   averaging of matched tokens).

The share 54/64 is VisionZip's default split between dominant and contextual tokens. Every kept token sits
at the position of the token it was chosen as, so RoPE still tells the model where in the grid it is.

:func:`merge_plan` decides from similarity vectors, :func:`merge_vectors` applies a plan to any vectors of
the same tokens: discrete codes merge their input embeddings, continuous features merge the features
before the projector (what a vision encoder's merge would do), see :mod:`mmgen.inference.prune`.
"""

from __future__ import annotations

import math

import torch

DOMINANT_SHARE = 54 / 64  # VisionZip's default: 54 dominant + 10 contextual tokens


def merge_plan(vectors: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``vectors`` (``(n, d)``, one per token in reading order) survive a cut to ``keep`` tokens,
    and where each token goes: ``(kept, assign)`` with ``kept`` the sorted indices of the surviving tokens
    and ``assign[i]`` the index into ``kept`` of the token that token ``i`` is merged into (a kept token
    is assigned to itself)."""
    n = vectors.shape[0]
    if keep >= n:
        every = torch.arange(n, device=vectors.device)
        return every, every
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    sim = unit @ unit.T
    n_ctx = max(1, keep - round(DOMINANT_SHARE * keep))
    n_dom = keep - n_ctx
    # distinctiveness: mean similarity to the others (the diagonal's 1 is the same for every token)
    dominant = sim.mean(-1).argsort(stable=True)[:n_dom]
    rest = torch.ones(n, dtype=torch.bool, device=vectors.device)
    rest[dominant] = False
    others = rest.nonzero().squeeze(-1)
    pick = torch.linspace(0, len(others) - 1, n_ctx, device=vectors.device).round().long().unique()
    contextual = others[pick]
    kept, _ = torch.cat([dominant, contextual]).sort()
    assign = torch.empty(n, dtype=torch.long, device=vectors.device)
    assign[kept] = torch.arange(len(kept), device=vectors.device)
    is_ctx = torch.zeros(n, dtype=torch.bool, device=vectors.device)
    is_ctx[contextual] = True
    ctx_slot = assign[contextual]
    loose = rest & ~is_ctx
    if bool(loose.any()):
        nearest = sim[loose][:, contextual].argmax(-1)
        assign[loose] = ctx_slot[nearest]
    return kept, assign


def merge_vectors(x: torch.Tensor, assign: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``(keep, d)`` means of ``x``'s rows grouped by ``assign`` (a plan from :func:`merge_plan`)."""
    sums = torch.zeros((keep, x.shape[-1]), dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=keep).clamp(min=1).to(sums)
    return (sums / counts[:, None]).to(x.dtype)


def kept_count(ratio: float, n: int) -> int:
    """Tokens a grid of ``n`` keeps at keep ratio ``ratio``: ``ceil(ratio * n)``, at least one."""
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def merge_flops(n: int, dim: int) -> int:
    """Multiply-adds (x2) of one grid's similarity matrix, the plan's only cost beyond a few sorts."""
    return 2 * n * n * dim
