"""The grid constraint as a ``transformers.LogitsProcessor``: every media block the model writes parses.

Once a row has emitted ``<image>``, only the ids that :meth:`Vocab.image_next_allowed` permits at that
position may follow (size tokens, then codes row by row with ``<eol>`` at each row's end, then the
closing tokens), so every image block the model writes parses and decodes. Outside blocks the row may
write text, ``<image>`` (when images are allowed), ``<audio>`` (when audio is allowed) and ``</s>``,
but no stray code or structural token that would have no meaning there.

Inside an ``<audio>`` block the residual levels take turns, frame by frame, as
:meth:`Vocab.audio_block` lays them out: the code after ``k`` codes must come from level
``k mod audio_levels`` (:meth:`Vocab.audio_level_range`), and ``</audio>`` may only follow a whole
frame, never an empty block. ``max_audio_frames`` and the token budget force the close, so every audio
block decodes to a whole number of codec frames.

Each row keeps its own state (inside a block or not, position in the block, declared grid), advanced
from the last token of ``input_ids`` at every call, so a step costs O(1) per row whatever the length of
the sequence. The prompt is scanned once, on the first call, to find a block it may leave open (the
``t2i`` mode ends the prompt with ``<image>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgen.errors import MMGenError
from mmgen.processing.vocab import Vocab
from mmgen.utils.compat import ensure_torchvision

ensure_torchvision()  # transformers' generation package imports torchvision on a CPU-only torch

from transformers import LogitsProcessor  # noqa: E402


class _BlockView:
    """What :meth:`Vocab.image_next_allowed` reads of a block prefix: its length and size tokens."""

    __slots__ = ("n", "h_tok", "w_tok")

    def __init__(self, n: int, h_tok: int, w_tok: int):
        self.n, self.h_tok, self.w_tok = n, h_tok, w_tok

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == 1:
            return self.h_tok
        if i == 2:
            return self.w_tok
        raise IndexError(i)


class ImageGridConstraint(LogitsProcessor):
    """Mask every id the grid (and audio-frame) constraint forbids, row by row.

    Args:
        vocab: the id layout.
        sizes: the (H, W) code grids an image may declare (e.g. the image tokenizer's native grid);
            None allows any grid up to ``vocab.config.max_grid``.
        allow_images: whether a row may open an image block (False for text-only generation).
        forbid_stray: outside blocks, allow only text ids, ``<image>`` and (with ``allow_audio``) ``<audio>``.
        max_length: total sequence length the caller will stop at. When given, ``<image>`` and grid
            sizes are allowed only if the whole block fits, so no image is ever cut off; ``<audio>`` only
            if a one-frame block fits, and an open audio block closes while ``</audio>`` still fits.
        allow_audio: whether a row may open an audio block (needs an "audio" range in the vocab). Off by
            default: the constraint then ignores audio tokens entirely, exactly as before audio existed.
        max_audio_frames: most code frames per audio block (None: only the budget limits it).
    """

    def __init__(
        self,
        vocab: Vocab,
        sizes: Sequence[tuple[int, int]] | None = None,
        allow_images: bool = True,
        forbid_stray: bool = True,
        max_length: int | None = None,
        allow_audio: bool = False,
        max_audio_frames: int | None = None,
    ):
        self.vocab = vocab
        self.sizes = [(int(h), int(w)) for h, w in sizes] if sizes else None
        if self.sizes:
            for h, w in self.sizes:
                if not (1 <= h <= vocab.config.max_grid and 1 <= w <= vocab.config.max_grid):
                    raise MMGenError(f"image grid {h}x{w} is outside the vocab's 1..{vocab.config.max_grid}")
        self.allow_images = bool(allow_images) and vocab.has("pix")
        self.forbid_stray = forbid_stray
        self.max_length = max_length
        self.image_id = vocab["<image>"]
        self.allow_audio = bool(allow_audio) and vocab.has("audio")
        if max_audio_frames is not None and max_audio_frames < 1:
            raise MMGenError(
                f"max_audio_frames must be >= 1 (an audio block holds at least one frame), got {max_audio_frames}"
            )
        self.max_audio_frames = max_audio_frames
        self.audio_open, self.audio_close = vocab["<audio>"], vocab["</audio>"]
        self._masks: dict[tuple, torch.Tensor] = {}
        self._block_len: dict[tuple[int, int], int] = {}
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all rows (the next call scans its ``input_ids`` afresh)."""
        self._seen = None  # sequence length at the last call
        self.pos: list[int] = []  # per row: tokens of the open block so far (0 = not in a block)
        self.h_tok: list[int] = []
        self.w_tok: list[int] = []
        self.completed: list[int] = []  # per row: image blocks closed since the first call
        self.audio_pos: list[int] = []  # per row: tokens of the open audio block so far (0 = none open)
        self.completed_audio: list[int] = []  # per row: audio blocks closed since the first call

    def block_length(self, h_tok: int, w_tok: int) -> int:
        key = (h_tok, w_tok)
        if key not in self._block_len:
            h = h_tok - self.vocab.h_start + 1
            w = w_tok - self.vocab.w_start + 1
            self._block_len[key] = self.vocab.image_block_len(h, w)
        return self._block_len[key]

    def _scan(self, row: list[int]) -> tuple[int, int, int, int]:
        """State of a row from scratch: an ``<image>`` (or, when audio is allowed, an ``<audio>``) with
        no closing token after it is an open block. Returns image pos, h_tok, w_tok and audio pos."""
        close = self.vocab["</image>"]
        for i in range(len(row) - 1, -1, -1):
            if row[i] == close or (self.allow_audio and row[i] == self.audio_close):
                break
            if row[i] == self.image_id:
                prefix = row[i:]
                h_tok = prefix[1] if len(prefix) > 1 else -1
                w_tok = prefix[2] if len(prefix) > 2 else -1
                return len(prefix), h_tok, w_tok, 0
            if self.allow_audio and row[i] == self.audio_open:
                return 0, -1, -1, len(row) - i
        return 0, -1, -1, 0

    def observe(self, input_ids: torch.LongTensor) -> None:
        """Advance every row's state by the last token of ``input_ids`` (or scan, on the first call)."""
        bsz, length = input_ids.shape
        if self._seen is not None and length == self._seen and bsz == len(self.pos):
            return  # already seen: several processors of one step may each ask
        if self._seen is None or length != self._seen + 1 or bsz != len(self.pos):
            rows = input_ids.tolist()
            states = [self._scan(r) for r in rows]
            self.pos = [s[0] for s in states]
            self.h_tok = [s[1] for s in states]
            self.w_tok = [s[2] for s in states]
            self.audio_pos = [s[3] for s in states]
            self.completed = [0] * bsz
            self.completed_audio = [0] * bsz
            self._seen = length
            return
        self._seen = length
        for b, t in enumerate(input_ids[:, -1].tolist()):
            if self.audio_pos[b]:
                self._observe_audio(b, t)
                continue
            p = self.pos[b]
            if p == 0:
                if t == self.image_id:
                    self.pos[b] = 1
                elif self.allow_audio and t == self.audio_open:
                    self.audio_pos[b] = 1
                continue
            if p == 1:
                self.h_tok[b] = t
            elif p == 2:
                self.w_tok[b] = t
            p += 1
            if p >= 3 and p == self.block_length(self.h_tok[b], self.w_tok[b]):
                p = 0  # the block is complete: the row is free again
                self.completed[b] += 1
            self.pos[b] = p

    def _observe_audio(self, b: int, t: int) -> None:
        if t == self.audio_close:
            self.audio_pos[b] = 0
            self.completed_audio[b] += 1
        else:
            self.audio_pos[b] += 1

    @property
    def in_block(self) -> list[bool]:
        """Per row: whether the next token is inside a media block (image or audio)."""
        return [p > 0 or a > 0 for p, a in zip(self.pos, self.audio_pos)]

    # -- masks ----------------------------------------------------------------------------------
    def _mask(self, key: tuple, ids_or_range, size: int, device) -> torch.Tensor:
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(size, dtype=torch.bool)
            if isinstance(ids_or_range, tuple):
                m[ids_or_range[0] : ids_or_range[1]] = True
            else:
                m[list(ids_or_range)] = True
            self._masks[key] = m
        return m.to(device)

    def _fits(self, h_tok: int, w_tok: int, used: int, remaining: int | None) -> bool:
        return remaining is None or self.block_length(h_tok, w_tok) - used <= remaining

    def _row_mask(self, b: int, size: int, remaining: int | None, device) -> torch.Tensor | None:
        if self.audio_pos[b]:
            return self._audio_mask(self.audio_pos[b], size, remaining, device)
        p = self.pos[b]
        v = self.vocab
        if p == 0:
            if not self.forbid_stray and self.allow_images and not self.allow_audio:
                return None
            image_ok = self.allow_images and self._any_fits(remaining)
            audio_ok = self.allow_audio and (remaining is None or v.audio_block_len(1) <= remaining)
            key = ("free", image_ok, self.forbid_stray, audio_ok)
            if key not in self._masks:
                m = torch.zeros(size, dtype=torch.bool)
                if self.forbid_stray:
                    m[: v.text_size] = True
                else:
                    m[:] = True
                    m[self.image_id] = False
                m[self.image_id] = image_ok
                if self.allow_audio:  # untracked audio tokens stay as they were (stray, or not)
                    m[self.audio_open] = audio_ok
                self._masks[key] = m
            return self._masks[key].to(device)
        if p >= 3:
            return self.block_allowed(p, self.h_tok[b], self.w_tok[b], size, device)
        allowed = v.image_next_allowed(_BlockView(p, self.h_tok[b], self.w_tok[b]), self.sizes)
        if p in (1, 2) and remaining is not None:
            # Keep only grids whose whole block still fits in the token budget. A block the prompt
            # opened may fit none; then the caller asked for a truncated block and gets one.
            if p == 1:
                fit = [t for t in allowed if any(self._fits(t, w, p, remaining) for w in self._w_toks_for(t))]
            else:
                fit = [t for t in allowed if self._fits(self.h_tok[b], t, p, remaining)]
            allowed = fit or allowed
        if allowed is None:  # cannot happen: a complete block resets pos to 0
            raise RuntimeError("grid constraint: block already complete")
        key = ("range", *allowed) if isinstance(allowed, tuple) else ("ids", *allowed)
        return self._mask(key, allowed, size, device)

    def block_allowed(self, p: int, h_tok: int, w_tok: int, size: int, device=None) -> torch.Tensor:
        """(size,) bool: the ids allowed at index ``p >= 3`` of an image block whose size tokens are
        ``h_tok``, ``w_tok`` -- what :meth:`mask` applies there. Past the size tokens it depends on nothing
        else (not on the token budget: the block was only opened because it fits), so speculative
        decoding asks it for positions ahead of a row's current one."""
        allowed = self.vocab.image_next_allowed(_BlockView(p, h_tok, w_tok), self.sizes)
        if allowed is None:
            raise MMGenError(f"grid constraint: index {p} is past the end of the image block")
        key = ("range", *allowed) if isinstance(allowed, tuple) else ("ids", *allowed)
        return self._mask(key, allowed, size, device)

    def _audio_mask(self, n: int, size: int, remaining: int | None, device) -> torch.Tensor:
        """Ids allowed after ``n`` tokens of an audio block (``<audio>`` included): the due level's
        codes, and ``</audio>`` at a frame boundary after at least one frame. At a boundary the block
        must close once it holds ``max_audio_frames`` frames, or when another frame plus ``</audio>``
        would not fit the budget (a frame, once begun, is always finished: the budget was checked at
        its start)."""
        levels = self.vocab.config.audio_levels
        frames, level = divmod(n - 1, levels)
        can_close = level == 0 and frames >= 1
        must_close = can_close and (
            (self.max_audio_frames is not None and frames >= self.max_audio_frames)
            or (remaining is not None and remaining < levels + 1)
        )
        ids = [] if must_close else list(range(*self.vocab.audio_level_range(level)))
        return self._mask(("audio", level, can_close, must_close), ids + [self.audio_close] * can_close, size, device)

    def _w_toks_for(self, h_tok: int) -> list[int]:
        h = h_tok - self.vocab.h_start + 1
        ws = [w for hh, w in self.sizes if hh == h] if self.sizes else range(1, self.vocab.config.max_grid + 1)
        return [self.vocab.size_token("w", w) for w in ws]

    def _any_fits(self, remaining: int | None) -> bool:
        if remaining is None:
            return True
        if self.sizes:
            need = min(self.vocab.image_block_len(h, w) for h, w in self.sizes)
        else:
            need = self.vocab.image_block_len(1, 1)
        return need <= remaining

    def mask(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Apply the current rows' constraints to ``scores`` (B, V); forbidden ids become -inf."""
        bsz, size = scores.shape
        if size < self.vocab.size:
            raise MMGenError(f"model vocabulary {size} is smaller than the mmgen vocab {self.vocab.size}")
        remaining = None if self.max_length is None else self.max_length - self._seen
        rows = [self._row_mask(b, size, remaining, scores.device) for b in range(bsz)]
        if all(r is None for r in rows):
            return scores
        full = torch.ones(size, dtype=torch.bool, device=scores.device)
        allowed = torch.stack([full if r is None else r for r in rows])
        return scores.masked_fill(~allowed, float("-inf"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.observe(input_ids)
        return self.mask(scores)
