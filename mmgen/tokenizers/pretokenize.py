"""Pre-tokenization: Doc shards -> code shards (every image item replaced by its code grid).

    summary = pretokenize("runs/tokenizer/tokenizer", "data/world/*.tar", "runs/codes", workers=2)

Images are encoded in batches with the saved image tokenizer and written with
:class:`~mmgen.data.code_shards.CodeShardWriter` as ``(h, w)`` int16 arrays (int32 for codebooks
larger than int16 can index). A dual tokenizer (DualViTok) writes both levels: the pixel grid as the
item's codes and the semantic grid beside it (``KEY.I.sem.npy``), which is what
:func:`mmgen.processing.sequence.build_sequence` turns into ``<sem> ... </sem> <pix> ... </pix>``.

Audio and video are opt-in, so a corpus tokenized without them stays as it was:

- ``audio_tokenizer`` (a saved :class:`~mmgen.tokenizers.audio.AudioCodec`): each audio item is
  decoded, mixed down to mono, resampled to the codec's rate and stored as ``(levels, T)`` codes;
- ``video``: each video item goes through :class:`~mmgen.tokenizers.video.VideoEncoder` around the
  same image tokenizer (sampled frames, per-frame codes, temporal merging) and is stored as
  ``(T, h, w)`` codes with -1 at merged cells (and the semantic grids for DualViTok), plus each
  frame's time and keyframe flag (``KEY.I.frames.npy``).

Without them, audio and video items are kept without codes and counted. A record that is not a Doc
(a :class:`BadRecord` from the reader) or a Doc with an image, audio or video item that cannot be
decoded is quarantined whole, with its reason (``undecodable_image``, ``undecodable_audio``,
``undecodable_video``), to ``out_dir/quarantine.jsonl``: ``docs_in == docs_written + quarantined``.

Input files are the work units (``executor``/``workers``: :func:`mmgen.data.executors.map_resumable`).
Input ``I`` becomes ``codes-IIIIII-NNNNNN.tar`` and, once those are complete, ``done/IIIIII.json``
(its counts and quarantined records); a rerun skips what is done. Images are batched within an
input file, never across files, so the bytes do not depend on which worker ran what.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mmgen.data.code_shards import CodedDoc, CodeShardWriter
from mmgen.data.doc import BadRecord, Doc, Image
from mmgen.data.executors import map_resumable
from mmgen.data.media import set_max_image_pixels
from mmgen.data.shards import read_docs
from mmgen.errors import MediaError, MMGenError, NotFetchedError
from mmgen.paths import expand_inputs
from mmgen.tokenizers.audio import AudioCodec
from mmgen.tokenizers.base import load_image_tokenizer
from mmgen.tokenizers.video import VideoEncoder
from mmgen.utils.files import write_json


def target_size(tokenizer, width: int, height: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) an image is encoded at: the tokenizer's resolution, or with ``keep_aspect``
    the same pixel area at the image's aspect ratio (clamped to 1:4..4:1), on the code grid."""
    rw, rh = tokenizer.resolution
    if not keep_aspect:
        return tokenizer.image_size_for(rw, rh)
    aspect = min(4.0, max(0.25, width / max(1, height)))
    area = rw * rh
    return tokenizer.image_size_for(math.sqrt(area * aspect), math.sqrt(area / aspect))


def code_dtype_for(sizes) -> type:
    """The smallest integer dtype that holds every code (and -1, the merged-cell mark of videos)."""
    return np.int16 if max(sizes) <= np.iinfo(np.int16).max + 1 else np.int32


def encode_audio_item(codec, item) -> np.ndarray:
    """An Audio item -> ``(levels, T)`` codes; undecodable or empty audio raises MediaError.

    One item at a time: a batched encode pads to the longest item, and padding can flip near-tied codes
    (see :meth:`AudioCodec.encode_batch`), so an item's codes would depend on its batch neighbours."""
    wave = codec.load_waveform(item.load())
    if not wave.size or not np.isfinite(wave).all():
        raise MediaError(f"audio has no usable samples ({item.path or 'embedded'})")
    with torch.no_grad():
        return codec.encode_batch([wave])[0].numpy()


def encode_video_item(encoder, item) -> dict:
    """A Video item -> ``{"codes", "sem" (DualViTok only), "frames", "before", "after"}`` for the code
    shards: grids with -1 at merged cells, (T, 2) times and keyframe flags, token counts."""
    tokens = encoder.encode(item.load())
    grids = tokens if isinstance(tokens, dict) else {"pix": tokens}
    pix = grids["pix"]
    out = {
        "codes": pix.to_grids(),
        "frames": np.stack([pix.times, [float(b.keyframe) for b in pix.blocks]], axis=1).astype(np.float64),
        "before": sum(t.tokens_before for t in grids.values()),
        "after": sum(t.tokens_after for t in grids.values()),
    }
    if "sem" in grids:
        out["sem"] = grids["sem"].to_grids()
    return out


class _MediaCoder:
    """Audio and video codes of one Doc (the opt-in parts of pre-tokenization) and their counts."""

    def __init__(
        self,
        image_tokenizer,
        audio_tokenizer,
        video: bool,
        video_fps: float,
        video_max_frames: int,
        batch_size: int,
        video_dtype: type,
    ):
        self.codec = AudioCodec.from_pretrained(audio_tokenizer) if audio_tokenizer else None
        self.video = (
            VideoEncoder(image_tokenizer, fps=video_fps, max_frames=video_max_frames, batch_size=batch_size)
            if video
            else None
        )
        self.audio_dtype = code_dtype_for([self.codec.codebook_size if self.codec else 1])
        self.video_dtype = video_dtype  # video grids hold the image tokenizer's codes

    def encode(self, item, i: int, arrays: dict, counts: Counter) -> None:
        """Codes of audio/video item ``i`` into ``arrays`` (codes/sem/frames), tallied in ``counts`` (the
        Doc's own: they join the summary only if the whole Doc is written); MediaError if undecodable."""
        if item.kind == "audio" and self.codec is not None:
            arrays["codes"][i] = encode_audio_item(self.codec, item).astype(self.audio_dtype)
            counts["audio_items_encoded"] += 1
            counts["audio_code_frames"] += arrays["codes"][i].shape[1]
        elif item.kind == "video" and self.video is not None:
            v = encode_video_item(self.video, item)
            arrays["codes"][i] = v["codes"].astype(self.video_dtype)
            arrays["frames"][i] = v["frames"]
            if "sem" in v:
                arrays["sem"][i] = v["sem"].astype(self.video_dtype)
            counts["video_items_encoded"] += 1
            counts["video_frames"] += len(v["frames"])
            counts["video_tokens_before"] += v["before"]
            counts["video_tokens_after"] += v["after"]
        else:
            counts[f"{item.kind}_items_without_codes"] += 1


class _ShardCoder:
    """What a worker holds to tokenize shards: the image tokenizer, the audio/video coder, the settings."""

    def __init__(self, p: dict):
        self.p = p
        self.tok = load_image_tokenizer(p["tokenizer"])
        self.sizes = getattr(self.tok, "codebook_sizes", {"pix": self.tok.codebook_size})
        self.code_dtype = code_dtype_for(self.sizes.values())
        self.media = _MediaCoder(
            self.tok,
            p["audio_tokenizer"],
            p["video"],
            p["video_fps"],
            p["video_max_frames"],
            p["batch_size"],
            self.code_dtype,
        )

    def summary(self) -> dict:
        """Codebook facts for the run's summary: the image codebooks and code dtype, the audio codec's."""
        info = {"codebooks": {"code_dtype": np.dtype(self.code_dtype).name, "codebooks": dict(self.sizes)}}
        codec = self.media.codec
        if codec is not None:
            info["audio"] = {
                "levels": codec.n_q,
                "codebook_size": codec.codebook_size,
                "frame_rate": codec.frame_rate,
                "sample_rate": codec.sample_rate,
            }
        return info

    def run(self, index: int, path: str, out: Path) -> dict:
        """Tokenize one input file into ``out/codes-IIIIII-NNNNNN.tar``; its counts and quarantined records."""
        tok, batch_size, p = self.tok, self.p["batch_size"], self.p
        set_max_image_pixels(p.get("max_image_pixels"))  # the limit is per process: set in each worker
        stats, reasons, grids, quarantined = Counter(), Counter(), Counter(), []
        # Docs wait here until their images have been encoded; encoding happens per batch of images.
        # Each holds (doc, images to encode, the audio/video arrays already made).
        pending: list[tuple[Doc, list[tuple[int, object, tuple[int, int]]], dict]] = []
        pending_images = 0

        def flush(writer) -> None:
            nonlocal pending, pending_images
            jobs = [(d_i, it_i, pil, size) for d_i, (_, imgs, _) in enumerate(pending) for it_i, pil, size in imgs]
            codes_of: dict[tuple[int, int], np.ndarray] = {}
            sem_of: dict[tuple[int, int], np.ndarray] = {}
            by_size: dict[tuple[int, int], list] = {}
            for job in jobs:
                by_size.setdefault(job[3], []).append(job)
            for size, group in by_size.items():
                for s in range(0, len(group), batch_size):
                    chunk = group[s : s + batch_size]
                    with torch.no_grad():
                        enc = tok.encode([j[2] for j in chunk], size=size)
                    codes, sem = (enc["pix"], enc["sem"].cpu().numpy()) if isinstance(enc, dict) else (enc, None)
                    for k, (j, c) in enumerate(zip(chunk, codes.cpu().numpy())):
                        codes_of[(j[0], j[1])] = c.astype(self.code_dtype)
                        grids[f"{c.shape[0]}x{c.shape[1]}"] += 1
                        if sem is not None:
                            sem_of[(j[0], j[1])] = sem[k].astype(self.code_dtype)
            for d_i, (doc, imgs, arrays) in enumerate(pending):
                for it_i, _, _ in imgs:
                    arrays["codes"][it_i] = codes_of[(d_i, it_i)]
                    if (d_i, it_i) in sem_of:
                        arrays["sem"][it_i] = sem_of[(d_i, it_i)]
                writer.write(CodedDoc(doc, arrays["codes"], arrays["sem"], arrays["frames"]))
                stats["docs_written"] += 1
                stats["images_encoded"] += len(imgs)
            pending, pending_images = [], 0

        def quarantine(entry: dict) -> None:
            stats["quarantined"] += 1
            reasons[entry["reason"]] += 1
            quarantined.append(entry)

        with CodeShardWriter(
            out, prefix=f"codes-{index:06d}", max_docs=p["max_docs_per_shard"], keep_media=p["keep_media"]
        ) as writer:
            for rec in read_docs(path):
                stats["docs_in"] += 1
                if isinstance(rec, BadRecord):
                    quarantine(rec.to_json())
                    continue
                imgs, arrays, counts, failed = [], {"codes": {}, "sem": {}, "frames": {}}, Counter(), None
                for i, item in enumerate(rec.items):
                    kind = getattr(item, "kind", "text")
                    try:
                        if kind == "image":
                            pil = item.to_pil()
                            imgs.append((i, pil, target_size(tok, pil.width, pil.height, p["keep_aspect"])))
                        elif kind in ("audio", "video"):
                            self.media.encode(item, i, arrays, counts)
                    except MediaError as e:
                        # a bomb, a mislabelled or truncated image, a URL never fetched: each says so
                        reason = (
                            "not_fetched"
                            if isinstance(e, NotFetchedError)
                            else e.reason
                            if e.reason != "undecodable_media"
                            else f"undecodable_{kind}"
                        )
                        failed = (i, reason, str(e))
                        break
                if failed is not None:
                    quarantine(
                        {
                            "id": rec.id,
                            "provenance": rec.provenance,
                            "reason": failed[1],
                            "item": failed[0],
                            "detail": failed[2],
                        }
                    )
                    continue
                stats.update(counts)  # a quarantined Doc's items are not counted as encoded
                pending.append((rec, imgs, arrays))
                pending_images += len(imgs)
                if pending_images >= batch_size:
                    flush(writer)
            flush(writer)
        if not stats["docs_written"]:  # the writer opens its first shard up front: no empty shard is kept
            for empty in out.glob(f"codes-{index:06d}-*.tar"):
                empty.unlink()
        return {
            "input": path,
            "stats": dict(stats),
            "reasons": dict(reasons),
            "grids": dict(grids),
            "quarantine": quarantined,
            "shards": sorted(x.name for x in out.glob(f"codes-{index:06d}-*.tar")),
        }


@functools.lru_cache(maxsize=1)
def _coder_of(key: str) -> _ShardCoder:
    return _ShardCoder(json.loads(key))


def _coder(params: dict) -> _ShardCoder:
    """The coder for ``params``, built once per worker process (models load once)."""
    return _coder_of(json.dumps(params, sort_keys=True))


def marker_path(out: Path, index: int) -> Path:
    """The done marker of input file ``index``: written once its code shards are in place."""
    return out / "done" / f"{index:06d}.json"


def tokenize_shard(params: dict, index: int, path: str, out_dir: str) -> dict:
    """One work unit of :func:`pretokenize` (a worker process or Ray task): input file ``index`` into
    its code shards, written under a temporary directory and moved into ``out_dir``, then its done
    marker ``out_dir/done/IIIIII.json`` (which the return value equals). A rerun finds the marker and
    skips the file; a file without one is tokenized again from scratch."""
    import shutil

    coder = _coder(params)
    out = Path(out_dir)
    part = out / "partial" / f"{index:06d}"
    shutil.rmtree(part, ignore_errors=True)
    for stale in out.glob(f"codes-{index:06d}-*.tar"):  # left by a run killed between the moves below
        stale.unlink()
    part.mkdir(parents=True)
    entry = {"params": params, **coder.run(index, path, part)}
    for name in entry["shards"]:
        (part / name).replace(out / name)
    part.rmdir()
    marker = marker_path(out, index)
    marker.parent.mkdir(exist_ok=True)
    write_json(marker, entry, sort_keys=False)  # key order kept: quarantine.jsonl is rebuilt from it
    return entry


def pretokenize(
    tokenizer_dir: str | Path,
    inputs,
    out_dir: str | Path,
    batch_size: int = 64,
    keep_media: bool = False,
    keep_aspect: bool = False,
    max_docs_per_shard: int = 5000,
    progress: bool = True,
    audio_tokenizer: str | Path | None = None,
    video: bool = False,
    video_fps: float = 2.0,
    video_max_frames: int = 16,
    executor: str = "local",
    workers: int = 1,
    max_image_pixels: int | None = None,
) -> dict:
    """Encode every image item (and, when asked, every audio and video item) of the Docs in ``inputs``
    into code shards under ``out_dir``.

    Each input file is one work unit, run by ``executor`` (``local``: this process, or ``workers``
    spawned processes; ``ray``: Ray tasks, see :mod:`mmgen.data.executors`) and written as
    ``codes-IIIIII-NNNNNN.tar`` (input I, at most ``max_docs_per_shard`` documents each) with a done
    marker; a rerun into the same ``out_dir`` skips the inputs already done, so a killed run resumes.
    The shards do not depend on the executor or the number of workers, to the byte.

    A Doc with a medium that cannot be decoded is quarantined with the reason (an image of more than
    ``max_image_pixels`` pixels, default :data:`mmgen.data.media.DEFAULT_MAX_IMAGE_PIXELS`, is
    ``too_many_pixels`` and is never decoded).

    Returns a summary (also written to ``out_dir/summary.json``)."""
    if batch_size <= 0:
        raise MMGenError(f"batch_size must be positive, got {batch_size}")
    if workers < 1:
        raise MMGenError(f"workers must be at least 1, got {workers}")

    set_max_image_pixels(max_image_pixels)  # a bad limit is an error here, before any worker starts
    paths = expand_inputs(inputs)
    params = {
        "tokenizer": str(tokenizer_dir),
        "batch_size": batch_size,
        "keep_media": keep_media,
        "keep_aspect": keep_aspect,
        "max_docs_per_shard": max_docs_per_shard,
        "audio_tokenizer": str(audio_tokenizer) if audio_tokenizer else None,
        "video": video,
        "video_fps": video_fps,
        "video_max_frames": video_max_frames,
        "max_image_pixels": max_image_pixels,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries, resumed = map_resumable(
        executor,
        workers,
        tokenize_shard,
        [(params, i, p, str(out)) for i, p in enumerate(paths)],
        [marker_path(out, i) for i in range(len(paths))],
        lambda i, e: e.get("params") == params and e.get("input") == paths[i],
        "tokenize",
        progress,
    )

    stats, reasons, grids = Counter(), Counter(), Counter()
    quarantine_path = out / "quarantine.jsonl"
    with open(quarantine_path, "w") as qf:
        for i in range(len(paths)):
            e = entries[i]
            stats.update(e["stats"])
            reasons.update(e["reasons"])
            grids.update(e["grids"])
            for q in e["quarantine"]:
                qf.write(json.dumps(q, ensure_ascii=False) + "\n")
    shards = [str(out / name) for i in range(len(paths)) for name in entries[i]["shards"]]
    # this process's coder: the one the shards were made with when it ran them (one local worker)
    coder_info = _coder(params).summary()
    summary = {
        "docs_in": stats["docs_in"],
        "docs_written": stats["docs_written"],
        "quarantined": stats["quarantined"],
        "quarantine_reasons": dict(reasons),
        "images_encoded": stats["images_encoded"],
        "code_grids": dict(grids),
        **coder_info["codebooks"],
        **{
            k: stats[k]
            for k in (
                "audio_items_encoded",
                "audio_code_frames",
                "audio_items_without_codes",
                "video_items_encoded",
                "video_frames",
                "video_tokens_before",
                "video_tokens_after",
                "video_items_without_codes",
            )
        },
        "tokenizer": str(tokenizer_dir),
        "shards": shards,
        "quarantine": str(quarantine_path),
        "inputs": len(paths),
        "inputs_resumed": resumed,
        "executor": executor,
        "workers": workers,
    }
    if coder_info.get("audio"):
        summary["audio_tokenizer"] = str(audio_tokenizer)
        summary["audio"] = coder_info["audio"]
    if stats["audio_items_without_codes"] or stats["video_items_without_codes"]:
        summary["note"] = (
            "audio/video items without codes: pass audio_tokenizer (--audio-tokenizer) / "
            "video=True (--video) to encode them"
        )
    if summary["docs_in"] != summary["docs_written"] + summary["quarantined"]:
        raise MMGenError(
            f"tokenize counts do not add up in {out}: {summary['docs_in']} in, {summary['docs_written']} "
            f"written, {summary['quarantined']} quarantined"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def encode_image_files(tokenizer, paths, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Codes ``(B, h, w)`` for image files; an unreadable or undecodable file raises
    :class:`~mmgen.errors.MediaError` naming it."""
    images = [Image(path=str(p)).to_pil() for p in paths]
    return tokenizer.encode(images, size=size)
