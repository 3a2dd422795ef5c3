"""The sampling settings a bundle was evaluated with, saved beside it as ``generation_config.json``.

The file is transformers' own (:class:`transformers.GenerationConfig`, which ``save_pretrained`` of the
model already writes with the bos/eos/pad ids): ``do_sample``, ``temperature``, ``top_k``, ``top_p`` and
classifier-free guidance as transformers' ``guidance_scale``. The quick start writes the settings its
evaluation used; ``mmgen generate``, ``mmgen chat`` and the evaluation functions start from them, and
an option the caller sets wins over the file.

A bundle without these keys (older bundles, or a model saved with transformers' defaults only) gets
:data:`DEFAULT_SAMPLING`, the quick start's evaluated settings -- never transformers' temperature 1.0:
one token decides a ShapesWorld cell's object, and the quick start chose 0.2 on prompts its report does
not use (t2i 0.76 at temperature 1 against 0.88 at 0.2; QuickstartConfig, docs/experiments/2026-12-06-code-blocks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.models.bundle import GENERATION_CONFIG, read_generation_config


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn: ``temperature`` 0 is greedy, ``top_k`` 0 and ``top_p`` 1 are off,
    ``cfg_scale`` 1 turns classifier-free guidance off."""

    temperature: float = 0.2
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0

    def check(self) -> SamplingSettings:
        if self.temperature < 0:
            raise MMGenError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MMGenError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MMGenError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.cfg_scale < 1.0:
            raise MMGenError(f"cfg_scale must be >= 1 (1 turns guidance off), got {self.cfg_scale}")
        return self

    def override(self, temperature=None, top_k=None, top_p=None, cfg_scale=None) -> SamplingSettings:
        """These settings with every argument that is not None put in their place, checked."""
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale}
        cast = {"temperature": float, "top_k": int, "top_p": float, "cfg_scale": float}
        return replace(self, **{k: cast[k](v) for k, v in given.items() if v is not None}).check()

    def to_generation_config(self, base=None):
        """A ``transformers.GenerationConfig`` holding these settings (on top of ``base``'s other fields)."""
        from transformers import GenerationConfig

        gc = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
        gc.do_sample = self.temperature > 0
        # Greedy decoding has no temperature, top-k or top-p: transformers rejects them beside do_sample=False.
        gc.temperature = self.temperature if gc.do_sample else None
        gc.top_k = self.top_k if gc.do_sample else None
        gc.top_p = self.top_p if gc.do_sample else None
        gc.guidance_scale = self.cfg_scale
        return gc

    @classmethod
    def from_generation_config(cls, gc) -> SamplingSettings:
        """The settings a GenerationConfig holds (None holds none). One that sets none of do_sample / temperature /
        top_k / top_p gets :data:`DEFAULT_SAMPLING`'s (guidance_scale still read); otherwise an unset
        field means what it means to transformers' sampling: temperature 1, top-k and top-p off."""
        get = lambda k: getattr(gc, k, None)  # noqa: E731
        cfg = float(_or(get("guidance_scale"), DEFAULT_SAMPLING.cfg_scale))
        if all(get(k) is None for k in ("do_sample", "temperature", "top_k", "top_p")):
            return replace(DEFAULT_SAMPLING, cfg_scale=cfg).check()
        if get("do_sample") is False:
            return cls(temperature=0.0, cfg_scale=cfg).check()
        return cls(
            temperature=float(_or(get("temperature"), 1.0)),
            top_k=int(_or(get("top_k"), 0)),
            top_p=float(_or(get("top_p"), 1.0)),
            cfg_scale=cfg,
        ).check()


def _or(v, fallback):
    return fallback if v is None else v


# The quick start's evaluated settings (QuickstartConfig: temperature 0.2, no guidance, no top-k/top-p).
DEFAULT_SAMPLING = SamplingSettings()


def load_generation_config(bundle_dir: str | Path):
    """The ``transformers.GenerationConfig`` a bundle's generation uses by default: its
    ``generation_config.json`` with any unset sampling field filled from :data:`DEFAULT_SAMPLING`
    (all of them when the file is missing). A corrupt file is a one-line :class:`MMGenError`."""
    gc = read_generation_config(bundle_dir)
    return SamplingSettings.from_generation_config(gc).to_generation_config(base=gc)


def save_generation_config(bundle_dir: str | Path, settings: SamplingSettings) -> Path:
    """Write ``settings`` into the bundle's ``generation_config.json``, keeping its other fields."""
    gc = settings.check().to_generation_config(base=read_generation_config(bundle_dir))
    gc.save_pretrained(bundle_dir)
    return Path(bundle_dir) / GENERATION_CONFIG


def bundle_sampling(bundle, temperature=None, top_k=None, top_p=None, cfg_scale=None) -> SamplingSettings:
    """The settings one generation call uses: the bundle's own (its model's ``generation_config``, which
    transformers loaded from ``generation_config.json``), with every argument that is not None in its place."""
    gc = getattr(bundle.model, "generation_config", None)
    base = SamplingSettings.from_generation_config(gc)
    return base.override(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
