"""The shape of the code base: no module reaches into another's private names, tests share helpers
through their helper modules only, and every module of mmgen stays short or says why it is not.

(The one-way chain of packages is import-linter's contract in pyproject.toml, which `make test` runs.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
# A module longer than MAX_LINES says why in its docstring, in a paragraph that starts with this.
LONG_MODULE_MARKER = "Kept as one module:"


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (ROOT / d).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "tests":
        parts = parts[1:]  # pytest puts tests/ itself on sys.path
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(source: str, module: str) -> list[str]:
    """``from other import _name`` statements in the source of ``module`` (its own names excepted)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module not in (module, "__future__"):
            out += [
                f"{module}:{node.lineno} imports {a.name} from {node.module}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return out


def test_no_module_imports_a_private_name_of_another():
    files = _python_files("mmgen", "tests", "benchmarks")
    found = [x for p in files for x in private_imports(p.read_text(), _module_name(p))]
    assert found == []


def test_the_private_import_check_sees_one():
    source = (
        "import os\n\ndef f():\n    from mmgen.data.media import _hidden, decode_image\n    from os import __all__\n"
    )
    assert private_imports(source, "mmgen.data.fetch") == ["mmgen.data.fetch:4 imports _hidden from mmgen.data.media"]
    assert private_imports(source, "mmgen.data.media") == []


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    found = []
    for p in _python_files("tests"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            found += [f"{p.name}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in tests]
    assert found == []


def test_modules_are_short_or_say_why():
    long = []
    for p in _python_files("mmgen"):
        text = p.read_text()
        n = text.count("\n")
        if n > MAX_LINES and LONG_MODULE_MARKER not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{p.relative_to(ROOT)}: {n} lines")
    assert long == []
