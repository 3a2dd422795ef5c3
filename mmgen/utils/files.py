"""Reading and writing the small JSON files runs leave behind (eval.json, mmgen.json, stage and done markers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | Path, default: Any = None) -> Any:
    """The parsed JSON at ``path``, or ``default`` when there is no such file (a run that skipped
    the step that writes it)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` to ``path`` atomically (a temp name, then a rename): a done marker is either whole or
    absent, even after a crash. ``sort_keys=False`` keeps the dicts' order for readers that rely on it."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=sort_keys, ensure_ascii=False))
    os.replace(tmp, path)
