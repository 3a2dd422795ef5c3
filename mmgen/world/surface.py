"""Surface forms of a ShapesWorld caption: the same scene written as people type it.

A text-to-image prompt in the world's grammar can reach the model with a lower-case first letter,
without its final full stop, with odd spacing, its objects in another order or another template,
or with the synonyms the grammar allows ("one" for the article "a"; "at", "on" and "in" before a
position). Every form keeps the facts: :func:`~mmgen.world.text.parse_caption` reads the
same scene from each. Two users of the same edits:

- the robustness suite of ``mmgen eval run`` (:data:`SURFACE_FORMS`: each prompt in every form);
- the training documents (``data.prompt_variation``): :func:`vary_prompts` rewrites a share of the
  captions that come before their picture, so the LM (and the text tokenizer trained on the same
  documents) meets the forms people type. The picture, its codes and the scene stay as they are.
"""

from __future__ import annotations

import itertools
import random
import re

from mmgen.errors import MMGenError
from mmgen.world.text import CAPTION_TEMPLATES, OBJECT_PHRASE_RE, caption_parts, caption_text

# The edits, in the order they compose: the grammar-level ones need the caption as :func:`caption` wrote it.
EDITS = ("word_order", "synonyms", "no_period", "lower_first", "spacing")
# Each form of the robustness suite: the edits it applies ("as_written" applies none).
SURFACE_FORMS: dict[str, tuple[str, ...]] = {
    "as_written": (),
    "lower_first": ("lower_first",),
    "no_period": ("no_period",),
    "lower_no_period": ("no_period", "lower_first"),
    "spacing": ("spacing",),
    "word_order": ("word_order",),
    "synonyms": ("synonyms",),
    "all_edits": EDITS,
}
ARTICLES = ("a", "one")
PREPOSITIONS = ("at", "on", "in")


def lower_first(text: str) -> str:
    """The first letter in lower case ("a large red circle ..." as people start a prompt)."""
    i = next((k for k, ch in enumerate(text) if ch.isalpha()), None)
    if i is None or not text[i].isupper():
        raise MMGenError(f"no upper-case first letter to lower in {text[:80]!r}")
    return text[:i] + text[i].lower() + text[i + 1 :]


def no_period(text: str) -> str:
    """The text without its final full stop."""
    t = text.rstrip()
    if not t.endswith("."):
        raise MMGenError(f"no final full stop to drop in {text[:80]!r}")
    return t[:-1].rstrip()


def odd_spacing(text: str, rng: random.Random) -> str:
    """Doubled spaces between some words (at least one) and, half the time, a space before each
    comma, colon and full stop."""
    words = text.split(" ")
    if len(words) < 2:
        raise MMGenError(f"no space to double in {text[:80]!r}")
    doubled = [rng.random() < 0.25 for _ in words[1:]]
    if not any(doubled):
        doubled[rng.randrange(len(doubled))] = True
    out = words[0] + "".join(("  " if d else " ") + w for d, w in zip(doubled, words[1:]))
    if rng.random() < 0.5:
        out = re.sub(r"(?<=\w)([,:.])", r" \1", out)
    return out


def word_order(text: str, rng: random.Random) -> str:
    """The same caption in another template or object order (one of those that differ, uniformly)."""
    parts = caption_parts(text)
    if parts is None:
        raise MMGenError(f"not a caption in the world's grammar, so no other word order: {text[:80]!r}")
    _, objs, bg = parts
    options = sorted(
        {
            caption_text(list(order), bg, t)
            for t in range(len(CAPTION_TEMPLATES))
            for order in itertools.permutations(objs)
        }
        - {text}
    )
    return rng.choice(options)


def synonyms(text: str, rng: random.Random) -> str:
    """Each object phrase's article and preposition, each with probability 1/2, swapped for another
    word the grammar reads the same ("one large red circle in the top left"); at least one swap."""
    matches = list(OBJECT_PHRASE_RE.finditer(text.lower()))  # lower() keeps ASCII offsets, so spans index ``text``
    if not matches:
        raise MMGenError(f"no 'a SIZE COLOR SHAPE at the POSITION' phrase in {text[:80]!r}")
    slots = []  # (start, end, word) of each article and preposition
    for m in matches:
        phrase = text[m.start() : m.end()]
        article = phrase.split(maxsplit=1)[0]
        slots.append((m.start(), m.start() + len(article), article))
        p = re.search(r"\s(at|on|in)\s+the\s", phrase, re.IGNORECASE)
        slots.append((m.start() + p.start(1), m.start() + p.end(1), p.group(1)))
    swap = [rng.random() < 0.5 for _ in slots]
    if not any(swap):
        swap[rng.randrange(len(swap))] = True
    out, last = [], 0
    for (s, e, word), sw in zip(slots, swap):
        out.append(text[last:s])
        if sw:
            choices = ARTICLES if word.lower() in ARTICLES else PREPOSITIONS
            new = rng.choice([w for w in choices if w != word.lower()])
            word = new[0].upper() + new[1:] if word[0].isupper() else new
        out.append(word)
        last = e
    return "".join(out) + text[last:]


def apply_edits(text: str, edits, rng: random.Random) -> str:
    """``text`` with ``edits`` (names of :data:`EDITS`) applied in :data:`EDITS` order."""
    unknown = set(edits) - set(EDITS)
    if unknown:
        raise MMGenError(f"unknown surface edit {min(unknown)!r}; use some of {', '.join(EDITS)}")
    for e in EDITS:
        if e not in edits:
            continue
        if e == "word_order":
            text = word_order(text, rng)
        elif e == "synonyms":
            text = synonyms(text, rng)
        elif e == "no_period":
            text = no_period(text)
        elif e == "lower_first":
            text = lower_first(text)
        else:
            text = odd_spacing(text, rng)
    return text


def check_forms(forms) -> tuple[str, ...]:
    """``forms`` (names of :data:`SURFACE_FORMS`, a list or a comma string) as a tuple; a one-line
    error names an unknown one."""
    names = [f.strip() for f in (forms.split(",") if isinstance(forms, str) else forms) if f.strip()]
    bad = [f for f in names if f not in SURFACE_FORMS]
    if bad or not names:
        raise MMGenError(
            f"unknown surface form {bad[0] if bad else '(none)'!r}; use a comma list of {', '.join(SURFACE_FORMS)}"
        )
    return tuple(dict.fromkeys(names))


def surface_form(text: str, form: str, seed) -> str:
    """Caption ``text`` in surface form ``form``; the same (text, form, seed) always gives the same string."""
    check_forms([form])
    return apply_edits(text, SURFACE_FORMS[form], random.Random(f"surface-{form}-{seed}-{text}"))


def vary_prompt(text: str, rng: random.Random, rate: float) -> str:
    """With probability ``rate``, ``text`` rewritten by a random non-empty set of :data:`EDITS` (each
    with probability 1/2); otherwise ``text``. Only captions as :func:`caption` writes them are
    rewritten: any other text comes back as it is."""
    if rate <= 0 or caption_parts(text) is None or rng.random() >= rate:
        return text
    edits = [e for e in EDITS if rng.random() < 0.5] or [rng.choice(EDITS)]
    return apply_edits(text, edits, rng)


def vary_prompts(doc, rate: float, seed: int = 0):
    """Each caption of ``doc`` that comes right before an image (a text-to-image prompt) rewritten in
    place by :func:`vary_prompt` (the item's ``surface_of`` keeps the original), drawn from a generator
    keyed by the document's id and ``seed``: the same document is varied the same way in every run, on
    any rank or worker. Media, their codes and every other text are left as they are; the document's id
    stays, so it can be traced to its source. Returns ``doc``."""
    from mmgen.data.doc import Text

    if rate <= 0:
        return doc
    rng = random.Random(f"prompt-variation-{seed}-{doc.id}")
    items = doc.items
    for i, it in enumerate(items[:-1]):
        if isinstance(it, Text) and items[i + 1].kind == "image":
            new = vary_prompt(it.text, rng, rate)
            if new != it.text:
                items[i] = Text(new, {**it.meta, "surface_of": it.text})
    return doc
