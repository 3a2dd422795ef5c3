"""The chat's "speed" panel and the statistics shown under each answer.

The panel is built from :data:`SPEED_CONTROLS`, a declared list of ``(GenerationOptions field, label,
control kind)``: each entry becomes one Gradio control whose value reaches the pipeline as that field
(checked like any ``key=value`` option, :meth:`GenerationOptions.build
<mmgen.inference.pipeline.GenerationOptions.build>`), so a new generation option reaches the chat with
one line here. Kinds: ``slider`` (``args`` = minimum, maximum, step), ``number``, ``checkbox`` and
``dropdown`` (``args`` = the choices: values, or (label, value) pairs). ``none_at`` is the control value
that means the field's None (e.g. a budget of 0 = unlimited); ``needs`` names what the bundle must have
for the control to act (``detokenizer``), otherwise it is shown greyed out.

Under each answer the chat shows what the answer cost, from the finished Doc's meta
(:func:`answer_stats`): forward passes, tokens/s (new tokens over the answer's seconds) and the KV
cache's bytes; under each picture, which decoder drew it (:func:`picture_caption`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mmgen.errors import MMGenError
from mmgen.inference.kv_cache import METHODS as KV_METHODS
from mmgen.inference.prune import PRUNE_METHODS

KINDS = ("slider", "number", "checkbox", "dropdown")


@dataclass(frozen=True)
class SpeedControl:
    field: str  # a GenerationOptions field
    label: str
    kind: str  # one of KINDS
    args: tuple = ()  # slider: (minimum, maximum, step); dropdown: the choices (values or (label, value) pairs)
    none_at: Any = None  # the control value that stands for the field's None
    needs: str = ""  # "detokenizer": acts only when the bundle's pictures are drawn by one
    max_from: str = ""  # "layers": a slider's maximum is the model's last layer index (depth - 1)


SPEED_CONTROLS = (
    SpeedControl("prune_method", "pruning of the picture you show (prefill)", "dropdown", PRUNE_METHODS),
    SpeedControl("prune_ratio", "pruning: share of the picture's tokens kept", "slider", (0.05, 1.0, 0.05)),
    SpeedControl("prune_layer", "pruning: layer K (fastv, text, pyramid)", "slider", (1, 1, 1), max_from="layers"),
    SpeedControl(
        "cache",
        "KV cache (fp8: transformers' QuantizedCache, a quarter of float32's bytes)",
        "dropdown",
        ("dynamic", "fp8"),
    ),
    SpeedControl(
        "kv_method", "KV compression (snapkv, h2o: by attention; streaming: sinks + recent)", "dropdown", KV_METHODS
    ),
    SpeedControl("kv_budget", "KV budget: entries per layer and head (0: unlimited)", "number", none_at=0),
    SpeedControl("spec_decoding", "speculative Jacobi decoding of pictures (same distribution)", "checkbox"),
    SpeedControl("spec_window", "speculative decoding: drafts verified per pass", "slider", (1, 32, 1)),
    SpeedControl("detok_steps", "detokenizer steps", "slider", (1, 50, 1), needs="detokenizer"),
    SpeedControl(
        "detok_scheduler",
        "detokenizer sampler",
        "dropdown",
        (("the saved one", "saved"), ("DDIM", "ddim"), ("DPM-Solver++", "dpm"), ("DDPM", "ddpm")),
        none_at="saved",
        needs="detokenizer",
    ),
)


def check_controls(controls=SPEED_CONTROLS) -> None:
    """Every control names a GenerationOptions field and a known kind (a one-line MMGenError otherwise)."""
    from mmgen.inference.pipeline import GenerationOptions

    names = {f.name for f in fields(GenerationOptions)}
    for c in controls:
        if c.field not in names:
            raise MMGenError(f"speed control '{c.label}' names '{c.field}', which is not a generation option")
        if c.kind not in KINDS:
            raise MMGenError(f"speed control '{c.label}' has kind '{c.kind}' (use one of: {', '.join(KINDS)})")


def build_speed_panel(
    gr, defaults, available: dict[str, bool], limits: dict[str, int] | None = None, controls=SPEED_CONTROLS
) -> list:
    """One Gradio component per control, in order, starting at ``defaults`` (GenerationOptions); call it
    inside the panel's ``gr.Accordion``. ``available[needs]`` False greys a control out; ``limits[max_from]``
    is a slider's maximum (its value is clamped to it)."""
    check_controls(controls)
    out = []
    for c in controls:
        value = getattr(defaults, c.field)
        value = c.none_at if value is None else value
        on = available.get(c.needs, True) if c.needs else True
        label = c.label if on else f"{c.label} (this checkpoint has no {c.needs})"
        common = {"label": label, "interactive": on, "elem_id": f"speed-{c.field}"}
        if c.kind == "slider":
            lo, hi, step = c.args
            if c.max_from and (limits or {}).get(c.max_from) is not None:
                hi = max(lo, limits[c.max_from])
                value = min(max(value, lo), hi)
            if hi > lo:
                out.append(gr.Slider(lo, hi, value=value, step=step, **common))
            else:  # one allowed value (a 2-layer model's K): Gradio's slider needs a range
                out.append(gr.Number(value=value, minimum=lo, maximum=hi, step=step, **common))
        elif c.kind == "number":
            out.append(gr.Number(value=value, **common))
        elif c.kind == "checkbox":
            out.append(gr.Checkbox(value=bool(value), **common))
        else:
            out.append(gr.Dropdown(choices=list(c.args), value=value, **common))
    return out


def speed_options(values, controls=SPEED_CONTROLS) -> dict:
    """The panel's values as GenerationOptions fields (``none_at`` -> None); values left None (an API
    call that skips the panel) keep the option's default."""
    out = {}
    for c, v in zip(controls, values):
        if v is None:
            continue
        out[c.field] = None if c.none_at is not None and v == c.none_at else v
    return out


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def answer_stats(meta: dict) -> str | None:
    """The line under a finished answer: new tokens, forward passes, tokens/s, KV bytes and, when pictures were
    decoded speculatively, picture tokens per pass; None while
    the answer is still growing (the statistics are written when it finishes)."""
    if "forward_passes" not in meta:
        return None
    parts = [f"{meta.get('new_tokens', 0)} tokens", f"{meta['forward_passes']} forward passes"]
    if meta.get("tokens_per_s") is not None:
        parts.append(f"{meta['tokens_per_s']:.1f} tokens/s")
    cache = meta.get("cache") or {}
    if "bytes" in cache:
        parts.append(f"KV cache {_bytes(cache['bytes'])} ({cache.get('kind', '')})")
    spec = meta.get("spec")
    if spec and spec.get("passes"):
        parts.append(f"{spec['tokens'] / spec['passes']:.2f} picture tokens per pass")
    return "*" + " · ".join(parts) + "*"


def picture_caption(image_meta: dict) -> str | None:
    """The line under a generated picture: which decoder drew it (None for a picture without that fact)."""
    from mmgen.inference.detokenize import decoder_label

    if "decoder" not in image_meta:
        return None
    return f"*drawn by the {decoder_label(image_meta['decoder'])}*"


__all__ = [
    "KINDS",
    "SPEED_CONTROLS",
    "SpeedControl",
    "answer_stats",
    "build_speed_panel",
    "check_controls",
    "picture_caption",
    "speed_options",
]
