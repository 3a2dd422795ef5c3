"""The records ``mmgen filter`` reads: WebDataset tars, jsonl in any converter format, parquet.

What a file holds is told by its content (:mod:`mmgen.data.input_kind`): gzip or zstd jsonl is read
transparently, a tar or tar.gz is a WebDataset shard whatever its name, anything else is a one-line
error before the run starts. The format of a jsonl or parquet input is recognised from its first
record's fields (``items`` -> mmgen, ``texts`` -> OBELICS/OmniCorpus, ``text_list`` -> MMC4,
``conversations`` -> LLaVA, ``text`` -> Data-Juicer) unless named.

Work is cut into :class:`WorkUnit` s so that one large file keeps every worker busy: an uncompressed
jsonl into byte ranges aligned to line starts (a record belongs to the unit where its line starts),
a parquet file into runs of row groups, a tar or a compressed file is one unit. Units depend only on
the inputs and the unit size, never on the number of workers, so the output does not either.

Every reader yields :class:`Doc` or :class:`BadRecord` and never raises on bad data, so one broken
line, row or tar member is quarantined and the run goes on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from mmgen.data.doc import BadRecord, Doc
from mmgen.data.formats import format_module
from mmgen.data.formats.common import ReadContext, RecordError
from mmgen.data.input_kind import InputKind, open_decompressed, sniff_input
from mmgen.data.shards import read_shard
from mmgen.errors import MediaError, MMGenError

INPUT_FORMATS = ("auto", "wds", "mmgen", "obelics", "mmc4", "dj", "llava")

# Checked in order: the first key present in a record names its format.
_SIGNATURE_KEYS = (
    ("items", "mmgen"),
    ("texts", "obelics"),
    ("text_list", "mmc4"),
    ("conversations", "llava"),
    ("text", "dj"),
)


def detect_format(record: dict) -> str | None:
    return next((fmt for key, fmt in _SIGNATURE_KEYS if key in record), None)


def _first_record(path: str, compression: str | None, max_lines: int = 1000) -> dict | None:
    try:
        with open_decompressed(path, compression) as f:
            for k, line in enumerate(f):
                if k >= max_lines:
                    break
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    return obj
    except (OSError, EOFError, ValueError, MMGenError):
        pass  # a damaged stream: its reader quarantines it
    return None


# Unit size when none is asked for: about 64 units over the whole corpus, within these bounds.
MIN_UNIT_BYTES, MAX_UNIT_BYTES = 256 << 10, 64 << 20


def auto_unit_bytes(paths: list[str]) -> int:
    total = sum(os.path.getsize(p) for p in paths)
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // 64)))


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file that a worker reads and filters on its own.

    jsonl: bytes ``[start, end)`` (``end`` None: to the end of the file), ``first_line`` the line number
    of the line at ``start``; parquet: row groups ``[start, end)``, ``first_line`` the number of rows
    before them; tar: the whole file."""

    path: str
    kind: str  # tar | parquet | jsonl
    fmt: str | None  # converter format of jsonl/parquet records; None: no record names one
    compression: str | None = None
    start: int = 0
    end: int | None = None
    first_line: int = 1
    array: bool = False  # jsonl: one JSON array, not a record per line

    @property
    def input_kind(self) -> InputKind:
        """What the file holds, as :func:`sniff_input` told when planning: its readers sniff nothing again."""
        return InputKind(self.kind, self.compression, self.array)


def _line_starts(path: str, size: int, unit_bytes: int) -> list[int]:
    """Offsets of the first line starting at or after each multiple of ``unit_bytes``."""
    starts = [0]
    with open(path, "rb") as f:
        t = unit_bytes
        while t < size:
            f.seek(t - 1)
            p = t - 1 + len(f.readline())
            if p >= size:
                break
            if p > starts[-1]:
                starts.append(p)
            t = max(t + unit_bytes, p + 1)
    return starts


def _newlines_between(path: str, starts: list[int], size: int) -> list[int]:
    """Line number of each start (1-based), counting newlines in one pass over the file."""
    out, count, pos = [], 0, 0
    with open(path, "rb") as f:
        for s in starts:
            while pos < s:
                chunk = f.read(min(8 << 20, s - pos))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                pos += len(chunk)
            out.append(count + 1)
    return out


def plan_units(paths: list[str], fmt: str = "auto", unit_bytes: int | None = None) -> list[WorkUnit]:
    """The work units of ``paths``, in input order (a one-line MMGenError for an unreadable input)."""
    if fmt not in INPUT_FORMATS:
        raise MMGenError(f"unknown input format '{fmt}' (use one of: {', '.join(INPUT_FORMATS)})")
    unit_bytes = unit_bytes or auto_unit_bytes(paths)
    units: list[WorkUnit] = []
    for path in paths:
        kind = sniff_input(path)
        if kind.kind == "tar" or fmt == "wds":
            units.append(WorkUnit(path, "tar", "wds", kind.compression))
            continue
        if kind.kind == "parquet":
            units += _parquet_units(path, fmt, unit_bytes)
            continue
        name = fmt
        if fmt == "auto":
            first = _first_record(path, kind.compression)
            name = detect_format(first) if first is not None else "mmgen"
        size = os.path.getsize(path)
        if name is None or not kind.seekable or kind.array or size <= unit_bytes:
            units.append(WorkUnit(path, "jsonl", name, kind.compression, array=kind.array))
            continue
        starts = _line_starts(path, size, unit_bytes)
        lines = _newlines_between(path, starts, size)
        ends = starts[1:] + [size]
        units += [WorkUnit(path, "jsonl", name, None, s, e, n) for s, e, n in zip(starts, ends, lines)]
    return units


def _parquet_units(path: str, fmt: str, unit_bytes: int) -> list[WorkUnit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # noqa: BLE001 - a damaged file: its reader quarantines it
        return [WorkUnit(path, "parquet", fmt)]
    units, start, rows, acc, first = [], 0, 0, 0, 1
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if acc >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(WorkUnit(path, "parquet", fmt, None, start, g + 1, first))
            start, acc, first = g + 1, 0, rows + 1
    return units or [WorkUnit(path, "parquet", fmt)]


def read_unit(
    unit: WorkUnit, media_root: str | None = None, allow_outside_root: bool = False
) -> Iterator[Doc | BadRecord]:
    """Docs and BadRecords of one work unit, in file order."""
    if unit.kind == "tar":
        yield from read_shard(
            unit.path, media_root=media_root, allow_outside_root=allow_outside_root, compression=unit.compression
        )
        return
    if unit.kind == "parquet":
        yield from _read_parquet(unit, media_root, allow_outside_root)
        return
    if unit.fmt is None:
        yield BadRecord(
            source=unit.path,
            reason="unknown_format",
            detail="no record has a field that names its format (items, texts, text_list, conversations "
            "or text); pass --input-format",
        )
        return
    opts = {"media_root": media_root, "allow_outside_root": allow_outside_root, "kind": unit.input_kind}
    if unit.end is not None:
        opts["byte_range"] = (unit.start, unit.end, unit.first_line)
    if unit.fmt != "llava":  # LLaVA's reader always accepts a .json array
        opts.update(whole_json_ok=unit.path.endswith((".json", ".json.gz", ".json.zst")), exts=(".jsonl", ".json"))
    yield from format_module(unit.fmt).read(unit.path, **opts)


def _read_parquet(
    unit: WorkUnit, media_root: str | None = None, allow_outside_root: bool = False, batch_rows: int = 256
) -> Iterator[Doc | BadRecord]:
    """Rows of a parquet file (the unit's row groups) as records of a converter format (OBELICS on the
    Hub is parquet)."""
    import pyarrow.parquet as pq

    path, fmt = unit.path, unit.fmt
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        yield BadRecord(source=path, reason="corrupt_parquet", detail=f"{type(e).__name__}: {e}")
        return
    ctx = ReadContext(source=path, media_root=media_root, allow_outside_root=allow_outside_root)
    module = None
    row = unit.first_line - 1
    groups = list(range(unit.start, unit.end)) if unit.end is not None else None
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
            for rec in batch.to_pylist():
                row += 1
                ctx.line = row
                if module is None:
                    name = fmt if fmt != "auto" else detect_format(rec)
                    if name is None:
                        yield ctx.bad("unknown_format", "row has no field that names its format; pass --input-format")
                        continue
                    module = format_module(name)
                try:
                    doc = module.record_to_doc(rec, ctx)
                except RecordError as e:
                    yield ctx.bad(e.reason, e.detail, _raw(rec))
                    continue
                except MediaError as e:
                    yield ctx.bad("missing_media", str(e), _raw(rec))
                    continue
                except (
                    TypeError,
                    ValueError,
                    KeyError,
                    AttributeError,
                    IndexError,
                    RecursionError,
                    OverflowError,
                ) as e:
                    yield ctx.bad("bad_schema", f"{type(e).__name__}: {str(e)[:200]}", _raw(rec))
                    continue
                doc.provenance.setdefault("source", path)
                doc.provenance.setdefault("line", row)
                yield doc
    except Exception as e:  # noqa: BLE001 - a damaged row group: keep the rows before it
        yield BadRecord(
            source=path,
            reason="corrupt_parquet",
            line=row + 1,
            detail=f"unreadable after row {row}: {type(e).__name__}: {e}",
        )


def _raw(rec: dict) -> str:
    return json.dumps(
        rec, ensure_ascii=False, default=lambda b: f"<{len(b)} bytes>" if isinstance(b, bytes) else str(b)
    )


def read_input(
    path: str, fmt: str = "auto", media_root: str | None = None, allow_outside_root: bool = False
) -> Iterator[Doc | BadRecord]:
    """Docs and BadRecords of one input file, in file order."""
    for unit in plan_units([path], fmt, unit_bytes=sys.maxsize):  # no file is cut: one unit each
        yield from read_unit(unit, media_root, allow_outside_root)
