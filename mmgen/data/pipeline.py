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
folder or ``media_root``; see :class:`mmgen.data.formats.common.ReadContext`), and images over
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
    manifest.json                  the job and its work units (a resume plans nothing, reads no input)
    summary.json report.md plots/*.png

A recipe ending in two-pass selectors (``top_k``, ``top_fraction``, ranked ``source_quota``) runs in
two passes. Pass 1 is the run above, except that the kept documents are staged in ``pass1/``
(shards plus ``pass1/KKKKK.jsonl``, one row per document) while the selectors observe their values
(in ``state/``). Then the selectors fix the selection over the whole corpus and pass 2 goes over
``pass1/`` input by input, in order, in this process: selected documents are copied into
``shards/``, the others go to ``rejects/KKKKK.select.jsonl`` with the selector's value, their stats
rows become ``rejected``, and ``done2/KKKKK.json`` (the input's final counts) marks it finished.
Both passes resume from their markers; ``pass1/`` is removed when pass 2 is complete.

Counts always add up: input = kept + rejected + quarantined (documents). Node-level removals from
kept documents are counted separately."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from mmgen.data.executors import EXECUTORS, results_in_order
from mmgen.data.filter_commit import SelectCommit, ShardCommit, maybe_die, write_json
from mmgen.data.filter_inputs import INPUT_FORMATS, WorkUnit, auto_unit_bytes, plan_units
from mmgen.data.filter_recipe import build_ops, load_recipe, two_pass_selectors
from mmgen.data.filter_report import write_report
from mmgen.data.formats.common import checked_media_root
from mmgen.data.input_kind import INPUT_EXTS
from mmgen.data.ops.base import Op
from mmgen.data.shards import expand_inputs
from mmgen.errors import MMGenError

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
        **{
            k: total.get(k, 0)
            for k in (
                "input",
                "kept",
                "rejected",
                "quarantined",
                "kept_with_nodes_removed",
                "nodes_removed",
                "nodes_quarantined",
                "media_not_fetched",
            )
        },
        "per_op": {op: {k: by_op.get(op, Counter()).get(k, 0) for k in keys} for op in order},
        "per_reason": {what: dict(sorted(reasons.get(what, Counter()).items())) for what in keys},
        "output_shards": outputs,
    }


def _open_run(out: Path, job: dict, plan) -> list:
    """The work units of the run in ``out``: those its manifest saved when the folder holds a run of
    the same job (a resume plans nothing, so it reads no input), else ``plan()``'s, saved with the job
    in a new manifest. Refuses a folder holding anything else."""
    mpath = out / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except ValueError:
            old = None
        saved = old.pop("units", None) if isinstance(old, dict) else None
        if old != json.loads(json.dumps(job)):
            raise MMGenError(
                f"{out} holds a filter run with other inputs, recipe or options; "
                "use a new --out folder or delete this one"
            )
        if saved is None:
            units = plan()  # a manifest written before the units were saved in it
        else:
            try:
                units = [WorkUnit(**u) for u in saved]
            except TypeError:
                raise MMGenError(
                    f"{mpath} holds work units this version cannot read; use a new --out folder or delete this one"
                ) from None
    else:
        if out.is_dir() and any(out.iterdir()):
            raise MMGenError(f"output folder {out} is not empty and holds no filter run; use a new --out folder")
        units = plan()
        out.mkdir(parents=True, exist_ok=True)
        write_json(mpath, {**job, "units": [dataclasses.asdict(u) for u in units]})
    for sub in _SUBDIRS:
        (out / sub).mkdir(exist_ok=True)
    return units


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


def _select_pass(
    out: Path, selectors: list[Op], pass1: list[dict], shard_size: int, dry_run: bool, save_media: bool, progress: bool
) -> list[dict]:
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
        counts.append(SelectCommit(out, k, selectors, pass1[k], shard_size, dry_run, save_media).run())
    shutil.rmtree(out / "pass1", ignore_errors=True)  # every input's pass 2 is done: the staging is spent
    return counts


def run_filter(
    recipe,
    inputs,
    out_dir,
    workers: int = 2,
    shard_size: int = 1000,
    dry_run: bool = False,
    progress: bool = True,
    executor: str = "local",
    input_format: str = "auto",
    save_reject_media: bool = False,
    report: bool = True,
    media_root: str | None = None,
    allow_outside_root: bool = False,
    unit_bytes: int | None = None,
    max_image_pixels: int | None = None,
) -> dict:
    """Filter ``inputs`` (glob, directory, path or list of them) with ``recipe`` into ``out_dir``.

    ``executor``: ``local`` (``workers`` processes) or ``ray`` (Ray tasks; the cluster ``ray.init``
    finds). ``input_format``: ``auto`` or a converter format for jsonl/parquet inputs.
    ``media_root``: a folder records' media paths may also name (besides the input file's own folder);
    ``allow_outside_root`` lifts that limit. ``unit_bytes``: the size of a jsonl/parquet work unit
    (None: about 1/64 of the corpus, 256 KiB to 64 MiB). ``max_image_pixels``: overrides the recipe's.
    Returns the summary (also written to ``out_dir/summary.json``). Rerunning into the same folder
    resumes: finished units are skipped and the final output is the same as an uninterrupted run's."""
    from tqdm import tqdm

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
    media_root = checked_media_root(media_root)
    paths = [os.path.abspath(p) for p in expand_inputs(inputs, INPUT_EXTS)]
    unit_bytes = unit_bytes or auto_unit_bytes(paths)
    read_opts = {"media_root": media_root, "allow_outside_root": bool(allow_outside_root)}
    out = Path(out_dir)
    recipe_data = dataclasses.asdict(r)
    units = _open_run(
        out,
        {
            "recipe": recipe_data,
            "inputs": paths,
            "shard_size": shard_size,
            "dry_run": dry_run,
            "input_format": input_format,
            "save_reject_media": save_reject_media,
            "unit_bytes": unit_bytes,
            **read_opts,
        },
        lambda: plan_units(paths, input_format, unit_bytes),
    )
    selectors = two_pass_selectors(ops)
    counts = _resume(out, len(units), ops)
    todo = list(range(len(counts), len(units)))
    bar = tqdm(
        total=len(units),
        initial=len(counts),
        unit="unit",
        desc=f"filter {r.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        with results_in_order(executor, workers, recipe_data, ops, [units[k] for k in todo], read_opts) as results:
            for k, recs in zip(todo, results):
                commit = ShardCommit(out, k, ops, shard_size, dry_run, save_reject_media, staged=bool(selectors))
                source = units[k].path
                for kind, rec in recs:
                    commit.bad(rec, source) if kind == "bad" else commit.doc(rec, source)
                    maybe_die()
                counts.append(commit.finish())
                bar.update(1)
                bar.set_postfix(docs=sum(c["input"] for c in counts), kept=sum(c["kept"] for c in counts))
    finally:
        bar.close()
    if selectors:
        counts = _select_pass(out, selectors, counts, shard_size, dry_run, save_reject_media, progress)

    summary = {
        "recipe": r.name,
        "inputs": len(paths),
        "units": len(units),
        "dry_run": dry_run,
        "levels": {o.label: o.level for o in ops},
        **_merge(counts, [o.label for o in ops]),
    }
    if selectors:
        summary["selection"] = {
            o.label: {
                "observed": len(o.values),
                "selected": len(o.kept),
                "rejected": summary["per_op"][o.label]["rejected"],
            }
            for o in selectors
        }
    summary["balanced"] = summary["input"] == summary["kept"] + summary["rejected"] + summary["quarantined"]
    write_json(out / "summary.json", summary)
    if report:
        write_report(out, summary, ops)
    return summary


# Reason codes -> the ShapesWorld defect type they detect.
REASON_DEFECT = {
    "caption_mismatch": "mismatched_caption",
    "duplicate_image": "duplicate_image",
    "near_duplicate_image": "near_duplicate_image",
    "duplicate_doc": "duplicate_doc",
    "near_duplicate_doc": "near_duplicate_doc",
    "corrupt_image": "corrupt_image",
    "undecodable_media": "corrupt_image",
    "truncated_image": "corrupt_image",
    "not_an_image": "corrupt_image",
    "image_too_small": "tiny_image",
    "extreme_aspect": "extreme_aspect",
    "gibberish": "gibberish_text",
    "special_characters": "gibberish_text",
    "low_alnum": "gibberish_text",
    "ngram_repetition": "ngram_spam",
    "non_english": "non_english",
    "too_short": "empty_item",
    "empty_text": "empty_item",
    "empty_image": "empty_item",
    "empty_audio": "empty_item",
    "empty_video": "empty_item",
    "empty_doc": "empty_item",
    # the Data-Juicer-named operators' reasons
    "character_repetition": "ngram_spam",
    "word_repetition": "ngram_spam",
    "low_alphanumeric": "gibberish_text",
    "wrong_language": "non_english",
    "aspect_ratio": "extreme_aspect",
    "image_shape": "tiny_image",
    "text_length": "empty_item",
    "words_num": "empty_item",
    "near_duplicate_image_in_doc": "near_duplicate_image",
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
        per[t] = {
            "true": len(truth),
            "flagged": len(pred),
            "tp": tp,
            "precision": round(tp / len(pred), 4) if pred else None,
            "recall": round(tp / len(truth), 4) if truth else None,
        }
    clean = [i for i, lab in enumerate(labels) if not lab["defects"]]
    touched = sum(1 for i in clean if flagged.get(i))
    # "kept" strictly: a clean document counts as lost when anything at all was taken from it
    return {
        "per_defect": per,
        "clean_docs": len(clean),
        "clean_docs_touched": touched,
        "clean_kept_fraction": round(1 - touched / len(clean), 4) if clean else None,
    }
