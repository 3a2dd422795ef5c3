"""Generated pictures drawn by the diffusion detokenizer instead of the image tokenizer's decoder.

When a bundle has a detokenizer (its ``detokenizer/`` folder, :mod:`mmgen.models.detokenizer_set`) or
the caller names one, every image block generation closes is drawn from its codes by that diffusers
pipeline (:class:`~mmgen.models.detokenizer.CodeDetokenizerPipeline`): ``mmgen generate``, ``mmgen
chat`` and ``mmgen eval run`` alike. The options are :class:`~mmgen.inference.pipeline.GenerationOptions`'
``detok_*`` block:

- ``detok_path``: ``auto`` (the bundle's detokenizer when it has one, else the tokenizer's decoder),
  ``none`` (the tokenizer's decoder), or a directory (one pipeline, or a folder of ``x1/``, ``x2/``);
- ``detok_steps``: denoising steps (>= 1); ``detok_cfg_scale``: the detokenizer's classifier-free
  guidance (>= 1, 1 = off); ``detok_scheduler``: ``ddim``, ``dpm`` (DPM-Solver++) or ``ddpm`` in place
  of the saved sampler; ``detok_scale``: 1, or 2 for the 2x super-resolution pipeline.

Each picture's item meta says which decoder drew it (``meta['decoder']``, :func:`decoder_label` makes
it a phrase), and the Doc's meta the decoder of the call (``meta['image_decoder']``). A detokenizer
made for another image tokenizer, or for code grids the LM does not write, is a one-line MMGenError
before anything is generated (:func:`mmgen.models.detokenizer_set.check_fits`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmgen.errors import MMGenError

SCALES = (1, 2)
DETOK_SCHEDULERS = ("ddim", "dpm", "ddpm")
# Detokenizers are shared by every answer of a chat server; one draws at a time, with its own sampler.
_SAMPLING = threading.Lock()


def check_detok_options(options, bundle=None) -> None:
    """One-line MMGenErrors for ``options``' detok_* fields; with ``bundle``, also whether the chosen
    detokenizer fits it (:func:`image_decoder` runs the same checks)."""
    o = options
    if o.detok_steps < 1:
        raise MMGenError(f"detok_steps must be >= 1, got {o.detok_steps}")
    if o.detok_cfg_scale < 1:
        raise MMGenError(
            f"detok_cfg_scale must be >= 1 (1 turns the detokenizer's guidance off), got {o.detok_cfg_scale}"
        )
    if o.detok_scale not in SCALES:
        raise MMGenError(f"detok_scale must be 1 or 2 (2x super-resolution), got {o.detok_scale}")
    if o.detok_scheduler is not None and o.detok_scheduler not in DETOK_SCHEDULERS:
        raise MMGenError(
            f"unknown detok_scheduler '{o.detok_scheduler}' (use one of: {', '.join(DETOK_SCHEDULERS)}, "
            "or leave it out for the saved one)"
        )
    path = str(o.detok_path or "auto")
    if path not in ("auto", "none") and not Path(path).is_dir():
        raise MMGenError(f"detokenizer directory {path} does not exist (detok_path: auto, none or a directory)")
    if path == "none" and o.detok_scale != 1:
        raise MMGenError(f"detok_scale {o.detok_scale} needs a detokenizer, and detok_path is none")
    if bundle is not None:
        _chosen(bundle, o)


def _chosen(bundle, options):
    """(DetokenizerSet, facts) of the detokenizer ``options`` choose for ``bundle``, or None; checked."""
    from mmgen.models.detokenizer_set import check_fits

    detoks = detokenizer_for(bundle, options)
    if detoks is None:
        if options.detok_scale != 1:  # (detok_path none with a scale is refused before, without the bundle)
            raise MMGenError(
                f"detok_scale {options.detok_scale} needs a detokenizer: this checkpoint has none "
                "(give one with --detokenizer DIR)"
            )
        return None
    facts = detoks.facts(options.detok_scale)
    check_fits(facts, bundle.image_tokenizer, bundle.vocab)
    return detoks, facts


def detokenizer_for(bundle, options):
    """The :class:`~mmgen.models.detokenizer_set.DetokenizerSet` ``options`` choose for ``bundle`` (None:
    the image tokenizer's decoder draws), unchecked."""
    from mmgen.models.bundle import can_draw

    path = str(options.detok_path or "auto")
    if path == "none":
        return None
    if path == "auto":
        return getattr(bundle, "detokenizer", None) if can_draw(bundle) else None
    return _from_dir(path)


_DIRS: dict[str, object] = {}


def _from_dir(path: str):
    """A detokenizer named by directory, read once per process (the chat asks on every answer)."""
    from mmgen.models.detokenizer_set import DetokenizerSet

    key = str(Path(path).resolve())
    if key not in _DIRS:
        _DIRS[key] = DetokenizerSet.from_dir(path)
    return _DIRS[key]


class DetokenizerDecoder:
    """Draws parsed image blocks with one detokenizer pipeline at fixed settings; its own seeded noise,
    so the same call draws the same pictures."""

    def __init__(self, pipe, facts: dict, steps: int, cfg_scale: float, scheduler: str | None = None, seed: int = 0):
        import torch

        self.pipe, self.facts = pipe, facts
        self.steps, self.cfg_scale, self.scheduler = int(steps), float(cfg_scale), scheduler
        self.grid_names = list(facts["grid_names"])
        self.generator = torch.Generator().manual_seed(int(seed))
        self.info = {
            "kind": "detokenizer",
            "scale": int(facts["scale"]),
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "scheduler": scheduler or _short_name(pipe.scheduler),
            "path": facts.get("path", ""),
        }

    def decode(self, parsed: Sequence[dict]) -> list:
        """PIL images of parsed image blocks (:meth:`Vocab.parse_image_block`), one pipeline call per grid shape."""
        import torch

        from mmgen.models.detokenizer import make_scheduler

        out: list = [None] * len(parsed)
        by_shape: dict[tuple, list[int]] = {}
        for r, p in enumerate(parsed):
            by_shape.setdefault(np.asarray(p["pix"]).shape, []).append(r)
        for idx in by_shape.values():
            grids = [
                torch.from_numpy(np.stack([np.asarray(parsed[r][name]) for r in idx])).long()
                for name in self.grid_names
            ]
            with _SAMPLING:
                saved = self.pipe.scheduler
                if self.scheduler:
                    self.pipe.scheduler = make_scheduler(self.scheduler, dict(saved.config))
                try:
                    images = self.pipe(
                        grids, num_inference_steps=self.steps, guidance_scale=self.cfg_scale, generator=self.generator
                    ).images
                finally:
                    self.pipe.scheduler = saved
            for r, pil in zip(idx, images):
                out[r] = pil
        return out


def _short_name(scheduler) -> str:
    name = type(scheduler).__name__
    return {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm", "DDPMScheduler": "ddpm"}.get(name, name)


def image_decoder(bundle, options, device=None) -> DetokenizerDecoder | None:
    """The decoder ``options`` choose for ``bundle``'s pictures: a :class:`DetokenizerDecoder`, or None
    for the image tokenizer's own decoder. Checked first (:func:`check_detok_options`)."""
    check_detok_options(options)
    chosen = _chosen(bundle, options)
    if chosen is None:
        return None
    detoks, facts = chosen
    if device is None:
        device = str(next(bundle.model.parameters()).device)
    pipe = detoks.pipeline(options.detok_scale, tokenizer=bundle.image_tokenizer, device=device)
    return DetokenizerDecoder(
        pipe, facts, options.detok_steps, options.detok_cfg_scale, options.detok_scheduler, seed=options.seed
    )


def decoder_label(info: dict | None) -> str:
    """A decoder's item meta (``meta['decoder']``) as a phrase for people, e.g. ``diffusion
    detokenizer 1x, ddim 4 steps, CFG off``."""
    if not info:
        return "image tokenizer's decoder"
    if info.get("kind") == "detokenizer":
        cfg = f"{info['cfg_scale']:g}" if info.get("cfg_scale", 1) != 1 else "off"
        return f"diffusion detokenizer {info['scale']}x, {info['scheduler']} {info['steps']} steps, CFG {cfg}"
    return f"image tokenizer's decoder ({info.get('tokenizer') or 'codes'})"


__all__ = [
    "DETOK_SCHEDULERS",
    "DetokenizerDecoder",
    "SCALES",
    "check_detok_options",
    "decoder_label",
    "detokenizer_for",
    "image_decoder",
]
