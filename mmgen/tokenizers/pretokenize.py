"""Pre-tokenization: Doc shards -> code shards (every image item replaced by its code grid).

    summary = pretokenize("runs/tokenizer/tokenizer", "data/world/*.tar", "runs/codes")

Images are encoded in batches with the saved image tokenizer and written with
:class:`~mmgen.data.code_shards.CodeShardWriter` as ``(h, w)`` int16 arrays (int32 for codebooks
larger than int16 can index). A dual tokenizer (DualViTok) writes both levels: the pixel grid as the
item's codes and the semantic grid beside it (``KEY.I.sem.npy``), which is what
:func:`mmgen.data.sequence.build_sequence` turns into ``<sem> ... </sem> <pix> ... </pix>``. A record that is not a Doc (a :class:`BadRecord` from the reader) or a
Doc with an undecodable image is quarantined whole, with its reason, to ``out_dir/quarantine.jsonl``:
``docs_in == docs_written + quarantined``. Audio and video items are kept without codes for now
(no audio or video tokenizer in the skeleton); the summary counts them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mmgen.errors import MediaError, MMGenError


def target_size(tokenizer, width: int, height: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) an image is encoded at: the tokenizer's resolution, or with ``keep_aspect``
    the same pixel area at the image's aspect ratio (clamped to 1:4..4:1), on the code grid."""
    rw, rh = tokenizer.resolution
    if not keep_aspect:
        return tokenizer.image_size_for(rw, rh)
    aspect = min(4.0, max(0.25, width / max(1, height)))
    area = rw * rh
    return tokenizer.image_size_for(math.sqrt(area * aspect), math.sqrt(area / aspect))


def pretokenize(tokenizer_dir: str | Path, inputs, out_dir: str | Path, batch_size: int = 64,
                keep_media: bool = False, keep_aspect: bool = False, max_docs_per_shard: int = 5000,
                progress: bool = True) -> dict:
    """Encode every image item of the Docs in ``inputs`` into code shards under ``out_dir``.

    Returns a summary (also written to ``out_dir/summary.json``)."""
    from tqdm import tqdm

    from mmgen.data.code_shards import CodedDoc, CodeShardWriter
    from mmgen.data.doc import BadRecord, Doc
    from mmgen.data.shards import read_docs
    from mmgen.tokenizers.base import load_image_tokenizer

    if batch_size <= 0:
        raise MMGenError(f"batch_size must be positive, got {batch_size}")
    tok = load_image_tokenizer(tokenizer_dir)
    sizes = getattr(tok, "codebook_sizes", {"pix": tok.codebook_size})
    code_dtype = np.int16 if max(sizes.values()) <= np.iinfo(np.int16).max + 1 else np.int32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quarantine_path = out / "quarantine.jsonl"
    stats = Counter()
    reasons: Counter = Counter()
    grids: Counter = Counter()

    # Docs wait here until their images have been encoded; encoding happens per batch of images.
    pending: list[tuple[Doc, list[tuple[int, object, tuple[int, int]]]]] = []
    pending_images = 0

    def flush(writer) -> None:
        nonlocal pending, pending_images
        jobs = [(d_i, it_i, pil, size) for d_i, (_, imgs) in enumerate(pending) for it_i, pil, size in imgs]
        codes_of: dict[tuple[int, int], np.ndarray] = {}
        sem_of: dict[tuple[int, int], np.ndarray] = {}
        by_size: dict[tuple[int, int], list] = {}
        for job in jobs:
            by_size.setdefault(job[3], []).append(job)
        for size, group in by_size.items():
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                with torch.no_grad():
                    out = tok.encode([j[2] for j in chunk], size=size)
                codes, sem = (out["pix"], out["sem"].cpu().numpy()) if isinstance(out, dict) else (out, None)
                for k, (j, c) in enumerate(zip(chunk, codes.cpu().numpy())):
                    codes_of[(j[0], j[1])] = c.astype(code_dtype)
                    grids[f"{c.shape[0]}x{c.shape[1]}"] += 1
                    if sem is not None:
                        sem_of[(j[0], j[1])] = sem[k].astype(code_dtype)
        for d_i, (doc, imgs) in enumerate(pending):
            writer.write(CodedDoc(doc, {it_i: codes_of[(d_i, it_i)] for it_i, _, _ in imgs},
                                  {it_i: sem_of[(d_i, it_i)] for it_i, _, _ in imgs if (d_i, it_i) in sem_of}))
            stats["docs_written"] += 1
            stats["images_encoded"] += len(imgs)
        pending, pending_images = [], 0

    with CodeShardWriter(out, max_docs=max_docs_per_shard, keep_media=keep_media) as writer, \
            open(quarantine_path, "w") as qf:
        def quarantine(entry: dict) -> None:
            stats["quarantined"] += 1
            reasons[entry["reason"]] += 1
            qf.write(json.dumps(entry, ensure_ascii=False) + "\n")

        for rec in tqdm(read_docs(inputs), desc="tokenize", unit="doc", disable=not progress):
            stats["docs_in"] += 1
            if isinstance(rec, BadRecord):
                quarantine(rec.to_json())
                continue
            imgs, failed = [], None
            for i, item in enumerate(rec.items):
                kind = getattr(item, "kind", "text")
                if kind == "image":
                    try:
                        pil = item.to_pil()
                    except MediaError as e:
                        failed = (i, str(e))
                        break
                    imgs.append((i, pil, target_size(tok, pil.width, pil.height, keep_aspect)))
                elif kind in ("audio", "video"):
                    stats[f"{kind}_items_without_codes"] += 1
            if failed is not None:
                quarantine({"id": rec.id, "provenance": rec.provenance, "reason": "undecodable_image",
                            "item": failed[0], "detail": failed[1]})
                continue
            pending.append((rec, imgs))
            pending_images += len(imgs)
            if pending_images >= batch_size:
                flush(writer)
        flush(writer)
        shards = sorted(str(p) for p in out.glob("codes-*.tar"))

    summary = {
        "docs_in": stats["docs_in"], "docs_written": stats["docs_written"], "quarantined": stats["quarantined"],
        "quarantine_reasons": dict(reasons), "images_encoded": stats["images_encoded"],
        "code_grids": dict(grids), "code_dtype": np.dtype(code_dtype).name, "codebooks": dict(sizes),
        "audio_items_without_codes": stats["audio_items_without_codes"],
        "video_items_without_codes": stats["video_items_without_codes"],
        "note": "audio and video items are kept without codes (no audio/video tokenizer yet)",
        "tokenizer": str(tokenizer_dir), "shards": shards, "quarantine": str(quarantine_path),
    }
    assert summary["docs_in"] == summary["docs_written"] + summary["quarantined"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def encode_image_files(tokenizer, paths, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Codes ``(B, h, w)`` for image files; an unreadable or undecodable file raises
    :class:`~mmgen.errors.MediaError` naming it."""
    from mmgen.data.doc import Image

    images = [Image(path=str(p)).to_pil() for p in paths]
    return tokenizer.encode(images, size=size)
