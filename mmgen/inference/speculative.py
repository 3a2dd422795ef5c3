"""Speculative Jacobi decoding (SJD) of image blocks: several code tokens per forward pass, training-free.

Inside an image block whose grid is declared (past ``<image> <h_H> <w_W>``), each row keeps a window of
up to ``window`` tokens ahead of the tokens it has committed. One forward pass over ``[last committed
token, window]`` gives the target distribution ``p_t`` of every window position at once, and the window
is verified left to right with SJD's rule: draft ``x`` at a position is accepted with probability
``min(1, p_t(x) / p_{t-1}(x))``, where ``p_{t-1}`` is the distribution it was drawn from. The first
rejected position is resampled from the residual ``max(0, p_t - p_{t-1})`` (normalised), which makes
every committed token an exact sample of the plain sampler's distribution; when the whole window passes,
the last position's ``p_t`` gives one more token for free. The drafts behind a rejection are redrawn
from this pass's ``p_t`` at their positions (the Jacobi update), and positions new to the window are
drawn from the last target the pass produced, under their own position's grid mask. Greedy decoding
(temperature 0) turns all of this into Jacobi iteration with exact matching: the committed tokens are
the plain greedy loop's tokens.

What the targets are: the step's own processing, position by position. The conditional and
unconditional CFG rows run in the same forward (one batch), guidance is mixed before the softmax
(``uncond + s * (cond - uncond)`` on media ids, :func:`~mmgen.inference.processors.cfg_mix`), then the
grid constraint's mask for that position of the block (:meth:`ImageGridConstraint.block_allowed
<mmgen.inference.constraints.ImageGridConstraint.block_allowed>`: codes, ``<eol>`` at row ends,
closers) and transformers' temperature / top-k / top-p warpers. The first window position goes through
the step's ``LogitsProcessorList`` itself. Drafts are drawn from distributions built the same way, so a
position with one allowed token (``<eol>``, ``</pix>``, ``</image>``) is always accepted. Text, audio
blocks and the size tokens are decoded plainly, one token per pass.

Rollback: the verifying forward appends ``[last, window]`` to the KV cache; right after the
verification the cache is cropped (``Cache.crop``) back to the committed tokens, less the last one,
which the next pass feeds again: exactly the state the plain loop keeps. Cropping is chosen over
keeping the cache at the committed tokens and recomputing, which would need a copy of every layer per
pass (to verify on) or a second forward for the accepted tokens; a crop costs nothing on a
``DynamicCache``. A cache that cannot crop (transformers' quantized caches say so with
``is_croppable``) is refused with a one-line error. Only committed tokens are in the cache between
passes, so a compressed cache only ever evicts those.

Batches: every pass commits the same number ``n`` of tokens to all rows (the fewest any active row
produced), so the cache stays rectangular and the stopping criteria, the grid constraint and the
caller's stream see one token per row at a time as in the plain loop. A row that produced more keeps the
surplus as *pending* tokens at the front of its next window: they are already exact samples (their
context is committed unchanged), so they are accepted without a test and nothing a fast row verified is
thrown away; the batch then advances about as fast as its slowest row would alone.

Relaxed acceptance (the LANTERN idea): with ``delta > 0`` a draft code is credited, in the acceptance
test only, with the target mass of its ``k`` nearest codes in the image tokenizer's codebook (latent
proximity), at most ``delta``: ``min(1, (p_t(x) + min(delta, p_t(N_k(x)))) / p_{t-1}(x))``. A draft that
is a near neighbour of what the model prefers then passes more often, at a distribution shift bounded
by the credit; ``delta = 0`` is the exact rule above.

Why a loop of its own: transformers' assisted generation (``generate(assistant_model=...)``, prompt
lookup) verifies a separate drafter's greedy proposals, for batch size 1 and without the CFG rows; SJD
drafts with the model's own previous pass and accepts by probability ratio, on the guided distribution.

Functions to call:

- :func:`decode_loop(..., spec=SpeculativeJacobi(window=16)) <mmgen.inference.pipeline.decode_loop>` and
  ``MMGenPipeline(bundle)(prompt, spec_decoding=True, spec_window=16, spec_delta=0.0)``: generation with
  SJD; ``doc.meta['spec']`` holds the passes and tokens per pass, ``doc.meta['forward_passes']`` all of
  the call's forward passes (prefill included).
- :func:`speculative_from_options` builds the settings from :class:`~mmgen.inference.pipeline.GenerationOptions`
  and a bundle (the codebook neighbours for the relaxed test); :func:`check_spec_options` checks them.
- :func:`compare_t2i` (bundle, prompts, window, delta, ...) runs batched text-to-image twice, plain and
  with SJD, on the same seeds, and returns both runs' images, forward passes per image and seconds, and
  their ratios: what ``benchmarks/inference.py`` records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mmgen.errors import MMGenError


@dataclass
class SpeculativeJacobi:
    """Settings of speculative Jacobi decoding, as :func:`~mmgen.inference.pipeline.decode_loop` takes them.

    ``window``: draft tokens verified per forward pass. ``delta``: the most neighbour mass the relaxed
    test credits a draft (0: exact SJD). ``neighbours``: ``(media ids, k)`` rows of the ``k`` nearest codes
    of each media id as media-column indices (:func:`codebook_neighbours`), needed when ``delta > 0``.
    ``stats`` is filled by the loop: passes, tokens committed per pass, drafts tested and accepted."""

    window: int = 16
    delta: float = 0.0
    neighbours: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if int(self.window) < 1:
            raise MMGenError(f"spec_window must be >= 1 (the draft window holds at least one token), got {self.window}")
        if not 0.0 <= float(self.delta) <= 1.0:
            raise MMGenError(f"spec_delta must be in [0, 1] (the most probability mass a draft is credited; 0 is exact "
                             f"SJD), got {self.delta}")
        if self.delta > 0 and self.neighbours is None:
            raise MMGenError("relaxed acceptance (spec_delta > 0) needs the codebook neighbours: build the settings "
                             "with speculative_from_options(options, bundle)")


# -- options ----------------------------------------------------------------------------------------
def check_spec_options(options, bundle=None) -> None:
    """One-line MMGenErrors for the ``spec_*`` fields of ``options`` (a GenerationOptions); with ``bundle``,
    also what the bundle must have: a croppable cache and, for the relaxed test, a codebook."""
    if options.spec_window < 1:
        raise MMGenError(f"spec_window must be >= 1 (the draft window holds at least one token), got {options.spec_window}")
    if not 0.0 <= options.spec_delta <= 1.0:
        raise MMGenError(f"spec_delta must be in [0, 1] (the most probability mass a draft is credited; 0 is exact SJD), "
                         f"got {options.spec_delta}")
    if options.spec_neighbours < 1:
        raise MMGenError(f"spec_neighbours must be >= 1 (codebook neighbours per code for the relaxed test), "
                         f"got {options.spec_neighbours}")
    if not options.spec_decoding or bundle is None:
        return
    from mmgen.inference.kv_cache import kv_cache_for

    if not kv_cache_for(bundle.model, options).is_croppable:
        raise MMGenError(f"speculative decoding rolls rejected drafts back out of the KV cache, which the "
                         f"'{options.cache}' cache cannot do without kv compression; use cache=dynamic (or a kv_method "
                         f"with cache=fp8), or turn spec_decoding off")
    if options.spec_delta > 0:
        codebook_neighbours(bundle.vocab, bundle.image_tokenizer, 1)  # raises when there is no codebook


def speculative_from_options(options, bundle) -> SpeculativeJacobi | None:
    """The decode loop's settings for ``options`` (None when ``spec_decoding`` is off)."""
    if not options.spec_decoding:
        return None
    table = (codebook_neighbours(bundle.vocab, bundle.image_tokenizer, options.spec_neighbours)
             if options.spec_delta > 0 else None)
    return SpeculativeJacobi(window=options.spec_window, delta=options.spec_delta, neighbours=table)


@torch.no_grad()
def codebook_neighbours(vocab, image_tokenizer, k: int) -> torch.Tensor:
    """``(vocab.size - vocab.text_size, k)`` long: for each media id (as an index past the text ids), the
    ``k`` nearest other codes of its code range by Euclidean distance between the tokenizer's code vectors
    (:func:`~mmgen.tokenizers.base.code_vectors`), as media-column indices. Ids without a codebook (the
    structural tokens) point at the column one past the end, which holds no mass."""
    from mmgen.tokenizers.base import code_vectors

    media = vocab.size - vocab.text_size
    table = torch.full((media, k), media, dtype=torch.long)
    found = False
    for name in ("sem", "pix"):
        vecs = code_vectors(image_tokenizer, name) if image_tokenizer is not None and vocab.has(name) else None
        if vecs is None:
            continue
        start, end = vocab.code_range(name)
        n = min(end - start, vecs.shape[0])
        kk = min(k, n - 1)
        found = True
        if kk < 1:
            continue
        vecs, first = vecs[:n].float(), start - vocab.text_size  # the range's first media column
        for s in range(0, n, 1024):  # chunks: a 16k codebook's full distance matrix would be 1 GiB
            d = torch.cdist(vecs[s:s + 1024], vecs)
            rows = torch.arange(d.shape[0])
            d[rows, s + rows] = float("inf")  # a code is not its own neighbour
            table[first + s: first + s + d.shape[0], :kk] = first + d.topk(kk, largest=False).indices
    if not found:
        raise MMGenError("relaxed acceptance (spec_delta > 0) needs the image tokenizer's codebook, and this bundle's "
                         "tokenizer has none; set spec_delta=0")
    return table


# -- the loop ---------------------------------------------------------------------------------------
class DraftWindow:
    """Per row: the tokens after the last committed one (pending first, then drafts), how many of them
    there are, how many are pending (already exact samples), each draft's distribution, and the grid
    masks of the window's positions and the one after it (what the verification applies)."""

    def __init__(self, tokens, length, pending, q, masks=None):
        self.tokens, self.length, self.pending, self.q, self.masks = tokens, length, pending, q, masks

    @classmethod
    def empty(cls, bsz: int, media: int, device):
        z = torch.zeros(bsz, dtype=torch.long, device=device)
        return cls(torch.zeros((bsz, 0), dtype=torch.long, device=device), z, z.clone(),
                   torch.zeros((bsz, 0, media), device=device))

    @property
    def size(self) -> int:
        return int(self.length.max()) if self.length.numel() else 0


class _BlockMasks:
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
                t[p] = self.constraint.block_allowed(p, h_tok, w_tok, self.size)[self.lo:self.hi]
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


@torch.no_grad()
def jacobi_decode(model, vocab, spec: SpeculativeJacobi, *, cache, cache_kw: str, seq: torch.Tensor, cur: int,
                  attn: torch.Tensor, dropped: int, next_pos: torch.Tensor, logits: torch.Tensor, processors,
                  stopping, constraint,
                  cfg_scale: float, temperature: float, top_k: int, top_p: float, gen: torch.Generator,
                  max_new_tokens: int, pad_id: int, stats: dict | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Step 4 of :func:`~mmgen.inference.pipeline.decode_loop` with speculative Jacobi decoding of image
    blocks (the module docstring says how). Takes over right after the prefill: ``seq`` (B, cur + budget)
    holds the conditional rows, ``attn`` the attention mask of all rows (2B with guidance) over every
    token, of which prefill pruning left ``dropped`` columns out of the cache, ``next_pos`` the position
    each row's next token takes, ``logits`` the prefill's last logits, ``cache`` the filled cache (its
    forwards take their mask from :func:`~mmgen.inference.kv_cache.attention_mask_for`, as the plain
    step's do). Yields ``(tokens, active)`` one token per row at a time, exactly like the plain loop."""
    from mmgen.inference.kv_cache import attention_mask_for
    from mmgen.inference.processors import cfg_mix

    if not getattr(cache, "is_croppable", False):
        raise MMGenError(f"speculative decoding rolls rejected drafts back with Cache.crop, which a "
                         f"{type(cache).__name__} cannot do; use the dynamic cache")
    stats = {} if stats is None else stats
    bsz, device = seq.shape[0], seq.device
    use_cfg = logits.shape[0] != bsz
    lo, hi = vocab.text_size, vocab.size
    media = hi - lo
    sampler = DraftSampler(temperature, top_k, top_p, gen)
    masks = _BlockMasks(constraint, vocab, logits.shape[-1], device)
    report = spec.stats  # accumulates over the calls that share these settings (batches of one run)
    report.update(window=spec.window, delta=spec.delta)
    for key in ("passes", "tokens", "drafts", "accepted"):
        report.setdefault(key, 0)
    report.setdefault("per_pass", [])
    win = DraftWindow.empty(bsz, media, device)
    step_logits = logits[:, None, :]  # (rows, 1 + window, V): the targets of the last forward
    position = next_pos.clone()  # (rows,) position of the token step_logits[:, 0] predicts
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    step = 0
    while True:
        k = win.length  # (B,) window tokens each row fed to the last forward
        fed = step_logits.shape[1] - 1
        scores = processors(seq[:, :cur], step_logits[:, 0])  # slot 0: the plain step's own processing
        first = _plain_draw(scores, sampler)
        cond = step_logits[:bsz, :, lo:hi]
        guided = cfg_mix(cond, step_logits[bsz:, :, lo:hi], cfg_scale) if use_cfg else cond  # (B, 1+fed, media)
        spec_rows = k > 0
        block_pos = torch.tensor(constraint.pos, dtype=torch.long, device=device)
        left = _block_left(constraint, block_pos)
        budget = max_new_tokens - step
        out = first[:, None]
        made = torch.ones(bsz, dtype=torch.long, device=device)
        if fed:
            target = sampler.probs(guided, win.masks)
            slot0 = sampler.probs(scores[:, lo:hi])
            target[:, 0] = torch.where(spec_rows[:, None], slot0, torch.full_like(slot0, 1.0 / media))
            out, made_spec, tested, accepted = verify_drafts(win, target, left, budget, spec, sampler, lo)
            out = torch.where(spec_rows[:, None], out, torch.cat([first[:, None], out[:, 1:]], 1))
            made = torch.where(spec_rows, made_spec, made)
            report["drafts"] += tested
            report["accepted"] += accepted
        else:
            target = None
        n = int(made[active].min())
        report["passes"] += 1
        report["per_pass"].append(0)
        # roll back first (a caller may stop reading at any token): keep [last, the n - 1 window tokens
        # committed now]; the n-th is fed next, as the plain loop feeds its last token
        _crop(cache, fed + 1 - n)
        # commit n tokens, one column at a time, as the plain loop would have written them
        for j in range(n):
            tok = torch.where(active, out[:, j], torch.full_like(out[:, j], pad_id))
            was_active = active.clone()
            seq[:, cur] = tok
            cur += 1
            step += 1
            active = active & ~stopping(seq[:, :cur], scores)
            report["tokens"] += 1
            report["per_pass"][-1] += 1
            yield tok, was_active
            if not bool(active.any()) or step == max_new_tokens:
                _crop(cache, n - 1 - j)  # the tokens after the last one written never count
                return
            constraint.observe(seq[:, :cur])  # the state of the next position
        position = position + n
        win = _next_window(win, out, made, n, k, target, guided, left, constraint, masks, sampler, active, spec.window,
                           max_new_tokens - step, lo, device)
        width = win.size
        feed = torch.cat([seq[:, cur - 1:cur], win.tokens[:, :width]], 1)
        extra = {}
        if getattr(model.config, "grid_positions", False):
            g = model.grid_cells(torch.cat([seq[:, :cur], win.tokens[:, :width]], 1), 1 + width)
            extra["grid_positions"] = torch.cat([g, g]) if use_cfg else g
        ids = torch.cat([feed, feed]) if use_cfg else feed
        positions = (position - 1)[:, None] + torch.arange(1 + width, device=device)
        mask = attention_mask_for(cache, attn[:, :cur - dropped + width])  # every token seen, then the window
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache},
                    **extra)
        stats["forward_passes"] = stats.get("forward_passes", 0) + 1
        step_logits = res.logits.float()


def _crop(cache, tokens: int) -> None:
    """Drop the last ``tokens`` positions of every layer of ``cache`` (transformers' ``Cache.crop`` takes
    the count negated)."""
    if tokens > 0:
        cache.crop(-tokens)


def _plain_draw(scores: torch.Tensor, sampler: DraftSampler) -> torch.Tensor:
    """The plain loop's draw from the processed scores (same random numbers, so text decodes the same)."""
    if sampler.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1).cpu(), 1, generator=sampler.gen).squeeze(-1).to(scores.device)


def _block_left(constraint, block_pos: torch.Tensor) -> torch.Tensor:
    """Per row: tokens of its open image block still to write (the next one included); 0 when the grid
    is not declared yet or no image block is open."""
    left = [constraint.block_length(h, w) - p if p >= 3 else 0
            for p, h, w in zip(constraint.pos, constraint.h_tok, constraint.w_tok)]
    return torch.tensor(left, dtype=torch.long, device=block_pos.device)


def verify_drafts(win: DraftWindow, target: torch.Tensor, left: torch.Tensor, budget: int, spec: SpeculativeJacobi,
            sampler: DraftSampler, lo: int):
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


def _next_window(win: DraftWindow, out, made, n: int, k, target, guided, left, constraint, masks: _BlockMasks,
                 sampler: DraftSampler, active, window: int, budget: int, lo: int, device) -> DraftWindow:
    """The window each row feeds next, after ``n`` tokens were committed: its pending tokens (produced
    past ``n``), then the Jacobi update of the drafts this pass targeted, then new positions drawn from
    the row's last target under their own grid masks."""
    bsz, media = out.shape[0], guided.shape[-1]
    block_pos = torch.tensor(constraint.pos, dtype=torch.long, device=device)
    now_left = _block_left(constraint, block_pos)
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


# -- measuring --------------------------------------------------------------------------------------
def compare_t2i(bundle, prompts: Sequence[str], *, window: int = 16, delta: float = 0.0, neighbours: int = 8,
                cfg_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, batch_size: int = 8) -> dict:
    """Text-to-image for ``prompts`` twice on the same seeds, plain and with SJD (``window``, ``delta``,
    ``neighbours``); sampling options left None are the bundle's. Returns ``{'plain': run, 'spec': run,
    'passes_ratio', 'seconds_ratio', 'cpu_seconds_ratio'}`` where a run is ``{'images', 'forward_passes',
    'passes_per_image', 'seconds', 'cpu_seconds', 'tokens_per_pass'}`` and the ratios are plain over SJD
    (> 1: SJD is faster). ``cpu_seconds`` is this process's CPU time, which other work on a shared
    machine disturbs less than wall time."""
    from mmgen.inference.generate import generate_images
    from mmgen.inference.pipeline import GenerationOptions

    options = GenerationOptions(spec_decoding=True, spec_window=window, spec_delta=delta, spec_neighbours=neighbours)
    check_spec_options(options, bundle)
    runs = {}
    for name, spec in (("plain", None), ("spec", speculative_from_options(options, bundle))):
        stats: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        images = generate_images(bundle, list(prompts), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 cfg_scale=cfg_scale, batch_size=batch_size, spec=spec, stats=stats)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[name] = {"images": images, "forward_passes": stats["forward_passes"],
                      "passes_per_image": stats["forward_passes"] / max(1, len(images)), "seconds": round(seconds, 4),
                      "cpu_seconds": round(cpu, 4)}
        if spec is not None:
            runs[name]["tokens_per_pass"] = round(spec.stats["tokens"] / max(1, spec.stats["passes"]), 3)
    runs["passes_ratio"] = runs["plain"]["forward_passes"] / runs["spec"]["forward_passes"]
    runs["seconds_ratio"] = runs["plain"]["seconds"] / max(runs["spec"]["seconds"], 1e-9)
    runs["cpu_seconds_ratio"] = runs["plain"]["cpu_seconds"] / max(runs["spec"]["cpu_seconds"], 1e-9)
    return runs
