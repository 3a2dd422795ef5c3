"""What a filter worker does with one work unit: read its records and run the operators over each
document, returning verdicts, statistics and the deduplication signatures for the parent to decide."""

from __future__ import annotations

from typing import Any

from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.data.filter_inputs import read_unit
from mmgen.data.ops.base import DocView, Op, Verdict, error_text
from mmgen.data.shards import doc_to_sample
from mmgen.errors import MediaError, NotFetchedError


def _apply(op: Op, view: DocView, verdicts: list[Verdict], stats: dict, events: list) -> dict | None:
    """Record stats, remove failing nodes; returns the document's fate if the op drops the document."""
    for v in verdicts:
        if v.item is None:
            stats["doc"][op.label] = v.stats
        else:
            stats["items"].setdefault(str(v.item), {})[op.label] = v.stats
    for v in verdicts:
        if v.reason is None:
            continue
        event = {"op": op.label, "reason": v.reason, "item": v.item, "stats": v.stats}
        if v.duplicate_of is not None:
            event["duplicate_of"] = v.duplicate_of
        if op.level == "doc" or v.item is None:
            return {**event, "status": "quarantined" if v.quarantine else "rejected"}
        if v.item in view.alive:
            item = view.doc.items[v.item]
            event["kind"] = item.kind
            if isinstance(item, Text):
                event["text"] = item.text
            elif item.data is not None:
                event["bytes"] = len(item.data)
            event["status"] = "quarantined" if v.quarantine else "removed"
            events.append(event)
            view.remove(v.item)
    return None


def run_op(op: Op, view: DocView, stats: dict, events: list, decide_sig: Any = ..., doc_id: str = "") -> dict | None:
    try:
        verdicts = op.apply(view) if decide_sig is ... else op.decide(view, decide_sig, doc_id)
    except NotFetchedError as e:  # the op needs bytes a URL reference does not have: it cannot judge this doc
        verdicts = [Verdict(None, {"not_fetched": 1, "error": error_text(e)})]
    except MediaError as e:
        verdicts = [Verdict(e.reason, {"error": error_text(e)}, quarantine=True)]
    except Exception as e:  # noqa: BLE001 - one odd document must not stop a run; it is quarantined visibly
        verdicts = [Verdict("op_error", {"error": f"{type(e).__name__}: {error_text(e)}"}, quarantine=True)]
    fate = _apply(op, view, verdicts, stats, events)
    if fate is None and not view.alive:
        fate = {"op": op.label, "reason": "no_items_left", "item": None, "stats": {}, "status": "rejected"}
    return fate


def process_doc(ops: list[Op], doc: Doc) -> dict:
    """Run the stateless operators and the dedup hashing on one document (worker side)."""
    view = DocView(doc)
    stats: dict = {"doc": {}, "items": {}}
    events: list = []
    fate = None
    if not view.alive:
        fate = {"op": "pipeline", "reason": "empty_doc", "item": None, "stats": {}, "status": "rejected"}
    for i in view.not_fetched():
        # Kept as references and counted: pixel operators skip them (run `mmgen fetch` first to judge them).
        stats["items"].setdefault(str(i), {})["fetch"] = {"not_fetched": 1}
    for op in ops:
        if fate is not None or op.stateful:
            break
        fate = run_op(op, view, stats, events)
    sigs = {}
    if fate is None:
        for op in ops:
            if op.stateful:
                try:
                    sigs[op.label] = op.signature(view)
                except NotFetchedError:
                    continue  # judged by nothing: decide() sees no signature, as for a short doc
                except MediaError as e:
                    fate = {
                        "op": op.label,
                        "reason": e.reason,
                        "item": None,
                        "stats": {"error": error_text(e)},
                        "status": "quarantined",
                    }
                    break
                except Exception as e:  # noqa: BLE001 - one odd document never stops a run
                    fate = {
                        "op": op.label,
                        "reason": "op_error",
                        "item": None,
                        "stats": {"error": f"{type(e).__name__}: {error_text(e)}"},
                        "status": "quarantined",
                    }
                    break
    return {
        "doc": doc,
        "alive": view.alive,
        "stats": stats,
        "events": events,
        "fate": fate,
        "sigs": sigs,
        "sample": encode_view(view) if fate is None else None,
    }


def encode_view(view: DocView) -> tuple | None:
    """The shard members of the document as it stands, encoded here in the worker: the parent writes
    every kept document, and serialising them there would make it the bottleneck."""
    try:
        sample = doc_to_sample(view.result(), "")
    except MediaError:
        return None  # the parent meets the same error when it writes, and reports it there
    sample.pop("__key__")
    return tuple(view.alive), sample


def process_unit(ops: list[Op], unit, read_opts: dict | None = None) -> list:
    """Everything a worker computes for one work unit: ("bad", record) and ("doc", result) in order."""
    out = []
    records = read_unit(unit, **(read_opts or {}))
    while True:
        try:
            rec = next(records)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a reader fault is quarantined with the unit's place, the run goes on
            out.append(
                (
                    "bad",
                    BadRecord(
                        source=unit.path,
                        reason="reader_error",
                        detail=f"{type(e).__name__}: {error_text(e)}; rest of the unit not read",
                    ).to_json(),
                )
            )
            break
        if isinstance(rec, BadRecord):
            out.append(("bad", rec.to_json()))
            continue
        try:
            out.append(("doc", process_doc(ops, rec)))
        except Exception as e:  # noqa: BLE001 - e.g. metadata no JSON can hold: quarantined, never fatal
            where = {k: v for k, v in rec.provenance.items() if k in ("line", "member")}
            out.append(
                (
                    "bad",
                    BadRecord(
                        source=unit.path,
                        reason="op_error",
                        line=where.get("line"),
                        member=where.get("member"),
                        detail=f"{type(e).__name__}: {error_text(e)}",
                    ).to_json(),
                )
            )
    return out
