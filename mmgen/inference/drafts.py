"""The draft side of speculative Jacobi decoding (:mod:`mmgen.inference.speculative`): each row's draft
window, the grid masks of its positions, the sampler that builds targets and draws drafts the way the
plain step samples, SJD's acceptance test of a window (:func:`verify_drafts`) and the window each row
feeds next (:func:`next_window`: pending tokens, the Jacobi update, new positions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmgen.inference.speculative import SpeculativeJacobi


class DraftWindow:
    """Per row: the tokens after the last committed one (pending first, then drafts), how many of them
    there are, how many are pending (already exact samples), each draft's distribution, and the grid
    masks of the window's positions and the one after it (what the verification applies)."""

    def __init__(self, tokens, length, pending, q, masks=None):
        self.tokens, self.length, self.pending, self.q, self.masks = tokens, length, pending, q, masks

    @classmethod
    def empty(cls, bsz: int, media: int, device):
        z = torch.zeros(bsz, dtype=torch.long, device=device)
        return cls(
            torch.zeros((bsz, 0), dtype=torch.long, device=device),
            z,
            z.clone(),
            torch.zeros((bsz, 0, media), device=device),
        )

    @property
    def size(self) -> int:
        return int(self.length.max()) if self.length.numel() else 0


class BlockMasks:
    """The grid constraint's masks over the media columns, per image-block index, for a run of positions."""

    def __init__(self, constraint, vocab, size: int, device):
        self.constraint, self.vocab, self.size, self.device = constraint, vocab, size, device
        self.lo, self.hi = vocab.text_size, vocab.size
        self._tables: dict[tuple[int, int], torch.Tensor] = {}

    def table(self, h_tok: int, w_tok: int) -> torch.Tensor:
        key = (h_tok, w_tok)
        if key not in self._tables:
            n = self.constraint.block_length(h_tok, w_tok)
            t = torch.ones((n, self.hi - self.lo), dtype=torch.bool)
            for p in range(3, n):
                t[p] = self.constraint.block_allowed(p, h_tok, w_tok, self.size)[self.lo : self.hi]
            self._tables[key] = t.to(self.device)
        return self._tables[key]

    def rows(self, start: torch.Tensor, count: int, speculating: torch.Tensor) -> torch.Tensor:
        """(B, count, media) masks of block indices ``start + j`` for the ``speculating`` rows (all True
        elsewhere and past a block's end, where nothing is read)."""
        c = self.constraint
        out = torch.ones((start.shape[0], count, self.hi - self.lo), dtype=torch.bool, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for b in torch.nonzero(speculating).flatten().tolist():
            groups.setdefault((c.h_tok[b], c.w_tok[b]), []).append(b)
        for key, rows in groups.items():
            t = self.table(*key)
            r = torch.tensor(rows, device=self.device)
            idx = start[r, None] + torch.arange(count, device=self.device)
            inside = idx < t.shape[0]
            got = t[idx.clamp(max=t.shape[0] - 1)]
            out[r] = torch.where(inside[..., None], got, torch.ones_like(got))
        return out


class DraftSampler:
    """Targets and draws, the way the step samples: warpers, softmax (one-hot argmax when greedy), and the
    loop's torch.Generator for every random number."""

    def __init__(self, temperature: float, top_k: int, top_p: float, gen: torch.Generator):
        from mmgen.inference.processors import sampling_warpers

        self.greedy = temperature == 0
        self.warpers = sampling_warpers(temperature, top_k, top_p)
        self.gen = gen

    def probs(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Distributions over the last dim of ``logits`` (any leading shape) after ``mask`` and the warpers."""
        shape = logits.shape
        x = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
        x = x.reshape(-1, shape[-1])
        if self.greedy:
            return torch.nn.functional.one_hot(x.argmax(-1), shape[-1]).to(logits.dtype).reshape(shape)
        for w in self.warpers:
            x = w(None, x)
        return x.softmax(-1).reshape(shape)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per distribution of ``probs`` (any leading shape)."""
        flat = probs.reshape(-1, probs.shape[-1])
        if self.greedy:
            got = flat.argmax(-1)
        else:
            got = torch.multinomial(flat.float().cpu(), 1, generator=self.gen).squeeze(-1).to(probs.device)
        return got.reshape(probs.shape[:-1])

    def uniform(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen).to(device)


def plain_draw(scores: torch.Tensor, sampler: DraftSampler) -> torch.Tensor:
    """The plain loop's draw from the processed scores (same random numbers, so text decodes the same)."""
    if sampler.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1).cpu(), 1, generator=sampler.gen).squeeze(-1).to(scores.device)


def block_left(constraint, block_pos: torch.Tensor) -> torch.Tensor:
    """Per row: tokens of its open image block still to write (the next one included); 0 when the grid
    is not declared yet or no image block is open."""
    left = [
        constraint.block_length(h, w) - p if p >= 3 else 0
        for p, h, w in zip(constraint.pos, constraint.h_tok, constraint.w_tok)
    ]
    return torch.tensor(left, dtype=torch.long, device=block_pos.device)


def verify_drafts(
    win: DraftWindow,
    target: torch.Tensor,
    left: torch.Tensor,
    budget: int,
    spec: SpeculativeJacobi,
    sampler: DraftSampler,
    lo: int,
):
    """SJD's test of each row's window against this pass's targets (B, 1 + fed, media). Returns the
    tokens each row produced (B, 1 + fed) ids, how many (B,), and the drafts tested and accepted."""
    bsz, fed = win.tokens.shape[0], target.shape[1] - 1
    k = win.length
    device = target.device
    x = (win.tokens[:, :fed] - lo).clamp(min=0, max=target.shape[-1] - 1)
    px = target[:, :fed].gather(-1, x[..., None]).squeeze(-1)
    qx = win.q[:, :fed].gather(-1, x[..., None]).squeeze(-1)
    if spec.delta > 0:
        ext = torch.cat([target[:, :fed], torch.zeros_like(target[:, :fed, :1])], -1)
        near = spec.neighbours.to(device)[x]  # (B, fed, k)
        px = px + _neighbour_mass(ext, near).clamp(max=spec.delta)
    slot = torch.arange(fed, device=device)[None, :]
    if sampler.greedy:
        ok = px >= qx  # one-hot targets and drafts: accepted exactly when the draft is the argmax
    else:
        ok = sampler.uniform((bsz, fed), device) * qx < px
    drafted = (slot >= win.pending[:, None]) & (slot < k[:, None])
    ok = (ok | (slot < win.pending[:, None])) & (slot < k[:, None])
    run = ok.long().cumprod(-1).sum(-1)  # leading accepted tokens
    tested = int((drafted & (slot <= run[:, None])).sum())
    accepted = int((drafted & (slot < run[:, None])).sum())
    # the next token: from the residual at the first rejection, else one more from the last target
    rows = torch.arange(bsz, device=device)
    p_at = target[rows, run.clamp(max=fed)]
    q_at = win.q[rows, run.clamp(max=max(win.q.shape[1] - 1, 0))] if win.q.shape[1] else torch.zeros_like(p_at)
    rejected = run < k
    resid = (p_at - q_at).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p_at)  # p == q everywhere: nothing to correct
    nxt = sampler.draw(torch.where(rejected[:, None], resid, p_at)) + lo
    bonus = (~rejected) & (k < left) & (k < budget)
    extra = rejected | bonus
    out = torch.cat([win.tokens[:, :fed], torch.zeros_like(win.tokens[:, :1])], 1)
    at = run.clamp(max=fed)
    out[rows, at] = torch.where(extra, nxt, out[rows, at])
    return out, run + extra.long(), tested, accepted


def _neighbour_mass(ext: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """Target mass of each draft's codebook neighbours: ``ext`` (B, fed, media + 1) targets with a zero
    column last, ``near`` (B, fed, k) neighbour columns (that zero column where there are none)."""
    return ext.gather(-1, near).sum(-1)


def next_window(
    win: DraftWindow,
    out,
    made,
    n: int,
    k,
    target,
    guided,
    left,
    constraint,
    masks: BlockMasks,
    sampler: DraftSampler,
    active,
    window: int,
    budget: int,
    lo: int,
    device,
) -> DraftWindow:
    """The window each row feeds next, after ``n`` tokens were committed: its pending tokens (produced
    past ``n``), then the Jacobi update of the drafts this pass targeted, then new positions drawn from
    the row's last target under their own grid masks."""
    bsz, media = out.shape[0], guided.shape[-1]
    block_pos = torch.tensor(constraint.pos, dtype=torch.long, device=device)
    now_left = block_left(constraint, block_pos)
    size = torch.clamp(now_left, max=min(window, budget))
    size = torch.where(active & (block_pos >= 3), size, torch.zeros_like(size))
    width = int(size.max()) if bsz else 0
    if width == 0:
        return DraftWindow.empty(bsz, media, device)
    src = n + torch.arange(width, device=device)[None, :].expand(bsz, -1)  # slot in this pass's numbering
    # targets this pass computed for a row: positions 0..k, those inside its block
    valid = torch.minimum(k + 1, torch.clamp(left, min=1)) if target is not None else torch.ones_like(k)
    pending = src < made[:, None]
    jacobi = (~pending) & (src < valid[:, None])
    new_masks = masks.rows(block_pos, width + 1, size > 0)
    last = guided[torch.arange(bsz, device=device), (valid - 1).clamp(min=0, max=guided.shape[1] - 1)]
    q = sampler.probs(last[:, None, :].expand(-1, width, -1), new_masks[:, :width])
    if target is not None:
        from_target = target[torch.arange(bsz, device=device)[:, None], src.clamp(max=target.shape[1] - 1)]
        q = torch.where(jacobi[..., None], from_target, q)
    drawn = sampler.draw(q) + lo
    kept = out.gather(1, src.clamp(max=out.shape[1] - 1))
    tokens = torch.where(pending, kept, drawn)
    live = torch.arange(width, device=device)[None, :] < size[:, None]
    tokens = torch.where(live, tokens, torch.zeros_like(tokens))
    return DraftWindow(tokens, size, torch.minimum((made - n).clamp(min=0), size), q, new_masks)
