"""What a number needs to be reproduced: the checkpoint's hash, the sampling settings, the prompt set's
hash and the evaluator's version.

Sampling settings are the ones ``mmgen generate`` uses (:func:`mmgen.inference.settings.bundle_sampling`'s
rules): the caller's explicit values, else the checkpoint's ``generation_config.json`` (transformers'
``GenerationConfig``; classifier-free guidance as ``guidance_scale``, ``do_sample: false`` meaning greedy),
else the quick start's evaluated settings (:data:`mmgen.inference.settings.DEFAULT_SAMPLING`), with
which the quick start's own report was made.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mmgen.errors import MMGenError

# Bumped whenever a rule, a prompt generator or a summary changes what a number means.
EVALUATOR_VERSION = "1.0"

# The sampling seed of an evaluation not given one (the quick start's report uses it too).
DEFAULT_EVAL_SEED = 0

# Files whose bytes decide what a checkpoint generates: the LM's weights, the text tokenizer, the
# id layout, the media tokenizers' own weights and configs, and the detokenizers that draw its pictures.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "config.json",
)
_MEDIA_DIRS = ("image_tokenizer", "audio_tokenizer", "detokenizer")


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    p = Path(checkpoint)
    files = sorted(p.glob("model*.safetensors")) + [p / f for f in _TOKENIZER_FILES if (p / f).is_file()]
    for d in _MEDIA_DIRS:
        if (p / d).is_dir():
            files += sorted(f for f in (p / d).rglob("*") if f.is_file())
    return files


def checkpoint_hash(checkpoint: str | Path) -> dict:
    """sha256 over the checkpoint's weights and tokenizer files (each file's relative path and bytes)."""
    p = Path(checkpoint)
    files = checkpoint_files(p)
    if not any(f.suffix == ".safetensors" and f.parent == p for f in files):
        raise MMGenError(f"{p} holds no model*.safetensors: not a checkpoint directory")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return {"sha256": h.hexdigest(), "files": [str(f.relative_to(p)) for f in files]}


def prompt_set_hash(items) -> str:
    """sha256 of a prompt set in canonical JSON (prompts together with the truth they are judged against)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


# Which of a generation config's keys decide each setting: the file is credited with a setting only
# when it holds one of them (do_sample decides the temperature: false is greedy, true without a
# temperature is transformers' 1).
_FILE_KEYS = {
    "temperature": ("do_sample", "temperature"),
    "top_k": ("top_k",),
    "top_p": ("top_p",),
    "cfg_scale": ("guidance_scale",),
}


def sampling_settings(
    checkpoint: str | Path,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
) -> dict:
    """The sampling settings an evaluation uses, each with where it came from (``sources``): the
    settings ``mmgen generate`` uses for the same checkpoint and options
    (:class:`~mmgen.inference.settings.SamplingSettings`, checked), plus the evaluation's seed."""
    from mmgen.inference.settings import SamplingSettings
    from mmgen.models.bundle import GENERATION_CONFIG, read_generation_config

    # A loaded GenerationConfig leaves every sampling field the file does not hold at None, so the
    # file is credited only with the keys it holds.
    gc = read_generation_config(checkpoint)  # None without a file; a damaged one is a one-line error
    base = SamplingSettings.from_generation_config(gc)
    explicit = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale}
    s = base.override(**explicit)
    sources = {
        k: "explicit"
        if explicit[k] is not None
        else GENERATION_CONFIG
        if gc is not None and any(getattr(gc, f, None) is not None for f in fks)
        else "quickstart"
        for k, fks in _FILE_KEYS.items()
    }
    sources["seed"] = "explicit" if seed is not None else "quickstart"
    return {
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "cfg_scale": s.cfg_scale,
        "seed": int(seed) if seed is not None else DEFAULT_EVAL_SEED,
        "sources": sources,
    }
