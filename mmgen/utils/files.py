"""Reading the small JSON files runs leave behind (eval.json, mmgen.json, stage markers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, default: Any = None) -> Any:
    """The parsed JSON at ``path``, or ``default`` when there is no such file (a run that skipped
    the step that writes it)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default
