"""Where the recipe folders live (tokenizers/, data_pipelines/, training/, inference/, eval/).

Recipes are YAML and shell files beside the package in the repository, not inside it: users copy and
edit them (torchtune's split). A recipe argument may be a path or a bare name looked up here."""

from __future__ import annotations

import glob
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
    raise MMGenError(
        f"recipe '{name_or_path}' not found (a file path, or one of {folder}/: {', '.join(known) or 'none'})"
    )


def is_errors_file(path: str) -> bool:
    """Quarantine files written by ``convert`` beside its output; never read back as data."""
    name = os.path.basename(path)
    return name == "errors.jsonl" or name.endswith(".errors.jsonl")


def expand_inputs(pattern: str | os.PathLike | list | tuple, exts: tuple[str, ...] = (".tar", ".jsonl")) -> list[str]:
    """Input files from a path, a directory (its files ending in ``exts``), a glob, or a list of these.

    Quarantine files (``errors.jsonl``) are never data. Nothing found is a one-line error, raised here
    rather than at the first read so that a typo fails before any work starts."""
    if isinstance(pattern, (list, tuple)):
        return [p for item in pattern for p in expand_inputs(item, exts)]
    pattern = os.path.expanduser(str(pattern))
    if os.path.isdir(pattern):
        found = sorted(p for e in exts for p in glob.glob(os.path.join(glob.escape(pattern), "*" + e)))
        found = [p for p in found if not is_errors_file(p)]
    elif any(c in pattern for c in "*?["):
        found = sorted(glob.glob(pattern))
    else:
        found = [pattern] if os.path.isfile(pattern) else []
    if not found:
        example = "dir/*" + (exts[0] if exts else "")
        raise MMGenError(f"no input files match '{pattern}' (give a file, a directory or a glob such as '{example}')")
    return found
