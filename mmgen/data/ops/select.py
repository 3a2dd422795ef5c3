"""Corpus-level selectors: keep the top k / top fraction of documents by a statistic
(DataComp-style), and per-source quotas.

A selector cannot decide a document until it has seen the whole corpus, so it works in two passes.
Interface for the runner (everything else is the usual :class:`StatefulOp` contract):

1. ``signature(view)`` (worker) computes the document's value: the stat of an inner operator
   that the selector runs itself (``op``/``params``/``stat``) or a number from the document's
   metadata (``meta_field``), plus its source for quotas.
2. Pass 1, parent, input order: ``decide(view, sig, doc_id)`` before :meth:`Selector.finalize`
   only *observes* (records the value, returns a keep verdict carrying the value as a stat) and
   ``commit`` logs the observation into the state (``state_delta``/``load_state``), so a resumed
   pass 1 rebuilds the same observations.
3. ``finalize()`` fixes the selection over everything observed (ties broken by input order).
4. Pass 2: ``decide`` again, for the same documents in the same order (the kept output of pass
   1 is enough: a selector comes last in a recipe, so every document it observed was otherwise
   kept). It now rejects the unselected ones (reason ``not_selected`` / ``source_quota``). The
   value is looked up by document id; ``sig`` may be None in pass 2.

A runner that does not support two passes can still run a recipe with a selector: pass 1 keeps
everything and records the values in the stats (a dry run to choose a threshold).
``source_quota`` without a ranking stat needs only one pass: it keeps the first ``max_docs`` of
each source in input order and decides at once (``two_pass`` False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mmgen.data.ops.base import DocView, StatefulOp, Verdict, build_op, register_op
from mmgen.errors import MMGenError


class Selector(StatefulOp):
    """Base class of run-wide selectors (see the module docstring for the two-pass contract)."""

    levels = ("doc",)
    selector = True
    two_pass = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        p = self.params
        if bool(getattr(p, "op", "")) == bool(getattr(p, "meta_field", "")) and self.needs_value():
            raise MMGenError(f"{self.name}: give either params.op (with params.stat) or params.meta_field")
        self.inner = build_op(p.op, "doc", dict(p.params)) if getattr(p, "op", "") else None
        self.values: dict[str, tuple] = {}  # doc_id -> (value, order, source)
        self.kept: set[str] | None = None  # fixed by finalize()

    def needs_value(self) -> bool:
        return True

    # -- worker side --------------------------------------------------------------------------------
    def value_of(self, view: DocView) -> float | None:
        p = self.params
        if self.inner is not None:
            verdicts = self.inner.apply(view)
            doc = next((v for v in verdicts if v.item is None and p.stat in v.stats), None)
            # a document-level value wins; per-item values (or a per-chunk list) are averaged
            vals = [doc.stats[p.stat]] if doc is not None else [v.stats[p.stat] for v in verdicts if p.stat in v.stats]
            flat = [float(x) for v in vals for x in (v if isinstance(v, list) else [v]) if x is not None]
            return sum(flat) / len(flat) if flat else None
        v = view.doc.meta.get(p.meta_field)
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    def source_of(self, view: DocView) -> str:
        return ""

    def signature(self, view):
        return {"value": self.value_of(view) if self.needs_value() else None, "source": self.source_of(view)}

    # -- parent side --------------------------------------------------------------------------------
    def decide(self, view, sig, doc_id):
        if self.kept is None:  # pass 1: observe
            if sig is None:
                raise MMGenError(f"{self.label}: pass 1 needs the worker's signature")
            return [Verdict(None, {"value": sig["value"], "source": sig["source"]})]
        value, _, source = self.values.get(doc_id, (None, None, ""))
        if doc_id not in self.values:
            raise MMGenError(f"{self.label}: document {doc_id} was not seen in pass 1 (rerun both passes)")
        return [Verdict(None if doc_id in self.kept else self.reject_reason, {"value": value, "source": source})]

    def commit(self, view, sig, doc_id):
        if self.kept is None and sig is not None and doc_id not in self.values:
            self._add([doc_id, sig["value"], sig["source"]])

    def _insert(self, e):
        self.values.setdefault(e[0], (e[1], len(self.values), e[2]))

    def finalize(self) -> set[str]:
        """Fix the selection over every observed document; returns the kept ids."""
        self.kept = self.select()
        return self.kept

    def select(self) -> set[str]:
        raise NotImplementedError

    reject_reason = "not_selected"


def _ranked(entries, descending: bool):
    """Entries (doc_id, (value, order, source)) with a value, best first; ties by input order."""
    scored = [(d, v) for d, v in entries if v[0] is not None and not math.isnan(v[0])]
    return sorted(scored, key=lambda e: ((-e[1][0] if descending else e[1][0]), e[1][1]))


@dataclass
class _ValueParams:
    op: str = ""
    params: dict = field(default_factory=dict)
    stat: str = ""
    meta_field: str = ""
    descending: bool = True  # keep the highest values (False: the lowest, e.g. perplexity)


@register_op("top_k")
class TopK(Selector):
    """Keeps the ``k`` documents with the highest (``descending``) value of a statistic (ties by
    input order); documents without a value are not selected."""

    @dataclass
    class Params(_ValueParams):
        k: int = 1000

        def validate(self):
            if self.k < 0:
                raise ValueError("k must be >= 0")

    def select(self):
        return {d for d, _ in _ranked(self.values.items(), self.params.descending)[: self.params.k]}


@register_op("top_fraction")
class TopFraction(Selector):
    """Keeps the best ``fraction`` of the documents that have a value (DataComp's "top 30% by CLIP
    score"): k = round(fraction x #documents with a value)."""

    @dataclass
    class Params(_ValueParams):
        fraction: float = 0.3

        def validate(self):
            if not 0.0 <= self.fraction <= 1.0:
                raise ValueError("fraction must be in [0, 1]")

    def select(self):
        ranked = _ranked(self.values.items(), self.params.descending)
        return {d for d, _ in ranked[: round(self.params.fraction * len(ranked))]}


@register_op("source_quota")
class SourceQuota(Selector):
    """At most ``max_docs`` documents per source. The source is the document metadata field
    ``source_field`` (a URL counts by its host), else the input file. Without a ranking stat the
    first documents of each source in input order are kept, decided in one pass; with one
    (``op``/``stat`` or ``meta_field``) the best ``max_docs`` per source, in two passes."""

    reject_reason = "source_quota"

    @dataclass
    class Params(_ValueParams):
        max_docs: int = 1000
        source_field: str = "url"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.two_pass = self.needs_value()
        self.counts: dict[str, int] = {}

    def needs_value(self):
        return bool(self.params.op or self.params.meta_field)

    def source_of(self, view):
        v = view.doc.meta.get(self.params.source_field)
        if isinstance(v, str) and v:
            return (urlsplit(v).hostname or v).lower().removeprefix("www.") if "://" in v else v
        return str(view.doc.provenance.get("source", ""))

    def decide(self, view, sig, doc_id):
        if self.two_pass:
            return super().decide(view, sig, doc_id)
        n = self.counts.get(sig["source"], 0)
        return [Verdict(None if n < self.params.max_docs else "source_quota", {"source": sig["source"], "rank": n})]

    def commit(self, view, sig, doc_id):
        if self.two_pass:
            return super().commit(view, sig, doc_id)
        self._add([sig["source"]])

    def _insert(self, e):
        if self.two_pass:
            return super()._insert(e)
        self.counts[e[0]] = self.counts.get(e[0], 0) + 1

    def select(self):
        by_source: dict[str, list] = {}
        for d, v in _ranked(self.values.items(), self.params.descending):
            by_source.setdefault(v[2], []).append(d)
        return {d for ds in by_source.values() for d in ds[: self.params.max_docs]}
