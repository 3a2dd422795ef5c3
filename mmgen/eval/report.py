"""Reports a person reads: PNG grids of prompts, outputs and verdicts, and report.md / report.json."""

from __future__ import annotations

import json
from pathlib import Path

_PAD = 6
_FONT_SIZE = 12
_LINE = 15
_OK, _BAD, _INK, _FRAME = (0, 120, 0), (190, 0, 0), (20, 20, 20), (120, 120, 120)


def _font(size: int = _FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels, at spaces (a word longer than a line
    is split by characters); newlines in ``text`` are kept. Nothing is cut off."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if measure(cand, font=font) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while measure(word, font=font) > width and len(word) > 1:
                k = len(word)
                while k > 1 and measure(word[:k], font=font) > width:
                    k -= 1
                lines.append(word[:k])
                word = word[k:]
            line = word
        lines.append(line)
    return lines


def panel_grid(panels: list[dict], path: str | Path, cols: int = 6, cell: int = 112) -> Path:
    """A grid of framed panels. Each panel is ``{"images": [(label, PIL image), ...], "text": str,
    "verdict": str, "ok": bool | None, "tag": str}``: its images side by side under their labels, then
    the whole text wrapped to the panel's width, then the verdict in green (ok) or red."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    font = _font()
    n_img = max((len(p["images"]) for p in panels), default=1)
    pw = n_img * cell + (n_img + 1) * _PAD
    text_w = pw - 2 * _PAD
    bodies = []
    for p in panels:
        lines = wrap(p.get("text", ""), font, text_w) if p.get("text") else []
        head = [f"[{p['tag']}]"] if p.get("tag") else []
        verdict = wrap(p["verdict"], font, text_w) if p.get("verdict") else []
        bodies.append((head, lines, verdict))
    text_rows = max((len(h) + len(body) + len(v) for h, body, v in bodies), default=0)
    ph = _PAD + _LINE + cell + _PAD + text_rows * _LINE + _PAD
    cols = max(1, min(cols, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    grid = PILImage.new("RGB", (cols * (pw + _PAD) + _PAD, rows * (ph + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i, (p, (head, lines, verdict)) in enumerate(zip(panels, bodies)):
        x0, y0 = _PAD + (i % cols) * (pw + _PAD), _PAD + (i // cols) * (ph + _PAD)
        frame = _FRAME if p.get("ok") is None else (_OK if p["ok"] else _BAD)
        draw.rectangle([x0, y0, x0 + pw - 1, y0 + ph - 1], outline=frame, width=2)
        for j, (label, img) in enumerate(p["images"]):
            ix = x0 + _PAD + j * (cell + _PAD)
            draw.text((ix, y0 + _PAD - 2), label, fill=_INK, font=font)
            iy = y0 + _PAD + _LINE
            grid.paste(img.convert("RGB").resize((cell, cell), PILImage.NEAREST), (ix, iy))
            draw.rectangle([ix - 1, iy - 1, ix + cell, iy + cell], outline=_FRAME, width=1)
        ty = y0 + _PAD + _LINE + cell + _PAD
        for line in head:
            draw.text((x0 + _PAD, ty), line, fill=_FRAME, font=font)
            ty += _LINE
        for line in lines:
            draw.text((x0 + _PAD, ty), line, fill=_INK, font=font)
            ty += _LINE
        for line in verdict:
            draw.text((x0 + _PAD, ty), line, fill=frame if p.get("ok") is not None else _INK, font=font)
            ty += _LINE
    path = Path(path)
    grid.save(path)
    return path


def write_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# -- report.md ---------------------------------------------------------------------------------------
def _ci(p: dict) -> str:
    if not p or p.get("value") is None:
        return "n/a | | "
    lo, hi = p["ci95"]
    if "k" in p:
        return f"{100 * p['value']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {p['k']}/{p['n']}"
    return f"{p['value']:.2f} | [{lo:.2f}, {hi:.2f}] | {p['n']}"


def _rows(metrics: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and "ci95" in v:
            out.append(f"| {name} | {_ci(v)} |")
        elif isinstance(v, dict):
            out += _rows(v, f"{name}.")
    return out


def write_eval_markdown(report: dict, path: str | Path) -> Path:
    s = report["sampling"]
    lines = [
        "# mmgen eval report",
        "",
        f"Checkpoint `{report['checkpoint']['path']}`, sha256 `{report['checkpoint']['sha256'][:16]}…` "
        f"(weights and tokenizer files). Evaluator {report['evaluator']['version']}.",
        "",
        f"Sampling: temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, CFG scale "
        f"{s['cfg_scale']}, "
        f"seed {s['seed']} (from: " + ", ".join(f"{k} {v}" for k, v in s["sources"].items()) + ").",
        "",
        f"Generated pictures: {report.get('inference', {}).get('image_decoding', 'decoded by the image tokenizer')}.",
        "",
        "Every figure is a share of judged samples with its Wilson 95% interval and the counts behind it "
        "(PSNR and object recall: the mean with its normal 95% interval).",
        "",
    ]
    for name, e in report["suites"].items():
        lines += [
            f"## {name}",
            "",
            f"{e['samples']} samples; prompt set sha256 `{e['prompt_set']['sha256'][:16]}…`"
            + (f"; {e['resumed_batches']} batches reused from an earlier run" if e.get("resumed_batches") else "")
            + ".",
            "",
            "| metric | value | 95% CI | count |",
            "| --- | --- | --- | --- |",
        ]
        lines += _rows(e["metrics"])
        if e.get("forms"):  # the robust suite: each surface form with an example prompt
            lines += [
                "",
                "| form | accuracy (all objects) | 95% CI | count | example prompt |",
                "| --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {f} | {_ci(e['metrics'].get(f, {}).get('intervals', {}).get('all_objects'))} | `{p}` |"
                for f, p in e["forms"].items()
            ]
        if e.get("grid"):
            lines += ["", f"![{name}: prompts, outputs and verdicts]({e['grid']})"]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)
