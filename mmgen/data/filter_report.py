"""``DIR/report.md`` of a filter run: counts per operator and reason, a histogram of every statistic
with the recipe's thresholds drawn (``DIR/plots/*.png``), and a few rejected and kept examples per
reason. It reads only the run's files, so it can be rebuilt for any finished run:

    write_report("filtered/", json.load(open("filtered/summary.json")), build_ops(load_recipe(r)))
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path

from mmgen.data.shards import read_shard

EXAMPLES_PER_REASON = 3
STATUS_COLORS = {"kept": "#4C72B0", "rejected": "#DD8452", "quarantined": "#C44E52"}


def thresholds(op) -> dict[str, list[tuple[str, float]]]:
    """stat name -> [(param name, value)] for the op's ``min_*`` / ``max_*`` parameters.

    An op may say it outright with a ``thresholds`` mapping {stat: [param, ...]}; otherwise a
    parameter ``max_special_ratio`` belongs to a stat named ``special_ratio`` (or ending in it)."""
    params = (
        {f.name: getattr(op.params, f.name) for f in dataclasses.fields(op.params)}
        if dataclasses.is_dataclass(op.params)
        else {}
    )
    numeric = {k: v for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    explicit = getattr(op, "thresholds", None)
    if isinstance(explicit, dict):
        return {stat: [(p, numeric[p]) for p in names if p in numeric] for stat, names in explicit.items()}
    out: dict[str, list] = {}
    for name, value in numeric.items():
        m = re.match(r"(min|max)_(.+)", name)
        if m:
            out.setdefault(m.group(2), []).append((name, value))
    single = getattr(op, "stat", None)  # one-statistic ops bound it with min_value / max_value
    if isinstance(single, str) and single and "value" in out:
        out[single] = out.pop("value")
    return out


def _threshold_for(stat: str, table: dict) -> list[tuple[str, float]]:
    if stat in table:
        return table[stat]
    for key, lines in table.items():
        if stat.endswith("_" + key) or key.endswith("_" + stat):
            return lines
    return []


def _load_stats(out: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((out / "stats").glob("*.parquet"))
    if not files:
        return None
    # ParquetFile, not read_table: the latter imports pyarrow.dataset and with it pandas (~0.5 s)
    return pa.concat_tables([pq.ParquetFile(f).read() for f in files])


def _plot(values_by_status: dict, lines: list, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import StrMethodFormatter

    allv = np.concatenate([v for v in values_by_status.values() if len(v)])
    lo, hi = float(allv.min()), float(allv.max())
    for _, t in lines:
        if np.isfinite(t) and abs(t) < 1e9:  # "no limit" defaults would squash the axis
            lo, hi = min(lo, t), max(hi, t)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    fig = plt.figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_axes((0.14, 0.15, 0.83, 0.75))  # room for 5-digit counts and the y label
    # one filled step artist per fate, stacked by hand: far cheaper to draw than a bar per bin
    base = np.zeros(len(bins) - 1)
    for s in (s for s in STATUS_COLORS if s in values_by_status):
        counts = np.histogram(values_by_status[s], bins)[0]
        ax.stairs(base + counts, bins, baseline=base, fill=True, color=STATUS_COLORS[s], label=f"doc {s}")
        base = base + counts
    for name, t in lines:
        if lo <= t <= hi:
            ax.axvline(t, color="black", linestyle="--", linewidth=1.2)
            ax.annotate(
                f"{name} = {t:g}",
                (t, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    if base.max() > 20 * max(1.0, float(np.median(base))):
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        # Decades only, labelled 1, 10, 100: minor ticks and the default mathtext labels (10^k, parsed by
        # pyparsing) were most of a plot's drawing time
        ax.minorticks_off()
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    # y given: matplotlib then skips placing the title above the tick labels' bounding boxes, which
    # measures every tick label and cost two thirds of a plot's drawing (the x axis is at the bottom anyway)
    ax.set_title(title, fontsize=10, y=1.0)
    ax.set_xlabel(title.split(" / ")[-1])
    ax.set_ylabel("count (items or docs)")
    ax.legend(fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def write_plots(out: Path, ops) -> list[tuple[str, str, str]]:
    """One histogram per numeric (op, stat); returns [(op, stat, png path relative to out)]."""
    import numpy as np
    import pyarrow.compute as pc

    table = _load_stats(out)
    if table is None or table.num_rows == 0:
        return []
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    value = table.column("value")
    table = table.filter(pc.and_(pc.is_valid(value), pc.invert(pc.is_nan(value))))
    # grouped by Arrow: a Python loop over every (document, statistic) row cost more than the plots
    grouped = table.group_by(["op", "stat", "status"]).aggregate([("value", "list")]).to_pydict()
    groups: dict[tuple, dict] = defaultdict(dict)
    for op, stat, status, values in zip(grouped["op"], grouped["stat"], grouped["status"], grouped["value_list"]):
        groups[(op, stat)][status] = np.asarray(values, dtype=float)
    by_label = {o.label: o for o in ops}
    made = []
    for (op, stat), per in sorted(groups.items()):
        lines = _threshold_for(stat, thresholds(by_label[op])) if op in by_label else []
        name = re.sub(r"[^A-Za-z0-9_]+", "_", f"{op}__{stat}") + ".png"
        _plot(per, lines, f"{op} / {stat}", plots / name)
        made.append((op, stat, f"plots/{name}"))
    return made


def _excerpt(rec: dict, width: int = 90) -> str:
    text = rec.get("text")
    if text is None and isinstance(rec.get("doc"), dict):
        text = " ".join(i.get("text", "") for i in rec["doc"].get("items", []) if i.get("type") == "text")
    if text is None:
        text = f"[{rec.get('kind', 'item')}, {rec.get('bytes', '?')} bytes]"
    text = " ".join(str(text).split())
    return (text[:width] + "…" if len(text) > width else text).replace("|", "\\|")


def _examples(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = defaultdict(list)
    for sub in ("rejects", "quarantine"):
        for p in sorted((out / sub).glob("*.jsonl")):
            with p.open(encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    key = f"{sub}: {rec.get('op')} / {rec['reason']}"
                    if len(found[key]) < EXAMPLES_PER_REASON:
                        found[key].append(rec)
    return found


def _kept_examples(out: Path, n: int = EXAMPLES_PER_REASON) -> list[str]:
    shown = []
    for p in sorted((out / "shards").glob("*.tar")):
        for doc in read_shard(p):
            if hasattr(doc, "items"):
                text = " ".join(" ".join(t.text.split()) for t in doc.texts)[:90].replace("|", "\\|")
                shown.append(f"| {doc.id} | {len(doc.items)} | {text} |")
            if len(shown) >= n:
                return shown
    return shown


def counts_markdown(s: dict) -> list[str]:
    lines = [
        f"# Filter report: {s['recipe']}",
        "",
        f"{s['inputs']} input files, {s['input']} documents: **{s['kept']} kept**, {s['rejected']} rejected, "
        f"{s['quarantined']} quarantined (input = kept + rejected + quarantined: "
        f"{'yes' if s['balanced'] else 'NO'}).",
        f"{s['kept_with_nodes_removed']} kept documents lost items: {s['nodes_removed']} removed, "
        f"{s['nodes_quarantined']} quarantined."
        + (" Dry run: no shards written." if s["dry_run"] else "")
        + (
            f" {s['media_not_fetched']} media URLs in kept documents were not fetched: kept as references, "
            "judged by no pixel operator (`mmgen fetch` downloads them)."
            if s.get("media_not_fetched")
            else ""
        ),
        "",
        "| operator | level | docs rejected | docs quarantined | nodes removed | nodes quarantined |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for op, c in s["per_op"].items():
        lines.append(
            f"| {op} | {s['levels'].get(op, '-')} | {c['rejected']} | {c['quarantined']} | "
            f"{c['nodes_removed']} | {c['nodes_quarantined']} |"
        )
    lines += ["", "| outcome | reason | count |", "| --- | --- | ---: |"]
    for what, d in s["per_reason"].items():
        for reason, n in d.items():
            lines.append(f"| {what} | {reason} | {n} |")
    return lines


def write_report(out_dir, summary: dict, ops) -> Path:
    out = Path(out_dir)
    lines = counts_markdown(summary)
    plots = write_plots(out, ops)
    if plots:
        lines += [
            "",
            "## Statistics",
            "",
            "Every operator's statistic over all documents (items for node-level operators), stacked by "
            "the document's fate; dashed lines are the recipe's thresholds. Raw values: `stats/*.parquet`.",
            "",
        ]
        lines += [f"### {op} / {stat}\n\n![{op} {stat}]({png})\n" for op, stat, png in plots]
    examples = _examples(out)
    if examples:
        lines += ["", "## Examples per reason", ""]
        for key, recs in sorted(examples.items()):
            lines += [f"### {key}", "", "| id | level | item | excerpt | stats |", "| --- | --- | ---: | --- | --- |"]
            for r in recs:
                stats = json.dumps(r.get("stats") or r.get("detail") or {}, sort_keys=True)[:120].replace("|", "\\|")
                lines.append(
                    f"| {r.get('id', r.get('source', ''))} | {r.get('level')} | {r.get('item', '')} | "
                    f"{_excerpt(r)} | {stats} |"
                )
            lines.append("")
    kept = _kept_examples(out)
    if kept:
        lines += ["## Kept examples", "", "| id | items | text |", "| --- | ---: | --- |", *kept, ""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
