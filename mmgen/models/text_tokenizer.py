"""A small text tokenizer trained offline on the corpus' own texts (the ``tiny`` preset's text side).

Byte-level BPE (GPT-2 style) built with Hugging Face ``tokenizers`` and wrapped as a
``transformers.PreTrainedTokenizerFast``, so it saves and loads with ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` like any hub tokenizer and a real-scale preset can swap in a
pretrained one (Qwen2.5, Llama) without touching the rest of the code.

Special tokens take the first ids, in a fixed order, so every tiny checkpoint agrees on them:
``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3. The tokenizer adds no special tokens by itself:
:mod:`mmgen.processing.sequence` places ``<s>``/``</s>`` explicitly around interleaved documents, because a
text item in the middle of a document must not get its own ``<s>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from mmgen.errors import MMGenError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# A byte-level BPE needs the 256 byte symbols plus the special tokens before it can learn a merge.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and return a ``PreTrainedTokenizerFast``.

    Deterministic: the same texts in the same order give the same merges and ids. Any string can be
    encoded afterwards (byte fallback), so prompts with words never seen in training still work."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise MMGenError(f"text vocab_size {vocab_size} is too small for a byte-level BPE (use at least {MIN_VOCAB})")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise MMGenError("no text to train the text tokenizer on (the shards hold no Text items)")

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Runs of spaces and tabs become one space, as people type them (a doubled space, a pasted tab); newlines
    # stay, since chat templates and paragraphs use them. Without it a doubled space splits a word into
    # tokens training rarely saw: the demo drew 0.805 of prompts with odd spacing right against 0.92.
    tok.normalizer = normalizers.Replace(Regex(r"[ \t]+"), " ")
    # add_prefix_space=False: a text item is encoded exactly as written, so a prompt at inference and
    # the same caption in training give identical ids.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    ids = [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:  # the fixed layout every tiny checkpoint relies on
        raise RuntimeError(f"special token ids came out as {ids}")
    return fast


def special_ids(text_tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids of any Hugging Face tokenizer (pad falls back to eos, as many LLMs have none)."""
    bos = text_tokenizer.bos_token_id
    eos = text_tokenizer.eos_token_id
    pad = text_tokenizer.pad_token_id
    return {"bos": bos, "eos": eos, "pad": pad if pad is not None else eos}


def load_text_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
