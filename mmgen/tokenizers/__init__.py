"""Tokenizers: media -> discrete codes (+ continuous features) and back, behind one API."""

from mmgen.tokenizers.base import ImageTokenizer, load_image_tokenizer, register_tokenizer, tokenizer_class  # noqa: F401
