"""Lossless converters between :class:`~mmgen.data.doc.Doc` and the interleaved corpora formats.

Every format but LLaVA holds any Doc: ``Doc -> X -> Doc`` keeps item order, texts, media bytes or
references (URLs stay URLs; a fetched medium keeps its URL), every item's and the document's metadata.
LLaVA holds conversations only: writing another Doc there refuses with a one-line error unless
``lossy=True`` (``mmgen convert --lossy``).

=========  ===================================================================================
name       layout
=========  ===================================================================================
obelics    OBELICS / OmniCorpus jsonl: parallel ``texts`` / ``images`` lists, ``metadata``
mmc4       MMC4 jsonl: ``text_list`` + ``image_info[].matched_text_index``
dj         Data-Juicer jsonl: ``text`` with ``<__dj__image>`` ... placeholders + media path lists
llava      LLaVA / ShareGPT conversations (``.jsonl`` or a ``.json`` array)
wds        mmgen WebDataset shards (a ``.tar``, a directory of shards or a glob)
mmgen      jsonl of :meth:`Doc.to_json` lines, media by path
=========  ===================================================================================

Readers never raise on a bad record: they yield :class:`~mmgen.data.doc.BadRecord` with a reason
(``bad_json``, ``bad_schema``, ``media_count_mismatch``, ``missing_media``) and go on. Writers of the
jsonl formats copy media bytes into ``media/`` beside the output, named by content hash, and reference
them by relative path, so nothing is lost; a URL that was never downloaded stays a URL.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mmgen.data.doc import BadRecord, Doc
from mmgen.data.formats.common import checked_media, checked_media_root, expand_jsonl_inputs
from mmgen.data.media import set_max_image_pixels
from mmgen.errors import LossyConversionError, MMGenError

_MODULES = {"obelics": "obelics", "mmc4": "mmc4", "dj": "dj", "llava": "llava", "wds": "wds", "mmgen": "native"}
FORMATS: list[str] = list(_MODULES)
_ALIASES = {
    "omnicorpus": "obelics",
    "data-juicer": "dj",
    "datajuicer": "dj",
    "sharegpt": "llava",
    "webdataset": "wds",
    "jsonl": "mmgen",
}
# Formats whose output is a directory rather than one file.
DIR_FORMATS = {"wds"}


def format_module(fmt: str):
    """The converter module for ``fmt``; an unknown name raises MMGenError naming the closest one."""
    name = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if name not in _MODULES:
        close = difflib.get_close_matches(str(fmt).lower(), FORMATS + list(_ALIASES), n=1)
        hint = f"did you mean '{_ALIASES.get(close[0], close[0])}'? " if close else ""
        raise MMGenError(f"unknown format '{fmt}': {hint}known formats: {', '.join(FORMATS)}")
    return importlib.import_module(f"mmgen.data.formats.{_MODULES[name]}")


def _path_map(path_map) -> dict[str, str]:
    """``{"old/": "new/"}`` or ``["old/=new/", ...]`` -> dict."""
    if not path_map:
        return {}
    if isinstance(path_map, dict):
        return {str(k): str(v) for k, v in path_map.items()}
    out = {}
    for entry in [path_map] if isinstance(path_map, str) else path_map:
        if "=" not in entry:
            raise MMGenError(f"path map entry '{entry}' needs the form OLD_PREFIX=NEW_PREFIX")
        old, new = entry.split("=", 1)
        out[old] = new
    return out


def read_records(
    path, fmt: str, media_root: str | None = None, path_map=None, allow_outside_root: bool = False, **opts
) -> Iterator[Doc | BadRecord]:
    """Docs (or BadRecords, never an exception for a bad record) from ``path`` in format ``fmt``.

    ``media_root``: where relative media references live when they do not resolve against the input
    file's folder (leading folders of a reference are dropped until a file is found there).
    ``path_map``: prefix rewrites applied to media references first, e.g. ``{"../../tests/ops/data/": "/data/"}``.
    Media paths stay inside the input's folder, ``media_root`` and the ``path_map`` targets: a record
    naming a file elsewhere is a BadRecord ``path_outside_root`` unless ``allow_outside_root``.
    An unknown format or a missing input raises MMGenError (an unusable argument, not a bad record)."""
    module = format_module(fmt)
    checked_media_root(media_root)  # fail now; records keep naming the folder as given
    if module.__name__.endswith(".wds"):
        module.expand_shards(path)  # fail now, not at the first next(), on a missing input
        return module.read(path, media_root=media_root, allow_outside_root=allow_outside_root, **opts)
    expand_jsonl_inputs(path, (".jsonl", ".json"))
    return module.read(
        path, media_root=media_root, path_map=_path_map(path_map), allow_outside_root=allow_outside_root, **opts
    )


def write_records(
    docs: Iterable[Doc | BadRecord], out_path, fmt: str, on_bad: Callable[[BadRecord], None] | None = None, **opts
) -> dict:
    """Write Docs to ``out_path`` in ``fmt``; returns counts ``{"written", "bad", "media_files", ...}``.

    BadRecords in ``docs``, and Docs that cannot be written (a media file gone missing), are counted as
    bad and passed to ``on_bad``. ``wds`` writes a directory of shards (``max_docs`` per shard)."""
    return format_module(fmt).write(docs, out_path, on_bad=on_bad, **opts)


def errors_path(output, fmt: str) -> Path:
    """Where ``convert`` quarantines bad records: ``OUT.errors.jsonl``, or ``OUT/errors.jsonl`` for shards."""
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    return Path(output) / "errors.jsonl" if name in DIR_FORMATS else Path(str(output) + ".errors.jsonl")


def convert(
    input,
    output,
    src: str,
    dst: str,
    media_root: str | None = None,
    path_map=None,
    progress: bool = True,
    lossy: bool = False,
    allow_outside_root: bool = False,
    max_image_pixels: int | None = None,
    **opts,
) -> dict:
    """Convert ``input`` (format ``src``) to ``output`` (format ``dst``).

    A Doc the target cannot hold without loss (an interleaved document as LLaVA turns) stops the
    conversion with :class:`MMGenError` and leaves no output, unless ``lossy`` is set.

    Bad records go to :func:`errors_path` with their reasons. Returns a summary whose counts add up:
    ``read == written + bad``; ``bad_reasons`` counts bad records by reason. Image headers are checked
    before anything is copied (:func:`mmgen.data.formats.common.checked_media`): a decompression bomb
    over ``max_image_pixels``, a file that is no image or another format than it says is a bad record."""
    format_module(src), format_module(dst)
    set_max_image_pixels(max_image_pixels)
    if os.path.abspath(str(input)) == os.path.abspath(str(output)):
        raise MMGenError(f"output '{output}' is the input: write the conversion to another path")
    records = checked_media(
        read_records(input, src, media_root=media_root, path_map=path_map, allow_outside_root=allow_outside_root)
    )
    err_path = errors_path(output, dst)
    if err_path.exists():
        err_path.unlink()  # a stale quarantine from an earlier run would misreport this one
    reasons: dict[str, int] = {}
    err_file = None
    read_n = 0

    def counted(it):
        nonlocal read_n
        for r in it:
            read_n += 1
            yield r

    def on_bad(bad: BadRecord):
        nonlocal err_file
        reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
        if err_file is None:
            err_path.parent.mkdir(parents=True, exist_ok=True)
            err_file = open(err_path, "w", encoding="utf-8")
        err_file.write(json.dumps(bad.to_json(), ensure_ascii=False) + "\n")

    stream = counted(records)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc=f"{src} -> {dst}", unit="doc", dynamic_ncols=True)
    try:
        counts = write_records(stream, output, dst, on_bad=on_bad, lossy=lossy, **opts)
    except LossyConversionError:
        for p in (Path(output), err_path):  # a half-written output would pass for a whole one
            if p.is_file():
                p.unlink()
        raise
    finally:
        if err_file is not None:
            err_file.close()
    summary = {
        "input": str(input),
        "output": str(output),
        "from": src,
        "to": dst,
        "read": read_n,
        "written": counts["written"],
        "bad": counts["bad"],
        "bad_reasons": reasons,
        "errors_path": str(err_path) if err_file is not None else None,
    }
    summary.update({k: v for k, v in counts.items() if k not in summary})
    assert summary["read"] == summary["written"] + summary["bad"], summary
    return summary


__all__ = ["FORMATS", "read_records", "write_records", "convert", "errors_path", "format_module"]
