"""A checkpoint bundle: everything needed to run a trained unified model from one directory.

Layout (every file in the ecosystem's own format, safetensors only)::

    DIR/config.json, DIR/model.safetensors   the causal LM (transformers save_pretrained)
    DIR/tokenizer.json, ...                   the text tokenizer (transformers save_pretrained)
    DIR/vocab.json                            the Vocab: id layout of text, structural and code tokens
    DIR/image_tokenizer/                      the image tokenizer (mmgen.tokenizers save_pretrained)
    DIR/audio_tokenizer/                      the audio codec (AudioCodec save_pretrained), when training used one:
                                              what turns generated audio codes back into a waveform
    DIR/mmgen.json                            run facts: image resolution, preset, training summary
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.models.vocab import Vocab
from mmgen.utils.files import read_json


@dataclass
class Bundle:
    model: object  # a transformers PreTrainedModel (causal LM)
    text_tokenizer: object  # a transformers PreTrainedTokenizerBase
    vocab: Vocab
    image_tokenizer: object | None = None  # mmgen.tokenizers.ImageTokenizer
    meta: dict = field(default_factory=dict)
    # After meta, so the positional Bundle(model, tok, vocab, image_tok, meta) calls keep their meaning.
    audio_tokenizer: object | None = None  # mmgen.tokenizers.audio.AudioCodec

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(p, safe_serialization=True)
        self.text_tokenizer.save_pretrained(p)
        self.vocab.save(p / "vocab.json")
        if self.image_tokenizer is not None:
            self.image_tokenizer.save_pretrained(p / "image_tokenizer")
        if self.audio_tokenizer is not None:
            self.audio_tokenizer.save_pretrained(p / "audio_tokenizer")
        (p / "mmgen.json").write_text(json.dumps(self.meta, indent=1, default=str))
        return p


def load_bundle(path: str | Path, device: str = "cpu", dtype=None) -> Bundle:
    """Load a bundle written by :meth:`Bundle.save` (or by training) from a local directory."""
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()  # transformers' model classes import torchvision, broken next to CPU torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmgen.models.unified  # noqa: F401  (registers MMGenForCausalLM with the Auto classes)

    p = Path(path)
    if not (p / "vocab.json").is_file() or not (p / "config.json").is_file():
        raise MMGenError(f"{p} is not an mmgen checkpoint (needs config.json and vocab.json); "
                         "train one with `mmgen quickstart` or `mmgen train`")
    vocab = Vocab.load(p / "vocab.json")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(p)
    image_tokenizer = None
    if (p / "image_tokenizer").is_dir():
        from mmgen.tokenizers import load_image_tokenizer

        image_tokenizer = load_image_tokenizer(p / "image_tokenizer", device=device)
    audio_tokenizer = None
    if (p / "audio_tokenizer").is_dir():  # bundles from before speech output have none: they still load
        from mmgen.tokenizers.audio import AudioCodec

        audio_tokenizer = AudioCodec.from_pretrained(p / "audio_tokenizer", device=device)
    meta = read_json(p / "mmgen.json", {})
    return Bundle(model, text_tokenizer, vocab, image_tokenizer, meta, audio_tokenizer)
