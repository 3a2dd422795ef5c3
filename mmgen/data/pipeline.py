"""The filtering runner behind ``mmgen filter``: a recipe of operators over input shards.

    summary = run_filter("shapesworld", "world/*.tar", "filtered/", workers=2)

Work is split by input file (a WebDataset shard or an mmgen jsonl). Workers run the stateless
operators and compute the hashes of the deduplication operators; the parent takes the workers'
results in input order, runs the deduplication decisions against the run-wide index, and writes
everything. The output therefore does not depend on the number of workers.

Output folder::

    shards/part-KKKKK-NNNNNN.tar   kept documents of input file K (at most shard_size per tar)
    rejects/KKKKK.jsonl            every rejected document and every removed node, with op, reason, stats
    quarantine/KKKKK.jsonl         unreadable records, corrupt tars, undecodable or missing media
    stats/KKKKK.jsonl              per-document statistics of every operator (for tuning thresholds)
    state/KKKKK.json               what input K added to the deduplication indexes
    done/KKKKK.json                input K is finished (its counts); a rerun skips it
    manifest.json summary.json report.md

Counts always add up: input = kept + rejected + quarantined (documents). Node-level removals from
kept documents are counted separately.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from mmgen.config import from_dict, read_yaml_mapping
from mmgen.data.doc import BadRecord, Doc, Text
from mmgen.data.ops.base import DocView, Op, Verdict, build_op, error_text
from mmgen.errors import MediaError, MMGenError


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
    return ops


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
    except MediaError as e:
        verdicts = [Verdict("undecodable_media", {"error": error_text(e)}, quarantine=True)]
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
                except MediaError as e:
                    fate = {"op": op.label, "reason": "undecodable_media", "item": None,
                            "stats": {"error": error_text(e)}, "status": "quarantined"}
                    break
    return {"doc": doc, "alive": view.alive, "stats": stats, "events": events, "fate": fate, "sigs": sigs}


def process_input(ops: list[Op], path: str) -> list:
    from mmgen.data.shards import read_docs

    out = []
    for rec in read_docs([path]):
        out.append(("bad", rec.to_json()) if isinstance(rec, BadRecord) else ("doc", process_doc(ops, rec)))
    return out


_WORKER_OPS: list[Op] | None = None


def _init_worker(recipe_data: dict) -> None:
    global _WORKER_OPS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_OPS = build_ops(from_dict(Recipe, recipe_data))


def _worker(path: str) -> list:
    return process_input(_WORKER_OPS, path)


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


class _ShardCommit:
    """Everything one input file produces, written by the parent in input order."""

    def __init__(self, out: Path, k: int, ops: list[Op], shard_size: int, dry_run: bool):
        self.out, self.k, self.ops, self.shard_size, self.dry_run = out, k, ops, shard_size, dry_run
        self.stateful = [o for o in ops if o.stateful]
        tag = f"{k:05d}"
        self.rejects = open(out / "rejects" / f"{tag}.jsonl", "w", encoding="utf-8")
        self.quarantine = open(out / "quarantine" / f"{tag}.jsonl", "w", encoding="utf-8")
        self.stats = open(out / "stats" / f"{tag}.jsonl", "w", encoding="utf-8")
        self.writer = None
        self.c: dict[str, Any] = {"input": 0, "kept": 0, "rejected": 0, "quarantined": 0,
                                  "kept_with_nodes_removed": 0, "nodes_removed": 0, "nodes_quarantined": 0,
                                  "by_op": {}, "reasons": {"rejected": {}, "quarantined": {}, "nodes_removed": {},
                                                           "nodes_quarantined": {}}}

    def _bump(self, op: str, what: str, reason: str) -> None:
        by = self.c["by_op"].setdefault(op, {})
        by[what] = by.get(what, 0) + 1
        r = self.c["reasons"][what]
        r[reason] = r.get(reason, 0) + 1

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
                self.rejects.write(_json_line(record))
            self.stats.write(_json_line({"id": doc.id, "status": status, "stats": stats}))
            return
        for op in self.stateful:
            op.commit(view, res["sigs"].get(op.label), doc.id)
        self.c["kept"] += 1
        if events:
            self.c["kept_with_nodes_removed"] += 1
        for ev in events:
            status = ev.pop("status")
            what = "nodes_quarantined" if status == "quarantined" else "nodes_removed"
            self.c[what] += 1
            self._bump(ev["op"], what, ev["reason"])
            (self.quarantine if status == "quarantined" else self.rejects).write(
                _json_line({**base, "level": "node", **ev}))
        self.stats.write(_json_line({"id": doc.id, "status": "kept", "nodes_removed": len(events), "stats": stats}))
        if not self.dry_run:
            if self.writer is None:
                from mmgen.data.shards import ShardWriter

                self.writer = ShardWriter(self.out / "shards", prefix=f"part-{self.k:05d}", max_docs=self.shard_size,
                                          mtime=0.0)
            self.writer.write(view.result())

    def finish(self) -> dict:
        for f in (self.rejects, self.quarantine, self.stats):
            f.close()
        outputs = []
        if self.writer is not None:
            self.writer.close()
            outputs = sorted(p.name for p in (self.out / "shards").glob(f"part-{self.k:05d}-*.tar"))
        self.c["outputs"] = outputs
        _write_json(self.out / "state" / f"{self.k:05d}.json",
                    {op.label: op.state_delta() for op in self.stateful})
        _write_json(self.out / "done" / f"{self.k:05d}.json", self.c)  # last: marks the input finished
        return self.c


def _cleanup_from(out: Path, k: int) -> None:
    """Remove every trace of inputs >= k (an interrupted run's partial output)."""
    for sub in ("done", "state", "rejects", "quarantine", "stats"):
        for p in (out / sub).glob("*"):
            stem = p.name.split(".")[0]
            if stem.isdigit() and int(stem) >= k:
                p.unlink()
    for p in (out / "shards").glob("part-*.tar"):
        if int(p.name.split("-")[1]) >= k:
            p.unlink()


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
                                         "nodes_removed", "nodes_quarantined")},
        "per_op": {op: {k: by_op.get(op, Counter()).get(k, 0) for k in keys} for op in order},
        "per_reason": {what: dict(sorted(reasons.get(what, Counter()).items())) for what in keys},
        "output_shards": outputs,
    }


def _report(summary: dict) -> str:
    s = summary
    lines = [f"# Filter report: {s['recipe']}", "",
             f"{s['inputs']} input files, {s['input']} documents: **{s['kept']} kept**, {s['rejected']} rejected, "
             f"{s['quarantined']} quarantined (input = kept + rejected + quarantined: "
             f"{'yes' if s['balanced'] else 'NO'}).",
             f"{s['kept_with_nodes_removed']} kept documents lost items: {s['nodes_removed']} removed, "
             f"{s['nodes_quarantined']} quarantined." + (" Dry run: no shards written." if s["dry_run"] else ""),
             "", "| operator | level | docs rejected | docs quarantined | nodes removed | nodes quarantined |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for op, c in s["per_op"].items():
        lines.append(f"| {op} | {s['levels'].get(op, '-')} | {c['rejected']} | {c['quarantined']} | "
                     f"{c['nodes_removed']} | {c['nodes_quarantined']} |")
    lines += ["", "| outcome | reason | count |", "| --- | --- | ---: |"]
    for what, d in s["per_reason"].items():
        for reason, n in d.items():
            lines.append(f"| {what} | {reason} | {n} |")
    return "\n".join(lines) + "\n"


def run_filter(recipe, inputs, out_dir, workers: int = 2, shard_size: int = 1000, dry_run: bool = False,
               progress: bool = True) -> dict:
    """Filter ``inputs`` (glob, directory, path or list of them) with ``recipe`` into ``out_dir``.

    Returns the summary (also written to ``out_dir/summary.json``). Rerunning into the same folder
    resumes: finished input files are skipped and the final output is the same."""
    from tqdm import tqdm

    from mmgen.data.shards import expand_inputs

    r = load_recipe(recipe)
    ops = build_ops(r)
    if workers < 1:
        raise MMGenError(f"workers must be >= 1, got {workers}")
    if shard_size < 1:
        raise MMGenError(f"shard_size must be >= 1, got {shard_size}")
    paths = [os.path.abspath(p) for p in expand_inputs(inputs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"recipe": dataclasses.asdict(r), "inputs": paths, "shard_size": shard_size, "dry_run": dry_run}
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
    for sub in ("shards", "rejects", "quarantine", "stats", "state", "done"):
        (out / sub).mkdir(exist_ok=True)

    # Resume: the finished inputs form a prefix (the parent commits in input order).
    counts: list[dict] = []
    stateful = [o for o in ops if o.stateful]
    while len(counts) < len(paths) and (out / "done" / f"{len(counts):05d}.json").exists():
        k = len(counts)
        counts.append(json.loads((out / "done" / f"{k:05d}.json").read_text()))
        delta = json.loads((out / "state" / f"{k:05d}.json").read_text())
        for op in stateful:
            op.load_state(delta.get(op.label, []))
    start = len(counts)
    _cleanup_from(out, start)

    todo = list(range(start, len(paths)))
    bar = tqdm(total=len(paths), initial=start, unit="shard", desc=f"filter {r.name}", disable=not progress,
               dynamic_ncols=True)
    pool = None
    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            # spawn: workers start clean (no inherited threads or open files), on every platform
            pool = mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_init_worker,
                                                initargs=(dataclasses.asdict(r),))
            results = pool.imap(_worker, [paths[k] for k in todo], chunksize=1)
        else:
            results = (process_input(ops, paths[k]) for k in todo)
        kept = sum(c["kept"] for c in counts)
        for k, recs in zip(todo, results):
            commit = _ShardCommit(out, k, ops, shard_size, dry_run)
            for kind, rec in recs:
                commit.bad(rec, paths[k]) if kind == "bad" else commit.doc(rec, paths[k])
            counts.append(commit.finish())
            kept += counts[-1]["kept"]
            bar.update(1)
            bar.set_postfix(docs=sum(c["input"] for c in counts), kept=kept)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    summary = {"recipe": r.name, "inputs": len(paths), "dry_run": dry_run,
               "levels": {o.label: o.level for o in ops}, **_merge(counts, [o.label for o in ops])}
    summary["balanced"] = summary["input"] == summary["kept"] + summary["rejected"] + summary["quarantined"]
    _write_json(out / "summary.json", summary)
    (out / "report.md").write_text(_report(summary))
    return summary


# ---------------------------------------------------------------------------------------------------
# Scoring against ground truth (ShapesWorld's labels.jsonl)

# Reason codes -> the ShapesWorld defect type they detect.
REASON_DEFECT = {
    "caption_mismatch": "mismatched_caption", "duplicate_image": "duplicate_image",
    "near_duplicate_image": "near_duplicate_image", "duplicate_doc": "duplicate_doc",
    "near_duplicate_doc": "near_duplicate_doc", "corrupt_image": "corrupt_image",
    "undecodable_media": "corrupt_image", "image_too_small": "tiny_image", "extreme_aspect": "extreme_aspect",
    "gibberish": "gibberish_text", "special_characters": "gibberish_text", "low_alnum": "gibberish_text",
    "ngram_repetition": "ngram_spam", "non_english": "non_english", "too_short": "empty_item",
    "empty_text": "empty_item", "empty_image": "empty_item", "empty_audio": "empty_item",
    "empty_video": "empty_item", "empty_doc": "empty_item",
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
    return {"per_defect": per, "clean_docs": len(clean),
            "clean_docs_touched": sum(1 for i in clean if flagged.get(i))}
