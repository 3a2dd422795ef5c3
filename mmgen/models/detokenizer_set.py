"""The diffusion detokenizers of a bundle: saved pipelines by output scale, and whether they fit it.

A bundle that draws through a detokenizer keeps it beside its image tokenizer::

    DIR/detokenizer/x1/   a CodeDetokenizerPipeline (diffusers save_pretrained: model_index.json, unet/,
                          scheduler/, conditioner/) drawing at the tokenizer's resolution
    DIR/detokenizer/x2/   optional: the 2x super-resolution pipeline of the same codes

A pipeline's scale is its output side over the resolution of the tokenizer it was trained on
(``unet/config.json``'s ``sample_size`` over ``conditioner/config.json``'s ``tokenizer_resolution``),
so it is read from two small JSON files: a bundle with a detokenizer loads no diffusers until an image
is drawn. ``--detokenizer DIR`` names either such a folder or one pipeline directory.

A detokenizer fits a bundle when it draws the code grids the bundle's LM writes, from the same image
tokenizer: same type, resolution and codebook sizes, and (for pipelines that record it) the same
:meth:`fingerprint <mmgen.tokenizers.base.ImageTokenizer.fingerprint>`. Anything else is a one-line
MMGenError (:func:`check_fits`), before any image is drawn.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.utils.files import read_json

DETOKENIZER_DIR = "detokenizer"
_SCALE_DIR = re.compile(r"^x(\d+)$")


def grid_spec(tokenizer) -> tuple[list[int], list[str]]:
    """(codebook sizes, grid names) of an image tokenizer's code grids: a multi-grid tokenizer
    (DualViTok, code blocks over it) by its ``codebook_sizes``, a one-grid one as ``pix``."""
    sizes = getattr(tokenizer, "codebook_sizes", None)
    if isinstance(sizes, dict):
        return [int(v) for v in sizes.values()], list(sizes)
    return [int(tokenizer.codebook_size)], ["pix"]


def pipeline_facts(path: str | Path) -> dict:
    """A saved pipeline's conditioner config and output ``scale``, read from its JSON files (no weights load)."""
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise MMGenError(
            f"{p} is not a detokenizer pipeline directory (needs model_index.json); "
            "train one with `mmgen train-detokenizer`"
        )
    try:
        cond = read_json(p / "conditioner" / "config.json")
        unet = read_json(p / "unet" / "config.json")
    except ValueError as e:
        raise MMGenError(f"{p} holds a damaged detokenizer config ({e}); save it again") from None
    if not cond or not unet:
        raise MMGenError(f"{p} is not a detokenizer pipeline (needs conditioner/config.json and unet/config.json)")
    side = unet.get("sample_size")
    side = side[0] if isinstance(side, (list, tuple)) else side
    res = cond.get("tokenizer_resolution") or 0
    if not side or not res or side % res:
        raise MMGenError(f"{p}: output side {side} is not a whole multiple of its tokenizer's resolution {res}")
    return {**cond, "scale": side // res, "path": str(p)}


class DetokenizerSet:
    """The detokenizers of one image tokenizer by output scale (1: its resolution, 2: twice it), as
    directories loaded on first use or as pipelines already in memory."""

    def __init__(self, pipelines: Mapping[int, object], source: str = ""):
        if not pipelines:
            raise MMGenError("a detokenizer set needs at least one pipeline")
        self._items: dict[int, object] = {}
        for scale, item in pipelines.items():
            self._items[int(scale)] = Path(item) if isinstance(item, (str, Path)) else item
        self.source = source
        self._loaded: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | Path) -> DetokenizerSet:
        """One pipeline directory, or a folder of them named by scale (``x1/``, ``x2/``)."""
        p = Path(path)
        if not p.is_dir():
            raise MMGenError(f"detokenizer directory {p} does not exist")
        if (p / "model_index.json").is_file():
            return cls({pipeline_facts(p)["scale"]: p}, source=str(p))
        found = {}
        for d in sorted(p.iterdir()):
            m = _SCALE_DIR.match(d.name)
            if m and d.is_dir():
                scale = pipeline_facts(d)["scale"]
                if scale != int(m.group(1)):
                    raise MMGenError(f"{d} holds a {scale}x detokenizer; name its folder x{scale}")
                found[scale] = d
        if not found:
            raise MMGenError(
                f"{p} holds no detokenizer: give a pipeline directory (model_index.json) or a folder "
                "of them named x1/, x2/"
            )
        return cls(found, source=str(p))

    @property
    def scales(self) -> list[int]:
        return sorted(self._items)

    def facts(self, scale: int) -> dict:
        """The conditioner config and scale of the ``scale`` pipeline (:func:`pipeline_facts`)."""
        item = self._item(scale)
        if isinstance(item, Path):
            return pipeline_facts(item)
        cond = dict(item.conditioner.config)
        return {
            **cond,
            "scale": int(item.unet.config.sample_size) // int(cond["tokenizer_resolution"]),
            "path": self.source,
        }

    def _item(self, scale: int):
        if int(scale) not in self._items:
            have = ", ".join(f"{s}x" for s in self.scales)
            raise MMGenError(
                f"the detokenizer {self.source or '(in memory)'} has no {scale}x pipeline "
                f"(it has {have}); "
                f"train one with `mmgen train-detokenizer tiny_detokenizer scale={scale} bundle=DIR`"
            )
        return self._items[int(scale)]

    def pipeline(self, scale: int, tokenizer=None, device: str = "cpu"):
        """The ``scale`` pipeline, loaded once per device; ``tokenizer`` serves a decode-conditioned one."""
        item = self._item(scale)
        with self._lock:
            key = (int(scale), str(device))
            if key not in self._loaded:
                from mmgen.models.detokenizer import load_pipeline

                if isinstance(item, Path):
                    pipe = load_pipeline(item, device=device, tokenizer=tokenizer)
                else:
                    pipe = item.to(device)
                    pipe.set_progress_bar_config(disable=True)
                    if tokenizer is not None:
                        pipe.image_tokenizer = tokenizer
                self._loaded[key] = pipe
            return self._loaded[key]

    def save(self, path: str | Path) -> Path:
        """Write every pipeline to ``path/x{scale}/``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for scale, item in self._items.items():
            dst = p / f"x{scale}"
            if isinstance(item, Path):
                if item.resolve() != dst.resolve():
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(item, dst, ignore=shutil.ignore_patterns("checkpoints"))
            else:
                item.save_pretrained(str(dst))
        return p


def check_fits(facts: dict, tokenizer, vocab) -> None:
    """A one-line MMGenError unless the detokenizer of ``facts`` (:func:`pipeline_facts`) draws the
    code grids this bundle's LM writes (``vocab``) from the bundle's image tokenizer."""
    where = f"detokenizer {facts.get('path') or '(in memory)'}"
    if tokenizer is None:
        raise MMGenError(f"{where}: this checkpoint has no image tokenizer, so it writes no codes to draw")
    made_for = facts.get("tokenizer") or facts.get("tokenizer_type") or "another tokenizer"
    kind = getattr(tokenizer, "mmgen_type", "")
    fix = "; train one for this checkpoint: mmgen train-detokenizer tiny_detokenizer bundle=CHECKPOINT"
    if facts.get("tokenizer_type") and facts["tokenizer_type"] != kind:
        raise MMGenError(
            f"{where} was made for a {facts['tokenizer_type']} image tokenizer ({made_for}), "
            f"this checkpoint's is {kind}{fix}"
        )
    res = int(tokenizer.resolution[0])
    if int(facts.get("tokenizer_resolution") or res) != res:
        raise MMGenError(
            f"{where} was made for {facts['tokenizer_resolution']} px pictures ({made_for}), "
            f"this checkpoint's tokenizer draws {res} px{fix}"
        )
    sizes = dict(zip(grid_spec(tokenizer)[1], grid_spec(tokenizer)[0]))
    for name, n in zip(facts.get("grid_names", []), facts.get("codebook_sizes", [])):
        if not vocab.has(name):
            raise MMGenError(
                f"{where} draws from '{name}' codes, which this checkpoint's LM does not write "
                f"(it writes {', '.join(g for g in ('sem', 'pix') if vocab.has(g))}){fix}"
            )
        if sizes.get(name) != int(n):
            raise MMGenError(
                f"{where} was made for an image tokenizer with {n} '{name}' codes ({made_for}), "
                f"this checkpoint's has {sizes.get(name, 0)}{fix}"
            )
    sha = facts.get("tokenizer_sha256")
    if sha and sha != tokenizer.fingerprint():
        raise MMGenError(
            f"{where} was made for another image tokenizer ({made_for}, fingerprint {sha[:12]}; this "
            f"checkpoint's is {tokenizer.fingerprint()[:12]}): its codes mean other pictures{fix}"
        )


def add_detokenizer(bundle_dir: str | Path, pipeline_dir: str | Path) -> Path:
    """Copy a saved pipeline into ``bundle_dir/detokenizer/x{scale}/`` after checking it fits the
    bundle's image tokenizer and LM; returns the folder it went to."""
    from mmgen.models.bundle import check_bundle_dir
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers import load_image_tokenizer

    b = check_bundle_dir(bundle_dir)
    facts = pipeline_facts(pipeline_dir)
    tok = load_image_tokenizer(b / "image_tokenizer") if (b / "image_tokenizer").is_dir() else None
    check_fits(facts, tok, Vocab.load(b / "vocab.json"))
    DetokenizerSet({facts["scale"]: Path(pipeline_dir)}).save(b / DETOKENIZER_DIR)
    return b / DETOKENIZER_DIR / f"x{facts['scale']}"


__all__ = ["DETOKENIZER_DIR", "DetokenizerSet", "add_detokenizer", "check_fits", "grid_spec", "pipeline_facts"]
