"""Where the recipe folders live (tokenizers/, data_pipelines/, training/, inference/, eval/).

Recipes are YAML and shell files beside the package in the repository, not inside it: users copy and
edit them (torchtune's split). A recipe argument may be a path or a bare name looked up here."""

from __future__ import annotations

import os
from pathlib import Path

from mmgen.errors import MMGenError

REPO_ROOT = Path(__file__).resolve().parents[1]


def recipe_path(name_or_path: str | os.PathLike, folder: str, suffix: str = ".yaml") -> Path:
    """``name_or_path`` if it exists, else ``<repo>/<folder>/<name><suffix>``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = REPO_ROOT / folder / (p.name if p.suffix else p.name + suffix)
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in (REPO_ROOT / folder).glob(f"*{suffix}")) if (REPO_ROOT / folder).is_dir() else []
    raise MMGenError(f"recipe '{name_or_path}' not found (a file path, or one of {folder}/: {', '.join(known) or 'none'})")
