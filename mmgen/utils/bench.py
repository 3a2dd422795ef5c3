"""Shared plumbing of the scripts in ``benchmarks/``: one section of BENCHMARKS.md per script.

Each benchmark script measures a baseline and mmgen side by side in one run and then calls
:func:`write_section` with its markdown. The section sits between ``<!-- bench:NAME -->`` markers,
so scripts rerun independently and never overwrite each other's results.
"""

from __future__ import annotations

import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
_HEADER = (
    "# Benchmarks\n\n"
    "Every number here was produced by the script named in its section, on the machine it names, with\n"
    "the baseline and mmgen measured side by side in the same run. Speed is reported as a ratio: the\n"
    "machines are shared and noisy, so absolute seconds move between runs while ratios hold.\n"
)


def machine_line() -> str:
    import os

    try:
        import torch

        tv = torch.__version__
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    except ImportError:
        tv, dev = "n/a", f"CPU, {os.cpu_count()} cores"
    return f"{dev}; Python {platform.python_version()}; torch {tv}; {time.strftime('%Y-%m-%d')}"


def command_line() -> str:
    """The command that produced the numbers, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def write_section(name: str, title: str, body: str, path: Path = BENCHMARKS_MD, command: str | None = None) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body`` under ``title``. ``command``
    is what reproduces the numbers (default: this process's command line; a script that rewrites its
    section from saved results passes the command of the run that measured them)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = (
        f"{start}\n## {title}\n\nCommand: `{command or command_line()}`  \nMachine: {machine_line()}\n\n"
        f"{body.strip()}\n{end}"
    )
    text = path.read_text() if path.is_file() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(with_contents(text))


_TOC = ("<!-- contents -->", "<!-- /contents -->")


def heading_anchor(title: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def with_contents(text: str) -> str:
    """``text`` with its table of contents (one link per section title) rewritten, or added before the
    first section."""
    titles = re.findall(r"^## (.+)$", text, re.M)
    toc = "\n".join([_TOC[0], "Contents:", "", *(f"- [{t}](#{heading_anchor(t)})" for t in titles), _TOC[1]])
    pattern = re.compile(re.escape(_TOC[0]) + r".*?" + re.escape(_TOC[1]), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: toc, text)
    first = text.find("<!-- bench:")
    return text + "\n" + toc + "\n" if first < 0 else text[:first] + toc + "\n\n" + text[first:]


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
