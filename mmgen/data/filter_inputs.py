"""The records ``mmgen filter`` reads: WebDataset tars, jsonl in any converter format, parquet.

Every reader yields :class:`Doc` or :class:`BadRecord` and never raises on bad data, so one broken
line, row or tar member is quarantined and the run goes on. The format of a jsonl or parquet input is
recognised from its first record's fields (``items`` -> mmgen, ``texts`` -> OBELICS/OmniCorpus,
``text_list`` -> MMC4, ``conversations`` -> LLaVA, ``text`` -> Data-Juicer) unless named.
"""

from __future__ import annotations

import json
from typing import Iterator

from mmgen.data.doc import BadRecord, Doc
from mmgen.errors import MMGenError

INPUT_EXTS = (".tar", ".jsonl", ".json", ".parquet")
INPUT_FORMATS = ("auto", "wds", "mmgen", "obelics", "mmc4", "dj", "llava")

# Checked in order: the first key present in a record names its format.
_SIGNATURE_KEYS = (("items", "mmgen"), ("texts", "obelics"), ("text_list", "mmc4"),
                   ("conversations", "llava"), ("text", "dj"))


def detect_format(record: dict) -> str | None:
    return next((fmt for key, fmt in _SIGNATURE_KEYS if key in record), None)


def _first_record(path: str) -> dict | None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _jsonl_format(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    first = _first_record(path)
    return detect_format(first) if first is not None else "mmgen"


def _read_jsonl(path: str, fmt: str) -> Iterator[Doc | BadRecord]:
    from mmgen.data.formats import format_module

    name = _jsonl_format(path, fmt)
    if name is None:
        yield BadRecord(source=path, reason="unknown_format",
                        detail="no record has a field that names its format (items, texts, text_list, conversations "
                               "or text); pass --input-format")
        return
    opts = {} if name == "llava" else {"whole_json_ok": path.endswith(".json"), "exts": (".jsonl", ".json")}
    yield from format_module(name).read(path, **opts)


def _read_parquet(path: str, fmt: str, batch_rows: int = 256) -> Iterator[Doc | BadRecord]:
    """Rows of a parquet file as records of a converter format (OBELICS on the Hub is parquet)."""
    import pyarrow.parquet as pq

    from mmgen.data.formats import format_module
    from mmgen.data.formats._common import ReadContext, RecordError
    from mmgen.errors import MediaError

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        yield BadRecord(source=path, reason="corrupt_parquet", detail=f"{type(e).__name__}: {e}")
        return
    ctx = ReadContext(source=path)
    module = None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
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
                except (TypeError, ValueError, KeyError, AttributeError) as e:
                    yield ctx.bad("bad_schema", f"{type(e).__name__}: {e}", _raw(rec))
                    continue
                doc.provenance.setdefault("source", path)
                doc.provenance.setdefault("line", row)
                yield doc
    except Exception as e:  # noqa: BLE001 - a damaged row group: keep the rows before it
        yield BadRecord(source=path, reason="corrupt_parquet", line=row + 1,
                        detail=f"unreadable after row {row}: {type(e).__name__}: {e}")


def _raw(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, default=lambda b: f"<{len(b)} bytes>" if isinstance(b, bytes) else str(b))


def read_input(path: str, fmt: str = "auto") -> Iterator[Doc | BadRecord]:
    """Docs and BadRecords of one input file, in file order."""
    if fmt not in INPUT_FORMATS:
        raise MMGenError(f"unknown input format '{fmt}' (use one of: {', '.join(INPUT_FORMATS)})")
    if path.endswith(".tar") or fmt == "wds":
        from mmgen.data.shards import read_shard

        yield from read_shard(path)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path, fmt)
    else:
        yield from _read_jsonl(path, fmt)
