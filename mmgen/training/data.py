"""The LM trainer's data: the text tokenizer (trained once on a sample, or loaded), the run's
:class:`~mmgen.processing.vocab.Vocab`, and the rows each rank trains on, behind one interface:
packed in memory (:class:`MemoryBatches`) or streamed from packed shards (:class:`StreamedBatches`)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mmgen.data.code_shards import read_code_shards_of_splits
from mmgen.data.doc import BadRecord
from mmgen.data.packed_shards import read_index
from mmgen.data.packing import pack_sequences, packed_attention_mask, packed_batch
from mmgen.errors import MMGenError
from mmgen.models.text_tokenizer import train_text_tokenizer
from mmgen.processing.sequence import build_sequences, chat_layout, doc_texts
from mmgen.processing.vocab import Vocab
from mmgen.tokenizers import load_image_tokenizer
from mmgen.tokenizers.audio import AudioCodec
from mmgen.training.config import TrainConfig
from mmgen.training.distributed import barrier, gather
from mmgen.training.streaming import StreamBatches
from mmgen.world.surface import vary_prompts


def _inherit_tokenizers(cfg: TrainConfig) -> None:
    """A stage started from a bundle (``init_from``) reuses the bundle's image tokenizer and audio codec
    (its ``image_tokenizer/`` and ``audio_tokenizer/``) unless the recipe names its own."""
    for name in ("image_tokenizer", "audio_tokenizer"):
        if cfg.init_from and not getattr(cfg.data, name) and (Path(cfg.init_from) / name).is_dir():
            setattr(cfg.data, name, str(Path(cfg.init_from) / name))


def new_text_tokenizer(cfg: TrainConfig, records=None):
    """The bundle's text tokenizer (``init_from``), ``data.text_tokenizer``, or a byte-level BPE trained on
    the texts of the first ``data.text_sample_docs`` documents (``records``, else read from the code shards)."""
    from itertools import islice

    from transformers import AutoTokenizer

    if cfg.init_from:  # continue with the ids the starting bundle was trained on
        return AutoTokenizer.from_pretrained(cfg.init_from)
    if cfg.data.text_tokenizer:
        return AutoTokenizer.from_pretrained(cfg.data.text_tokenizer)
    if records is None:  # the documents the run trains on, varied prompts included: the BPE learns their forms too
        records = training_records(cfg.data.code_shards, sequence_settings(cfg))
    sample = islice((r for r in records if not isinstance(r, BadRecord)), cfg.data.text_sample_docs)
    return train_text_tokenizer(doc_texts(sample), vocab_size=cfg.data.text_vocab_size)


def text_tokenizer_for(cfg: TrainConfig, tok_dir: Path, rank: int, records=None, copy_from: Path | None = None):
    """The run's text tokenizer, saved at ``tok_dir`` once (by rank 0) and loaded from there on every
    rank: a copy of the files at ``copy_from`` (packed shards' tokenizer, the ids their rows are written
    in), else :func:`new_text_tokenizer` of ``records``."""
    from transformers import AutoTokenizer

    if rank == 0 and not (tok_dir / "tokenizer_config.json").is_file():
        if copy_from is not None:
            shutil.copytree(copy_from, tok_dir, dirs_exist_ok=True)
        else:
            new_text_tokenizer(cfg, records).save_pretrained(tok_dir)
    barrier()
    return AutoTokenizer.from_pretrained(tok_dir)


def media_tokenizers_and_vocab(cfg: TrainConfig, tok):
    """(vocab, image tokenizer or None, audio codec or None) of a run with text tokenizer ``tok``."""
    image_tokenizer = None
    _inherit_tokenizers(cfg)
    if cfg.data.image_tokenizer:
        if not Path(cfg.data.image_tokenizer).is_dir():
            raise MMGenError(
                f"data.image_tokenizer: no tokenizer directory at {cfg.data.image_tokenizer} (train one "
                f"with "
                "`mmgen train-tokenizer`, or set data.image_tokenizer=null data.codebook_size=N)"
            )
        image_tokenizer = load_image_tokenizer(cfg.data.image_tokenizer)
        books = image_codebooks(image_tokenizer)
    elif cfg.data.codebook_size:
        books = {"pix": int(cfg.data.codebook_size)}
    elif cfg.init_from or cfg.data.codebooks:
        books = None  # the bundle's vocab, or data.codebooks, says
    else:
        raise MMGenError(
            "the vocab needs the pixel codebook size: set data.image_tokenizer=DIR "
            "(the tokenizer that made the code shards) or data.codebook_size=N"
        )
    audio_codec = None
    if cfg.data.audio_tokenizer:
        audio_codec = AudioCodec.from_pretrained(cfg.data.audio_tokenizer)
    vocab = (
        Vocab.load(Path(cfg.init_from) / "vocab.json")
        if cfg.init_from
        else run_vocab(cfg, len(tok), books, audio_codec, getattr(image_tokenizer, "sem_ratio", 2))
    )
    return vocab, image_tokenizer, audio_codec


def check_saved_vocab(saved: Path, vocab, hint: str) -> None:
    if saved.is_file() and Vocab.load(saved) != vocab:
        raise MMGenError(f"{saved} was written by a run with another vocab ({Vocab.load(saved)} vs {vocab}); {hint}")


def sequence_settings(cfg: TrainConfig) -> dict:
    """What the rows depend on besides the tokenizers: kept in packed shards' index and checked at training."""
    # SFT learns to answer; pretraining on conversations still learns everything the user shows
    out = {
        "seq_len": cfg.data.seq_len,
        "packing": cfg.data.packing,
        "splits": list(cfg.data.splits or []),
        "targets": list(cfg.data.loss_targets),
        "chat": chat_layout(cfg.stage, cfg.data.chat),
        "user_targets": cfg.stage != "sft",
    }
    if cfg.data.prompt_variation:  # only when on: packed shards written before the switch existed still match
        out["prompt_variation"] = float(cfg.data.prompt_variation)
    return out


def training_records(paths, settings: dict):
    """The documents of code shards ``paths`` a run with ``settings`` (:func:`sequence_settings`) trains
    on: those of its splits, with ``prompt_variation`` of their text-to-image prompts rewritten in another
    surface form (:func:`mmgen.world.surface.vary_prompts`; the same way in every run, as it is
    keyed by each document's id). Bad records pass through, to be counted."""
    records = read_code_shards_of_splits(paths, settings["splits"])
    rate = settings.get("prompt_variation", 0.0)
    if not rate:
        return records

    def varied():
        for r in records:
            if not isinstance(r, BadRecord):
                vary_prompts(r.doc, rate)  # its texts only: the record's codes and media stay as read
            yield r

    return varied()


def image_grid_counts(records) -> Counter:
    grids = Counter()
    for r in records:
        for i, codes in getattr(r, "codes", {}).items():
            if getattr(r.doc.items[i], "kind", None) == "image":  # audio and video codes are no image grids
                grids[tuple(int(x) for x in np.shape(codes)[-2:])] += 1
    return grids


def pack_records(records: list, tok, vocab, settings: dict):
    """Documents ``records`` as packed rows, built with ``settings`` (:func:`sequence_settings`): their
    sequences in the stage's chat layout and targets, packed by :func:`mmgen.data.packing.pack_sequences`.
    Returns (rows, sequence stats, packing stats, image grid counts); rows and packing stats are None
    when no document is trainable. A caller that passes the only reference to ``records`` has them
    freed before the packing."""
    seqs, seq_stats = build_sequences(
        records, tok, vocab, targets=settings["targets"], chat=settings["chat"], user_targets=settings["user_targets"]
    )
    grids = image_grid_counts(records)
    del records
    if not seqs:
        return None, seq_stats, None, grids
    rows, pack_stats = pack_sequences(
        seqs, settings["seq_len"], pad_id=tok.pad_token_id or 0, algorithm=settings["packing"]
    )
    return rows, seq_stats, pack_stats, grids


def prepare_data(cfg: TrainConfig, out_dir: Path, rank: int):
    """Text tokenizer, vocab, image and audio tokenizers and the rows of this run: every packed row in
    memory (``data.source=memory``, identical on every rank) or the index of the packed shards the
    ranks stream (``data.source=packed``, ``rows`` None)."""
    if cfg.data.source == "packed":
        return prepare_packed(cfg, out_dir, rank)
    records = list(training_records(cfg.data.code_shards, sequence_settings(cfg)))
    if cfg.data.max_docs is not None:
        records = records[: cfg.data.max_docs]
    tok = text_tokenizer_for(cfg, out_dir / "text_tokenizer", rank, records)
    vocab, image_tokenizer, audio_codec = media_tokenizers_and_vocab(cfg, tok)
    check_saved_vocab(out_dir / "vocab.json", vocab, "use a fresh out_dir or the same data settings")

    rows, seq_stats, pack_stats, grids = pack_records(records, tok, vocab, sequence_settings(cfg))
    if rows is None:
        raise MMGenError(f"no trainable documents in {cfg.data.code_shards} ({seq_stats.to_dict()})")
    return {
        "text_tokenizer": tok,
        "vocab": vocab,
        "image_tokenizer": image_tokenizer,
        "audio_tokenizer": audio_codec,
        "rows": rows,
        "n_rows": int(rows["input_ids"].shape[0]),
        "seq_stats": seq_stats.to_dict(),
        "pack_stats": pack_stats.to_dict(),
        "image_grids": {f"{h}x{w}": n for (h, w), n in grids.most_common()},
    }


def prepare_packed(cfg: TrainConfig, out_dir: Path, rank: int) -> dict:
    """The tokenizers and vocab of packed shards (checked against this run's settings) and their index."""
    packed = Path(cfg.data.packed_shards)
    index = read_index(packed)
    want = sequence_settings(cfg)
    diff = {k: (index["settings"].get(k), v) for k, v in want.items() if index["settings"].get(k) != v}
    if diff:
        k, (got, need) = next(iter(diff.items()))
        raise MMGenError(
            f"packed shards {packed} were built with {k}={got!r}, this run needs {need!r}; "
            f"rerun `mmgen pack` with this run's config"
        )
    tok = text_tokenizer_for(cfg, out_dir / "text_tokenizer", rank, copy_from=packed / "text_tokenizer")
    vocab, image_tokenizer, audio_codec = media_tokenizers_and_vocab(cfg, tok)
    check_saved_vocab(packed / "vocab.json", vocab, "rerun `mmgen pack` with this run's data settings")
    check_saved_vocab(out_dir / "vocab.json", vocab, "use a fresh out_dir or the same data settings")
    return {
        "text_tokenizer": tok,
        "vocab": vocab,
        "image_tokenizer": image_tokenizer,
        "audio_tokenizer": audio_codec,
        "rows": None,
        "index": index,
        "n_rows": int(index["totals"]["packing"]["rows"]),
        "seq_stats": index["totals"]["sequences"],
        "pack_stats": index["totals"]["packing"],
        "image_grids": index["totals"]["image_grids"],
    }


def image_codebooks(image_tokenizer) -> dict[str, int]:
    """The code ranges an image tokenizer writes, in id order: DualViTok's {sem, pix} (the LM reads and
    writes both levels, coarse to fine, as ILLUME+ does), a pixel VQ's {pix}."""
    sizes = getattr(image_tokenizer, "codebook_sizes", None)
    return {k: int(v) for k, v in sizes.items()} if sizes else {"pix": int(image_tokenizer.codebook_size)}


def run_vocab(cfg: TrainConfig, n_text: int, image_books: dict[str, int] | None, audio_codec=None, sem_ratio: int = 2):
    """The Vocab of a fresh run: text ids, then data.codebooks (default: the image tokenizer's code
    ranges), the audio codec's levels x codebook range when there is one, and the video layout when
    data.video_times > 0. ``data.image_levels: [pix]`` keeps a DualViTok run to its pixel codes."""
    text_size = cfg.data.text_size or n_text
    if text_size < n_text:
        raise MMGenError(f"data.text_size {text_size} is smaller than the text tokenizer ({n_text} tokens)")
    image_books = dict(image_books or {})
    if cfg.data.image_levels is not None and image_books:
        unknown = [k for k in cfg.data.image_levels if k not in image_books]
        if unknown or not cfg.data.image_levels:
            raise MMGenError(
                f"data.image_levels={list(cfg.data.image_levels)}: the image tokenizer writes "
                f"{', '.join(image_books)}; name one or more of those"
            )
        image_books = {k: n for k, n in image_books.items() if k in cfg.data.image_levels}
    books = dict(cfg.data.codebooks) if cfg.data.codebooks else image_books
    for name, n in image_books.items():  # a range the tokenizer also writes must have its size
        if name in books and int(books[name]) != n:
            raise MMGenError(
                f"data.codebooks.{name}={books[name]} but the image tokenizer's {name} codebook has {n} "
                f"codes; set data.codebooks.{name}={n}"
            )
    levels = 1
    if audio_codec is not None:
        levels, n = audio_codec.n_q, audio_codec.n_q * audio_codec.codebook_size
        if books.setdefault("audio", n) != n:
            raise MMGenError(
                f"data.codebooks.audio={books['audio']} but the audio codec has {levels} levels x "
                f"{audio_codec.codebook_size} codes = {n}; set data.codebooks.audio={n} or leave it out"
            )
    return Vocab(
        text_size,
        books,
        max_grid=cfg.data.max_grid,
        sem_ratio=sem_ratio,
        audio_levels=levels,
        video_times=cfg.data.video_times,
        video_time_step=cfg.data.video_time_step,
    )


class RowSampler:
    """Which packed rows a rank reads at (step, micro step): a seeded permutation per epoch.

    Position in the global stream is a function of the step alone, so resuming at step s reads the
    same rows an uninterrupted run would, on any number of ranks."""

    def __init__(self, n_rows: int, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int):
        self.n, self.mb, self.ga, self.rank, self.world, self.seed = n_rows, micro_batch, grad_accum, rank, world, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.ga + micro) * self.world + self.rank) * self.mb
        return np.array([self._perm(k // self.n)[k % self.n] for k in range(first, first + self.mb)])


def step_denominator(rows: dict, sampler: RowSampler, step: int, grad_accum: int, world: int) -> float:
    """Target tokens of one optimizer step over all ranks and micro-batches (every rank holds all rows)."""
    n = 0
    for r in range(world):
        sub = RowSampler(sampler.n, sampler.mb, sampler.ga, r, world, sampler.seed)
        for micro in range(grad_accum):
            lab = rows["labels"][sub.indices(step, micro)]
            n += int((lab[:, 1:] != -100).sum())
    return float(n)


def _targets(labels: np.ndarray) -> int:
    return int((labels[:, 1:] != -100).sum())


class MemoryBatches:
    """Micro-batches from rows held in memory (every rank holds all of them): :class:`RowSampler`.

    Prompt dropout draws from a generator keyed by (seed, step, micro, rank): a resumed run drops
    exactly the captions an uninterrupted one would."""

    def __init__(self, rows: dict, cfg: TrainConfig, rank: int, world: int):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.sampler = RowSampler(rows["input_ids"].shape[0], cfg.micro_batch, cfg.grad_accum, rank, world, cfg.seed)

    def step(self, step: int, dtype, attention: str) -> tuple[list[dict], float]:
        cfg = self.cfg
        denom = step_denominator(self.rows, self.sampler, step, cfg.grad_accum, self.world)
        batches = [
            packed_batch(
                self.rows,
                self.sampler.indices(step, micro),
                dtype=dtype,
                prompt_dropout=cfg.loss.prompt_dropout,
                rng=np.random.default_rng([cfg.seed, step, micro, self.rank, 17]),
                attention=attention,
            )
            for micro in range(cfg.grad_accum)
        ]
        return batches, denom

    def state(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}


class StreamedBatches:
    """Micro-batches streamed from packed shards (:mod:`mmgen.training.streaming`); the step's target
    count is summed over ranks. Prompt dropout is keyed by (seed, step, micro, stream), so it follows
    the rows whatever rank reads them."""

    def __init__(self, index: dict, cfg: TrainConfig, rank: int, world: int, state: dict | None):
        self.cfg, self.world = cfg, world
        state = state or {}
        streams = cfg.data.streams or world
        if state and state.get("streams") != streams:
            raise MMGenError(
                f"the checkpoint's data position is for data.streams={state.get('streams')}, this run has "
                f"{streams}; resume with data.streams={state.get('streams')}"
            )
        self.reader = StreamBatches(
            index, cfg.micro_batch, rank, world, cfg.seed, cfg.data.shuffle_buffer, streams, state.get("positions")
        )

    def step(self, step: int, dtype, attention: str) -> tuple[list[dict], float]:
        cfg = self.cfg
        parts = [self.reader.next() for _ in range(cfg.grad_accum)]
        n = torch.tensor(
            [float(sum(_targets(rows["labels"]) for micro in parts for _, rows in micro))], dtype=torch.float64
        )
        if self.world > 1:
            torch.distributed.all_reduce(n)
        batches = []
        for micro, streams in enumerate(parts):
            pieces = [
                packed_batch(
                    rows,
                    np.arange(rows["input_ids"].shape[0]),
                    dtype=dtype,
                    prompt_dropout=cfg.loss.prompt_dropout,
                    rng=np.random.default_rng([cfg.seed, step, micro, s, 17]),
                    attention="varlen",
                )
                for s, rows in streams
            ]
            batch = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
            if attention == "mask":
                batch["attention_mask"] = packed_attention_mask(batch["segment_ids"], dtype=dtype)
            batches.append(batch)
        return batches, float(n.item())

    def summary(self) -> dict:
        """The packed shards each rank reads, for the run's summary (a collective: all ranks call it)."""
        return {"shards_per_rank": gather(sorted(Path(p).name for p in self.reader.shard_paths()), self.world)}

    def state(self) -> dict:
        """Every rank's stream positions (a collective: all ranks call it)."""
        everyone = gather(self.reader.positions(), self.world)
        return {"streams": self.reader.n_streams, "positions": {k: v for d in everyone for k, v in d.items()}}
