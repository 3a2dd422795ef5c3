"""Packing token sequences into fixed-length rows without cross-document attention.

Documents are placed into rows of ``seq_len`` tokens by bin packing: first-fit-decreasing (longest
first, each into the first row with room) or minimum bin slack (row by row, the subset that leaves
the least room), which waste little padding for the short, uneven documents of multimodal corpora.
Each row carries:

- ``position_ids`` that restart at 0 for every document (RoPE sees each document as if alone);
- ``segment_ids``: which document of the row a token belongs to (-1 for padding), from which
  :func:`packed_attention_mask` builds the block-diagonal causal mask;
- ``labels``: the input id where the token is a training target, else -100. The first token of each
  segment is never a target, since its predecessor in the row belongs to another document.

A document longer than a row is split into chunks at item boundaries (an image block is never cut:
a half image would teach the model malformed grids); when one item alone is longer than a row the
document is dropped and counted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class PackStats:
    docs: int = 0
    rows: int = 0
    chunks: int = 0  # pieces placed into rows (a split document gives several)
    docs_split: int = 0
    docs_dropped: int = 0
    tokens: int = 0  # real tokens placed
    seq_len: int = 0

    @property
    def fill_rate(self) -> float:
        return self.tokens / (self.rows * self.seq_len) if self.rows else 0.0

    @classmethod
    def total(cls, stats: list[dict], seq_len: int) -> PackStats:
        """The sum of several packings' counts (their :meth:`to_dict`), into rows of ``seq_len``."""
        return cls(
            **{f.name: sum(s.get(f.name, 0) for s in stats) for f in fields(cls) if f.name != "seq_len"},
            seq_len=seq_len,
        )

    def to_dict(self) -> dict:
        return {
            "docs": self.docs,
            "rows": self.rows,
            "chunks": self.chunks,
            "docs_split": self.docs_split,
            "docs_dropped": self.docs_dropped,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "fill_rate": round(self.fill_rate, 4),
        }


def split_at_boundaries(seq: dict, seq_len: int) -> list[dict] | None:
    """Cut a sequence longer than ``seq_len`` into chunks that end on item boundaries.

    Returns None when some item alone does not fit a row."""
    ids = seq["input_ids"]
    n = len(ids)
    # Allowed cut points: item starts, plus the ends. A chunk spans [cuts[a], cuts[b]).
    cuts = sorted({0, n, *[b for b in seq.get("boundaries", []) if 0 < b < n]})
    pieces = []
    start = 0
    while start < n:
        # The farthest allowed cut that keeps the chunk within a row.
        k = bisect.bisect_right(cuts, start + seq_len) - 1
        end = cuts[k]
        if end <= start:
            return None
        pieces.append((start, end))
        start = end
    out = []
    for a, b in pieces:
        mask = np.array(seq["loss_mask"][a:b], dtype=bool)
        mask[0] = False  # a continuation chunk has no context for its first token
        span = seq.get("cond_span")
        keep = span is not None and a <= span[0] and span[1] <= b
        out.append(
            {
                "input_ids": ids[a:b],
                "loss_mask": mask,
                "doc_index": seq.get("doc_index"),
                "cond_span": (span[0] - a, span[1] - a) if keep else None,
            }
        )
    return out


def first_fit_decreasing(lengths: list[int], cap: int) -> list[list[int]]:
    """Rows of item indices: longest first, each into the first row with room (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    free: list[int] = []  # room left per row
    rows: list[list[int]] = []
    for j in order:
        n = lengths[j]
        for r, room in enumerate(free):
            if room >= n:
                free[r] -= n
                rows[r].append(j)
                break
        else:
            free.append(cap - n)
            rows.append([j])
    return rows


def minimum_bin_slack(lengths: list[int], cap: int, budget: int = 2000) -> list[list[int]]:
    """Rows of item indices by Minimum Bin Slack (Gupta & Ho, 1999): one row at a time, the longest
    item left plus the subset of the others that leaves the least room, found by depth-first search
    (at most ``budget`` nodes per row; lengths already tried at a level are skipped, so equal-length
    documents cost one branch). Where first-fit-decreasing leaves a gap no single document fits, this
    finds the pair or triple that does: ShapesWorld's ~170-token documents fill 512-token rows to
    ~94% instead of ~91%. Deterministic; O(rows x (items + budget))."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    left = [lengths[j] for j in order]  # descending
    neg = [-x for x in left]  # ascending, for bisect
    ids = list(order)
    rows: list[list[int]] = []
    while ids:
        first = ids.pop(0)
        left.pop(0)
        neg.pop(0)
        best: list[int] = []
        best_room = cap - lengths[first]
        nodes = 0

        def search(start: int, room: int, chosen: list[int]) -> None:
            nonlocal best, best_room, nodes
            if room < best_room:
                best, best_room = list(chosen), room
            # skip the items too long for the room: ``left`` is sorted descending
            k = bisect.bisect_left(neg, -room, lo=start)
            tried = set()
            while k < len(left) and best_room > 0 and nodes < budget:
                n = left[k]
                if n not in tried:
                    tried.add(n)
                    nodes += 1
                    chosen.append(k)
                    search(k + 1, room - n, chosen)
                    chosen.pop()
                k += 1

        search(0, best_room, [])
        rows.append([first] + [ids[k] for k in best])
        for k in sorted(best, reverse=True):
            ids.pop(k)
            left.pop(k)
            neg.pop(k)
    return rows


def pack_sequences(
    seqs: list[dict], seq_len: int, pad_id: int = 0, split_long: bool = True, algorithm: str = "ffd"
) -> tuple[dict, PackStats]:
    """Pack sequences (from :func:`mmgen.processing.sequence.build_sequence`) into rows of ``seq_len``:
    first-fit-decreasing (``algorithm="ffd"``) or minimum bin slack (``"mbs"``, fuller rows).

    Returns ``(rows, stats)`` where rows holds int64 numpy arrays ``(R, seq_len)``: ``input_ids``,
    ``labels``, ``position_ids``, ``segment_ids``, and ``doc_index`` (which input sequence each
    token came from, -1 for padding)."""
    stats = PackStats(seq_len=seq_len)
    chunks: list[dict] = []
    for i, seq in enumerate(seqs):
        stats.docs += 1
        seq = dict(seq, doc_index=i)
        if len(seq["input_ids"]) <= seq_len:
            chunks.append(seq)
            continue
        pieces = split_at_boundaries(seq, seq_len) if split_long else None
        if pieces is None:
            stats.docs_dropped += 1
            continue
        stats.docs_split += 1
        chunks.extend(pieces)
    lengths = [len(c["input_ids"]) for c in chunks]
    if algorithm == "ffd":
        rows = first_fit_decreasing(lengths, seq_len)
    elif algorithm == "mbs":
        rows = minimum_bin_slack(lengths, seq_len)
    else:
        raise ValueError(f"packing algorithm must be 'ffd' or 'mbs', got {algorithm!r}")
    R = len(rows)
    out = {
        "input_ids": np.full((R, seq_len), pad_id, dtype=np.int64),
        "labels": np.full((R, seq_len), IGNORE_INDEX, dtype=np.int64),
        "position_ids": np.zeros((R, seq_len), dtype=np.int64),
        "segment_ids": np.full((R, seq_len), -1, dtype=np.int64),
        "doc_index": np.full((R, seq_len), -1, dtype=np.int64),
        # the caption of a text-to-image document, which prompt dropout (CFG) may remove
        "cond_mask": np.zeros((R, seq_len), dtype=bool),
    }
    for r, members in enumerate(rows):
        pos = 0
        for s, j in enumerate(members):
            c = chunks[j]
            ids = np.asarray(c["input_ids"], dtype=np.int64)
            n = len(ids)
            mask = np.array(c["loss_mask"], dtype=bool)
            mask[0] = False
            sl = slice(pos, pos + n)
            out["input_ids"][r, sl] = ids
            out["labels"][r, sl] = np.where(mask, ids, IGNORE_INDEX)
            out["position_ids"][r, sl] = np.arange(n)
            out["segment_ids"][r, sl] = s
            out["doc_index"][r, sl] = c["doc_index"]
            if c.get("cond_span") is not None:
                a, b = c["cond_span"]
                out["cond_mask"][r, pos + a : pos + b] = True
            pos += n
            stats.tokens += n
        # Padding continues the position count so position ids stay in range and monotone per row.
        out["position_ids"][r, pos:] = np.arange(seq_len - pos)
    stats.rows = R
    stats.chunks = len(chunks)
    return out, stats


def drop_prompts(
    ids: np.ndarray,
    seg: np.ndarray,
    pos: np.ndarray,
    labels: np.ndarray,
    cond: np.ndarray,
    p: float,
    rng: np.random.Generator,
) -> int:
    """Prompt dropout for classifier-free guidance, in place on one batch of packed rows.

    Each document with a caption loses it with probability ``p``, so that its image is trained exactly
    as if the document had been ``<s> <image> …`` (the unconditional prompt CFG decodes from): the
    token before the caption (``<s>``) moves to the caption's last slot, the slots before it become
    padding (segment -1, no target), and later positions move back by the caption length. The next
    token is then predicted from ``<s>``, as in the uncaptioned document. Returns how many were dropped."""
    dropped = 0
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r][cond[r]]):
            if rng.random() >= p:
                continue
            span = np.flatnonzero(cond[r] & (seg[r] == s))
            first, last = span[0], span[-1]
            doc = seg[r] == s
            ids[r, last] = ids[r, first - 1]
            dead = np.arange(first - 1, last)
            seg[r, dead] = -1
            labels[r, dead] = IGNORE_INDEX
            labels[r, last] = IGNORE_INDEX
            later = doc & (np.arange(seg.shape[1]) >= last)
            pos[r, later] -= len(span)
            dropped += 1
    return dropped


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-D additive mask ``(B, 1, L, L)``: 0 where query i may attend key j (same segment, j <= i),
    the dtype's minimum elsewhere. Segment id < 0 marks padding, which attends only to itself so that
    no softmax row is empty."""
    seg = segment_ids
    if seg.ndim == 1:
        seg = seg[None]
    L = seg.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    allowed = same & causal[None]
    pad = seg < 0
    eye = torch.eye(L, dtype=torch.bool, device=seg.device)[None]
    allowed = torch.where(pad[:, :, None], eye, allowed)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packed_batch(
    rows: dict,
    index,
    dtype: torch.dtype = torch.float32,
    prompt_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
    attention: str = "mask",
) -> dict:
    """Model inputs for some rows: ``input_ids``, ``position_ids``, ``labels`` and the attention.

    ``attention="mask"``: a 4-D block-diagonal ``attention_mask`` (eager and sdpa kernels).
    ``attention="varlen"``: no mask, only the per-document ``position_ids`` — what transformers'
    flash-attention path turns into ``cu_seqlens`` for variable-length kernels (GPU only); the results
    are the same. ``prompt_dropout`` with ``rng`` applies :func:`drop_prompts`."""
    idx = np.atleast_1d(np.asarray(index))
    ids = rows["input_ids"][idx].copy()
    seg = rows["segment_ids"][idx].copy()
    pos = rows["position_ids"][idx].copy()
    labels = rows["labels"][idx].copy()
    if prompt_dropout > 0 and "cond_mask" in rows:
        drop_prompts(ids, seg, pos, labels, rows["cond_mask"][idx], prompt_dropout, rng or np.random.default_rng())
    batch = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "labels": torch.from_numpy(labels),
        "segment_ids": torch.from_numpy(seg),
    }
    if attention == "mask":
        batch["attention_mask"] = packed_attention_mask(batch["segment_ids"], dtype=dtype)
    elif attention != "varlen":
        raise ValueError(f"attention must be 'mask' or 'varlen', got {attention!r}")
    return batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]`` (targets of -100 are ignored)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return loss
    return loss / (target != IGNORE_INDEX).sum().clamp(min=1)
