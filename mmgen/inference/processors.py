"""Each decoding step's logits processors and stopping criteria, as transformers defines them.

A step runs ``LogitsProcessorList([MediaCFGLogitsProcessor, ImageGridConstraint, Temperature, TopK,
TopP])``: guidance first (it must see finite conditional and unconditional logits), then the grid
constraint masks what the block forbids, then transformers' own warpers shape what is left. Stopping
is a ``StoppingCriteriaList`` of :class:`BlockAwareEosCriteria` and :class:`ImagesDoneCriteria`.
"""

from __future__ import annotations

import torch
from transformers import (  # noqa: E402  (after the compat shim)
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmgen.inference.constraints import ImageGridConstraint  # also makes transformers importable on CPU torch
from mmgen.processing.vocab import Vocab


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of logits: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


class MediaCFGLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance on media tokens only, for rows inside a media block.

    ``scores`` holds ``2B`` rows, the conditional batch then the unconditional one (as transformers'
    ``ClassifierFreeGuidanceLogitsProcessor`` expects); ``input_ids`` the ``B`` conditional rows. Returns
    ``B`` rows: ``uncond + scale * (cond - uncond)`` on non-text ids of rows the grid constraint says are
    inside a block, the conditional logits elsewhere (text is never guided). transformers' processor
    guides every id of every step, which would also push the model's text away from the empty prompt.
    """

    def __init__(self, guidance_scale: float, vocab: Vocab, constraint: ImageGridConstraint, logits_hook=None):
        self.guidance_scale = float(guidance_scale)
        self.vocab = vocab
        self.constraint = constraint
        self.logits_hook = logits_hook  # sees (cond, uncond, guided, in_block) each step: tests, analysis
        self._media_cols: torch.Tensor | None = None

    def media_columns(self, size: int, device) -> torch.Tensor:
        if self._media_cols is None or self._media_cols.shape[0] != size:
            m = torch.zeros(size, dtype=torch.bool, device=device)
            m[self.vocab.text_size : self.vocab.size] = True
            self._media_cols = m
        return self._media_cols

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bsz = input_ids.shape[0]
        self.constraint.observe(input_ids)
        in_block = torch.tensor(self.constraint.in_block, dtype=torch.bool, device=scores.device)
        cond = scores[:bsz]
        if scores.shape[0] == bsz:  # guidance off: nothing to mix
            uncond, guided = None, cond
        else:
            uncond = scores[bsz:]
            mixed = cfg_mix(cond, uncond, self.guidance_scale)
            where = in_block[:, None] & self.media_columns(scores.shape[-1], scores.device)[None, :]
            guided = torch.where(where, mixed, cond)
        if self.logits_hook is not None:
            self.logits_hook(cond, uncond, guided, in_block)
        return guided


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> list[LogitsProcessor]:
    """transformers' warpers for these settings, in transformers' order; none for greedy decoding."""
    if temperature == 0:
        return []
    out: list[LogitsProcessor] = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def step_processors(
    vocab: Vocab,
    constraint: ImageGridConstraint,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    logits_hook=None,
) -> LogitsProcessorList:
    """The whole step: guidance (also the hook's view of the raw logits), the grid constraint (a
    LogitsProcessor itself; guidance already advanced its state), warpers."""
    return LogitsProcessorList(
        [
            MediaCFGLogitsProcessor(cfg_scale, vocab, constraint, logits_hook),
            constraint,
            *sampling_warpers(temperature, top_k, top_p),
        ]
    )


class BlockAwareEosCriteria(StoppingCriteria):
    """A row is done at ``</s>`` written outside a media block. Called after the token is appended and
    before the constraint sees it, so the constraint still describes where the token was written."""

    def __init__(self, eos_id: int, constraint: ImageGridConstraint):
        self.eos_id, self.constraint = int(eos_id), constraint

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        in_block = torch.tensor(self.constraint.in_block, dtype=torch.bool, device=input_ids.device)
        return (input_ids[:, -1] == self.eos_id) & ~in_block


class ImagesDoneCriteria(StoppingCriteria):
    """A row is done once it has closed ``n`` image blocks (the token just written may close one)."""

    def __init__(self, n: int, constraint: ImageGridConstraint):
        self.n, self.constraint = int(n), constraint

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        c = self.constraint
        closes = [p >= 3 and p + 1 == c.block_length(h, w) for p, h, w in zip(c.pos, c.h_tok, c.w_tok)]
        done = [k + int(x) >= self.n for k, x in zip(c.completed, closes)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
