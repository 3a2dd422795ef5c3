"""A checkpoint bundle: everything needed to run a trained unified model from one directory.

Layout (every file in the ecosystem's own format, safetensors only)::

    DIR/config.json, DIR/model.safetensors   the causal LM (transformers save_pretrained)
    DIR/tokenizer.json, ...                   the text tokenizer (transformers save_pretrained)
    DIR/vocab.json                            the Vocab: id layout of text, structural and code tokens
    DIR/image_tokenizer/                      the image tokenizer (mmgen.tokenizers save_pretrained)
    DIR/audio_tokenizer/                      the audio codec (AudioCodec save_pretrained), when training used one:
                                              what turns generated audio codes back into a waveform
    DIR/detokenizer/x1/, x2/                  optional diffusion detokenizers of the image tokenizer's codes, by
                                              output scale (mmgen.models.detokenizer_set): generation draws
                                              pictures through them
    DIR/generation_config.json                transformers' GenerationConfig: bos/eos/pad and the sampling
                                              settings the recipe was evaluated with (mmgen.inference.settings)
    DIR/processor_config.json                 the chat template (mmgen.processing.processor.ChatTemplate)
    DIR/mmgen.json                            run facts: image resolution, preset, training summary
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.processing.processor import ChatTemplate
from mmgen.processing.vocab import Vocab
from mmgen.utils.compat import ensure_torchvision
from mmgen.utils.files import read_json

# transformers' GenerationConfig file: bos/eos/pad and the sampling settings generation starts from
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Bundle:
    model: object  # a transformers PreTrainedModel (causal LM)
    text_tokenizer: object  # a transformers PreTrainedTokenizerBase
    vocab: Vocab
    image_tokenizer: object | None = None  # mmgen.tokenizers.ImageTokenizer
    meta: dict = field(default_factory=dict)
    # After meta, so the positional Bundle(model, tok, vocab, image_tok, meta) calls keep their meaning.
    audio_tokenizer: object | None = None  # mmgen.tokenizers.audio.AudioCodec
    # The sampling settings generation starts from are the model's own ``generation_config``, which
    # transformers loads and saves with it (mmgen.inference.settings.bundle_sampling reads it).
    # mmgen.processing.processor.ChatTemplate, saved as processor_config.json (None: from the training facts)
    chat_template: object | None = None
    # mmgen.models.detokenizer_set.DetokenizerSet, saved as detokenizer/ (None: pictures come from the
    # tokenizer's decoder)
    detokenizer: object | None = None

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
        # The chat template goes in explicitly: generation never re-derives it from the training config.

        (self.chat_template or ChatTemplate.from_training(self.meta)).save(p)
        if self.detokenizer is not None:
            from mmgen.models.detokenizer_set import DETOKENIZER_DIR

            self.detokenizer.save(p / DETOKENIZER_DIR)
        (p / "mmgen.json").write_text(json.dumps(self.meta, indent=1, default=str))
        return p


def can_draw(bundle) -> bool:
    """Whether ``bundle`` writes images: an image tokenizer to decode them and the pixel code range in
    its vocab to write them in."""
    return bundle.image_tokenizer is not None and bundle.vocab.has("pix")


def checkpoint_can_draw(path: str | Path) -> bool:
    """:func:`can_draw` from a bundle directory's files, before anything loads: an ``image_tokenizer/``
    folder and pixel codes in ``vocab.json``."""
    p = Path(path)
    return (p / "image_tokenizer").is_dir() and Vocab.load(p / "vocab.json").has("pix")


def read_generation_config(path: str | Path):
    """The bundle's ``generation_config.json`` as a ``transformers.GenerationConfig``, None without one;
    a file that does not parse is a one-line MMGenError naming it."""
    f = Path(path) / GENERATION_CONFIG
    if not f.is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(f.parent)
    except Exception as e:  # JSON syntax, unknown value types: transformers raises several kinds
        raise MMGenError(f"{f} is not a valid generation config ({_first_line(e)}); fix or delete it") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def check_bundle_dir(path: str | Path) -> Path:
    """``path`` as an mmgen bundle directory, or a one-line MMGenError saying what is missing (cheap:
    reads nothing but file names, so commands check it before loading anything)."""
    p = Path(path)
    if not p.is_dir():
        raise MMGenError(
            f"checkpoint directory {p} does not exist; train one with `mmgen quickstart` "
            "(its final bundle is named in runs/quickstart/report.json) or `mmgen train`"
        )
    missing = [n for n in ("config.json", "vocab.json") if not (p / n).is_file()]
    if missing:
        raise MMGenError(
            f"{p} is not an mmgen checkpoint (no {' or '.join(missing)}); "
            "train one with `mmgen quickstart` or `mmgen train`"
        )
    return p


def load_bundle(path: str | Path, device: str = "cpu", dtype=None) -> Bundle:
    """Load a bundle written by :meth:`Bundle.save` (or by training) from a local directory."""
    ensure_torchvision()  # transformers' model classes import torchvision, broken next to CPU torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmgen.models.unified  # noqa: F401  (registers MMGenForCausalLM with the Auto classes)

    p = check_bundle_dir(path)
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MMGenError(
            f"{p / 'config.json'} is not valid JSON ({_first_line(e)}); the checkpoint is damaged"
        ) from None
    vocab = Vocab.load(p / "vocab.json")
    read_generation_config(p)  # a damaged file is a one-line error here; the model loads it below
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # a truncated, corrupt or missing weights file
        weights = sorted(x.name for x in p.glob("*.safetensors")) or ["model.safetensors"]
        raise MMGenError(
            f"{p / weights[0]} could not be loaded ({_first_line(e)}); "
            "the checkpoint is damaged or incomplete, copy or save it again"
        ) from None
    model = model.to(device).eval()
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
    from mmgen.models.detokenizer_set import DETOKENIZER_DIR, DetokenizerSet

    # read from its JSON files only: the pipelines load when the first picture is drawn
    detok = DetokenizerSet.from_dir(p / DETOKENIZER_DIR) if (p / DETOKENIZER_DIR).is_dir() else None
    return Bundle(
        model,
        text_tokenizer,
        vocab,
        image_tokenizer,
        meta,
        audio_tokenizer=audio_tokenizer,
        chat_template=ChatTemplate.load(p),
        detokenizer=detok,
    )
