"""Writing one work unit's results: kept shards, rejects, quarantine and statistics, staged under
``tmp/`` and moved into place with the unit's done marker, so a killed run never leaves half a unit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmgen.data.doc import Doc, Text
from mmgen.data.filter_worker import run_op
from mmgen.data.ops.base import DocView, Op
from mmgen.data.shards import ShardWriter, sample_to_doc, tar_samples
from mmgen.errors import MediaError, MMGenError
from mmgen.utils.files import write_json


def json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str) + "\n"


def provenance_of(doc: Doc) -> dict:
    return {k: v for k, v in doc.provenance.items() if isinstance(v, (str, int, float))}


# Test hook: SIGKILL this process after committing this many documents (a crash at a random point).
KILL_ENV = "MMGEN_FILTER_KILL_AFTER_DOCS"
_committed_docs = 0


def maybe_die() -> None:
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
                    rows.append(
                        (
                            doc_id,
                            status,
                            item,
                            op,
                            name,
                            None,
                            v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str),
                        )
                    )
    return rows


def write_stats_parquet(rows: list[tuple], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*rows)) if rows else [()] * len(STATS_COLUMNS)
    types = (pa.string(), pa.string(), pa.int32(), pa.string(), pa.string(), pa.float64(), pa.string())
    table = pa.table({n: pa.array(list(c), type=t) for n, c, t in zip(STATS_COLUMNS, cols, types)})
    pq.write_table(table, path, compression="zstd")


class ShardCommit:
    """Everything one input file produces, written by the parent in input order.

    All of it goes to ``tmp/KKKKK/`` first and is renamed into place by :meth:`finish`, done marker
    last: a kill at any moment leaves either a finished input or files a rerun removes.

    ``staged`` (a recipe with two-pass selectors): the kept documents are pass 1's output, not the
    run's; they go to ``pass1/`` with a row per document (``pass1/KKKKK.jsonl``: id and where it came
    from) for :class:`SelectCommit` to decide on once the selection is fixed."""

    def __init__(
        self,
        out: Path,
        k: int,
        ops: list[Op],
        shard_size: int,
        dry_run: bool,
        save_media: bool,
        staged: bool = False,
        tmp_root: str = "tmp",
    ):
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
        self.c: dict[str, Any] = {
            "input": 0,
            "kept": 0,
            "rejected": 0,
            "quarantined": 0,
            "kept_with_nodes_removed": 0,
            "nodes_removed": 0,
            "nodes_quarantined": 0,
            "media_not_fetched": 0,
            "by_op": {},
            "reasons": {"rejected": {}, "quarantined": {}, "nodes_removed": {}, "nodes_quarantined": {}},
        }

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
        self.quarantine.write(json_line({"level": "record", "op": "reader", "input": source, **rec}))

    def doc(self, res: dict, source: str) -> None:
        self.c["input"] += 1
        doc: Doc = res["doc"]
        view = DocView(doc)
        view.alive = list(res["alive"])
        stats, events, fate = res["stats"], list(res["events"]), res["fate"]
        if fate is None:
            for op in self.stateful:
                fate = run_op(op, view, stats, events, decide_sig=res["sigs"].get(op.label), doc_id=doc.id)
                if fate is not None:
                    break
        base = {"id": doc.id, "input": source, "provenance": provenance_of(doc)}
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
            (self.quarantine if status == "quarantined" else self.rejects).write(json_line(record))
        self.stat_rows += _stat_rows(doc.id, "kept", stats)
        if self.observed is not None:
            self.observed.write(json_line({"id": doc.id, "base": base, "lost_items": bool(events)}))
        if not self.dry_run:
            if self.writer is None:
                self.writer = ShardWriter(
                    self.tmp / "shards", prefix=f"part-{self.tag}", max_docs=self.shard_size, mtime=0
                )
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
            self.quarantine.write(json_line(record))
        else:
            self.c["rejected"] += 1
            self._bump(fate["op"], "rejected", fate["reason"])
            if self.save_media:
                record["media"] = self._media(doc, list(range(len(doc.items))))
            self.rejects.write(json_line(record))
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
        write_json(self.out / "state" / f"{self.tag}.json", {op.label: op.state_delta() for op in self.stateful})
        write_json(self.out / "done" / f"{self.tag}.json", self.c)  # last: marks the input finished
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.c


class SelectCommit(ShardCommit):
    """Pass 2 of a recipe with two-pass selectors, for input K: pass 1's kept documents of K in
    order, each kept or rejected by the finalized selectors (the first that rejects names the reason).

    The selected documents' tar members are copied as pass 1 wrote them, so the shards are what a
    one-pass run would have written. Writes to ``tmp2/KKKKK/``, then renames into place: shards,
    ``rejects/KKKKK.select.jsonl``, the stats rows' status, and ``done2/KKKKK.json`` (the input's final
    counts) last."""

    def __init__(
        self, out: Path, k: int, selectors: list[Op], pass1: dict, shard_size: int, dry_run: bool, save_media: bool
    ):
        super().__init__(out, k, selectors, shard_size, dry_run, save_media, tmp_root="tmp2")
        self.selectors = selectors
        self.c = json.loads(json.dumps(pass1))
        self.rejected_ids: set[str] = set()

    def pass1_docs(self):
        """(row, doc, sample) for every document pass 1 kept for input K, in order."""
        rows = [json.loads(x) for x in open(self.out / "pass1" / f"{self.tag}.jsonl", encoding="utf-8")]
        if self.dry_run:  # nothing was written in pass 1: the decisions need only the ids
            yield from ((r, Doc(items=[], id=r["id"]), None) for r in rows)
            return
        import tarfile

        samples = (
            smp
            for p in sorted((self.out / "pass1").glob(f"part-{self.tag}-*.tar"))
            for smp in tar_samples(tarfile.open(p, "r|"), str(p))
        )
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
                maybe_die()
                continue
            if not self.dry_run:
                if self.writer is None:
                    self.writer = ShardWriter(
                        self.tmp / "shards", prefix=f"part-{self.tag}", max_docs=self.shard_size, mtime=0
                    )
                self.writer.write_sample(doc, {k: v for k, v in sample.items() if k != "__key__"})
            maybe_die()
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
        write_json(self.out / "done2" / f"{self.tag}.json", self.c)  # last: marks pass 2 of the input finished
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
        status = [
            "rejected" if i in self.rejected_ids else s
            for i, s in zip(t.column("id").to_pylist(), t.column("status").to_pylist())
        ]
        t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(status, type=pa.string()))
        tmp = self.tmp / "stats.parquet"
        pq.write_table(t, tmp, compression="zstd")
        os.replace(tmp, path)
