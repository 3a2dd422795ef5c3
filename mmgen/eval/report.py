"""Reports a person reads: a PNG grid of prompts and generated images, and report.md/report.json."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def image_grid(samples: list[dict], path: str | Path, cols: int = 6, cell: int = 128) -> Path:
    """A grid of generated images, each under its prompt and a ✓/✗ verdict of the scene parser."""
    from PIL import Image as PILImage, ImageDraw

    rows = max(1, -(-len(samples) // cols))
    caption_h = 64
    grid = PILImage.new("RGB", (cols * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, s in enumerate(samples):
        x, y = (i % cols) * cell, (i // cols) * (cell + caption_h)
        grid.paste(s["image"].convert("RGB").resize((cell, cell), PILImage.NEAREST), (x, y))
        verdict = "OK" if s.get("all_objects") else ("unparsed" if not s.get("parsed") else "wrong")
        lines = textwrap.wrap(s["prompt"], width=cell // 6)[:4] + [f"[{s.get('split', '')}] {verdict}"]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + 12 * k), line, fill="black" if k < len(lines) - 1 else
                      ((0, 128, 0) if verdict == "OK" else (200, 0, 0)))
    path = Path(path)
    grid.save(path)
    return path


def pairs_grid(pairs: list[tuple], path: str | Path, cell: int = 96) -> Path:
    """Originals (top row) over reconstructions (bottom row)."""
    from PIL import Image as PILImage

    grid = PILImage.new("RGB", (len(pairs) * cell, 2 * cell), "white")
    for i, (a, b) in enumerate(pairs):
        grid.paste(a.convert("RGB").resize((cell, cell), PILImage.NEAREST), (i * cell, 0))
        grid.paste(b.convert("RGB").resize((cell, cell), PILImage.NEAREST), (i * cell, cell))
    grid.save(path)
    return Path(path)


def write_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))
