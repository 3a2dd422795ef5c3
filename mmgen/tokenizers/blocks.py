"""Code blocks: one token for each frequent k x k block of an image tokenizer's pixel codes.

A second-stage vocabulary over visual codes, in the spirit of byte-pair encoding on quantized images
(Zhang et al. 2024, "From Pixels to Tokens: Byte-Pair Encoding on Quantized Visual Modalities"),
restricted to aligned square blocks so an image stays a grid. Why mmgen has it: the tiny DualViTok's
pixel codes are cell-aligned (a ShapesWorld cell is exactly 3 x 3 codes, and an object gets the same
block wherever it stands, see ``benchmarks/cell_codes.py``), so the demo corpus holds only a few hundred
distinct blocks among its 127k. Writing one token per block cuts a picture from 81 codes to 9, and the
LM binds a caption's objects to cells per token, as in ``benchmarks/binding_probe.py``, at a third of the
sequence length.

The table is fitted on code shards (``fit_block_table``): the ``max_size`` most frequent blocks seen at
least ``min_count`` times. A block outside the table is written as the nearest entry (squared distance
between the pixel quantizer's code vectors, summed over the block): lossy, so ``fit`` reports the
table's coverage, and the reconstruction benchmarks measure the whole chain.

``CodeBlockTokenizer`` wraps the fitted table and the inner tokenizer behind the usual tokenizer API, so
``mmgen tokenize``, the LM bundle, generation and evaluation use it like any other image tokenizer. Its
directory holds ``config.json``, ``model.safetensors`` (the table) and the inner tokenizer in ``inner/``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mmgen.data.code_shards import read_code_shards_of_splits
from mmgen.errors import MMGenError
from mmgen.tokenizers.base import ImageTokenizer, as_code_grids, load_image_tokenizer
from mmgen.utils.pixels import pil_to_tensor, tensor_to_pil


def blocks_of(grid: np.ndarray, block: int) -> np.ndarray:
    """A ``(H, W)`` code grid -> ``(H/b, W/b, b*b)`` blocks, each read row-major."""
    h, w = grid.shape
    if h % block or w % block:
        raise MMGenError(f"a {h}x{w} code grid does not split into {block}x{block} blocks")
    return grid.reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3).reshape(h // block, w // block, -1)


def fit_block_table(
    grids: Iterable[np.ndarray], block: int, max_size: int = 1024, min_count: int = 2
) -> tuple[np.ndarray, dict]:
    """The most frequent ``block x block`` code blocks of ``grids`` (ties broken by the codes, so the
    table is deterministic), at most ``max_size`` of them, each seen ``min_count`` times or more."""
    counts: Counter = Counter()
    n_grids = 0
    for g in grids:
        b = blocks_of(np.asarray(g), block)
        counts.update(map(tuple, b.reshape(-1, b.shape[-1]).tolist()))
        n_grids += 1
    if not counts:
        raise MMGenError("no image code grids to fit a block table on")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = [t for t, n in ranked[:max_size] if n >= min_count] or [ranked[0][0]]
    total = sum(counts.values())
    stats = {
        "grids": n_grids,
        "blocks": total,
        "distinct": len(counts),
        "table_size": len(kept),
        "coverage": round(sum(counts[t] for t in kept) / total, 6),
    }
    return np.asarray(kept, dtype=np.int64), stats


class CodeBlockTokenizer(ImageTokenizer):
    """An inner image tokenizer whose pixel-code grid is rewritten as one token per ``block x block``
    block from a fitted table. A DualViTok's semantic grid passes through unchanged when it has one
    code per block (its ``sem_ratio`` equals ``block``)."""

    mmgen_type = "code_blocks"

    def __init__(
        self,
        inner: ImageTokenizer,
        table: np.ndarray | torch.Tensor,
        block: int,
        fit_stats: dict | None = None,
        labels: list[dict | None] | None = None,
        fitted_rows: int | None = None,
    ):
        super().__init__()
        table = torch.as_tensor(np.asarray(table), dtype=torch.long)
        if table.ndim != 2 or table.shape[1] != block * block or not len(table):
            raise MMGenError(f"a block table must be (K, {block * block}) codes, got shape {tuple(table.shape)}")
        n_pix = _pix_codebook(inner)
        if int(table.min()) < 0 or int(table.max()) >= n_pix:
            raise MMGenError(f"block table codes must lie in the inner pixel codebook 0..{n_pix - 1}")
        self.inner = inner.eval()
        self.block = int(block)
        self.fit_stats = dict(fit_stats or {})
        self.register_buffer("table", table)
        self.resolution = tuple(inner.resolution)
        self.downsample = inner.downsample * self.block
        self.codebook_size = len(table)
        sizes = getattr(inner, "codebook_sizes", None) or {}
        # one semantic code per block: the LM's semantic grid is the block grid (ratio 1)
        self.sem_ratio = 1
        self.codebook_sizes = {"pix": self.codebook_size}
        if "sem" in sizes and getattr(inner, "sem_ratio", 0) == self.block:
            self.codebook_sizes = {"sem": int(sizes["sem"]), "pix": self.codebook_size}
        sem_down = getattr(inner, "sem_downsample", 1)
        if self.downsample % sem_down:
            raise MMGenError(
                f"{self.block}x{self.block} blocks of {inner.downsample}-pixel codes ({self.downsample} "
                f"px) must "
                f"tile the inner tokenizer's semantic cells ({sem_down} px)"
            )
        self._index = {tuple(row): i for i, row in enumerate(table.tolist())}
        self._vectors = None
        # What each block shows, where known (compose_blocks): {"kind": "object", "color": ..., ...}, or
        # None. Rows from fitted_rows on were added by compose_blocks, not fitted on any data.
        self.labels = list(labels) if labels is not None else [None] * len(table)
        self.fitted_rows = len(table) if fitted_rows is None else int(fitted_rows)
        if len(self.labels) != len(table) or not 0 < self.fitted_rows <= len(table):
            raise MMGenError(f"block labels ({len(self.labels)}) and fitted rows must match the table ({len(table)})")

    # -- blocks <-> pixel codes -------------------------------------------------------------------------
    def to_blocks(self, pix: torch.Tensor) -> torch.Tensor:
        """Inner pixel codes ``(B, H, W)`` -> block tokens ``(B, H/b, W/b)``; unseen blocks -> nearest entry."""
        grids = [blocks_of(g, self.block) for g in pix.detach().cpu().long().numpy()]
        if not grids:
            return torch.empty((0, 0, 0), dtype=torch.long, device=self.table.device)
        rows = np.stack(grids)  # (B, h, w, b*b)
        flat = rows.reshape(-1, rows.shape[-1])
        ids = np.array([self._index.get(tuple(r), -1) for r in flat.tolist()], dtype=np.int64)
        missing = ids < 0
        if missing.any():
            ids[missing] = self._nearest(torch.from_numpy(flat[missing])).numpy()
        return torch.from_numpy(ids.reshape(rows.shape[:3])).to(self.table.device)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Block tokens ``(B, h, w)`` -> inner pixel codes ``(B, h*b, w*b)``."""
        blocks = blocks.long().to(self.table.device)
        n, h, w = blocks.shape
        b = self.block
        return self.table[blocks].view(n, h, w, b, b).permute(0, 1, 3, 2, 4).reshape(n, h * b, w * b)

    def _nearest(self, tuples: torch.Tensor) -> torch.Tensor:
        if self._vectors is None:  # (n_pix, D) code vectors of the inner pixel quantizer, and the table's
            q = getattr(self.inner, "pix_quantizer", None) or self.inner.quantizer
            n = _pix_codebook(self.inner)
            with torch.no_grad():
                codes = q.embed(torch.arange(n, device=self.inner.device).view(1, 1, n))[0, :, 0].T.cpu()
            self._vectors = (codes, codes[self.table.cpu()].flatten(1))
        codes, table = self._vectors
        return torch.cdist(codes[tuples.long()].flatten(1), table).argmin(1)

    # -- the tokenizer API ----------------------------------------------------------------------------
    def tokens_per_image(self, width: int, height: int) -> int:
        h, w = self.code_shape(width, height)
        return h * w * len(self.codebook_sizes)  # the semantic grid, when kept, is the block grid

    def get_config(self) -> dict:
        config = {"block": self.block, "inner": "inner", "fit_stats": self.fit_stats}
        if any(self.labels) or self.fitted_rows != len(self.labels):
            config.update(labels=self.labels, fitted_rows=self.fitted_rows)
        return config

    def encode_tensor(self, x: torch.Tensor, return_features: bool = False):
        if return_features:
            raise MMGenError("code blocks have no continuous features; ask the inner tokenizer (tokenizer.inner)")
        out = self.inner.encode_tensor(x)
        if not isinstance(out, dict):
            return self.to_blocks(out)
        codes = {"pix": self.to_blocks(out["pix"])}
        if "sem" in self.codebook_sizes:
            codes["sem"] = out["sem"]
        return codes

    def decode_tensor(self, codes) -> torch.Tensor:
        grids = as_code_grids(codes, self.codebook_sizes)
        if "pix" not in grids:
            raise MMGenError("code-block decode needs the block grid ('pix')")
        pix = self.from_blocks(grids["pix"])
        if "sem" in grids:
            return self.inner.decode_tensor({"sem": grids["sem"], "pix": pix})
        return self.inner.decode_tensor(pix)

    @torch.no_grad()
    def encode(self, images, size: tuple[int, int] | None = None, return_features: bool = False):
        size = self.image_size_for(*(size or self.resolution))
        return self.encode_tensor(pil_to_tensor(images, size).to(self.device), return_features=return_features)

    @torch.no_grad()
    def decode(self, codes) -> list:
        return tensor_to_pil(self.decode_tensor(codes))

    # -- saving and loading: the inner tokenizer in ``inner/``, the table in model.safetensors --------------
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        self.inner.save_pretrained(Path(save_directory) / "inner")
        save_file({"table": self.table.contiguous().cpu()}, str(Path(save_directory) / "model.safetensors"))

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, config: dict, map_location: str = "cpu", device: str | None = None, **_hub_kwargs
    ):
        from safetensors.torch import load_file

        p, device = Path(model_id), device or map_location
        inner = load_image_tokenizer(p / config.get("inner", "inner"), device=device)
        table = load_file(str(p / "model.safetensors"))["table"]
        return (
            cls(
                inner,
                table,
                int(config["block"]),
                config.get("fit_stats"),
                config.get("labels"),
                config.get("fitted_rows"),
            )
            .to(device)
            .eval()
        )


def compose_blocks(tok: CodeBlockTokenizer, probes, render) -> CodeBlockTokenizer:
    """``tok`` with its blocks labelled by what ``probes`` show, and the probes' blocks it lacks appended.

    ``probes``: (scene, {cell: label}) pairs, e.g. :func:`mmgen.world.probes.object_probes`; ``render``
    draws a scene as a PIL image the way the corpus was drawn. A block seen under one label only gets
    that label (a block two labels share stays unlabelled). A labelled block missing from the table, such
    as the block of a colour-shape pair no training picture shows, becomes a new row after the fitted
    ones: the tokenizer can write every object its inner tokenizer can encode, and a model can compose
    the new rows from what it learnt about their attributes (:mod:`mmgen.training.block_factors`)."""
    scenes = [scene for scene, _ in probes]
    seen: dict[tuple, list] = {}
    for start in range(0, len(scenes), 64):
        images = [render(scene) for scene in scenes[start : start + 64]]
        out = tok.inner.encode(images, size=tok.resolution)
        pix = (out["pix"] if isinstance(out, dict) else out).cpu().numpy()
        for grid, (_, labels) in zip(pix, probes[start : start + 64]):
            rows = blocks_of(grid, tok.block)
            if rows.shape[0] * rows.shape[1] != len(labels):
                raise MMGenError(
                    f"the probes label {len(labels)} cells but a picture has {rows.shape[0]}x{rows.shape[1]} "
                    "blocks: compose_blocks needs one block per labelled cell"
                )
            for cell, label in labels.items():
                found = seen.setdefault(tuple(rows[cell].tolist()), [])
                if label not in found:
                    found.append(label)
    table = tok.table.cpu().numpy()
    labels = list(tok.labels[: tok.fitted_rows])
    for i, row in enumerate(table[: tok.fitted_rows].tolist()):
        found = seen.get(tuple(row), [])
        labels[i] = found[0] if len(found) == 1 else None
    fitted = {tuple(r) for r in table[: tok.fitted_rows].tolist()}
    new = [(b, found[0]) for b, found in seen.items() if len(found) == 1 and b not in fitted]
    table = np.concatenate(
        [table[: tok.fitted_rows], np.asarray([b for b, _ in new], dtype=table.dtype).reshape(-1, table.shape[1])]
    )
    stats = dict(tok.fit_stats, labelled=sum(x is not None for x in labels), composed=len(new))
    return CodeBlockTokenizer(tok.inner, table, tok.block, stats, labels + [lab for _, lab in new], tok.fitted_rows)


def compose_world_blocks(tokenizer_dir: str | Path) -> dict:
    """:func:`compose_blocks` with every ShapesWorld object as a probe, drawn at the side the world draws a
    corpus for this tokenizer (:func:`mmgen.world.scene.render_size`); saves the tokenizer in place and
    returns its fit statistics (``labelled``, ``composed`` added)."""
    from mmgen.world.probes import object_probes
    from mmgen.world.scene import render, render_size

    tok = load_image_tokenizer(tokenizer_dir)
    if not isinstance(tok, CodeBlockTokenizer):
        raise MMGenError(f"{tokenizer_dir} is no code-block tokenizer (fit one with `mmgen fit-blocks`)")
    side = render_size(tok.resolution)
    composed = compose_blocks(tok, object_probes(), lambda scene: render(scene, *side))
    composed.save_pretrained(tokenizer_dir)
    return composed.fit_stats


def _pix_codebook(tok) -> int:
    return int((getattr(tok, "codebook_sizes", None) or {}).get("pix", tok.codebook_size))


def image_grids_of_shards(code_shards, splits: Iterable[str] | None = ("train",)) -> Iterable[np.ndarray]:
    """Every image item's pixel-code grid in ``code_shards`` (documents of ``splits`` only; None: all)."""
    for r in read_code_shards_of_splits(code_shards, splits):
        if not hasattr(r, "doc"):
            continue
        for i, codes in r.codes.items():
            if getattr(r.doc.items[i], "kind", None) == "image" and np.ndim(codes) == 2:
                yield np.asarray(codes)


def fit_code_blocks(
    tokenizer_dir: str | Path,
    code_shards,
    out_dir: str | Path,
    block: int | None = None,
    max_size: int = 1024,
    min_count: int = 2,
    splits: Iterable[str] | None = ("train",),
) -> Path:
    """Fit a block table on the image codes of ``code_shards`` (written by the tokenizer at
    ``tokenizer_dir``) and save the wrapped tokenizer to ``out_dir``. ``block`` defaults to the inner
    tokenizer's semantic ratio (one block per semantic code), else 2."""
    inner = load_image_tokenizer(tokenizer_dir)
    block = int(block or getattr(inner, "sem_ratio", 2))
    table, stats = fit_block_table(image_grids_of_shards(code_shards, splits), block, max_size, min_count)
    tok = CodeBlockTokenizer(inner, table, block, dict(stats, source=str(code_shards), splits=list(splits or [])))
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def reblock_code_shards(
    tokenizer_dir: str | Path, code_shards, out_dir: str | Path, max_docs_per_shard: int = 5000, progress: bool = True
) -> dict:
    """``code_shards`` written by the inner tokenizer of the code-block tokenizer at ``tokenizer_dir``,
    rewritten for it: each image's pixel-code grid becomes its block grid and its semantic grid is kept
    only when the block tokenizer keeps it, as ``mmgen tokenize --tokenizer BLOCKS`` writes them from the
    pictures (``CodeBlockTokenizer.encode`` is the inner encode followed by :meth:`to_blocks`), without
    decoding or encoding a picture (the same codes up to the encoder's near-ties, which depend on how
    pictures are batched: 4 of the demo's 42,708 pictures differ in one block). Audio codes pass through.
    Video codes were merged over time on the inner codes, so a corpus with them must be tokenized again
    instead. Input shard I becomes ``codes-IIIIII-NNNNNN.tar``; returns the summary, also written to
    ``out_dir/summary.json``."""
    from tqdm import tqdm

    from mmgen.data.code_shards import CodedDoc, CodeShardWriter, read_code_shards
    from mmgen.paths import expand_inputs
    from mmgen.tokenizers.pretokenize import code_dtype_for

    tok = load_image_tokenizer(tokenizer_dir)
    if not isinstance(tok, CodeBlockTokenizer):
        raise MMGenError(f"{tokenizer_dir} is no code-block tokenizer (fit one with `mmgen fit-blocks`)")
    keep_sem = "sem" in tok.codebook_sizes
    dtype = code_dtype_for(tok.codebook_sizes.values())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(code_shards, (".tar",))
    stats, grids, shards = {"docs_in": 0, "docs_written": 0, "images_reblocked": 0, "bad_records": 0}, Counter(), []
    for index, path in enumerate(tqdm(paths, desc="reblock", unit="shard", disable=not progress)):
        docs = []
        for rec in read_code_shards([path]):
            if not isinstance(rec, CodedDoc):
                stats["bad_records"] += 1
                continue
            for i in rec.codes:
                if getattr(rec.doc.items[i], "kind", None) == "video":
                    raise MMGenError(
                        f"{path}: document {rec.doc.id} has video codes, merged over time on the inner "
                        "codes; tokenize the corpus with the block tokenizer instead"
                    )
            docs.append(rec)
        stats["docs_in"] += len(docs)
        # one to_blocks call per grid shape and shard: blocks outside the table are looked up together
        by_shape: dict[tuple, list[tuple[int, int]]] = {}
        for d, rec in enumerate(docs):
            for i, grid in rec.codes.items():
                if getattr(rec.doc.items[i], "kind", None) == "image":
                    by_shape.setdefault(np.shape(grid), []).append((d, i))
        blocks: dict[tuple[int, int], np.ndarray] = {}
        for where in by_shape.values():
            stacked = torch.from_numpy(np.stack([np.asarray(docs[d].codes[i]) for d, i in where]))
            for (d, i), grid in zip(where, tok.to_blocks(stacked).numpy().astype(dtype)):
                blocks[(d, i)] = grid
                grids[f"{grid.shape[0]}x{grid.shape[1]}"] += 1
        stats["images_reblocked"] += len(blocks)
        with CodeShardWriter(out, prefix=f"codes-{index:06d}", max_docs=max_docs_per_shard) as writer:
            for d, rec in enumerate(docs):
                codes = {i: blocks.get((d, i), c) for i, c in rec.codes.items()}
                sem = {i: g for i, g in rec.sem.items() if keep_sem and (d, i) in blocks}
                writer.write(CodedDoc(rec.doc, codes, sem, dict(rec.frames)))
                stats["docs_written"] += 1
        found = sorted(out.glob(f"codes-{index:06d}-*.tar"))
        if writer.count == 0:  # the writer opens its first shard up front: no empty shard is kept
            for empty in found:
                empty.unlink()
            found = []
        shards += [str(f) for f in found]
    summary = {
        **stats,
        "code_grids": dict(grids),
        "code_dtype": np.dtype(dtype).name,
        "codebooks": tok.codebook_sizes,
        "tokenizer": str(tokenizer_dir),
        "source": str(code_shards),
        "shards": shards,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = [
    "CodeBlockTokenizer",
    "blocks_of",
    "compose_blocks",
    "compose_world_blocks",
    "fit_block_table",
    "fit_code_blocks",
    "image_grids_of_shards",
    "reblock_code_shards",
]
