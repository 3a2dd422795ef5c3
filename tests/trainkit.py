"""Pieces several tests share: tiny colour, caption and audio code shards, the key=value overrides of a
tiny run, and the tiny tokenizers built from config (a pixel VQ, an audio codec, a DualViTok training config).

Imported as ``trainkit`` (pytest puts this folder on sys.path, as it does for conftest)."""

from __future__ import annotations

import json

import numpy as np

from mmgen.config import load_config
from mmgen.data.code_shards import CodedDoc, CodeShardWriter
from mmgen.data.doc import Audio, Doc, Image, Text
from mmgen.tokenizers.train_config import TokenizerTrainConfig

COLORS = ["red", "blue", "green", "yellow"]
CODEBOOK = 32
# A DAC small enough to build in a test: a 320-sample hop at 16 kHz (50 code frames/s), 2 levels of 16 codes.
TINY_AUDIO_CODEC = {
    "sampling_rate": 16000,
    "encoder_hidden_size": 4,
    "downsampling_ratios": [2, 4, 5, 8],
    "decoder_hidden_size": 16,
    "hidden_size": 16,
    "n_codebooks": 2,
    "codebook_size": 16,
    "codebook_dim": 4,
}
AUDIO_HOP = int(np.prod(TINY_AUDIO_CODEC["downsampling_ratios"]))  # samples per code frame
AUDIO_SR = TINY_AUDIO_CODEC["sampling_rate"]


def tiny_pixel_vq():
    """A randomly initialised PixelVQ: 32x32 images -> 8x8 codes of a 32-code book."""
    import torch

    from mmgen.tokenizers.vq import PixelVQ

    torch.manual_seed(0)
    return PixelVQ(resolution=(32, 32), channels=(8, 16), code_dim=4, codebook_size=CODEBOOK, norm_groups=4).eval()


def tiny_audio_codec():
    """The tiny DAC of :data:`TINY_AUDIO_CODEC`, random weights drawn from seed 0."""
    import torch

    from mmgen.tokenizers.audio import AudioCodec

    torch.manual_seed(0)
    return AudioCodec.from_config(TINY_AUDIO_CODEC)


def write_color_shard(out, n_docs: int):
    """Alternating QA docs (image, question, answer) and caption docs (text -> 4x4 codes); the codes
    of a picture fall in the colour's quarter of the codebook, so there is something to learn."""
    rng = np.random.default_rng(0)
    with CodeShardWriter(out) as w:
        for i in range(n_docs):
            c = int(rng.integers(4))
            codes = (4 * c + rng.integers(0, 4, size=(4, 4))) % CODEBOOK
            if i % 2:
                items = [Text(f"a {COLORS[c]} circle."), Image(path="<codes:1>", format="png")]
                w.write(CodedDoc(Doc(items=items), codes={1: codes}))
            else:
                items = [
                    Image(path="<codes:0>", format="png"),
                    Text("What color is the circle?", {"role": "question"}),
                    Text(COLORS[c], {"role": "answer"}),
                ]
                w.write(CodedDoc(Doc(items=items), codes={0: codes}))
    return out


def write_caption_shard(
    out,
    n_docs: int,
    colors: list[str],
    shapes: list[str],
    codebook: int,
    grid: int,
    seed: int,
    places: list[str] | None = None,
    max_docs: int = 5000,
):
    """Caption docs "a <colour> <shape>[ at the <place>]." -> a grid x grid code picture whose codes are the
    (colour, shape) index plus a random half-codebook offset, so the caption predicts every code's residue."""
    rng = np.random.default_rng(seed)
    with CodeShardWriter(out, max_docs=max_docs) as w:
        for _ in range(n_docs):
            c, s = rng.integers(len(colors)), rng.integers(len(shapes))
            where = f" at the {places[rng.integers(len(places))]}" if places else ""
            codes = (len(shapes) * c + s + codebook // 2 * rng.integers(0, 2, size=(grid, grid))) % codebook
            doc = Doc(items=[Text(f"a {colors[c]} {shapes[s]}{where}."), Image(path="<codes:1>", format="png")])
            w.write(CodedDoc(doc, codes={1: codes}))
    return out


def write_audio_shard(out, n_docs: int, levels: int, codebook: int, seed: int = 0):
    """Spoken-caption docs "a <colour> sound." -> (levels, T) audio codes, the first level's codes in
    the colour's quarter of the codebook."""
    rng = np.random.default_rng(seed)
    with CodeShardWriter(out) as w:
        for _ in range(n_docs):
            c = int(rng.integers(len(COLORS)))
            codes = rng.integers(0, codebook, size=(levels, int(rng.integers(6, 12))))
            codes[0] = c * codebook // 4 + codes[0] % (codebook // 4)
            doc = Doc(items=[Text(f"a {COLORS[c]} sound."), Audio(path="<codes:1>", format="wav")])
            w.write(CodedDoc(doc, codes={1: codes}))
    return out


def tiny_run(code_shards, out_dir, settings: dict, **kw) -> list[str]:
    """Overrides of a tiny run: the settings every training test shares, then the test's
    ``settings``, then the call's ``kw`` (later wins)."""
    merged = {
        "data.code_shards": str(code_shards),
        "out_dir": str(out_dir),
        "micro_batch": 2,
        "log_every": 1,
        "progress": False,
        "optim.warmup_steps": 0,
        **settings,
        **kw,
    }
    return [f"{k}={v}" for k, v in merged.items()]


# A tiny DualViTok and its CLIP teacher (open_clip model config).
TEACHER_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2.0},
}
TINY_DUALVITOK = {
    "sem_width": 16,
    "sem_heads": 2,
    "sem_encoder_layers": 1,
    "sem_decoder_layers": 1,
    "sem_merge": 2,
    "sem_code_dim": 8,
    "sem_quantizer": {"kind": "simvq", "codebook_size": 16},
    "pix_channels": [8, 16],
    "pix_patch_size": 4,
    "pix_code_dim": 4,
    "pix_quantizer": {"kind": "simvq", "codebook_size": 32},
    "sem_cond_dim": 4,
    "norm_groups": 4,
}


def tiny_dualvitok_cfg(out_dir, teacher_dir, **over):
    """A DualViTok training config of a few steps on 48 scenes of 32 px, the teacher CLIP at ``teacher_dir``."""
    base = {
        "tokenizer": "dualvitok",
        "synthetic_images": 48,
        "resolution": 32,
        "eval_images": 8,
        "dualvitok": {**TINY_DUALVITOK, "teacher": {"kind": "open_clip", "name": teacher_dir}},
        "steps": 4,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 1,
        "log_every": 1,
        "ckpt_every": 2,
        "restart_every": 2,
        "out_dir": str(out_dir),
        "threads": 1,
        "progress": False,
    }
    base.update(over)
    return load_config(TokenizerTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def assert_logged_run(out_dir) -> list[dict]:
    """A trainer's run directory holds the shared metric log (mmgen.utils.metric_log): metrics.jsonl rows,
    TensorBoard events carrying the same losses at the same steps, and a PNG loss plot. Returns the rows."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = Path(out_dir)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in r and "loss" in r for r in rows)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in logged] == [r["step"] for r in rows]
    assert np.allclose([v for _, v in logged], [r["loss"] for r in rows], rtol=1e-6)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows
