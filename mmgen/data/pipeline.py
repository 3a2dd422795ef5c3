"""The filtering runner behind ``mmgen filter``: a recipe of operators over input shards.

    summary = run_filter("shapesworld", "world/*.tar", "filtered/", workers=2)

Work is split into work units: whole input files (a WebDataset tar, plain or compressed; a
compressed jsonl), byte ranges of a large jsonl aligned to line starts, runs of row groups of a
parquet file (see :mod:`mmgen.data.filter_inputs`), so one large file keeps every worker busy. Units
depend only on the inputs and ``unit_bytes``. Workers (local processes or Ray tasks, see
:mod:`mmgen.data.executors`) run the stateless operators and compute the hashes of the
deduplication operators; the parent takes the workers' results in input order, runs the
deduplication decisions against the run-wide index, and writes everything. The output therefore
does not depend on the executor or the number of workers: the kept documents are those of the
inputs in input order (file by file, line by line), whatever the unit size; with the same unit size
the output is the same byte for byte. Media paths in records stay inside the corpus (the input's
folder or ``media_root``; see :class:`mmgen.data.formats._common.ReadContext`), and images over
``max_image_pixels`` are quarantined (``too_many_pixels``) before they are decoded.

Output folder (K numbers the work units; a small file is one unit)::

    shards/part-KKKKK-NNNNNN.tar   kept documents of unit K (at most shard_size per tar)
    rejects/KKKKK.jsonl            every rejected document and every removed node, with op, reason, stats
    rejects/media/KKKKK/           the rejected media, with --save-reject-media
    quarantine/KKKKK.jsonl         unreadable records, corrupt tars, undecodable or missing media
    stats/KKKKK.parquet            every operator's statistics, one row per (doc, item, op, stat)
    state/KKKKK.json               what input K added to the deduplication indexes
    done/KKKKK.json                unit K is finished (its counts); a rerun skips it
    tmp/KKKKK/                     the input being written; renamed into place when it is finished
    manifest.json summary.json report.md plots/*.png

A recipe ending in two-pass selectors (``top_k``, ``top_fraction``, ranked ``source_quota``) runs in
two passes. Pass 1 is the run above, except that the kept documents are staged in ``pass1/``
(shards plus ``pass1/KKKKK.jsonl``, one row per document) while the selectors observe their values
(in ``state/``). Then the selectors fix the selection over the whole corpus and pass 2 goes over
``pass1/`` input by input, in order, in this process: selected documents are copied into
``shards/``, the others go to ``rejects/KKKKK.select.jsonl`` with the selector's value, their stats
rows become ``rejected``, and ``done2/KKKKK.json`` (the input's final counts) marks it finished.
Both passes resume from their markers; ``pass1/`` is removed when pass 2 is complete.

Counts always add up: input = kept + rejected + quarantined (documents). Node-level removals from
kept documents are counted separately.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from mmgen.config import from_dict, read_yaml_mapping
from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.data.ops.base import DocView, Op, Verdict, build_op, error_text
from mmgen.errors import MediaError, MMGenError, NotFetchedError


@dataclass
class OpSpec:
    op: str
    level: str | None = None  # doc | node; None = the operator's default
    params: dict = field(default_factory=dict)
    name: str | None = None  # label in reports; needed when one operator appears twice


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    ops: list[OpSpec] = field(default_factory=list)
    # images (and video frames) of more pixels are quarantined as too_many_pixels before decoding;
    # None: mmgen.data.media.DEFAULT_MAX_IMAGE_PIXELS
    max_image_pixels: int | None = None


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A recipe from a YAML path, the name of one in ``data_pipelines/``, a mapping or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        data = recipe
    else:
        from mmgen.paths import recipe_path

        path = recipe_path(recipe, "data_pipelines")
        data = read_yaml_mapping(path, "recipe")
        data.setdefault("name", path.stem)
    r = from_dict(Recipe, data)
    if not r.ops:
        raise MMGenError(f"recipe '{r.name}' has no ops (add a list under 'ops:', see data_pipelines/README.md)")
    return r


def build_ops(recipe: Recipe) -> list[Op]:
    from mmgen.data.media import set_max_image_pixels

    set_max_image_pixels(recipe.max_image_pixels)  # the process's decodes, in workers and the parent alike
    ops: list[Op] = []
    for i, spec in enumerate(recipe.ops):
        where = f"recipe '{recipe.name}' ops[{i}] ({spec.op}): "
        ops.append(build_op(spec.op, spec.level, spec.params, spec.name, where=where))
    labels = [o.label for o in ops]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise MMGenError(f"recipe '{recipe.name}': operator '{dup}' appears twice; give each a distinct 'name:'")
    # Deduplication decides in the parent, after the workers' stateless pass, so it must come last.
    first_stateful = next((i for i, o in enumerate(ops) if o.stateful), len(ops))
    late = next((o for o in ops[first_stateful:] if not o.stateful), None)
    if late is not None:
        raise MMGenError(f"recipe '{recipe.name}': '{late.label}' comes after deduplication op "
                         f"'{ops[first_stateful].label}'; move deduplication ops to the end of the recipe")
    # A selector must see documents in their final state: a dedup op after it would index the hashes
    # of documents that the selection later drops, and reject their copies for nothing.
    first_sel = next((i for i, o in enumerate(ops) if getattr(o, "selector", False)), len(ops))
    late = next((o for o in ops[first_sel:] if not getattr(o, "selector", False)), None)
    if late is not None:
        raise MMGenError(f"recipe '{recipe.name}': '{late.label}' comes after selector '{ops[first_sel].label}'; "
                         "selectors (top_k, top_fraction, source_quota) go at the very end of the recipe")
    return ops


def two_pass_selectors(ops: list[Op]) -> list[Op]:
    return [o for o in ops if getattr(o, "selector", False) and getattr(o, "two_pass", False)]


# ---------------------------------------------------------------------------------------------------
# Per-document processing (shared by workers and the parent)


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


def _run_op(op: Op, view: DocView, stats: dict, events: list, decide_sig: Any = ..., doc_id: str = "") -> dict | None:
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
        fate = _run_op(op, view, stats, events)
    sigs = {}
    if fate is None:
        for op in ops:
            if op.stateful:
                try:
                    sigs[op.label] = op.signature(view)
                except NotFetchedError:
                    continue  # judged by nothing: decide() sees no signature, as for a short doc
                except MediaError as e:
                    fate = {"op": op.label, "reason": e.reason, "item": None,
                            "stats": {"error": error_text(e)}, "status": "quarantined"}
                    break
                except Exception as e:  # noqa: BLE001 - one odd document never stops a run
                    fate = {"op": op.label, "reason": "op_error", "item": None,
                            "stats": {"error": f"{type(e).__name__}: {error_text(e)}"}, "status": "quarantined"}
                    break
    return {"doc": doc, "alive": view.alive, "stats": stats, "events": events, "fate": fate, "sigs": sigs,
            "sample": _encode(view) if fate is None else None}


def _encode(view: DocView) -> tuple | None:
    """The shard members of the document as it stands, encoded here in the worker: the parent writes
    every kept document, and serialising them there would make it the bottleneck."""
    from mmgen.data.shards import doc_to_sample

    try:
        sample = doc_to_sample(view.result(), "")
    except MediaError:
        return None  # the parent meets the same error when it writes, and reports it there
    sample.pop("__key__")
    return tuple(view.alive), sample


def process_unit(ops: list[Op], unit, read_opts: dict | None = None) -> list:
    """Everything a worker computes for one work unit: ("bad", record) and ("doc", result) in order."""
    from mmgen.data.filter_inputs import read_unit

    out = []
    records = read_unit(unit, **(read_opts or {}))
    while True:
        try:
            rec = next(records)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a reader fault is quarantined with the unit's place, the run goes on
            out.append(("bad", BadRecord(source=unit.path, reason="reader_error",
                                         detail=f"{type(e).__name__}: {error_text(e)}; rest of the unit not read").to_json()))
            break
        if isinstance(rec, BadRecord):
            out.append(("bad", rec.to_json()))
            continue
        try:
            out.append(("doc", process_doc(ops, rec)))
        except Exception as e:  # noqa: BLE001 - e.g. metadata no JSON can hold: quarantined, never fatal
            where = {k: v for k, v in rec.provenance.items() if k in ("line", "member")}
            out.append(("bad", BadRecord(source=unit.path, reason="op_error", line=where.get("line"),
                                         member=where.get("member"),
                                         detail=f"{type(e).__name__}: {error_text(e)}").to_json()))
    return out


# ---------------------------------------------------------------------------------------------------
# The run


def _json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str) + "\n"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False))
    os.replace(tmp, path)  # a marker is either whole or absent, even after a crash


def _where(doc: Doc) -> dict:
    return {k: v for k, v in doc.provenance.items() if isinstance(v, (str, int, float))}


# Test hook: SIGKILL this process after committing this many documents (a crash at a random point).
KILL_ENV = "MMGEN_FILTER_KILL_AFTER_DOCS"
_committed_docs = 0


def _maybe_die() -> None:
    global _committed_docs
    _committed_docs += 1
    limit = os.environ.get(KILL_ENV)
    if limit and _committed_docs >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


STATS_COLUMNS = ("id", "status", "item", "op", "stat", "value", "text")


def _stat_rows(doc_id: str, status: str, stats: dict) -> list[tuple]:
    """Long-format rows (one per statistic) for the parquet stats: the ops' stats differ in shape."""
    if not isinstance(doc_id, str):  # a source id may be any JSON value; the column holds text
        doc_id = json.dumps(doc_id, sort_keys=True, default=str)
    rows = []
    for item, per_op in [(-1, stats["doc"])] + [(int(i), d) for i, d in stats["items"].items()]:
        for op, values in per_op.items():
            for name, v in (values or {}).items():
                if isinstance(v, bool) or isinstance(v, (int, float)):
                    rows.append((doc_id, status, item, op, name, float(v), None))
                else:
                    rows.append((doc_id, status, item, op, name, None,
                                 v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)))
    return rows


def write_stats_parquet(rows: list[tuple], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*rows)) if rows else [()] * len(STATS_COLUMNS)
    types = (pa.string(), pa.string(), pa.int32(), pa.string(), pa.string(), pa.float64(), pa.string())
    table = pa.table({n: pa.array(list(c), type=t) for n, c, t in zip(STATS_COLUMNS, cols, types)})
    pq.write_table(table, path, compression="zstd")


class _ShardCommit:
    """Everything one input file produces, written by the parent in input order.

    All of it goes to ``tmp/KKKKK/`` first and is renamed into place by :meth:`finish`, done marker
    last: a kill at any moment leaves either a finished input or files a rerun removes.

    ``staged`` (a recipe with two-pass selectors): the kept documents are pass 1's output, not the
    run's; they go to ``pass1/`` with a row per document (``pass1/KKKKK.jsonl``: id and where it came
    from) for :class:`_SelectCommit` to decide on once the selection is fixed."""

    def __init__(self, out: Path, k: int, ops: list[Op], shard_size: int, dry_run: bool, save_media: bool,
                 staged: bool = False, tmp_root: str = "tmp"):
        self.out, self.k, self.ops, self.shard_size, self.dry_run = out, k, ops, shard_size, dry_run
        self.save_media, self.staged = save_media, staged
        self.stateful = [o for o in ops if o.stateful]
        self.tag = f"{k:05d}"
        self.tmp = out / tmp_root / self.tag
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.rejects = open(self.tmp / "rejects.jsonl", "w", encoding="utf-8")
        self.quarantine = open(self.tmp / "quarantine.jsonl", "w", encoding="utf-8")
        self.stat_rows: list[tuple] = []
        self.observed = open(self.tmp / "observed.jsonl", "w", encoding="utf-8") if staged else None
        self.writer = None
        self.c: dict[str, Any] = {"input": 0, "kept": 0, "rejected": 0, "quarantined": 0,
                                  "kept_with_nodes_removed": 0, "nodes_removed": 0, "nodes_quarantined": 0,
                                  "media_not_fetched": 0, "by_op": {}, "reasons": {"rejected": {}, "quarantined": {}, "nodes_removed": {},
                                                           "nodes_quarantined": {}}}

    def _bump(self, op: str, what: str, reason: str) -> None:
        by = self.c["by_op"].setdefault(op, {})
        by[what] = by.get(what, 0) + 1
        r = self.c["reasons"][what]
        r[reason] = r.get(reason, 0) + 1

    def _media(self, doc: Doc, items: list[int]) -> list[dict]:
        """Copies of the rejected media (content-addressed), to look at what a filter threw away."""
        import hashlib

        saved = []
        for i in items:
            it = doc.items[i]
            if isinstance(it, Text):
                continue
            try:
                data = it.load()
            except MediaError:
                continue
            name = f"{hashlib.sha1(data).hexdigest()}.{it.ext}"
            target = self.tmp / "media" / name
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(data)
            saved.append({"item": i, "path": f"media/{self.tag}/{name}"})
        return saved

    def bad(self, rec: dict, source: str) -> None:
        self.c["input"] += 1
        self.c["quarantined"] += 1
        self._bump("reader", "quarantined", rec["reason"])
        self.quarantine.write(_json_line({"level": "record", "op": "reader", "input": source, **rec}))

    def doc(self, res: dict, source: str) -> None:
        self.c["input"] += 1
        doc: Doc = res["doc"]
        view = DocView(doc)
        view.alive = list(res["alive"])
        stats, events, fate = res["stats"], list(res["events"]), res["fate"]
        if fate is None:
            for op in self.stateful:
                fate = _run_op(op, view, stats, events, decide_sig=res["sigs"].get(op.label), doc_id=doc.id)
                if fate is not None:
                    break
        base = {"id": doc.id, "input": source, "provenance": _where(doc)}
        if fate is not None:
            self._drop(doc, fate, events, base, stats)
            return
        for op in self.stateful:
            op.commit(view, res["sigs"].get(op.label), doc.id)
        self.c["kept"] += 1
        self.c["media_not_fetched"] += len(view.not_fetched())
        if events:
            self.c["kept_with_nodes_removed"] += 1
        for ev in events:
            status = ev.pop("status")
            what = "nodes_quarantined" if status == "quarantined" else "nodes_removed"
            self.c[what] += 1
            self._bump(ev["op"], what, ev["reason"])
            record = {**base, "level": "node", **ev}
            if self.save_media and status != "quarantined":
                record["media"] = self._media(doc, [ev["item"]])
            (self.quarantine if status == "quarantined" else self.rejects).write(_json_line(record))
        self.stat_rows += _stat_rows(doc.id, "kept", stats)
        if self.observed is not None:
            self.observed.write(_json_line({"id": doc.id, "base": base, "lost_items": bool(events)}))
        if not self.dry_run:
            if self.writer is None:
                from mmgen.data.shards import ShardWriter

                self.writer = ShardWriter(self.tmp / "shards", prefix=f"part-{self.tag}", max_docs=self.shard_size,
                                          mtime=0.0)
            pre = res.get("sample")
            if pre is not None and list(pre[0]) == view.alive:  # dedup removed nothing since the worker
                self.writer.write_sample(doc, pre[1])
            else:
                self.writer.write(view.result())

    def _drop(self, doc: Doc, fate: dict, events: list, base: dict, stats: dict) -> None:
        status = fate.pop("status")
        record = {**base, "level": "doc", **fate, "doc": doc.to_json()}
        if events:
            record["removed_nodes_before"] = events
        if status == "quarantined":
            self.c["quarantined"] += 1
            self._bump(fate["op"], "quarantined", fate["reason"])
            self.quarantine.write(_json_line(record))
        else:
            self.c["rejected"] += 1
            self._bump(fate["op"], "rejected", fate["reason"])
            if self.save_media:
                record["media"] = self._media(doc, list(range(len(doc.items))))
            self.rejects.write(_json_line(record))
        self.stat_rows += _stat_rows(doc.id, status, stats)

    def finish(self) -> dict:
        self.rejects.close()
        self.quarantine.close()
        outputs = []
        kept_dir = self.out / ("pass1" if self.staged else "shards")
        kept_dir.mkdir(exist_ok=True)
        if self.writer is not None:
            self.writer.close()
            for p in sorted((self.tmp / "shards").glob("*.tar")):
                os.replace(p, kept_dir / p.name)
                outputs.append(p.name)
        if self.observed is not None:
            self.observed.close()
            os.replace(self.tmp / "observed.jsonl", kept_dir / f"{self.tag}.jsonl")
        self.c["outputs"] = outputs
        write_stats_parquet(self.stat_rows, self.tmp / "stats.parquet")
        os.replace(self.tmp / "stats.parquet", self.out / "stats" / f"{self.tag}.parquet")
        if not self.dry_run:  # a dry run only measures: its decisions are counts and stats, nothing moves
            os.replace(self.tmp / "rejects.jsonl", self.out / "rejects" / f"{self.tag}.jsonl")
            os.replace(self.tmp / "quarantine.jsonl", self.out / "quarantine" / f"{self.tag}.jsonl")
            if (self.tmp / "media").exists():
                os.replace(self.tmp / "media", self.out / "rejects" / "media" / self.tag)
        _write_json(self.out / "state" / f"{self.tag}.json",
                    {op.label: op.state_delta() for op in self.stateful})
        _write_json(self.out / "done" / f"{self.tag}.json", self.c)  # last: marks the input finished
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.c


class _SelectCommit(_ShardCommit):
    """Pass 2 of a recipe with two-pass selectors, for input K: pass 1's kept documents of K in
    order, each kept or rejected by the finalized selectors (the first that rejects names the reason).

    The selected documents' tar members are copied as pass 1 wrote them, so the shards are what a
    one-pass run would have written. Writes to ``tmp2/KKKKK/``, then renames into place: shards,
    ``rejects/KKKKK.select.jsonl``, the stats rows' status, and ``done2/KKKKK.json`` (the input's final
    counts) last."""

    def __init__(self, out: Path, k: int, selectors: list[Op], pass1: dict, shard_size: int, dry_run: bool,
                 save_media: bool):
        super().__init__(out, k, selectors, shard_size, dry_run, save_media, tmp_root="tmp2")
        self.selectors = selectors
        self.c = json.loads(json.dumps(pass1))
        self.rejected_ids: set[str] = set()

    def pass1_docs(self):
        """(row, doc, sample) for every document pass 1 kept for input K, in order."""
        from mmgen.data.shards import _group_members, sample_to_doc

        rows = [json.loads(x) for x in open(self.out / "pass1" / f"{self.tag}.jsonl", encoding="utf-8")]
        if self.dry_run:  # nothing was written in pass 1: the decisions need only the ids
            yield from ((r, Doc(items=[], id=r["id"]), None) for r in rows)
            return
        import tarfile

        samples = (smp for p in sorted((self.out / "pass1").glob(f"part-{self.tag}-*.tar"))
                   for smp in _group_members(tarfile.open(p, "r|"), str(p)))
        for r, smp in zip(rows, samples, strict=True):
            doc = sample_to_doc(smp)
            if doc.id != r["id"]:
                raise MMGenError(f"{self.out}/pass1 does not match its index at {r['id']}; delete {self.out} and rerun")
            yield r, doc, smp

    def run(self) -> dict:
        for row, doc, sample in self.pass1_docs():
            fate, stats = None, {}
            for sel in self.selectors:
                v = sel.decide(DocView(doc), None, doc.id)[0]
                stats[sel.label] = v.stats
                if v.reason is not None and fate is None:
                    fate = {"op": sel.label, "reason": v.reason, "item": None, "stats": v.stats, "status": "rejected"}
            if fate is not None:
                self.c["kept"] -= 1
                self.c["kept_with_nodes_removed"] -= int(row["lost_items"])
                self.rejected_ids.add(doc.id)
                self._drop(doc, fate, [], row["base"], {"doc": stats, "items": {}})
                _maybe_die()
                continue
            if not self.dry_run:
                if self.writer is None:
                    from mmgen.data.shards import ShardWriter

                    self.writer = ShardWriter(self.tmp / "shards", prefix=f"part-{self.tag}",
                                              max_docs=self.shard_size, mtime=0.0)
                self.writer.write_sample(doc, {k: v for k, v in sample.items() if k != "__key__"})
            _maybe_die()
        return self.finish()

    def finish(self) -> dict:
        self.rejects.close()
        self.quarantine.close()
        outputs = []
        if self.writer is not None:
            self.writer.close()
            for p in sorted((self.tmp / "shards").glob("*.tar")):
                os.replace(p, self.out / "shards" / p.name)
                outputs.append(p.name)
        self.c["outputs"] = outputs
        if not self.dry_run:
            os.replace(self.tmp / "rejects.jsonl", self.out / "rejects" / f"{self.tag}.select.jsonl")
            for m in sorted((self.tmp / "media").glob("*")):  # content-addressed: merging twice is harmless
                (self.out / "rejects" / "media" / self.tag).mkdir(exist_ok=True)
                os.replace(m, self.out / "rejects" / "media" / self.tag / m.name)
        self._restatus_stats()
        _write_json(self.out / "done2" / f"{self.tag}.json", self.c)  # last: marks pass 2 of the input finished
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.c

    def _restatus_stats(self) -> None:
        """Pass 1 wrote the selector-rejected documents' stats as kept; they are rejected (idempotent,
        so a pass 2 redone after a kill gives the same file)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rejected_ids:
            return
        path = self.out / "stats" / f"{self.tag}.parquet"
        t = pq.read_table(path)
        status = ["rejected" if i in self.rejected_ids else s
                  for i, s in zip(t.column("id").to_pylist(), t.column("status").to_pylist())]
        t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(status, type=pa.string()))
        tmp = self.tmp / "stats.parquet"
        pq.write_table(t, tmp, compression="zstd")
        os.replace(tmp, path)


_SUBDIRS = ("shards", "rejects", "rejects/media", "quarantine", "stats", "state", "done")
_PASS2_DIRS = ("pass1", "done2")  # only in runs of recipes with two-pass selectors


def _input_of(name: str) -> int | None:
    """The input number in an output file name: ``part-KKKKK-NNNNNN.tar``, ``KKKKK.jsonl``, ``KKKKK.select.jsonl``."""
    stem = name.split(".")[0].split("-")
    num = stem[1] if stem[0] == "part" and len(stem) > 1 else stem[0]
    return int(num) if num.isdigit() else None


def _cleanup_from(out: Path, k: int, subdirs=_SUBDIRS + _PASS2_DIRS, tmp: str = "tmp") -> None:
    """Remove every trace of inputs >= k (an interrupted run's partial output)."""
    shutil.rmtree(out / tmp, ignore_errors=True)
    for sub in subdirs:
        for p in (out / sub).glob("*"):
            num = _input_of(p.name)
            if num is not None and num >= k:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _merge(counts: list[dict], labels: list[str]) -> dict:
    total = Counter()
    by_op: dict[str, Counter] = {}
    reasons: dict[str, Counter] = {}
    outputs = []
    for c in counts:
        total.update({k: v for k, v in c.items() if isinstance(v, int)})
        for op, d in c["by_op"].items():
            by_op.setdefault(op, Counter()).update(d)
        for what, d in c["reasons"].items():
            reasons.setdefault(what, Counter()).update(d)
        outputs += c["outputs"]
    order = labels + sorted(set(by_op) - set(labels))
    keys = ("rejected", "quarantined", "nodes_removed", "nodes_quarantined")
    return {
        **{k: total.get(k, 0) for k in ("input", "kept", "rejected", "quarantined", "kept_with_nodes_removed",
                                         "nodes_removed", "nodes_quarantined", "media_not_fetched")},
        "per_op": {op: {k: by_op.get(op, Counter()).get(k, 0) for k in keys} for op in order},
        "per_reason": {what: dict(sorted(reasons.get(what, Counter()).items())) for what in keys},
        "output_shards": outputs,
    }


def _open_run(out: Path, manifest: dict) -> None:
    """Create the output folder, or check that the one there holds a run of the same job (to resume)."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except ValueError:
            old = None
        if old != json.loads(json.dumps(manifest)):
            raise MMGenError(f"{out} holds a filter run with other inputs, recipe or options; "
                             "use a new --out folder or delete this one")
    else:
        if any(out.iterdir()):
            raise MMGenError(f"output folder {out} is not empty and holds no filter run; use a new --out folder")
        _write_json(mpath, manifest)
    for sub in _SUBDIRS:
        (out / sub).mkdir(exist_ok=True)


def _resume(out: Path, n_inputs: int, ops: list[Op]) -> list[dict]:
    """Counts of the finished inputs (a prefix: the parent commits in input order); reloads dedup state."""
    counts: list[dict] = []
    stateful = [o for o in ops if o.stateful]
    while len(counts) < n_inputs and (out / "done" / f"{len(counts):05d}.json").exists():
        k = len(counts)
        counts.append(json.loads((out / "done" / f"{k:05d}.json").read_text()))
        delta = json.loads((out / "state" / f"{k:05d}.json").read_text())
        for op in stateful:
            op.load_state(delta.get(op.label, []))
    _cleanup_from(out, len(counts))
    return counts


def _select_pass(out: Path, selectors: list[Op], pass1: list[dict], shard_size: int, dry_run: bool,
                 save_media: bool, progress: bool) -> list[dict]:
    """Pass 2: fix the selection over everything pass 1 observed, then decide pass 1's kept documents
    input by input in order (in this process: the decisions are lookups, the work is copying tar
    members). Resumes from ``done2/`` markers like pass 1 does from ``done/``. Returns the final
    counts per input."""
    from tqdm import tqdm

    for sel in selectors:
        sel.finalize()
    (out / "done2").mkdir(exist_ok=True)
    counts: list[dict] = []
    while len(counts) < len(pass1) and (out / "done2" / f"{len(counts):05d}.json").exists():
        counts.append(json.loads((out / "done2" / f"{len(counts):05d}.json").read_text()))
    _cleanup_from(out, len(counts), subdirs=("shards", "done2"), tmp="tmp2")
    for p in (out / "rejects").glob("*.select.jsonl"):
        if (_input_of(p.name) or 0) >= len(counts):
            p.unlink()
    for k in tqdm(range(len(counts), len(pass1)), desc="select", unit="file", disable=not progress):
        counts.append(_SelectCommit(out, k, selectors, pass1[k], shard_size, dry_run, save_media).run())
    shutil.rmtree(out / "pass1", ignore_errors=True)  # every input's pass 2 is done: the staging is spent
    return counts


def run_filter(recipe, inputs, out_dir, workers: int = 2, shard_size: int = 1000, dry_run: bool = False,
               progress: bool = True, executor: str = "local", input_format: str = "auto",
               save_reject_media: bool = False, report: bool = True, media_root: str | None = None,
               allow_outside_root: bool = False, unit_bytes: int | None = None,
               max_image_pixels: int | None = None) -> dict:
    """Filter ``inputs`` (glob, directory, path or list of them) with ``recipe`` into ``out_dir``.

    ``executor``: ``local`` (``workers`` processes) or ``ray`` (Ray tasks; the cluster ``ray.init``
    finds). ``input_format``: ``auto`` or a converter format for jsonl/parquet inputs.
    ``media_root``: a folder records' media paths may also name (besides the input file's own folder);
    ``allow_outside_root`` lifts that limit. ``unit_bytes``: the size of a jsonl/parquet work unit
    (None: about 1/64 of the corpus, 256 KiB to 64 MiB). ``max_image_pixels``: overrides the recipe's.
    Returns the summary (also written to ``out_dir/summary.json``). Rerunning into the same folder
    resumes: finished units are skipped and the final output is the same as an uninterrupted run's."""
    from tqdm import tqdm

    from mmgen.data.executors import EXECUTORS, results_in_order
    from mmgen.data.filter_inputs import INPUT_EXTS, INPUT_FORMATS, auto_unit_bytes, plan_units
    from mmgen.data.shards import expand_inputs

    r = load_recipe(recipe)
    if max_image_pixels is not None:
        r = dataclasses.replace(r, max_image_pixels=max_image_pixels)
    ops = build_ops(r)
    if workers < 1:
        raise MMGenError(f"workers must be >= 1, got {workers}")
    if shard_size < 1:
        raise MMGenError(f"shard_size must be >= 1, got {shard_size}")
    if executor not in EXECUTORS:
        raise MMGenError(f"unknown executor '{executor}' (use one of: {', '.join(EXECUTORS)})")
    if input_format not in INPUT_FORMATS:
        raise MMGenError(f"unknown input format '{input_format}' (use one of: {', '.join(INPUT_FORMATS)})")
    if unit_bytes is not None and (isinstance(unit_bytes, bool) or not isinstance(unit_bytes, int) or unit_bytes < 1):
        raise MMGenError(f"unit_bytes must be a positive integer, got {unit_bytes!r}")
    if media_root is not None:
        if not os.path.isdir(os.path.expanduser(str(media_root))):
            raise MMGenError(f"media root '{media_root}' is not a directory (give the folder holding the media files)")
        media_root = os.path.abspath(os.path.expanduser(str(media_root)))
    paths = [os.path.abspath(p) for p in expand_inputs(inputs, INPUT_EXTS)]
    unit_bytes = unit_bytes or auto_unit_bytes(paths)
    units = plan_units(paths, input_format, unit_bytes)
    read_opts = {"media_root": media_root, "allow_outside_root": bool(allow_outside_root)}
    out = Path(out_dir)
    recipe_data = dataclasses.asdict(r)
    _open_run(out, {"recipe": recipe_data, "inputs": paths, "shard_size": shard_size, "dry_run": dry_run,
                    "input_format": input_format, "save_reject_media": save_reject_media,
                    "unit_bytes": unit_bytes, **read_opts})
    selectors = two_pass_selectors(ops)
    counts = _resume(out, len(units), ops)
    todo = list(range(len(counts), len(units)))
    bar = tqdm(total=len(units), initial=len(counts), unit="unit", desc=f"filter {r.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        with results_in_order(executor, workers, recipe_data, ops, [units[k] for k in todo], read_opts) as results:
            for k, recs in zip(todo, results):
                commit = _ShardCommit(out, k, ops, shard_size, dry_run, save_reject_media, staged=bool(selectors))
                source = units[k].path
                for kind, rec in recs:
                    commit.bad(rec, source) if kind == "bad" else commit.doc(rec, source)
                    _maybe_die()
                counts.append(commit.finish())
                bar.update(1)
                bar.set_postfix(docs=sum(c["input"] for c in counts), kept=sum(c["kept"] for c in counts))
    finally:
        bar.close()
    if selectors:
        counts = _select_pass(out, selectors, counts, shard_size, dry_run, save_reject_media, progress)

    summary = {"recipe": r.name, "inputs": len(paths), "units": len(units), "dry_run": dry_run,
               "levels": {o.label: o.level for o in ops}, **_merge(counts, [o.label for o in ops])}
    if selectors:
        summary["selection"] = {o.label: {"observed": len(o.values), "selected": len(o.kept),
                                          "rejected": summary["per_op"][o.label]["rejected"]} for o in selectors}
    summary["balanced"] = summary["input"] == summary["kept"] + summary["rejected"] + summary["quarantined"]
    _write_json(out / "summary.json", summary)
    if report:
        from mmgen.data.filter_report import write_report

        write_report(out, summary, ops)
    return summary


# ---------------------------------------------------------------------------------------------------
# Scoring against ground truth (ShapesWorld's labels.jsonl)

# Reason codes -> the ShapesWorld defect type they detect.
REASON_DEFECT = {
    "caption_mismatch": "mismatched_caption", "duplicate_image": "duplicate_image",
    "near_duplicate_image": "near_duplicate_image", "duplicate_doc": "duplicate_doc",
    "near_duplicate_doc": "near_duplicate_doc", "corrupt_image": "corrupt_image",
    "undecodable_media": "corrupt_image", "truncated_image": "corrupt_image", "not_an_image": "corrupt_image",
    "image_too_small": "tiny_image", "extreme_aspect": "extreme_aspect",
    "gibberish": "gibberish_text", "special_characters": "gibberish_text", "low_alnum": "gibberish_text",
    "ngram_repetition": "ngram_spam", "non_english": "non_english", "too_short": "empty_item",
    "empty_text": "empty_item", "empty_image": "empty_item", "empty_audio": "empty_item",
    "empty_video": "empty_item", "empty_doc": "empty_item",
    # the Data-Juicer-named operators' reasons
    "character_repetition": "ngram_spam", "word_repetition": "ngram_spam", "low_alphanumeric": "gibberish_text",
    "wrong_language": "non_english", "aspect_ratio": "extreme_aspect", "image_shape": "tiny_image",
    "text_length": "empty_item", "words_num": "empty_item", "near_duplicate_image_in_doc": "near_duplicate_image",
}


def score_against_labels(out_dir, labels_path) -> dict:
    """Per-defect precision and recall of a finished run against a world's ``labels.jsonl``.

    A document counts as flagged for a defect type when any action on it (rejection, quarantine,
    node removal, or a node removal before its rejection) has a reason mapped to that type.
    Documents are matched to label rows by their input position (the shard member's index), so
    exact copies sharing an id are told apart. Only valid for inputs written by ``mmgen world``."""
    out = Path(out_dir)
    labels = [json.loads(line) for line in open(labels_path, encoding="utf-8")]
    flagged: dict[int, set] = {}
    for sub in ("rejects", "quarantine"):
        for p in sorted((out / sub).glob("*.jsonl")):
            for line in p.open(encoding="utf-8"):
                r = json.loads(line)
                member = (r.get("provenance") or {}).get("member") or r.get("member") or ""
                head = os.path.basename(str(member)).split("_")[0]
                if not head.isdigit():
                    continue
                reasons = [r["reason"]] + [e["reason"] for e in r.get("removed_nodes_before", [])]
                flagged.setdefault(int(head), set()).update(REASON_DEFECT.get(x, x) for x in reasons)
    types = sorted({d["type"] for lab in labels for d in lab["defects"]})
    per = {}
    for t in types:
        truth = {i for i, lab in enumerate(labels) if any(d["type"] == t for d in lab["defects"])}
        pred = {i for i, f in flagged.items() if t in f}
        tp = len(truth & pred)
        per[t] = {"true": len(truth), "flagged": len(pred), "tp": tp,
                  "precision": round(tp / len(pred), 4) if pred else None,
                  "recall": round(tp / len(truth), 4) if truth else None}
    clean = [i for i, lab in enumerate(labels) if not lab["defects"]]
    touched = sum(1 for i in clean if flagged.get(i))
    # "kept" strictly: a clean document counts as lost when anything at all was taken from it
    return {"per_defect": per, "clean_docs": len(clean), "clean_docs_touched": touched,
            "clean_kept_fraction": round(1 - touched / len(clean), 4) if clean else None}
