"""Operator base classes, the registry and the per-document view operators work on.

An operator computes statistics for a document (``level: doc``) or for each of its items
(``level: node``, OBELICS-style: only the offending paragraph or image is removed) and decides.
Its parameters are a dataclass validated with :func:`mmgen.config.from_dict`, so a misspelled
parameter is an error naming the closest valid one.

Stateless operators run inside worker processes. Stateful ones (deduplication) split their work:
:meth:`StatefulOp.signature` (the expensive hashing) runs in the worker, :meth:`StatefulOp.decide`
runs in the parent in input order against a run-wide index, so the result never depends on the
number of workers.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from mmgen.config import from_dict
from mmgen.data.doc import Doc, Image, Item, Text
from mmgen.errors import MediaError, MMGenError

OPS: dict[str, type[Op]] = {}
LEVELS = ("doc", "node")


def register_op(name: str):
    """Class decorator: make an operator available to recipes under ``name``."""

    def wrap(cls):
        if name in OPS and OPS[name] is not cls:
            raise ValueError(f"operator name '{name}' registered twice")
        cls.name = name
        OPS[name] = cls
        return cls

    return wrap


@dataclass
class NoParams:
    pass


@dataclass
class Verdict:
    """One decision: about the whole document (``item`` None) or about item ``item``.

    ``reason`` None means keep. ``quarantine`` marks unreadable input (not a quality judgement)."""

    reason: str | None
    stats: dict
    item: int | None = None
    quarantine: bool = False
    duplicate_of: str | None = None


class DocView:
    """A document as the operator chain sees it: the original Doc plus which items are still alive.

    Item indices always refer to the original Doc, so reject records point at the input item.
    Decoded images, and values derived from them (:meth:`derived`), are cached so several operators
    decode or analyse each image once."""

    def __init__(self, doc: Doc):
        self.doc = doc
        self.alive: list[int] = list(range(len(doc.items)))
        self._pil: dict[int, Any] = {}
        self._derived: dict[tuple[str, int], Any] = {}

    def items(self) -> Iterator[tuple[int, Item]]:
        for i in self.alive:
            yield i, self.doc.items[i]

    def texts(self) -> Iterator[tuple[int, Text]]:
        return ((i, it) for i, it in self.items() if isinstance(it, Text))

    def images(self, fetched: bool = True) -> Iterator[tuple[int, Image]]:
        """The alive images; by default only those whose bytes are here. An image that is a URL not yet
        fetched is judged by no pixel operator: the runner records it as ``not_fetched`` instead."""
        return ((i, it) for i, it in self.items() if isinstance(it, Image) and (it.fetched or not fetched))

    def not_fetched(self) -> list[int]:
        """Indices of alive media items that are URL references without bytes."""
        return [i for i, it in self.items() if not isinstance(it, Text) and not it.fetched]

    @property
    def text(self) -> str:
        return "\n\n".join(t.text for _, t in self.texts())

    def has_text(self) -> bool:
        return any(True for _ in self.texts())

    def remove(self, index: int) -> None:
        if index in self.alive:
            self.alive.remove(index)
            self._pil.pop(index, None)

    def pil(self, index: int):
        """Item ``index`` decoded to RGB (cached); raises MediaError if undecodable."""
        if index not in self._pil:
            self._pil[index] = self.doc.items[index].to_pil("RGB")
        return self._pil[index]

    def derived(self, name: str, index: int, fn):
        """``fn(self.pil(index))``, computed once per item and ``name`` (a parsed scene is wanted by the
        caption check and by the scene deduplication alike); MediaError propagates, uncached."""
        key = (name, index)
        if key not in self._derived:
            self._derived[key] = fn(self.pil(index))
        return self._derived[key]

    def result(self) -> Doc:
        """The Doc with removed items dropped (same id: node removal does not change identity)."""
        if len(self.alive) == len(self.doc.items):
            return self.doc
        return Doc(
            items=[self.doc.items[i] for i in self.alive],
            id=self.doc.id,
            meta=dict(self.doc.meta),
            provenance=dict(self.doc.provenance),
        )


class Op:
    """Base operator. Subclasses set ``Params`` (a dataclass) and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    levels: ClassVar[tuple[str, ...]] = LEVELS
    default_level: ClassVar[str] = "doc"
    stateful: ClassVar[bool] = False

    def __init__(self, params=None, level: str | None = None, label: str | None = None):
        self.params = params if params is not None else self.Params()
        self.level = level or self.default_level
        if self.level not in self.levels:
            raise MMGenError(
                f"operator '{self.name}' does not support level '{self.level}' (use one of: {', '.join(self.levels)})"
            )
        self.label = label or self.name  # the name used in reports (a recipe may use one op twice)

    def apply(self, view: DocView) -> list[Verdict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r}, params={self.params!r})"


class TextOp(Op):
    """Statistic over text. ``doc`` level judges the whole document's text; ``node`` level each paragraph.

    Documents without text are not judged (an image-only document is not too short)."""

    def text_stats(self, text: str) -> dict:
        raise NotImplementedError

    def judge(self, stats: dict) -> str | None:
        raise NotImplementedError

    def apply(self, view: DocView) -> list[Verdict]:
        if self.level == "doc":
            if not view.has_text():
                return []
            stats = self.text_stats(view.text)
            return [Verdict(self.judge(stats), stats)]
        out = []
        for i, t in view.texts():
            stats = self.text_stats(t.text)
            out.append(Verdict(self.judge(stats), stats, item=i))
        return out


class ImageOp(Op):
    """Statistic per image. ``node`` level drops the image; ``doc`` level drops the document if any fails."""

    default_level = "node"

    def image_stats(self, view: DocView, index: int, image: Image) -> dict:
        raise NotImplementedError

    def judge(self, stats: dict) -> str | None:
        raise NotImplementedError

    def apply(self, view: DocView) -> list[Verdict]:
        out = []
        for i, img in list(view.images()):
            try:
                stats = self.image_stats(view, i, img)
            except MediaError as e:
                out.append(Verdict(e.reason, {"error": error_text(e)}, item=i, quarantine=True))
                continue
            out.append(Verdict(self.judge(stats), stats, item=i))
        return out


class StatefulOp(Op):
    """A run-wide operator (deduplication): first occurrence kept, later ones rejected.

    ``signature`` runs in a worker and returns picklable keys; ``decide`` runs in the parent, in
    input order, checks the keys against the run-wide state, registers what is kept and returns
    verdicts. ``state_delta``/``load_state`` persist the state per finished input shard (JSON),
    so a resumed run sees exactly the state the first run had."""

    stateful = True

    def __init__(self, params=None, level=None, label=None):
        super().__init__(params, level, label)
        self._log: list = []  # entries added since the last commit

    def signature(self, view: DocView) -> Any:
        raise NotImplementedError

    def decide(self, view: DocView, signature: Any, doc_id: str) -> list[Verdict]:
        raise NotImplementedError

    def commit(self, view: DocView, signature: Any, doc_id: str) -> None:
        """Register a finally kept document's hashes (only its surviving items)."""
        raise NotImplementedError

    def _add(self, entry) -> None:
        """Register a kept entry (a JSON-able tuple) in the index and in the commit log."""
        self._log.append(entry)
        self._insert(entry)

    def _insert(self, entry) -> None:
        raise NotImplementedError

    def state_delta(self) -> list:
        out, self._log = self._log, []
        return out

    def load_state(self, entries: list) -> None:
        for e in entries:
            self._insert(e)


def error_text(e: BaseException) -> str:
    """An exception as stable text: decoders embed object addresses, which would make outputs
    differ between runs and between worker counts."""
    return re.sub(r"<[^<>]*? at 0x[0-9a-fA-F]+>", "<data>", str(e))


def closest(name: str, valid) -> str:
    m = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return f"; did you mean '{m[0]}'?" if m else ""


def build_op(
    op: str, level: str | None = None, params: dict | None = None, label: str | None = None, where: str = ""
) -> Op:
    """Construct a registered operator from recipe values, with one-line errors for every mistake."""
    if op not in OPS:
        raise MMGenError(
            f"{where}unknown operator '{op}'{closest(op, OPS)} (known: {', '.join(sorted(OPS))}; "
            "operators defined elsewhere need their module in the recipe's operator_modules)"
        )
    cls = OPS[op]
    if level is not None and level not in LEVELS:
        raise MMGenError(f"{where}level must be 'doc' or 'node', got {level!r}")
    try:
        p = from_dict(cls.Params, params or {}, prefix="params.")
    except MMGenError as e:
        raise MMGenError(f"{where}{e}") from None
    check = getattr(p, "validate", None)
    if check:
        try:
            check()
        except ValueError as e:
            raise MMGenError(f"{where}{op}: {e}") from None
    try:
        return cls(p, level, label)
    except MMGenError as e:
        raise MMGenError(f"{where}{e}") from None


def params_dict(op: Op) -> dict:
    return dataclasses.asdict(op.params)


def image_caption_pairs(view: DocView) -> list[tuple[int, int]]:
    """(image item, caption item) for each live image that has a text: its caption is the nearest
    text item before it, else the nearest one after it (the OBELICS/MMC4 reading of interleaved
    documents)."""
    items = list(view.items())
    out = []
    for pos, (i, it) in enumerate(items):
        if not isinstance(it, Image) or not it.fetched:
            continue
        cap = next((items[j][0] for j in range(pos - 1, -1, -1) if isinstance(items[j][1], Text)), None)
        if cap is None:
            cap = next((items[j][0] for j in range(pos + 1, len(items)) if isinstance(items[j][1], Text)), None)
        if cap is not None:
            out.append((i, cap))
    return out


REDUCE_MODES = ("avg", "max", "min")


def reduce_scores(values: list[float], mode: str) -> float:
    if mode == "avg":
        return sum(values) / len(values)
    return max(values) if mode == "max" else min(values)
