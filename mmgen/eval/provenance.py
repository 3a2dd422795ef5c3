"""What a number needs to be reproduced: the checkpoint's hash, the sampling settings, the prompt set's
hash and the evaluator's version.

Sampling settings come, first to last: the caller's explicit values, the checkpoint's
``generation_config.json`` (transformers' ``GenerationConfig``; classifier-free guidance as
``guidance_scale``, ``do_sample: false`` meaning greedy), then the quick start's settings
(:class:`mmgen.quickstart.QuickstartConfig`), with which the quick start's own report was made.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mmgen.errors import MMGenError

# Bumped whenever a rule, a prompt generator or a summary changes what a number means.
EVALUATOR_VERSION = "1.0"

# Files whose bytes decide what a checkpoint generates: the LM's weights, the text tokenizer, the
# id layout and the media tokenizers' own weights and configs.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "config.json")
_MEDIA_DIRS = ("image_tokenizer", "audio_tokenizer")


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


def _generation_config(checkpoint: Path) -> dict:
    """The sampling keys a checkpoint's generation_config.json sets (those it leaves unset are absent).

    The file's own keys are read, not a loaded ``GenerationConfig``: a loaded one fills unset fields
    with defaults, and the report would then credit the file with values it never held."""
    import json

    from mmgen.models.bundle import read_generation_config

    if read_generation_config(checkpoint) is None:  # None without a file; a damaged one is a one-line error
        return {}
    d = json.loads((checkpoint / "generation_config.json").read_text())
    keys = ("do_sample", "temperature", "top_k", "top_p", "guidance_scale")
    return {k: d[k] for k in keys if d.get(k) is not None}


def sampling_settings(checkpoint: str | Path, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, cfg_scale: float | None = None, seed: int | None = None) -> dict:
    """The sampling settings an evaluation uses, each with where it came from (``sources``)."""
    from mmgen.quickstart import QuickstartConfig

    qs = QuickstartConfig()
    base = {"temperature": qs.temperature, "top_k": 0, "top_p": 1.0, "cfg_scale": qs.cfg_scale, "seed": qs.eval_seed}
    sources = {k: "quickstart" for k in base}
    gc = _generation_config(Path(checkpoint))
    from_file = {"temperature": gc.get("temperature"), "top_k": gc.get("top_k"), "top_p": gc.get("top_p"),
                 "cfg_scale": gc.get("guidance_scale")}
    if gc.get("do_sample") is False:
        from_file["temperature"] = 0.0
    for k, v in from_file.items():
        if v is not None:
            base[k], sources[k] = type(base[k])(v), "generation_config.json"
    for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale, "seed": seed}.items():
        if v is not None:
            base[k], sources[k] = type(base[k])(v), "explicit"
    return {**base, "sources": sources}
