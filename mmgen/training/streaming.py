"""Streaming packed shards to the ranks: each rank reads only its own shards, one at a time.

The global batch is drawn from ``S`` data streams (``data.streams``, default: the world size). The
shards are split once between the streams (a seeded permutation, shard ``perm[j]`` to stream
``j % S``), and rank ``r`` of ``W`` reads streams ``r*S/W .. (r+1)*S/W - 1``, a micro-batch taking
``micro_batch * W / S`` rows of each. So no two ranks ever open the same shard, and one rank with
both streams and the doubled micro-batch reads exactly the rows two ranks read (the loss and weights
agree; tested across two launcher "nodes").

A stream walks its shards in a new seeded order every epoch, rows in shard order, through a shuffle
buffer of ``buffer`` rows (WebDataset's ``shuffle``: each incoming row takes the place of a random
one, which goes out). It holds the current shard and the buffer: memory does not grow with the corpus.

The position of a stream is the number of rows it has handed out. The trainer saves it in the
checkpoint; a stream started at position ``p`` replays the index order (shard and row numbers only,
no data read) up to ``p``, then reads the rows its buffer holds at that point: the rows after a
resume are exactly those an uninterrupted run reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import count

import numpy as np

from mmgen.data.packed_shards import read_packed_shard
from mmgen.errors import MMGenError


def stream_shards(n_shards: int, streams: int, seed: int) -> list[list[int]]:
    """Shard indices of each stream: a seeded permutation dealt out round-robin."""
    if n_shards < streams:
        raise MMGenError(
            f"{n_shards} packed shard(s) for {streams} data streams (one per rank unless data.streams "
            "says): every stream needs a shard of its own: tokenize into more, smaller code shards "
            "(mmgen pack writes one packed shard per code shard) or use fewer ranks"
        )
    perm = np.random.default_rng([seed, 7]).permutation(n_shards)
    return [sorted(int(i) for i in perm[s::streams]) for s in range(streams)]


def rank_streams(streams: int, rank: int, world: int) -> range:
    if streams % world:
        raise MMGenError(f"data.streams={streams} is not a multiple of the world size {world}")
    q = streams // world
    return range(rank * q, (rank + 1) * q)


class PackedRowStream:
    """One data stream over some packed shards: rows one at a time, shuffled within a bounded buffer.

    ``shards``: ``(path, rows)`` pairs; ``buffer``: rows the shuffle buffer holds, at least 1
    (``data.shuffle_buffer``, checked with the config); ``start``: rows already handed out (a resumed run)."""

    def __init__(self, shards: list[tuple[str, int]], seed: int, stream: int, buffer: int, start: int = 0):
        if not shards or not any(n for _, n in shards):
            raise MMGenError(f"data stream {stream} has no packed rows")
        self.shards, self.seed, self.stream, self.size = shards, seed, stream, buffer
        self.position = 0
        self._rng = random.Random(seed * 1_000_003 + stream)
        self._source = self._indices()
        self._buf: list = []  # (shard, row) while replaying; row arrays once live
        self._loaded: tuple[int, dict] | None = None
        if start:
            self._replay(start)

    def _indices(self) -> Iterator[tuple[int, int]]:
        for epoch in count():
            order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(len(self.shards))
            for k in order:
                for row in range(self.shards[k][1]):
                    yield int(k), row

    def _rows_of(self, k: int) -> dict:
        if self._loaded is None or self._loaded[0] != k:
            self._loaded = None  # the old shard goes before the next is read
            self._loaded = (k, read_packed_shard(self.shards[k][0]))
        return self._loaded[1]

    def _row(self, k: int, row: int) -> dict:
        rows = self._rows_of(k)
        return {name: arr[row].copy() for name, arr in rows.items()}

    def _step(self, take) -> object | None:
        """Push the next source row through the buffer; the row that leaves it (None while filling)."""
        item = take(*next(self._source))
        if len(self._buf) < self.size:
            self._buf.append(item)
            return None
        j = self._rng.randrange(self.size)
        out, self._buf[j] = self._buf[j], item
        return out

    def _replay(self, start: int) -> None:
        current = None

        def index(k, row):
            nonlocal current
            current = k
            return (k, row)

        while self.position < start:
            if self._step(index) is not None:
                self.position += 1
        # the buffer's rows, read a shard at a time; the shard the source is in goes last, so the first
        # take finds it loaded (the last row replayed is in the buffer: the shard is among these)
        by_shard: dict[int, list[int]] = {}
        for j, (k, _) in enumerate(self._buf):
            by_shard.setdefault(k, []).append(j)
        for k in sorted(by_shard, key=lambda k: k == current):
            for j in by_shard[k]:
                self._buf[j] = self._row(*self._buf[j])

    def take(self, n: int) -> dict:
        """The next ``n`` rows, stacked: arrays ``(n, seq_len)``."""
        out = []
        while len(out) < n:
            row = self._step(self._row)
            if row is not None:
                out.append(row)
                self.position += 1
        return {k: np.stack([r[k] for r in out]) for k in out[0]}


class StreamBatches:
    """The micro-batches of one rank from its data streams (see the module docstring)."""

    def __init__(
        self,
        index: dict,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        buffer: int,
        streams: int | None = None,
        positions: dict | None = None,
    ):
        self.n_streams = streams or world
        self.mine = rank_streams(self.n_streams, rank, world)
        per_rank = len(self.mine)
        if micro_batch % per_rank:
            raise MMGenError(
                f"micro_batch={micro_batch} must be a multiple of the {per_rank} data streams each rank "
                f"reads (data.streams={self.n_streams} over {world} ranks)"
            )
        self.per_stream = micro_batch // per_rank
        shards = [(s["path"], int(s["rows"])) for s in index["shards"]]
        owned = stream_shards(len(shards), self.n_streams, seed)
        positions = positions or {}
        self.streams = {
            s: PackedRowStream([shards[k] for k in owned[s]], seed, s, buffer, start=int(positions.get(str(s), 0)))
            for s in self.mine
        }

    def shard_paths(self) -> set[str]:
        return {p for st in self.streams.values() for p, _ in st.shards}

    def next(self) -> list[tuple[int, dict]]:
        """One micro-batch: ``(stream, rows)`` for each of this rank's streams, in stream order."""
        return [(s, st.take(self.per_stream)) for s, st in self.streams.items()]

    def positions(self) -> dict[str, int]:
        return {str(s): st.position for s, st in self.streams.items()}
