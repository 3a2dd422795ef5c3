"""``Vocab``: the single source of truth for token ids and the multimodal sequence layout.

Id space, in order::

    [0, text_size)              text tokens of a Hugging Face tokenizer (unchanged ids)
    structural tokens           <image> </image> <sem> </sem> <pix> </pix> <eol> <audio> </audio> ...
    size tokens                 <h_1> .. <h_{max_grid}>, <w_1> .. <w_{max_grid}>  (code-grid height/width)
    code ranges                 one contiguous range per codebook, in the order given (e.g. sem, pix, audio)
    video tokens (opt-in)       <skip_1> .. <skip_{max_grid}>, <time_0> .. <time_{video_times-1}>

An image is written coarse to fine, ILLUME+ style (the semantic part only when a ``sem`` range exists)::

    <image> <h_H> <w_W> <sem> row (<eol>) ... </sem> <pix> row <eol> ... </pix> </image>

where H x W is the pixel-code grid and the semantic grid is ceil(H/sem_ratio) x ceil(W/sem_ratio).
Audio is ``<audio> codes </audio>`` with residual levels interleaved frame by frame, each level in its
own sub-range.

A video (only when ``video_times > 0``) is its sampled frames in order, each with its time::

    <video> <frame> <time_k> image block </frame>                                  (keyframe)
            <frame> <time_k> <sem> sparse rows </sem> <pix> sparse rows </pix> </frame>   (other frames)
            ... </video>

A keyframe is a whole image block (it declares the grid size every later frame shares). Any other
frame writes only the codes temporal merging kept: each row lists its kept codes left to right, a
``<skip_n>`` before a code jumps over n merged cells (copied from the previous frame), and ``<eol>``
ends the row, the rest of it merged. Times are quantized to ``video_time_step`` seconds:
``<time_k>`` is the frame at ``k * video_time_step`` s (nearest step); frame order is the order of the
frames. The video codes share the image code ranges (same tokenizer, same codebook); the video
layout's methods are :class:`~mmgen.processing.video_layout.VideoLayout`'s.
Training, inference constraints and evaluation all ask this class; no other module hard-codes an
offset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmgen.errors import MMGenError
from mmgen.processing.video_layout import VideoLayout

GRID_BRANCHES = ("sem", "pix")  # code ranges laid out as grids inside image blocks, in grid-table order

STRUCTURAL = [
    "<image>",
    "</image>",
    "<sem>",
    "</sem>",
    "<pix>",
    "</pix>",
    "<eol>",
    "<audio>",
    "</audio>",
    "<video>",
    "</video>",
    "<frame>",
    "</frame>",
]


@dataclass
class VocabConfig:
    text_size: int
    codebooks: dict[str, int] = field(default_factory=dict)  # name -> number of codes, in id order
    max_grid: int = 64  # largest code-grid side an image block may declare
    sem_ratio: int = 2  # pixel grid / semantic grid, per side
    audio_levels: int = 1  # residual VQ levels sharing the "audio" range (size = levels * codebook)
    video_times: int = 0  # <time_k> tokens; 0: no video layout (and no skip or time ids)
    video_time_step: float = 0.5  # seconds between two consecutive time tokens


class Vocab(VideoLayout):
    def __init__(
        self,
        text_size: int,
        codebooks: dict[str, int] | None = None,
        max_grid: int = 64,
        sem_ratio: int = 2,
        audio_levels: int = 1,
        video_times: int = 0,
        video_time_step: float = 0.5,
    ):
        self.config = VocabConfig(
            int(text_size),
            dict(codebooks or {}),
            int(max_grid),
            int(sem_ratio),
            int(audio_levels),
            int(video_times),
            float(video_time_step),
        )
        if self.config.video_times < 0 or self.config.video_time_step <= 0:
            raise MMGenError(
                f"video_times must be >= 0 and video_time_step > 0, got {video_times} and {video_time_step}"
            )
        self.text_size = self.config.text_size
        self._tok2id: dict[str, int] = {}
        nxt = self.text_size
        for name in STRUCTURAL:
            self._tok2id[name] = nxt
            nxt += 1
        self.h_start = nxt
        nxt += self.config.max_grid
        self.w_start = nxt
        nxt += self.config.max_grid
        self.ranges: dict[str, tuple[int, int]] = {}  # name -> (start, end) of its ids
        for name, n in self.config.codebooks.items():
            if n <= 0:
                raise MMGenError(f"codebook '{name}' must have a positive size, got {n}")
            self.ranges[name] = (nxt, nxt + int(n))
            nxt += int(n)
        # Video ids come after the code ranges, so switching video on leaves every existing id where it
        # was: a trained model gains video by growing its embedding table, nothing moves.
        self.skip_start = self.time_start = nxt
        if self.has_video:
            self.time_start = self.skip_start + self.config.max_grid
            nxt = self.time_start + self.config.video_times
        self.size = nxt
        self._id2tok = {v: k for k, v in self._tok2id.items()}

    # -- structural tokens --------------------------------------------------------------------
    def __getitem__(self, token: str) -> int:
        """Id of a structural token, e.g. ``vocab['<image>']`` or ``vocab['<h_8>']``."""
        if token in self._tok2id:
            return self._tok2id[token]
        if token.startswith("<h_") or token.startswith("<w_"):
            n = int(token[3:-1])
            return self.size_token(token[1], n)
        if self.has_video and token.startswith("<skip_"):
            return self.skip_token(int(token[6:-1]))
        if self.has_video and token.startswith("<time_") and 0 <= int(token[6:-1]) < self.config.video_times:
            return self.time_start + int(token[6:-1])
        raise KeyError(token)

    def size_token(self, axis: str, n: int) -> int:
        if not 1 <= n <= self.config.max_grid:
            raise MMGenError(f"grid side {n} outside 1..{self.config.max_grid} (raise vocab max_grid)")
        return (self.h_start if axis == "h" else self.w_start) + n - 1

    def token_name(self, i: int) -> str | None:
        """Readable name of a non-text id (structural, size or code), None for text ids."""
        if i < self.text_size:
            return None
        if i in self._id2tok:
            return self._id2tok[i]
        if self.h_start <= i < self.w_start:
            return f"<h_{i - self.h_start + 1}>"
        if self.w_start <= i < self.w_start + self.config.max_grid:
            return f"<w_{i - self.w_start + 1}>"
        for name, (a, b) in self.ranges.items():
            if a <= i < b:
                return f"<{name}_{i - a}>"
        if self.skip_start <= i < self.time_start:
            return f"<skip_{i - self.skip_start + 1}>"
        if self.time_start <= i < self.size:
            return f"<time_{i - self.time_start}>"
        raise IndexError(f"id {i} outside vocab of size {self.size}")

    @property
    def structural_ids(self) -> dict[str, int]:
        return dict(self._tok2id)

    # -- code ranges --------------------------------------------------------------------------
    @property
    def grid_names(self) -> list[str]:
        """The grid code ranges this vocab has (of :data:`GRID_BRANCHES`), in block order."""
        return [n for n in GRID_BRANCHES if self.has(n)]

    def has(self, name: str) -> bool:
        return name in self.ranges

    def code_range(self, name: str) -> tuple[int, int]:
        if name not in self.ranges:
            raise MMGenError(f"vocab has no '{name}' codebook (has: {', '.join(self.ranges) or 'none'})")
        return self.ranges[name]

    def codes_to_ids(self, name: str, codes) -> np.ndarray:
        start, end = self.code_range(name)
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= end - start):
            raise MMGenError(f"{name} code out of range 0..{end - start - 1}")
        return codes + start

    def ids_to_codes(self, name: str, ids) -> np.ndarray:
        start, end = self.code_range(name)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < start or ids.max() >= end):
            raise ValueError(f"ids outside the {name} code range")
        return ids - start

    def modality_of(self, ids) -> np.ndarray:
        """Per-id modality index: 0 text, 1 structural/size, then 2 + index of the code range."""
        ids = np.asarray(ids)
        out = np.where(ids < self.text_size, 0, 1)
        for k, (a, b) in enumerate(self.ranges.values()):
            out = np.where((ids >= a) & (ids < b), 2 + k, out)
        return out

    # -- image blocks -------------------------------------------------------------------------
    def sem_grid(self, h: int, w: int) -> tuple[int, int]:
        r = self.config.sem_ratio
        return math.ceil(h / r), math.ceil(w / r)

    def _rows(self, name: str, grid: np.ndarray) -> list[int]:
        out: list[int] = []
        eol = self._tok2id["<eol>"]
        for row in self.codes_to_ids(name, grid):
            out.extend(int(x) for x in row)
            out.append(eol)
        return out

    def image_block(self, pix, sem=None) -> list[int]:
        """Token ids of one image from its pixel code grid ``(H, W)`` and optional semantic grid."""
        pix = np.asarray(pix)
        if pix.ndim != 2:
            raise MMGenError(f"pixel codes must be a 2-D grid, got shape {pix.shape}")
        h, w = pix.shape
        ids = [self["<image>"], self.size_token("h", h), self.size_token("w", w)]
        if self.has("sem"):
            if sem is None:
                raise MMGenError("this vocab has semantic codes: image_block needs sem=")
            sem = np.asarray(sem)
            if sem.shape != self.sem_grid(h, w):
                raise MMGenError(
                    f"semantic grid {sem.shape} does not match {self.sem_grid(h, w)} for a {h}x{w} pixel grid"
                )
            ids += [self["<sem>"], *self._rows("sem", sem), self["</sem>"]]
        ids += [self["<pix>"], *self._rows("pix", pix), self["</pix>"], self["</image>"]]
        return ids

    def grid_position_ids(self, input_ids, target: bool = False):
        """Per token of ``input_ids`` (a torch LongTensor, any leading shape), its row in a 2-D
        grid-position table: 0 outside image code grids, else ``1 + branch * G*G + row * G + col``
        with ``G = max_grid`` and ``branch`` the index in :data:`GRID_BRANCHES`.

        Reads only the layout (``<sem>``/``<pix>`` open a grid, ``<eol>`` ends a row, ``<skip_n>`` in a
        merged video frame moves n cells on), so it works on packed rows holding many documents and on
        any grid size. Cached decoding, which feeds one token at a time, takes the last column of this
        over the sequence so far.

        ``target=True`` names instead the cell the *next* code goes to, on every token that precedes one
        (the opener, each code or skip, each ``<eol>`` of an open grid): the input that predicts a code
        then says where it lands, which is what RandAR's position instructions give a decoder. It is read
        from the tokens up to each position, so training and cached decoding agree. Rows and columns run
        to ``G`` inclusive (after a row's last code the next cell is column ``w``, where the layout puts
        ``<eol>``), so this table has ``1 + branches * (G+1)**2`` rows: :meth:`grid_table_size`."""
        import torch

        G = self.config.max_grid
        side = G + 1 if target else G  # table side
        # Cells advanced by each token: one, or n for <skip_n>; a code's column is the advance since its row began.
        advance = torch.ones_like(input_ids)
        is_skip = torch.zeros_like(input_ids, dtype=torch.bool)
        if self.has_video:
            is_skip = (input_ids >= self.skip_start) & (input_ids < self.time_start)
            advance = torch.where(is_skip, input_ids - self.skip_start + 1, advance)
        cells = advance.cumsum(-1)
        index = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        eol = input_ids == self["<eol>"]
        eol_before = eol.long().cumsum(-1)
        out = torch.zeros_like(input_ids)
        for b, name in enumerate(GRID_BRANCHES):
            if not self.has(name):
                continue
            lo, hi = self.code_range(name)
            opener = input_ids == self[f"<{name}>"]
            last_open = torch.where(opener, index, -1).cummax(-1).values
            last_break = torch.where(opener | eol, index, -1).cummax(-1).values
            row = eol_before - eol_before.gather(-1, last_open.clamp(min=0))
            col = cells - cells.gather(-1, last_break.clamp(min=0)) - 1
            code = (input_ids >= lo) & (input_ids < hi) & (last_open >= 0)
            if target:
                closed = torch.where(input_ids == self[f"</{name}>"], index, -1).cummax(-1).values
                open_grid = (last_open >= 0) & (last_open > closed)
                # after a code or skip: the next column; after the opener or an <eol>: column 0 of `row`
                # (an <eol> counts itself in eol_before, so `row` is already the next row there)
                col = torch.where(opener | eol, torch.zeros_like(col), col + 1)
                code = open_grid & (code | is_skip | opener | eol)
            cell = 1 + b * side * side + row.clamp(0, side - 1) * side + col.clamp(0, side - 1)
            out = torch.where(code, cell, out)
        return out

    def grid_table_size(self, target: bool = False) -> int:
        """Rows of the embedding table that :meth:`grid_position_ids` indexes (row 0: no cell)."""
        side = self.config.max_grid + (1 if target else 0)
        return 1 + len(GRID_BRANCHES) * side * side

    def grid_position_ids_tail(self, input_ids, n: int = 1, target: bool = False):
        """:meth:`grid_position_ids` of the last ``n`` tokens, read from the shortest window that holds
        their image blocks: a code's cell depends only on the tokens since its block opened, and no
        block is longer than a ``max_grid`` square one. Cached decoding asks this every step, so the
        cost stays bounded by the block length instead of growing with the sequence."""
        window = n + self.image_block_len(self.config.max_grid, self.config.max_grid)
        return self.grid_position_ids(input_ids[..., -window:], target)[..., -n:]

    def image_block_len(self, h: int, w: int) -> int:
        n = 3 + (h * (w + 1)) + 3
        if self.has("sem"):
            sh, sw = self.sem_grid(h, w)
            n += 2 + sh * (sw + 1)
        return n

    def parse_image_block(self, ids: Sequence[int]) -> dict:
        """Inverse of :meth:`image_block`: ``{'h', 'w', 'pix': (H, W) array, 'sem': array | None}``.

        Raises ValueError naming the first position that breaks the layout."""
        ids = [int(x) for x in ids]
        pos = 0

        def expect(tok: str):
            nonlocal pos
            if pos >= len(ids) or ids[pos] != self[tok]:
                raise ValueError(f"image block: expected {tok} at position {pos}")
            pos += 1

        def grid(name: str, h: int, w: int) -> np.ndarray:
            nonlocal pos
            start, end = self.code_range(name)
            rows = []
            for r in range(h):
                row = ids[pos : pos + w]
                if len(row) != w or any(not start <= x < end for x in row):
                    raise ValueError(f"image block: row {r} of {name} codes malformed at position {pos}")
                rows.append([x - start for x in row])
                pos += w
                expect("<eol>")
            return np.asarray(rows, dtype=np.int64)

        expect("<image>")
        if pos + 2 > len(ids):
            raise ValueError("image block: missing size tokens")
        h = ids[pos] - self.h_start + 1
        w = ids[pos + 1] - self.w_start + 1
        if not (1 <= h <= self.config.max_grid and 1 <= w <= self.config.max_grid):
            raise ValueError("image block: bad size tokens")
        pos += 2
        sem = None
        if self.has("sem"):
            expect("<sem>")
            sem = grid("sem", *self.sem_grid(h, w))
            expect("</sem>")
        expect("<pix>")
        pix = grid("pix", h, w)
        expect("</pix>")
        expect("</image>")
        return {"h": h, "w": w, "pix": pix, "sem": sem, "length": pos}

    def image_next_allowed(self, prefix: Sequence[int], sizes: Sequence[tuple[int, int]] | None = None):
        """The grid constraint: ids allowed after ``prefix`` (the tokens from ``<image>`` on).

        Returns ``(start, end)`` for a contiguous id range, a list of ids, or None when the block is
        complete. ``sizes`` limits the (H, W) grids the model may declare (None: any up to max_grid)."""
        # Only the length and the two size tokens matter, so nothing here walks the whole prefix:
        # a decoding loop can call this every step at O(1) cost.
        n = len(prefix)
        if n == 0:
            return [self["<image>"]]
        if n == 1:
            hs = sorted({h for h, _ in sizes}) if sizes else range(1, self.config.max_grid + 1)
            return [self.size_token("h", h) for h in hs]
        h = int(prefix[1]) - self.h_start + 1
        if n == 2:
            ws = sorted({w for hh, w in sizes if hh == h}) if sizes else range(1, self.config.max_grid + 1)
            return [self.size_token("w", w) for w in ws]
        w = int(prefix[2]) - self.w_start + 1
        pos = n - 3  # tokens after the size tokens
        segments: list[tuple[str, int, int]] = []
        if self.has("sem"):
            segments.append(("sem", *self.sem_grid(h, w)))
        segments.append(("pix", h, w))
        for name, gh, gw in segments:
            seg_len = 2 + gh * (gw + 1)
            if pos < seg_len:
                if pos == 0:
                    return [self[f"<{name}>"]]
                if pos == seg_len - 1:
                    return [self[f"</{name}>"]]
                col = (pos - 1) % (gw + 1)
                return [self["<eol>"]] if col == gw else self.code_range(name)
            pos -= seg_len
        if pos == 0:
            return [self["</image>"]]
        return None

    # -- audio blocks -------------------------------------------------------------------------
    @property
    def audio_codebook_size(self) -> int:
        """Codes per residual level: the "audio" range is ``audio_levels`` sub-ranges of this size."""
        start, end = self.code_range("audio")
        return (end - start) // self.config.audio_levels

    def audio_level_range(self, level: int) -> tuple[int, int]:
        """``(start, end)`` ids of residual level ``level``'s codes (level 0 is the coarsest)."""
        if not 0 <= level < self.config.audio_levels:
            raise MMGenError(f"audio level {level} outside 0..{self.config.audio_levels - 1}")
        per = self.audio_codebook_size
        start = self.code_range("audio")[0] + level * per
        return start, start + per

    def audio_block_len(self, frames: int) -> int:
        """Tokens of an audio block of ``frames`` code frames: ``<audio>``, levels x frames codes, ``</audio>``."""
        return 2 + frames * self.config.audio_levels

    def audio_block(self, codes) -> list[int]:
        """``<audio> codes </audio>``; ``codes`` is ``(levels, T)``, written frame-major."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim == 1:
            codes = codes[None]
        levels = self.config.audio_levels
        if codes.shape[0] != levels:
            raise MMGenError(f"audio codes have {codes.shape[0]} levels, vocab expects {levels}")
        start, end = self.code_range("audio")
        per = (end - start) // levels
        if codes.size and (codes.min() < 0 or codes.max() >= per):
            raise MMGenError(f"audio code out of range 0..{per - 1}")
        flat = (codes + (np.arange(levels) * per)[:, None]).T.reshape(-1) + start
        return [self["<audio>"], *map(int, flat), self["</audio>"]]

    def parse_audio_block(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) < 2 or ids[0] != self["<audio>"] or ids[-1] != self["</audio>"]:
            raise ValueError("audio block must start with <audio> and end with </audio>")
        levels = self.config.audio_levels
        start, end = self.code_range("audio")
        per = (end - start) // levels
        body = ids[1:-1] - start
        if len(body) % levels:
            raise ValueError("audio block length is not a multiple of the residual levels")
        frames = body.reshape(-1, levels).T
        return frames - (np.arange(levels) * per)[:, None]

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "text_size": self.text_size,
            "codebooks": self.config.codebooks,
            "max_grid": self.config.max_grid,
            "sem_ratio": self.config.sem_ratio,
            "audio_levels": self.config.audio_levels,
        }
        if self.has_video:  # written only when used, so vocabs without video keep their saved form
            d.update(video_times=self.config.video_times, video_time_step=self.config.video_time_step)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(**d)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            p = p / "vocab.json"
        p.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        p = Path(path)
        if p.is_dir():
            p = p / "vocab.json"
        if not p.is_file():
            raise MMGenError(f"no vocab.json at {path} (is this an mmgen checkpoint directory?)")
        return cls.from_dict(json.loads(p.read_text()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, text={self.text_size}, codebooks={self.config.codebooks})"
