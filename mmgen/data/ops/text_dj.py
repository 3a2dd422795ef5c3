"""Data-Juicer-compatible text statistics: the same names, statistics and keep ranges as Data-Juicer's
operators of those names (its docs and source define them; the formulas are restated below).
Data-Juicer judges the whole sample text, placeholders included; here ``doc`` level judges the
document's paragraphs joined by a blank line and ``node`` level each paragraph, placeholders never
being part of the text.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass

from mmgen.data.ops.base import TextOp, register_op
from mmgen.data.ops.text import EN_STOPWORDS
from mmgen.errors import MMGenError

# Letters (Unicode L*/M*) that Data-Juicer's special-character list names anyway, among them the
# CJK '一' (one) and '上' (up): kept so that ratios on Chinese text match Data-Juicer's.
DJ_SPECIAL_LETTERS = frozenset("一上士ーンッツシाাी्ेøıɪπГهªºॽˌˈʻʺʼː")


def is_special_char(c: str) -> bool:
    """Data-Juicer's special characters: whitespace, punctuation, digits, symbols and emoji.

    Defined by Unicode category (P*, S*, Z*, N*, whitespace) plus the letters Data-Juicer's
    hand-picked list names (:data:`DJ_SPECIAL_LETTERS`). Both agree on ASCII, CJK/fullwidth
    punctuation and emoji; they differ on rarer symbols that list omits and on digits of other
    scripts, which count as special here."""
    return c.isspace() or unicodedata.category(c)[0] in "PSZN" or c in DJ_SPECIAL_LETTERS


def strip_special(word: str) -> str:
    i, j = 0, len(word)
    while i < j and is_special_char(word[i]):
        i += 1
    while j > i and is_special_char(word[j - 1]):
        j -= 1
    return word[i:j]


def dj_words(text: str, lower: bool = True) -> list[str]:
    """Words as Data-Juicer counts them: split on spaces, newlines and tabs, lower-cased, special
    characters stripped from both ends, empty words dropped."""
    out = []
    for w in re.split(r"[ \n\t]", text):
        w = strip_special(w.lower() if lower else w)
        if w:
            out.append(w)
    return out


class RangeTextOp(TextOp):
    """A text statistic kept inside [min, max] (both inclusive, as in Data-Juicer)."""

    stat: str = ""
    reason: str = ""

    def value(self, text: str) -> float:
        raise NotImplementedError

    def text_stats(self, text):
        v = self.value(text)
        return {self.stat: round(v, 6) if isinstance(v, float) else v}

    def judge(self, s):
        p = self.params
        return None if p.min_value <= s[self.stat] <= p.max_value else self.reason


def _range_params(lo: float, hi: float):
    @dataclass
    class Params:
        min_value: float = lo
        max_value: float = hi

        def validate(self):
            if self.min_value > self.max_value:
                raise ValueError(f"min_value ({self.min_value}) is above max_value ({self.max_value})")

    return Params


def dj_char_repetition(text: str, n: int) -> float:
    """Share of n-gram occurrences taken by the most frequent repeated n-grams: the top
    min(floor(sqrt(#distinct)), #distinct repeated) n-gram counts over all n-gram occurrences."""
    counts: dict[str, int] = {}
    for i in range(len(text) - n + 1):
        g = text[i : i + n]
        counts[g] = counts.get(g, 0) + 1
    if not counts:
        return 0.0
    freq = sorted(counts.values(), reverse=True)
    repeated = sum(1 for f in freq if f > 1)
    top = min(int(len(freq) ** 0.5), repeated)
    return sum(freq[:top]) / sum(freq)


@register_op("character_repetition_filter")
class CharacterRepetitionFilter(RangeTextOp):
    """Character n-gram repetition ratio (Data-Juicer ``character_repetition_filter``): over all
    character n-grams of the raw text (``rep_len``, default 10), the counts of the
    floor(sqrt(#distinct n-grams)) most frequent n-grams (only those seen more than once) divided by
    the number of n-grams. Kept when ``min_value <= ratio <= max_value``."""

    stat, reason = "char_rep_ratio", "character_repetition"

    @dataclass
    class Params(_range_params(0.0, 0.5)):
        rep_len: int = 10

    def value(self, text):
        return dj_char_repetition(text, self.params.rep_len)


@register_op("word_repetition_filter")
class WordRepetitionFilter(RangeTextOp):
    """Word n-gram repetition ratio (Data-Juicer ``word_repetition_filter``): words as
    :func:`dj_words`; over all word n-grams (``rep_len``, default 10), the occurrences of n-grams
    seen more than once divided by all n-gram occurrences."""

    stat, reason = "word_rep_ratio", "word_repetition"

    @dataclass
    class Params(_range_params(0.0, 0.5)):
        rep_len: int = 10

    def value(self, text):
        ws = dj_words(text)
        n = self.params.rep_len
        counts: dict[str, int] = {}
        for i in range(len(ws) - n + 1):
            g = " ".join(ws[i : i + n])
            counts[g] = counts.get(g, 0) + 1
        total = sum(counts.values())
        return sum(f for f in counts.values() if f > 1) / total if total else 0.0


@register_op("special_characters_filter")
class SpecialCharactersFilter(RangeTextOp):
    """Special-character ratio (Data-Juicer ``special_characters_filter``): characters that are
    whitespace, punctuation, digits, symbols or emoji (:func:`is_special_char`) over all characters."""

    stat, reason = "special_char_ratio", "special_characters"
    Params = _range_params(0.0, 0.25)

    def value(self, text):
        return sum(map(is_special_char, text)) / len(text) if text else 0.0


@register_op("alphanumeric_filter")
class AlphanumericFilter(RangeTextOp):
    """Alphanumeric ratio (Data-Juicer ``alphanumeric_filter`` without tokenization): characters
    for which ``str.isalnum`` holds (letters and digits of any script) over all characters."""

    stat, reason = "alnum_ratio", "low_alphanumeric"
    Params = _range_params(0.25, float("inf"))

    def value(self, text):
        return sum(map(str.isalnum, text)) / len(text) if text else 0.0


@register_op("punctuation_filter")
class PunctuationFilter(RangeTextOp):
    """Punctuation ratio: characters of Unicode category P* (ASCII and CJK punctuation, dashes,
    quotes) over non-whitespace characters. Not a Data-Juicer operator; catches punctuation runs
    and code-like boilerplate that the special-character ratio (which counts spaces) dilutes."""

    stat, reason = "punct_ratio", "punctuation"
    Params = _range_params(0.0, 0.2)

    def value(self, text):
        chars = [c for c in text if not c.isspace()]
        return sum(unicodedata.category(c)[0] == "P" for c in chars) / len(chars) if chars else 0.0


@register_op("text_length_filter")
class TextLengthFilter(RangeTextOp):
    """Text length in characters, ``len(text)`` (Data-Juicer ``text_length_filter``)."""

    stat, reason = "text_len", "text_length"
    Params = _range_params(10, float("inf"))

    def value(self, text):
        return len(text)


@register_op("words_num_filter")
class WordsNumFilter(RangeTextOp):
    """Number of words as :func:`dj_words` splits them (Data-Juicer ``words_num_filter`` without
    tokenization)."""

    stat, reason = "num_words", "words_num"
    Params = _range_params(10, float("inf"))

    def value(self, text):
        return len(dj_words(text, lower=False))


def _word_list(words: list[str], path: str | None) -> frozenset[str]:
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return frozenset(w.strip().lower() for w in f if w.strip())
        except OSError as e:
            raise MMGenError(
                f"cannot read word list {path}: {e.strerror} (give a text file, one word a line)"
            ) from None
    return frozenset(w.lower() for w in words)


class WordListRatio(TextOp):
    """Share of :func:`dj_words` that are in a word list (``words`` or one word a line in ``words_file``)."""

    stat = ""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.vocab = _word_list(self.params.words, self.params.words_file)

    def text_stats(self, text):
        ws = dj_words(text)
        return {self.stat: round(sum(w in self.vocab for w in ws) / len(ws), 6) if ws else 0.0}


@register_op("stopwords_filter")
class StopwordsFilter(WordListRatio):
    """Stopword ratio (Data-Juicer ``stopwords_filter``): share of words (:func:`dj_words`) that are
    stopwords; kept when >= ``min_ratio``.

    Difference: Data-Juicer downloads its stopword lists at run time; the default list here is
    mmgen's built-in English function-word list (``EN_STOPWORDS``, offline). Pass ``words_file``
    for another list or language; ratios on English prose are close but not identical."""

    stat = "stopwords_ratio"

    @dataclass
    class Params:
        min_ratio: float = 0.3
        words: list = dataclasses.field(default_factory=lambda: sorted(EN_STOPWORDS))
        words_file: str | None = None

    def judge(self, s):
        return None if s[self.stat] >= self.params.min_ratio else "few_stopwords"


# A short default list of adult and spam terms; real pipelines pass a curated list in words_file.
FLAGGED_WORDS = (
    "porn",
    "porno",
    "xxx",
    "sex",
    "sexy",
    "nude",
    "nudes",
    "escort",
    "escorts",
    "hentai",
    "milf",
    "fuck",
    "fucking",
    "shit",
    "bitch",
    "viagra",
    "cialis",
    "casino",
    "betting",
    "jackpot",
    "onlyfans",
    "camgirl",
    "camgirls",
)


@register_op("flagged_words_filter")
class FlaggedWordsFilter(WordListRatio):
    """Flagged-word ratio (Data-Juicer ``flagged_words_filter``): share of words (:func:`dj_words`)
    in the flagged list; kept when <= ``max_ratio``.

    Difference: Data-Juicer downloads its flagged-word lists; here the default is a short built-in
    list of adult/spam terms (``FLAGGED_WORDS``) and ``words_file`` takes a curated one."""

    stat = "flagged_words_ratio"

    @dataclass
    class Params:
        max_ratio: float = 0.045
        words: list = dataclasses.field(default_factory=lambda: list(FLAGGED_WORDS))
        words_file: str | None = None

    def judge(self, s):
        return None if s[self.stat] <= self.params.max_ratio else "flagged_words"
