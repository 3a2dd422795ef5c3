"""VideoEncoder: a video -> sampled frames -> image codes -> temporally merged frame blocks, and back.

1. **Decode** with PyAV (:func:`mmgen.data.media.decode_video`; any container FFmpeg reads).
2. **Sample** frames: ``uniform`` at ``fps`` (capped at ``max_frames``, spread evenly), or
   ``keyframes``: only frames that open a new shot. A shot boundary is where the mean absolute
   difference of consecutive 32x32 thumbnails exceeds ``scene_threshold``; in uniform mode such
   frames are flagged as keyframes too.
3. **Encode** every frame with any :class:`~mmgen.tokenizers.base.ImageTokenizer` (the pixel VQ now,
   DualViTok through the same API), in batches.
4. **Temporal token merging** (the HoliTom idea, applied to codes): within a shot, a token whose feature
   stays similar to the token already carried at its position (cosine >= ``similarity_threshold``) is
   merged into it, i.e. not emitted again. At most ``keep_ratio`` of a non-key frame's tokens are
   emitted, the least similar first. Keyframes are emitted whole. Features are the tokenizer's codebook
   vectors, so "similar" means "decodes alike"; a tokenizer without them falls back to code equality.
   A multi-grid tokenizer (DualViTok: semantic + pixel codes) is merged grid by grid.
5. The result is a sequence of :class:`FrameBlock` (timestamp, keyframe flag, emitted positions and
   codes). :meth:`VideoEncoder.decode` rebuilds every frame's full grid by copying merged tokens
   forward from the previous frame, then decodes the grids with the image tokenizer.

Code shards and :meth:`mmgen.processing.vocab.Vocab.video_block` hold the same facts as dense arrays:
:meth:`VideoTokens.to_grids` gives ``(T, h, w)`` codes with :data:`MERGED` where a frame emitted
nothing, and :meth:`VideoTokens.from_grids` turns them back into frame blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmgen.data.media import decode_video
from mmgen.errors import MediaError, MMGenError

MERGED = -1  # a cell a frame does not emit: the decoder copies it from the frame before


@dataclass
class FrameBlock:
    index: int  # position in the sampled frame sequence
    time: float  # seconds from the start of the video
    keyframe: bool
    positions: torch.Tensor  # (k,) int64 flat indices into the (h, w) grid, ascending
    codes: torch.Tensor  # (k,) int64

    def __len__(self) -> int:
        return int(self.codes.numel())

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "time": round(self.time, 4),
            "keyframe": self.keyframe,
            "positions": self.positions.tolist(),
            "codes": self.codes.tolist(),
        }


@dataclass
class VideoTokens:
    grid: tuple[int, int]  # (h, w) code grid of every frame
    blocks: list[FrameBlock] = field(default_factory=list)

    @property
    def tokens_before(self) -> int:
        """Codes without merging: every sampled frame in full."""
        return len(self.blocks) * self.grid[0] * self.grid[1]

    @property
    def tokens_after(self) -> int:
        return sum(len(b) for b in self.blocks)

    @property
    def times(self) -> list[float]:
        return [b.time for b in self.blocks]

    def to_grids(self) -> np.ndarray:
        """``(T, h, w)`` int64: each frame's emitted codes, :data:`MERGED` at the cells it left out."""
        out = np.full((len(self.blocks), self.grid[0] * self.grid[1]), MERGED, dtype=np.int64)
        for i, b in enumerate(self.blocks):
            out[i, b.positions.numpy()] = b.codes.numpy()
        return out.reshape(len(self.blocks), *self.grid)

    @classmethod
    def from_grids(cls, grids, times: Sequence[float], keyframes: Sequence[bool]) -> VideoTokens:
        """Inverse of :meth:`to_grids`, with each frame's time and keyframe flag."""
        grids = np.asarray(grids, dtype=np.int64)
        flat = grids.reshape(len(grids), -1)
        blocks = []
        for i, row in enumerate(flat):
            pos = np.flatnonzero(row != MERGED)
            blocks.append(
                FrameBlock(
                    i, float(times[i]), bool(keyframes[i]), torch.from_numpy(pos), torch.from_numpy(row[pos].copy())
                )
            )
        return cls(grid=tuple(int(x) for x in grids.shape[1:]), blocks=blocks)

    def to_dict(self) -> dict:
        return {
            "grid": list(self.grid),
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "blocks": [b.to_dict() for b in self.blocks],
        }


def thumb(img, side: int = 32) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((side, side)), np.float32) / 255.0


def shot_changes(frames: Sequence, threshold: float) -> list[bool]:
    """Per frame: does it open a new shot? The first frame always does."""
    flags, prev = [], None
    for f in frames:
        t = thumb(f)
        flags.append(prev is None or float(np.abs(t - prev).mean()) > threshold)
        prev = t
    return flags


class VideoEncoder:
    def __init__(
        self,
        tokenizer,
        fps: float = 2.0,
        max_frames: int = 16,
        sampling: str = "uniform",
        scene_threshold: float = 0.25,
        keep_ratio: float = 0.5,
        similarity_threshold: float = 0.95,
        analysis_fps: float = 8.0,
        batch_size: int = 32,
    ):
        if sampling not in ("uniform", "keyframes"):
            raise MMGenError(f"sampling must be 'uniform' or 'keyframes', got '{sampling}'")
        if not 0 < keep_ratio <= 1:
            raise MMGenError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if fps <= 0 or max_frames <= 0:
            raise MMGenError(f"fps and max_frames must be positive, got {fps} and {max_frames}")
        self.tokenizer = tokenizer
        self.fps, self.max_frames, self.sampling = fps, max_frames, sampling
        self.scene_threshold, self.keep_ratio = scene_threshold, keep_ratio
        self.similarity_threshold, self.analysis_fps, self.batch_size = similarity_threshold, analysis_fps, batch_size

    # -- 1, 2: decode and sample -------------------------------------------------------------------
    def sample_frames(self, video) -> tuple[list, list[float], list[bool]]:
        """A path or bytes -> (PIL frames, timestamps, keyframe flags)."""
        name = None
        if isinstance(video, (str, Path)):
            name = str(video)
            if not Path(video).is_file():
                raise MediaError(f"video file not found: {video}")
            video = Path(video).read_bytes()
        rate = self.analysis_fps if self.sampling == "keyframes" else self.fps
        frames, times = decode_video(bytes(video), fps=rate, name=name)
        if self.sampling == "keyframes":
            picked = [i for i, k in enumerate(shot_changes(frames, self.scene_threshold)) if k]
        else:
            picked = list(range(len(frames)))
        if len(picked) > self.max_frames:  # spread the kept frames evenly over the clip
            picked = (
                [picked[round(i * (len(picked) - 1) / (self.max_frames - 1))] for i in range(self.max_frames)]
                if self.max_frames > 1
                else picked[:1]
            )
        frames = [frames[i] for i in picked]
        keys = [True] * len(frames) if self.sampling == "keyframes" else shot_changes(frames, self.scene_threshold)
        return frames, [times[i] for i in picked], keys

    # -- 3: encode ---------------------------------------------------------------------------------
    def encode_frames(self, frames: Sequence):
        """PIL frames -> codes ``(T, h, w)``; a multi-grid tokenizer (DualViTok) gives a dict of them."""
        parts = [
            self.tokenizer.encode(list(frames[i : i + self.batch_size])) for i in range(0, len(frames), self.batch_size)
        ]
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0] if not k.endswith("features")}
        return torch.cat(parts).cpu()

    def token_features(self, codes: torch.Tensor, grid: str = "pix") -> torch.Tensor | None:
        """``(T, h, w)`` codes -> ``(T, h*w, c)`` codebook vectors, or None where the tokenizer has none."""
        q = getattr(self.tokenizer, f"{grid}_quantizer", None) or getattr(self.tokenizer, "quantizer", None)
        if q is None or not hasattr(q, "embed"):
            return None
        with torch.no_grad():
            return q.embed(codes.to(self.tokenizer.device)).flatten(2).transpose(1, 2).float().cpu()

    # -- 4: merge ----------------------------------------------------------------------------------
    def merge(self, codes, times: Sequence[float], keyframes: Sequence[bool], grid: str = "pix"):
        """Codes ``(T, h, w)`` of consecutive frames -> frame blocks with merged tokens left out; a dict
        of grids (DualViTok's sem and pix) -> a dict of frame-block sequences, merged grid by grid."""
        if isinstance(codes, dict):
            return {name: self.merge(c, times, keyframes, name) for name, c in codes.items()}
        t_len, h, w = codes.shape
        self._grid_shape = (h, w)
        flat = codes.reshape(t_len, h * w)
        budget = max(1, math.ceil(self.keep_ratio * h * w))
        out = VideoTokens(grid=(h, w))
        carried = None
        for i in range(t_len):
            key = carried is None or bool(keyframes[i])
            pos = torch.arange(h * w) if key else self._changed(flat[i], carried, budget, grid)
            carried = flat[i].clone() if key else carried
            carried[pos] = flat[i][pos]
            out.blocks.append(FrameBlock(i, float(times[i]), key, pos, flat[i][pos].clone()))
        return out

    def _changed(self, now: torch.Tensor, carried: torch.Tensor, budget: int, grid: str) -> torch.Tensor:
        """Positions to emit: tokens not similar to the carried one, least similar first, within the budget."""
        h, w = self._grid_shape
        feats = self.token_features(torch.stack([now, carried]).view(2, h, w), grid)
        if feats is not None:
            sim = F.cosine_similarity(feats[0], feats[1], dim=-1)
        else:
            sim = (now == carried).float()
        sim = torch.where(now == carried, torch.ones_like(sim), sim)  # identical codes always merge
        cand = torch.nonzero(sim < self.similarity_threshold).flatten()
        if cand.numel() > budget:
            cand = cand[torch.argsort(sim[cand], stable=True)[:budget]]
        return torch.sort(cand).values

    # -- the API -----------------------------------------------------------------------------------
    def encode(self, video, times: Sequence[float] | None = None):
        """A video path / bytes, or a list of PIL frames (with ``times``; default ``i / fps``) ->
        merged frame blocks (:class:`VideoTokens`; a dict of them per grid for DualViTok)."""
        if isinstance(video, (list, tuple)):
            frames = list(video)
            if not frames:
                raise MMGenError("no frames to encode")
            times = list(times) if times is not None else [i / self.fps for i in range(len(frames))]
            keys = shot_changes(frames, self.scene_threshold)
        else:
            frames, times, keys = self.sample_frames(video)
        return self.merge(self.encode_frames(frames), times, keys)

    @staticmethod
    def full_grids(tokens: VideoTokens) -> torch.Tensor:
        """Every frame's full ``(T, h, w)`` code grid, merged tokens copied forward."""
        h, w = tokens.grid
        grids, cur = [], None
        for b in tokens.blocks:
            if cur is None:
                if len(b) != h * w:
                    raise MMGenError("the first frame block must be a full keyframe")
                cur = torch.empty(h * w, dtype=torch.long)
            cur = cur.clone()
            cur[b.positions] = b.codes
            grids.append(cur.view(h, w))
        return torch.stack(grids) if grids else torch.empty(0, h, w, dtype=torch.long)

    def decode(self, tokens) -> list:
        """Frame blocks (or a dict of them per grid) -> PIL frames (one per sampled frame)."""
        if isinstance(tokens, dict):
            grids = {name: self.full_grids(t) for name, t in tokens.items()}
            n = len(next(iter(grids.values())))

            def chunk(i):
                return {k: g[i : i + self.batch_size] for k, g in grids.items()}
        else:
            grids = self.full_grids(tokens)
            n = len(grids)

            def chunk(i):
                return grids[i : i + self.batch_size]

        out = []
        for i in range(0, n, self.batch_size):
            out.extend(self.tokenizer.decode(chunk(i)))
        return out


__all__ = ["MERGED", "FrameBlock", "VideoEncoder", "VideoTokens", "shot_changes"]
