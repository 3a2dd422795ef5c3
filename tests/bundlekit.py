"""What several tests share: a tiny random bundle (a test image tokenizer of flat colour patches, a
text tokenizer trained on three captions, a 2-layer LM, and a way to bias its head), and a free port
for the servers tests start on 127.0.0.1.

Imported as ``bundlekit`` (pytest puts this folder on sys.path, as it does for conftest)."""

from __future__ import annotations

import socket
import struct
import zlib

import torch

from mmgen.processing.vocab import Vocab
from mmgen.tokenizers.base import ImageTokenizer, register_tokenizer

TEXTS = [
    "a large red circle at the top left, on a black background.",
    "a small blue square in the center, on a white background.",
    "two green triangles at the bottom right, on a gray background.",
] * 4
RES = (32, 32)  # (width, height) -> a 4x4 code grid at downsample 8


@register_tokenizer
class PaletteTokenizer(ImageTokenizer):
    """Test-only image tokenizer: each code is a flat colour patch (a fixed random palette)."""

    mmgen_type = "test_palette"

    def __init__(self, codebook_size: int = 16, downsample: int = 8, resolution=RES):
        super().__init__()
        self.codebook_size, self.downsample, self.resolution = codebook_size, downsample, tuple(resolution)
        g = torch.Generator().manual_seed(0)
        self.palette = torch.nn.Parameter(torch.rand(codebook_size, 3, generator=g) * 2 - 1)

    def encode_tensor(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, self.downsample).permute(0, 2, 3, 1)
        return torch.cdist(pooled.reshape(-1, 3), self.palette).argmin(-1).reshape(pooled.shape[:3])

    def decode_tensor(self, codes):
        img = self.palette[codes].permute(0, 3, 1, 2)
        return img.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)

    def get_config(self):
        return {"codebook_size": self.codebook_size, "downsample": self.downsample, "resolution": list(self.resolution)}


def make_tiny_bundle(path):
    """Save a tiny random bundle (2 layers, hidden 64) to ``path`` and load it back."""
    from mmgen.models.bundle import Bundle, load_bundle
    from mmgen.models.lm import build_tiny_lm
    from mmgen.models.text_tokenizer import train_text_tokenizer

    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": 16}, max_grid=8)
    model = build_tiny_lm(vocab, hidden=64, layers=2, heads=4, text_tokenizer=tok, seed=0)
    Bundle(model, tok, vocab, PaletteTokenizer(), {"image_resolution": list(RES)}).save(path)
    return load_bundle(path)


def bias_head(bundle, ids_bias: dict[int, float]):
    """Give the LM head a bias so the model prefers some ids (a random model never would)."""
    model = bundle.model
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for i, b in ids_bias.items():
            head.bias[i] = b
    model.lm_head = head


def tiny_qwen2(vocab: Vocab, tok, **config):
    """A tiny random Qwen2 decoder over ``vocab`` (2 layers, 4 query heads sharing 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab.size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    return Qwen2ForCausalLM(cfg).eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_speech_bundle(path):
    """A tiny random LM whose vocab has pixel and audio codes, saved at ``path`` with the palette image
    tokenizer and the tiny audio codec (``trainkit.tiny_audio_codec``)."""
    from mmgen.models.bundle import Bundle
    from mmgen.models.lm import build_tiny_lm
    from mmgen.models.text_tokenizer import train_text_tokenizer

    from trainkit import TINY_AUDIO_CODEC, tiny_audio_codec

    levels, per = TINY_AUDIO_CODEC["n_codebooks"], TINY_AUDIO_CODEC["codebook_size"]
    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": 16, "audio": levels * per}, max_grid=8, audio_levels=levels)
    model = build_tiny_lm(vocab, hidden=64, layers=1, heads=4, text_tokenizer=tok, seed=0)
    Bundle(model, tok, vocab, PaletteTokenizer(), {"image_resolution": list(RES)}, tiny_audio_codec()).save(path)
    return path


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of w x h white pixels, a few hundred kB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\xff" * ((w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def tiny_detok(tok, sizes=(16,), names=("pix",), ppc=8, side=4, seed=0, **over):
    """A random tiny detokenizer pipeline for ``tok``'s codes (codes only: it draws other pictures than
    the tokenizer's decoder); ``over`` replaces what it records of its tokenizer."""
    from mmgen.models.detokenizer import build_pipeline

    torch.manual_seed(seed)
    kw = dict(
        tokenizer_type=tok.mmgen_type, tokenizer_resolution=int(tok.resolution[0]), tokenizer_sha256=tok.fingerprint()
    )
    kw.update(over)
    return build_pipeline(
        list(sizes),
        list(names),
        ppc,
        side,
        embed_dims=[4] * len(sizes),
        block_out_channels=(8, 16),
        norm_num_groups=4,
        **kw,
    )


def make_detok_bundle(root):
    """The tiny bundle saved at ``root/bundle`` with a 1x and a 2x detokenizer (``detokenizer/x1``, ``x2``)."""
    from mmgen.models.detokenizer_set import DetokenizerSet

    b = make_tiny_bundle(root / "plain")
    b.detokenizer = DetokenizerSet({1: tiny_detok(b.image_tokenizer), 2: tiny_detok(b.image_tokenizer, ppc=16)})
    b.save(root / "bundle")
    return root / "bundle"
