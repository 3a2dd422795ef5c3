"""Text operators: hand-made cases and Data-Juicer's demo texts, checked against values derived
here from Data-Juicer's documented formulas (not from the operators' own helpers)."""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter

import pytest

from mmgen.data.doc import Doc, Text
from mmgen.data.ops import DocView, build_op
from mmgen.errors import MMGenError

# Every non-ASCII character of the demo texts that Data-Juicer's special-character list holds:
# fullwidth/CJK punctuation, typographic quotes and dashes, and the CJK letters '一' and '上'.
_SPECIAL = set(string.punctuation + string.digits + string.whitespace + "，！。、“”’‘—…（）：；一上")


@pytest.fixture(scope="module")
def demo_texts(real_dir):
    lines = (real_dir / "dj-demo-dedup.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["text"] for x in lines if x.strip()]


def run(op, *texts):
    """Verdicts of ``op`` on a document whose paragraphs are ``texts``."""
    return op.apply(DocView(Doc(items=[Text(t) for t in texts])))


def doc_stat(name, text, key, **params):
    [v] = run(build_op(name, level="doc", params=params), text)
    return v.stats[key], v.reason


def ref_words(text):
    out = []
    for w in re.split(r"[ \n\t]", text.lower()):
        w = w.strip("".join(_SPECIAL))
        if w:
            out.append(w)
    return out


def ref_char_rep(text, n=10):
    c = Counter(text[i : i + n] for i in range(len(text) - n + 1))
    if not c:
        return 0.0
    freq = sorted(c.values(), reverse=True)
    k = min(math.isqrt(len(freq)), sum(f > 1 for f in freq))
    return sum(freq[:k]) / sum(freq)


def ref_word_rep(text, n=10):
    ws = ref_words(text)
    c = Counter(" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1))
    total = sum(c.values())
    return sum(f for f in c.values() if f > 1) / total if total else 0.0


def test_dj_statistics_on_demo_texts(demo_texts):
    assert len(demo_texts) >= 10
    for t in demo_texts:
        special = sum(c in _SPECIAL for c in t) / len(t)
        alnum = sum(c.isalnum() for c in t) / len(t)
        cases = [
            ("special_characters_filter", "special_char_ratio", special, special <= 0.25),
            ("alphanumeric_filter", "alnum_ratio", alnum, alnum >= 0.25),
            ("character_repetition_filter", "char_rep_ratio", ref_char_rep(t), ref_char_rep(t) <= 0.5),
            ("word_repetition_filter", "word_rep_ratio", ref_word_rep(t), ref_word_rep(t) <= 0.5),
            ("text_length_filter", "text_len", len(t), len(t) >= 10),
            ("words_num_filter", "num_words", len(ref_words(t)), len(ref_words(t)) >= 10),
        ]
        for name, key, want, keep in cases:
            got, reason = doc_stat(name, t, key)
            assert got == pytest.approx(want, abs=1e-5), (name, t[:40])
            assert (reason is None) == keep, (name, t[:40], got)


def test_repetition_catches_spam_and_spares_prose(demo_texts):
    spam = "Buy cheap watches online now! " * 30
    # a 30-character period: ~30 distinct 10-grams, the top floor(sqrt(30)) = 5 take 5/30 of all
    assert doc_stat("character_repetition_filter", spam, "char_rep_ratio")[0] == pytest.approx(5 / 30, abs=0.01)
    assert doc_stat("character_repetition_filter", "Wow " + "z" * 200, "char_rep_ratio")[1] == "character_repetition"
    assert doc_stat("word_repetition_filter", spam, "word_rep_ratio")[1] == "word_repetition"
    long_prose = max(demo_texts, key=len)
    assert doc_stat("word_repetition_filter", long_prose, "word_rep_ratio")[1] is None
    # the demo set holds exact repeats of whole sentences only across records, not inside one
    assert doc_stat("character_repetition_filter", long_prose, "char_rep_ratio")[0] < 0.2


def test_stopwords_flagged_and_punctuation():
    en = "The cat sat on the mat and it was happy with all of the sun."
    assert doc_stat("stopwords_filter", en, "stopwords_ratio")[1] is None
    ratio, reason = doc_stat("stopwords_filter", "Quantum chromodynamics lattice gauge simulations", "stopwords_ratio")
    assert ratio == 0.0 and reason == "few_stopwords"
    ws = ref_words(en)
    want = sum(w in {"the", "on", "and", "it", "was", "with", "all", "of"} for w in ws) / len(ws)
    assert doc_stat(
        "stopwords_filter", en, "stopwords_ratio", words=["the", "on", "and", "it", "was", "with", "all", "of"]
    )[0] == pytest.approx(want)
    r, reason = doc_stat("flagged_words_filter", "Free casino jackpot, hot xxx cams here", "flagged_words_ratio")
    assert r == pytest.approx(3 / 7, abs=1e-5) and reason == "flagged_words"
    assert doc_stat("flagged_words_filter", en, "flagged_words_ratio") == (0.0, None)
    assert doc_stat("punctuation_filter", "!!! ??? ... ;;; hello", "punct_ratio")[1] == "punctuation"
    assert doc_stat("punctuation_filter", en, "punct_ratio")[1] is None


def test_word_list_file(tmp_path):
    f = tmp_path / "flagged.txt"
    f.write_text("Gadget\nwidget\n")
    r, reason = doc_stat("flagged_words_filter", "a gadget and a widget", "flagged_words_ratio", words_file=str(f))
    assert r == pytest.approx(0.4) and reason == "flagged_words"
    with pytest.raises(MMGenError, match="cannot read word list"):
        build_op("flagged_words_filter", params={"words_file": str(tmp_path / "missing.txt")})


def test_node_level_removes_only_the_bad_paragraph():
    op = build_op("word_repetition_filter", level="node", params={"rep_len": 2, "max_value": 0.3})
    vs = run(op, "a clean paragraph about cats and dogs", "spam spam spam spam spam spam", "another fine one here")
    assert [v.item for v in vs] == [0, 1, 2]
    assert [v.reason for v in vs] == [None, "word_repetition", None]


def test_language_id_on_demo_texts(demo_texts):
    op = build_op("language_id_score_filter", params={"lang": ["en"], "min_score": 0.8})
    got = {t[:12]: (run(op, t)[0].stats["lang"], run(op, t)[0].reason) for t in demo_texts[:8]}
    assert got["Today is Sun"] == ("en", None)
    assert got["你好，请问你是谁"] == ("zh", "wrong_language")
    assert got["Sur la plate"] == ("fr", "wrong_language")
    any_lang = build_op("language_id_score_filter", params={"min_score": 0.5})
    assert run(any_lang, "Sur la plateforme MT4, plusieurs manières d'accéder")[0].reason is None


def test_range_params_validated():
    with pytest.raises(MMGenError, match="min_value"):
        build_op("text_length_filter", params={"min_value": 5, "max_value": 2})
    with pytest.raises(MMGenError, match="did you mean 'max_value'"):
        build_op("special_characters_filter", params={"max_valeu": 0.2})


def test_shipped_recipes_build():
    from mmgen.data.filter_recipe import build_ops, load_recipe

    for name in ("obelics_en", "caption_pairs"):
        ops = build_ops(load_recipe(name))
        assert ops and all(o.level in ("doc", "node") for o in ops)
        stateful = [o.stateful for o in ops]
        assert stateful == sorted(stateful)  # cheap stateless ops first, run-wide dedup last
