"""The video layout of :class:`~mmgen.processing.vocab.Vocab` (see its docstring for the layout):
``<video>`` frame blocks ``</video>``, keyframes as whole image blocks, the other frames as the codes
temporal merging kept, with ``<skip_n>`` over merged runs and ``<time_k>`` per frame.

:class:`VideoLayout` is mixed into ``Vocab``; it reads the id space through ``Vocab``'s own
attributes and methods (``config``, ``skip_start``, ``time_start``, ``size``, ``code_range``, ``has``,
``grid_names``, ``sem_grid``, ``image_block``, ``parse_image_block`` and ``vocab[token]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmgen.errors import MMGenError


class VideoLayout:
    @property
    def has_video(self) -> bool:
        return self.config.video_times > 0

    def _need_video(self) -> None:
        if not self.has_video:
            raise MMGenError("this vocab has no video layout (build it with video_times > 0)")

    def skip_token(self, n: int) -> int:
        self._need_video()
        if not 1 <= n <= self.config.max_grid:
            raise MMGenError(f"skip of {n} cells outside 1..{self.config.max_grid}")
        return self.skip_start + n - 1

    def time_token(self, seconds: float) -> int:
        """``<time_k>`` of the nearest step; a time past the last token is an error, not a clamp (a
        clamp would give later frames the same time and hide how long the clip is)."""
        self._need_video()
        k = round(float(seconds) / self.config.video_time_step)
        if not 0 <= k < self.config.video_times:
            last = (self.config.video_times - 1) * self.config.video_time_step
            raise MMGenError(
                f"video time {seconds:.2f} s is outside 0..{last:g} s of the time tokens (raise vocab video_times)"
            )
        return self.time_start + k

    def _sparse_rows(self, name: str, grid: np.ndarray) -> list[int]:
        """Rows of a merged frame: kept codes (>= 0) in reading order, ``<skip_n>`` over each run of
        merged cells (-1) that a kept code follows, ``<eol>`` per row.

        Why skips rather than a ``<same>`` token per merged cell or a position token per kept code:
        ``<same>`` keeps the frame as long as an unmerged one (merging would save no sequence length),
        and a position token doubles every kept code (no saving at the usual ~50% kept) and needs
        max_grid^2 ids. A skip costs one token per merged *run*, needs max_grid ids, and keeps the row
        structure, so :meth:`grid_position_ids` still knows each code's cell and a merged row is never
        longer than a full one."""
        start, end = self.code_range(name)
        out: list[int] = []
        for row in np.asarray(grid, dtype=np.int64):
            kept = np.flatnonzero(row >= 0)
            if kept.size and row[kept].max() >= end - start:
                raise MMGenError(f"{name} code out of range 0..{end - start - 1}")
            col = 0
            for c in kept:
                if c > col:
                    out.append(self.skip_token(int(c - col)))
                out.append(start + int(row[c]))
                col = int(c) + 1
            out.append(self["<eol>"])
        return out

    def video_block(self, pix, times, keyframes, sem=None) -> list[int]:
        """Token ids of a video from per-frame code grids ``pix`` ``(T, H, W)`` (and ``sem`` for a
        two-level tokenizer) where -1 marks a merged cell, the frame times in seconds and keyframe
        flags. Keyframes must be whole; the first frame must be one."""
        self._need_video()
        pix = np.asarray(pix, dtype=np.int64)
        keys = [bool(k) for k in keyframes]
        if pix.ndim != 3 or not len(pix) or len(times) != len(pix) or len(keys) != len(pix):
            raise MMGenError(
                f"video codes must be (T, H, W) with T times and keyframe flags, got {pix.shape}, "
                f"{len(times)} times, {len(keys)} flags"
            )
        if not keys[0]:
            raise MMGenError("the first video frame must be a keyframe (later frames copy merged cells from it)")
        grids = {"pix": pix}
        if self.has("sem"):
            if sem is None:
                raise MMGenError("this vocab has semantic codes: video_block needs sem=")
            grids = {"sem": np.asarray(sem, dtype=np.int64), "pix": pix}
            if grids["sem"].shape != (len(pix), *self.sem_grid(*pix.shape[1:])):
                raise MMGenError(f"semantic video grids {grids['sem'].shape} do not match the pixel grids {pix.shape}")
        ids = [self["<video>"]]
        for t in range(len(pix)):
            ids += [self["<frame>"], self.time_token(times[t])]
            if keys[t]:
                ids += self.image_block(pix[t], sem=grids["sem"][t] if "sem" in grids else None)
            else:
                for name, g in grids.items():
                    ids += [self[f"<{name}>"], *self._sparse_rows(name, g[t]), self[f"</{name}>"]]
            ids.append(self["</frame>"])
        ids.append(self["</video>"])
        return ids

    def parse_video_block(self, ids: Sequence[int]) -> dict:
        """Inverse of :meth:`video_block`: ``{'h', 'w', 'pix': (T, H, W), 'sem': array | None, 'times',
        'keyframes', 'length'}`` with -1 at merged cells and times on the quantization steps.

        Raises ValueError naming the first position that breaks the layout."""
        self._need_video()
        ids = [int(x) for x in ids]
        if not ids or ids[0] != self["<video>"]:
            raise ValueError("video block: expected <video> at position 0")
        pos, size = 1, None
        frames: dict[str, list[np.ndarray]] = {"sem": [], "pix": []}
        times, keys = [], []
        while pos < len(ids) and ids[pos] == self["<frame>"]:
            pos += 1
            if pos >= len(ids) or not self.time_start <= ids[pos] < self.size:
                raise ValueError(f"video block: expected a time token at position {pos}")
            times.append((ids[pos] - self.time_start) * self.config.video_time_step)
            pos += 1
            if pos < len(ids) and ids[pos] == self["<image>"]:
                img = self.parse_image_block(ids[pos:])
                size, keyframe = (img["h"], img["w"]), {"pix": img["pix"], "sem": img["sem"]}
                pos += img["length"]
            elif size is None:
                raise ValueError(f"video block: the first frame must be a keyframe image block (position {pos})")
            else:
                keyframe = None
                pos = self._parse_sparse_frame(ids, pos, size, frames)
            if keyframe is not None:
                for name, grids in frames.items():
                    if keyframe[name] is not None:
                        grids.append(keyframe[name])
            keys.append(keyframe is not None)
            if pos >= len(ids) or ids[pos] != self["</frame>"]:
                raise ValueError(f"video block: expected </frame> at position {pos}")
            pos += 1
        if pos >= len(ids) or ids[pos] != self["</video>"] or not keys:
            raise ValueError(f"video block: expected <frame> or </video> at position {pos}")
        return {
            "h": size[0],
            "w": size[1],
            "pix": np.stack(frames["pix"]),
            "sem": np.stack(frames["sem"]) if frames["sem"] else None,
            "times": np.asarray(times, dtype=np.float64),
            "keyframes": np.asarray(keys, dtype=bool),
            "length": pos + 1,
        }

    def _parse_sparse_frame(self, ids: list[int], pos: int, size: tuple[int, int], frames: dict) -> int:
        """Parse the ``<sem>``/``<pix>`` parts of a merged frame at ``pos`` into ``frames``; the new pos."""
        for name in self.grid_names:
            h, w = self.sem_grid(*size) if name == "sem" else size
            if ids[pos : pos + 1] != [self[f"<{name}>"]]:
                raise ValueError(f"video block: expected <{name}> at position {pos}")
            pos += 1
            start, end = self.code_range(name)
            grid = np.full((h, w), -1, dtype=np.int64)
            for r in range(h):
                col = 0
                while pos < len(ids) and ids[pos] != self["<eol>"]:
                    x = ids[pos]
                    if self.skip_start <= x < self.time_start:
                        col += x - self.skip_start + 1
                    elif start <= x < end and col < w:
                        grid[r, col] = x - start
                        col += 1
                    else:
                        raise ValueError(f"video block: row {r} of {name} codes malformed at position {pos}")
                    if col > w:
                        raise ValueError(f"video block: row {r} of {name} skips past the row end at position {pos}")
                    pos += 1
                if pos >= len(ids):
                    raise ValueError(f"video block: row {r} of {name} has no <eol>")
                pos += 1
            if ids[pos : pos + 1] != [self[f"</{name}>"]]:
                raise ValueError(f"video block: expected </{name}> at position {pos}")
            frames[name].append(grid)
            pos += 1
        return pos
