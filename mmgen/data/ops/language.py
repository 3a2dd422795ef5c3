"""Language identification and language-model perplexity, both offline.

Language id uses ``langid`` (langid.py), whose naive-Bayes model for 97 languages ships inside the
package. Perplexity uses any causal LM that ``transformers`` can load from a local directory or a
hub id already in the local cache; models are loaded once per worker process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from mmgen.data.ops.base import TextOp, register_op
from mmgen.errors import MMGenError
from mmgen.utils.compat import ensure_torchvision


@lru_cache(maxsize=1)
def langid_identifier():
    """langid.py's shipped model with normalised probabilities (loading it takes a few seconds)."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language."""
    lang, score = langid_identifier().classify(text.lower().replace("\n", " "))
    return lang, float(score)


@register_op("language_id_score_filter")
class LanguageIdScoreFilter(TextOp):
    """Most likely language and its probability (Data-Juicer ``language_id_score_filter``): the text
    is lower-cased with newlines turned into spaces, as Data-Juicer does; kept when the language is
    one of ``lang`` (any language when empty) and its probability is >= ``min_score``.

    Difference: Data-Juicer downloads fastText's lid.176 model; here langid.py's shipped model is used
    (offline; ISO 639-1 codes as fastText's). Its probabilities are normalised over 97 languages
    and run higher than fastText's on short text, so thresholds are not interchangeable."""

    @dataclass
    class Params:
        lang: list = field(default_factory=list)
        min_score: float = 0.8

        def validate(self):
            if isinstance(self.lang, str):
                self.lang = [self.lang] if self.lang else []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        try:
            import langid  # noqa: F401
        except ImportError:
            raise MMGenError("language_id_score_filter needs langid: pip install langid") from None

    def text_stats(self, text):
        lang, score = identify_language(text)
        return {"lang": lang, "lang_score": round(score, 6)}

    def judge(self, s):
        p = self.params
        if p.lang and s["lang"] not in p.lang:
            return "wrong_language"
        return None if s["lang_score"] >= p.min_score else "low_language_score"


@lru_cache(maxsize=2)
def load_causal_lm(name_or_path: str, device: str = "cpu"):
    """(model, tokenizer) of a causal LM from a local directory or a cached hub id; never downloads."""
    import torch

    ensure_torchvision()  # transformers' model modules import torchvision, broken next to CPU torch without it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise MMGenError(
            f"cannot load causal LM '{name_or_path}': {str(e).splitlines()[0]} "
            "(give a local directory saved with save_pretrained, or a hub id already in the cache)"
        ) from None
    return model.to(device).eval(), tok


def perplexity(model, tok, text: str, max_tokens: int) -> tuple[float, int]:
    """exp(mean next-token negative log-likelihood) of ``text`` (first ``max_tokens`` tokens), and
    the number of predicted tokens. A BOS token is prepended when the tokenizer has one, so the
    first word is scored too."""
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    if len(ids) < 2:
        return float("nan"), 0
    x = torch.tensor([ids])
    with torch.inference_mode():
        loss = model(input_ids=x, labels=x).loss
    return float(math.exp(min(float(loss), 80.0))), len(ids) - 1


@register_op("perplexity_filter")
class PerplexityFilter(TextOp):
    """Perplexity of the text under a causal LM (``model``: local path or hub id):
    exp(mean token negative log-likelihood); kept when <= ``max_ppl``. Texts with fewer than
    ``min_tokens`` tokens are not judged.

    Difference: Data-Juicer's ``perplexity_filter`` scores with a KenLM 5-gram over SentencePiece
    pieces (downloaded per language); here any transformers causal LM does the scoring, so the
    scale depends on the model and its tokenizer: pick ``max_ppl`` from a dry run's stats."""

    @dataclass
    class Params:
        model: str = ""
        max_ppl: float = 1500.0
        max_tokens: int = 512
        min_tokens: int = 1
        device: str = "cpu"

        def validate(self):
            if not self.model:
                raise ValueError("set params.model to a causal LM directory or hub id")

    def text_stats(self, text):
        model, tok = load_causal_lm(self.params.model, self.params.device)
        ppl, n = perplexity(model, tok, text, self.params.max_tokens)
        return {"perplexity": round(ppl, 4) if n else None, "lm_tokens": n}

    def judge(self, s):
        if s["lm_tokens"] < self.params.min_tokens or s["perplexity"] is None:
            return None
        return None if s["perplexity"] <= self.params.max_ppl else "high_perplexity"
