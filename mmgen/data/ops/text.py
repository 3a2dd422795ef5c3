"""Text-quality operators: length, n-gram repetition, special characters, gibberish, language, emptiness."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from mmgen.data.doc import Text
from mmgen.data.ops.base import DocView, Op, TextOp, Verdict, error_text, register_op
from mmgen.errors import MediaError

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # runs of letters (any script), with inner apostrophes
_TOKEN = re.compile(r"\S+")

# The most frequent English function words (closed-class words that any English prose is full of).
EN_STOPWORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself also may might must shall
upon within without one two three four five six seven eight nine ten
""".split()
)

# Function words of other common Latin-script languages. A text rich in these and poor in English
# function words is not English (an offline language check needing no model).
FOREIGN_STOPWORDS = (
    frozenset(
        """
le la les des du un une est et en dans sur avec pour pas qui que au aux ce cette sont il elle nous vous ils
der die das und ist ein eine mit auf den dem nicht zu von sich auch im ist sind oben unten links rechts
el los las del y es una con por para se lo al como más pero sus
il della di che è gli per sono alla nel non uno
o os da do das dos em um uma não com são
het een van niet zijn op te dat
""".split()
    )
    - EN_STOPWORDS
)


# English function words spelled like a function word of a language above (German "am", "an", "die",
# "was"; Romance "a", "no", "me"; Dutch/German/Italian "in"): evidence for neither side, so they do not
# count as English. Counted as English, "Die Bibliothek bleibt am Sonntag leider geschlossen." has as
# many English function words as foreign ones and passed.
SHARED_STOPWORDS = frozenset("am an so was die will also man do me no he or".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@register_op("text_length")
class TextLength(TextOp):
    """Word count (whitespace tokens) and character count; rejects text shorter or longer than the bounds."""

    @dataclass
    class Params:
        min_words: int = 1
        max_words: int = 100_000
        min_chars: int = 0
        max_chars: int = 10_000_000

    def text_stats(self, text):
        return {"words": len(_TOKEN.findall(text)), "chars": len(text.strip())}

    def judge(self, s):
        p = self.params
        if s["words"] < p.min_words or s["chars"] < p.min_chars:
            return "too_short"
        if s["words"] > p.max_words or s["chars"] > p.max_chars:
            return "too_long"
        return None


def char_ngram_repetition(text: str, n: int) -> float:
    """Share of character n-gram occurrences that repeat an earlier one (0 = no repeats, ->1 = spam)."""
    t = " ".join(text.lower().split())
    total = len(t) - n + 1
    if total <= 1:
        return 0.0
    distinct = len({t[i : i + n] for i in range(total)})
    return 1.0 - distinct / total


@register_op("char_repetition")
class CharRepetition(TextOp):
    """Character n-gram repetition ratio: 1 - distinct/total n-grams of the lower-cased text.

    Repeated phrases ("buy now buy now ...") push it towards 1; ordinary prose stays low."""

    @dataclass
    class Params:
        n: int = 10
        max_ratio: float = 0.5

        def validate(self):
            if self.n < 1:
                raise ValueError("n must be >= 1")

    def text_stats(self, text):
        return {"char_rep_ratio": round(char_ngram_repetition(text, self.params.n), 4)}

    def judge(self, s):
        return "ngram_repetition" if s["char_rep_ratio"] > self.params.max_ratio else None


@register_op("special_chars")
class SpecialChars(TextOp):
    """Share of special characters (neither letter/digit nor whitespace) and of alphanumerics among
    non-space characters."""

    @dataclass
    class Params:
        max_special_ratio: float = 0.25
        min_alnum_ratio: float = 0.6

    def text_stats(self, text):
        chars = [c for c in text if not c.isspace()]
        if not chars:
            return {"special_ratio": 0.0, "alnum_ratio": 1.0}
        alnum = sum(c.isalnum() for c in chars)
        special = sum(unicodedata.category(c)[0] in "PSC" for c in chars)
        return {"special_ratio": round(special / len(chars), 4), "alnum_ratio": round(alnum / len(chars), 4)}

    def judge(self, s):
        if s["special_ratio"] > self.params.max_special_ratio:
            return "special_characters"
        if s["alnum_ratio"] < self.params.min_alnum_ratio:
            return "low_alnum"
        return None


_VOWELS = set("aeiouy")
# Letter pairs that (almost) never occur inside English words; random letter strings hit them often.
_RARE_BIGRAMS = frozenset(
    "bq bx cj cx dx fq fx fz gq gx hx jb jc jd jf jg jh jj jk jl jm jn jp jq jr js jt jv jw jx jy jz kq kx kz "
    "mq mx mz pq px pz qa qb qc qd qe qf qg qh qi qj qk ql qm qn qo qp qq qr qs qt qv qw qx qy qz sx tq vb "
    "vc vd vf vg vh vj vk vm vn vp vq vt vw vx vz wj wq wv wx wz xj xk xq xz yq yy zb zf zj zq zx".split()
)


def implausible_word(w: str) -> bool:
    """Whether a lower-case ASCII word is unlikely to be a word of English (or a name)."""
    if len(w) > 20:
        return True
    if len(w) >= 3 and not any(c in _VOWELS for c in w):
        return True
    run_c = run_v = run_same = 0
    prev = ""
    for c in w:
        if c in _VOWELS:
            run_v, run_c = run_v + 1, 0
        else:
            run_c, run_v = run_c + 1, 0
        run_same = run_same + 1 if c == prev else 1
        if run_c >= 5 or run_v >= 5 or run_same >= 3:
            return True
        prev = c
    return any(w[i : i + 2] in _RARE_BIGRAMS for i in range(len(w) - 1))


@register_op("gibberish")
class Gibberish(TextOp):
    """Gibberish score: share of word-like tokens that are not plausible letter sequences (no vowel,
    long consonant runs, letter pairs English never uses, letters mixed with digits).

    Judged only on texts with at least ``min_words`` candidate words; non-ASCII words are left to
    the language operator."""

    @dataclass
    class Params:
        max_score: float = 0.3
        min_words: int = 2

    def text_stats(self, text):
        cands = bad = 0
        for tok in _TOKEN.findall(text.lower()):
            tok = tok.strip(".,;:!?\"'()[]{}")
            if len(tok) < 2 or not tok.isascii():
                continue
            has_alpha, has_digit = any(c.isalpha() for c in tok), any(c.isdigit() for c in tok)
            if not has_alpha:
                continue
            cands += 1
            if has_digit and not re.fullmatch(r"\d+(st|nd|rd|th|s|x|d|k|m|px)?", tok):
                bad += 1
            elif any(implausible_word(w) for w in re.findall(r"[a-z]+", tok)):
                bad += 1
        return {"gibberish_score": round(bad / cands, 4) if cands else 0.0, "candidate_words": cands}

    def judge(self, s):
        if s["candidate_words"] >= self.params.min_words and s["gibberish_score"] > self.params.max_score:
            return "gibberish"
        return None


@register_op("stopwords")
class Stopwords(TextOp):
    """English stopword ratio (share of words in a built-in list of English function words), the
    share of function words of other languages, and the share of non-ASCII letters. Words that are
    function words in English and in one of the other languages (``SHARED_STOPWORDS``) count for neither.

    Low English and high foreign ratios, or many non-ASCII letters, mark non-English text."""

    @dataclass
    class Params:
        min_en_ratio: float = 0.08
        min_words: int = 4
        max_foreign_ratio: float = 0.15
        max_non_ascii_ratio: float = 0.3

    def text_stats(self, text):
        ws = words(text)
        n = len(ws)
        letters = [c for c in text if c.isalpha()]
        return {
            "words": n,
            "en_stopword_ratio": round(sum(w in EN_STOPWORDS and w not in SHARED_STOPWORDS for w in ws) / n, 4)
            if n
            else 0.0,
            "foreign_stopword_ratio": round(
                sum(w in FOREIGN_STOPWORDS and w not in SHARED_STOPWORDS for w in ws) / n, 4
            )
            if n
            else 0.0,
            "non_ascii_ratio": round(sum(not c.isascii() for c in letters) / len(letters), 4) if letters else 0.0,
        }

    def judge(self, s):
        p = self.params
        if s["non_ascii_ratio"] > p.max_non_ascii_ratio:
            return "non_english"
        if (
            s["words"] >= 2
            and s["foreign_stopword_ratio"] > p.max_foreign_ratio
            and s["foreign_stopword_ratio"] > s["en_stopword_ratio"]
        ):
            return "non_english"
        if s["words"] >= p.min_words and s["en_stopword_ratio"] < p.min_en_ratio:
            return "non_english"
        return None


@register_op("empty_items")
class EmptyItems(Op):
    """Empty items: text that is only whitespace, media with zero bytes; and documents with no items.

    A by-reference media item whose file is missing is quarantined (input problem, not quality)."""

    default_level = "node"

    def apply(self, view: DocView) -> list[Verdict]:
        out = []
        for i, it in list(view.items()):
            if isinstance(it, Text):
                n = len(it.text.strip())
                out.append(Verdict("empty_text" if n == 0 else None, {"chars": n}, item=i))
                continue
            if not it.fetched:  # a URL reference: its bytes are judged once fetched
                out.append(Verdict(None, {"not_fetched": 1}, item=i))
                continue
            try:
                n = len(it.load())
            except MediaError as e:
                out.append(Verdict("missing_media", {"error": error_text(e)}, item=i, quarantine=True))
                continue
            out.append(Verdict(f"empty_{it.kind}" if n == 0 else None, {"bytes": n}, item=i))
        if not view.alive:
            out.append(Verdict("empty_doc", {"items": 0}))
        return out
