"""The plain sampling loop generation used before the pipeline: the reference the pipeline must match.

Kept verbatim (no transformers processors, a past_key_values cache passed around; only the left
padding, which both share, comes from the pipeline) so that
tests/test_pipeline.py can show token for token that the pipeline, built from transformers'
LogitsProcessorList, warpers, StoppingCriteria and an explicit DynamicCache, decodes exactly as before.
Not imported by the library.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mmgen.errors import MMGenError
from mmgen.inference.constraints import ImageGridConstraint
from mmgen.inference.pipeline import left_pad
from mmgen.processing.vocab import Vocab


def image_token_mask(vocab: Vocab, size: int, device=None) -> torch.Tensor:
    """(V,) bool: the ids guidance acts on (everything that is not a text id)."""
    m = torch.zeros(size, dtype=torch.bool, device=device)
    m[vocab.text_size : vocab.size] = True
    return m


def cfg_logits(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rows_in_image: torch.Tensor, image_cols: torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance on image tokens of rows inside an image block; cond logits elsewhere."""
    guided = uncond + scale * (cond - uncond)
    where = rows_in_image[:, None] & image_cols[None, :]
    return torch.where(where, guided, cond)


def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the best token always stays).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _sample(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return scores.argmax(-1)
    probs = _warp(scores, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(scores.device)


# -- the loop ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_tokens(
    model,
    vocab: Vocab,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    cfg_scale: float = 1.0,
    uncond_rows: Sequence[Sequence[int]] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    allow_images: bool = True,
    stop_after_images: int | None = None,
    logits_hook=None,
    allow_audio: bool = False,
    max_audio_frames: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sample continuations of ``rows`` under the grid constraint, one step at a time.

    Yields ``(tokens, active)`` per step: the (B,) new token ids and which rows were still generating
    (a finished row's token is ``pad_id`` and must be ignored). A row finishes at ``eos_id`` (outside an
    image block), after ``stop_after_images`` closed image blocks, or at ``max_new_tokens``.
    ``logits_hook(cond, uncond, guided, in_block)`` sees each step's logits (tests, analysis)."""
    if not rows:
        return
    device = next(model.parameters()).device
    bsz = len(rows)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        if uncond_rows is None or len(uncond_rows) != bsz:
            raise MMGenError("classifier-free guidance needs one unconditional prompt per row")
        all_rows = list(rows) + list(uncond_rows)
    else:
        all_rows = list(rows)
    ids, attn = left_pad(all_rows, pad_id, device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    # Preallocated, so a step writes one column instead of copying the whole sequence.
    cur = ids.shape[1]
    seq = torch.full((bsz, cur + max_new_tokens), pad_id, dtype=torch.long, device=device)
    seq[:, :cur] = ids[:bsz]
    attn_buf = torch.ones((len(all_rows), cur + max_new_tokens), dtype=attn.dtype, device=device)
    attn_buf[:, :cur] = attn
    constraint = ImageGridConstraint(
        vocab,
        sizes=sizes,
        allow_images=allow_images,
        max_length=cur + max_new_tokens,
        allow_audio=allow_audio,
        max_audio_frames=max_audio_frames,
    )
    gen = torch.Generator().manual_seed(int(seed))
    image_cols = None

    import inspect

    # The prefill needs the logits of the last position only (a real vocabulary makes the rest costly).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, **keep)
    past = out.past_key_values
    logits = out.logits[:, -1, :].float()
    next_pos = position[:, -1] + 1
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        constraint.observe(seq[:, :cur])
        cond = logits[:bsz]
        in_block = torch.tensor(constraint.in_block, dtype=torch.bool, device=device)
        if use_cfg:
            if image_cols is None:
                image_cols = image_token_mask(vocab, cond.shape[-1], device)
            uncond = logits[bsz:]
            scores = cfg_logits(cond, uncond, cfg_scale, in_block, image_cols)
        else:
            uncond, scores = None, cond
        if logits_hook is not None:
            logits_hook(cond, uncond, scores, in_block)
        scores = constraint.mask(scores)
        tok = _sample(scores, temperature, top_k, top_p, gen)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        was_active = active.clone()
        seq[:, cur] = tok
        cur += 1
        # The closing token of a block is only counted by observe() on the next step; count it here.
        finished = (tok == eos_id) & ~in_block
        if stop_after_images is not None:
            closes = torch.tensor(
                [p > 0 and p + 1 == _block_len(constraint, b) for b, p in enumerate(constraint.pos)],
                dtype=torch.bool,
                device=device,
            )
            done_images = torch.tensor(constraint.completed, device=device) + closes.long()
            finished |= done_images >= stop_after_images
        active = active & ~finished
        yield tok, was_active
        if not bool(active.any()) or step == max_new_tokens - 1:
            return
        step_tok = torch.cat([tok, tok]) if use_cfg else tok
        grid = {}
        if getattr(model.config, "grid_positions", False):
            # The new token's grid cell depends only on the tokens since its block opened, which the
            # conditional and unconditional rows share.
            g = model.grid_cells(seq[:, :cur], 1)
            grid = {"grid_positions": torch.cat([g, g]) if use_cfg else g}
        out = model(
            input_ids=step_tok[:, None],
            attention_mask=attn_buf[:, :cur],
            position_ids=next_pos[:, None],
            past_key_values=past,
            use_cache=True,
            **grid,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1


def _block_len(constraint: ImageGridConstraint, b: int) -> int:
    if constraint.pos[b] < 3:
        return -1
    return constraint.block_length(constraint.h_tok[b], constraint.w_tok[b])
