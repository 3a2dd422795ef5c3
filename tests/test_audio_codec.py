"""AudioCodec (transformers' DAC built from config): shapes, determinism, resampling, save/load,
real files, clear errors, training + exact resume, the CLI and the real-scale preset on meta, and
pre-tokenizing audio items into code shards that round-trip through the LM sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgen.errors import MediaError, MMGenError

from trainkit import TINY_AUDIO_CODEC as TINY
from trainkit import assert_logged_run, tiny_pixel_vq

REAL_AUDIO = ["audio1.wav", "audio3.ogg", "video1.mp4", "video4.mp4"]


@pytest.fixture(scope="module")
def codec():
    from mmgen.tokenizers.audio import AudioCodec

    torch.manual_seed(0)
    return AudioCodec.from_config(TINY)


def tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels) if channels > 1 else x


def test_facts_shapes_and_batched_encode(codec):
    assert codec.hop_length == 320 and codec.frame_rate == 50 and codec.tokens_per_second == 100
    a, b = tone(0.5, 16000), tone(0.23, 16000)
    codes = codec.encode([a, b], sample_rate=16000)
    assert [tuple(c.shape) for c in codes] == [(2, 25), (2, codec.code_length(len(b)))] and codec.code_length(
        len(b)
    ) == 12
    assert all(c.dtype == torch.int64 and int(c.min()) >= 0 and int(c.max()) < 16 for c in codes)
    y = codec.decode(codes[0])
    assert y.ndim == 1 and abs(len(y) - 25 * 320) <= 320
    ys = codec.decode(torch.stack([codes[0], codes[0]]))
    assert ys.shape[0] == 2


def test_encode_is_deterministic_and_batch_independent(codec):
    x = tone(0.4, 16000)
    one = codec.encode(x, sample_rate=16000)
    again = codec.encode(x, sample_rate=16000)
    assert torch.equal(one, again)
    batched = codec.encode([x, tone(0.8, 16000) * 0.5], sample_rate=16000)[0]
    # Zero padding only reaches the last frames through the receptive field; elsewhere only float
    # rounding of batched convolutions can flip a near-tied code.
    assert (batched[:, :-3] == one[:, :-3]).float().mean() >= 0.9


def test_resampling_and_stereo_are_handled(codec):
    mono16 = codec.encode(tone(0.5, 16000), sample_rate=16000)
    stereo44 = codec.encode(tone(0.5, 44100, channels=2), sample_rate=44100)
    assert stereo44.shape == mono16.shape  # same duration -> same number of code frames
    with pytest.raises(MMGenError, match="sample_rate"):
        codec.encode(tone(0.5, 16000))


def test_save_load_round_trip_is_bit_exact(codec, tmp_path):
    from transformers import DacModel

    from mmgen.tokenizers.audio import AudioCodec

    codec.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").is_file()
    back = AudioCodec.from_pretrained(tmp_path / "c")
    x = tone(0.6, 16000)
    assert torch.equal(codec.encode(x, sample_rate=16000), back.encode(x, sample_rate=16000))
    codes = codec.encode(x, sample_rate=16000)
    assert np.array_equal(codec.decode(codes), back.decode(codes))
    assert isinstance(DacModel.from_pretrained(str(tmp_path / "c")), DacModel)  # a plain transformers checkpoint


@pytest.mark.parametrize("name", REAL_AUDIO)
def test_every_real_audio_file_encodes_and_decodes(codec, real_dir, name):
    from mmgen.data.media import probe_audio

    info = probe_audio((real_dir / name).read_bytes(), name)
    codes = codec.encode(real_dir / name)
    assert codes.shape[0] == 2
    assert abs(codes.shape[1] - info["duration"] * codec.frame_rate) <= 2
    assert np.isfinite(codec.decode(codes[:, :50])).all()


def test_bad_inputs_are_clear_one_line_errors(codec, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 3)
    with pytest.raises(MediaError) as e:
        codec.encode(bad)
    assert "\n" not in str(e.value) and "broken.wav" in str(e.value)
    with pytest.raises(MediaError, match="not found"):
        codec.encode(tmp_path / "missing.wav")
    with pytest.raises(MMGenError, match="out of range"):
        codec.decode(torch.full((2, 4), 99))
    with pytest.raises(MMGenError, match="levels|shaped"):
        codec.decode(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(MMGenError, match="power of 2"):
        from mmgen.tokenizers.audio import AudioCodec

        AudioCodec.from_config({**TINY, "codebook_size": 12})
    with pytest.raises(MMGenError, match="not an audio codec directory"):
        from mmgen.tokenizers.audio import AudioCodec

        AudioCodec.from_pretrained(tmp_path)


def test_mel_l1_and_si_snr_measure_distortion():
    from mmgen.tokenizers.audio import mel_l1, si_snr

    x = torch.from_numpy(tone(0.5, 16000))
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert si_snr(x, 3 * x) > 60  # scale-invariant
    assert 5 < si_snr(x, noisy) < 40
    assert mel_l1(x, x, 16000) == 0 and mel_l1(x, noisy, 16000) > 0.01


def _train_cfg(out_dir, real_dir, **over):
    from mmgen.config import load_config
    from mmgen.tokenizers.audio_train import AudioTrainConfig

    base = {
        "synthetic_captions": 2,
        "eval_captions": 1,
        "real_audio": [str(real_dir / "audio1.wav")],
        "segment_seconds": 0.2,
        "model": TINY,
        "steps": 4,
        "batch_size": 2,
        "log_every": 1,
        "ckpt_every": 2,
        "out_dir": str(out_dir),
        "threads": 1,
        "progress": False,
        "mel_ffts": [256],
    }
    base.update(over)
    return load_config(AudioTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_training_writes_codec_eval_and_resumes_exactly(tmp_path, real_dir):
    from safetensors.torch import load_file

    from mmgen.tokenizers.audio import AudioCodec
    from mmgen.tokenizers.audio_train import train_audio_tokenizer

    full = train_audio_tokenizer(_train_cfg(tmp_path / "full", real_dir))
    rep = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert rep["tokens_per_second"] == 100 and rep["real_tails"]["clips"] == 1 and "si_snr_db" in rep["heldout_speech"]
    assert AudioCodec.from_pretrained(full).n_q == 2
    assert_logged_run(tmp_path / "full")

    train_audio_tokenizer(_train_cfg(tmp_path / "cut", real_dir, steps=2, eval_captions=0))
    resumed = train_audio_tokenizer(_train_cfg(tmp_path / "cut", real_dir, resume=True, eval_captions=0))
    a = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_and_recipe(tmp_path, real_dir, capsys):
    from mmgen.cli import main

    assert main(["train-audio-tokenizer", "--help"]) == 0
    assert "tiny_audio" in capsys.readouterr().out
    assert main(["train-audio-tokenizer", "tiny_audio", "stepz=3"]) == 2
    assert "steps" in capsys.readouterr().err


def test_real_scale_preset_builds_on_meta_and_loads_by_local_path(tmp_path):
    from mmgen.config import read_yaml_mapping
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.audio import AudioCodec, build_on_meta

    preset = read_yaml_mapping(recipe_path("dac_16khz", "tokenizers"))
    big = build_on_meta(preset["model"])
    assert next(big.parameters()).device.type == "meta"
    assert big.tokens_per_second == 600 and big.codebook_size == 1024
    assert 60e6 < big.num_parameters() < 90e6  # DAC 16 kHz is ~74M parameters
    # The same loading code on a tiny checkpoint saved like a hub one.
    AudioCodec.from_config(TINY).model.save_pretrained(str(tmp_path / "hub_like"))
    assert AudioCodec.from_pretrained(str(tmp_path / "hub_like")).n_q == 2
    with pytest.raises(MMGenError, match="cannot load audio codec"):
        AudioCodec.from_pretrained("no-such-org/no-such-codec")


def _wav(x: np.ndarray, sr: int) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, np.float32).T, sr, format="WAV")
    return buf.getvalue()


def test_pretokenize_audio_codes_round_trip_through_sequences(codec, real_dir, tmp_path, capsys):
    from mmgen.cli import main
    from mmgen.data.code_shards import read_code_shards
    from mmgen.data.doc import Audio, Doc, Text
    from mmgen.data.shards import write_shards
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.processing.sequence import build_sequence
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.pretokenize import pretokenize

    tiny_pixel_vq().save_pretrained(tmp_path / "vq")
    codec.save_pretrained(tmp_path / "codec")
    ogg = (real_dir / "audio3.ogg").read_bytes()
    stereo = _wav(tone(0.5, 44100, channels=2), 44100)  # the codec wants 16 kHz mono
    docs = [
        Doc([Text("a real clip."), Audio(data=ogg, format="ogg")]),
        Doc([Text("a stereo tone."), Audio(data=stereo, format="wav")]),
        Doc([Text("broken."), Audio(data=b"RIFF\x00\x00\x00\x00WAVEjunk" * 3, format="wav")]),
        Doc([Text("empty."), Audio(data=_wav(np.zeros(0), 16000), format="wav")]),
        # a good item then a broken one: the Doc is quarantined and its good item not counted as encoded
        Doc([Audio(data=stereo, format="wav"), Audio(data=b"RIFF\x00\x00\x00\x00WAVEjunk" * 3, format="wav")]),
    ]
    write_shards(docs, tmp_path / "in")

    plain = pretokenize(tmp_path / "vq", str(tmp_path / "in"), tmp_path / "plain", progress=False)
    assert plain["docs_written"] == 5 and plain["audio_items_without_codes"] == 6 and plain["audio_items_encoded"] == 0
    assert all(not c.codes for c in read_code_shards(plain["shards"]))  # as before the option existed

    assert (
        main(
            [
                "tokenize",
                "--tokenizer",
                str(tmp_path / "vq"),
                "--audio-tokenizer",
                str(tmp_path / "codec"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "codes"),
            ]
        )
        == 0
    )
    assert "3 quarantined" in capsys.readouterr().out
    s = json.loads((tmp_path / "codes" / "summary.json").read_text())
    assert s["docs_in"] == s["docs_written"] + s["quarantined"] == 5
    assert s["quarantine_reasons"] == {"undecodable_audio": 3} and s["audio_items_encoded"] == 2
    assert s["audio"]["levels"] == 2 and s["audio"]["frame_rate"] == 50
    coded = list(read_code_shards(s["shards"]))
    real, mono = coded[0].codes[1], coded[1].codes[1]
    assert real.dtype == np.int16 and np.array_equal(real, codec.encode(ogg).numpy())
    assert mono.shape == (2, 25)  # 0.5 s at 50 code frames/s, whatever the input's rate and channels

    tok = train_text_tokenizer(["a real clip.", "a stereo tone."] * 10, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": 32, "audio": 2 * 16}, max_grid=8, audio_levels=2)
    for cd in coded:
        seq = build_sequence(cd, tok, vocab)
        ids = seq["input_ids"].tolist()
        block = ids[ids.index(vocab["<audio>"]) : ids.index(vocab["</audio>"]) + 1]
        assert np.array_equal(vocab.parse_audio_block(block), cd.codes[1]) and not seq["skipped"]
        audio_only = build_sequence(cd, tok, vocab, targets=("audio",))["loss_mask"]
        assert audio_only.sum() == cd.codes[1].size  # every code of every level is an "audio" target
    skipped = build_sequence(coded[0], tok, Vocab(len(tok), {"pix": 32}, max_grid=8))["skipped"]
    assert skipped == {"audio_without_codes": 1}


def test_logged_usage_counts_codes_that_won_frames_not_restarted_ones():
    from types import SimpleNamespace

    from mmgen.tokenizers.audio_train import CodebookUsage

    k, d = 8, 2
    quant = SimpleNamespace(codebook=torch.nn.Embedding(k, d))
    model = SimpleNamespace(quantizer=SimpleNamespace(quantizers=[quant]))
    opt = torch.optim.AdamW(quant.codebook.parameters())
    tracker = CodebookUsage(1, k, decay=0.5)
    out = SimpleNamespace(audio_codes=torch.tensor([[[0, 0, 1, 1]]]), projected_latents=torch.randn(1, d, 4))
    restarted = tracker.update(model, out, threshold=0.5, restart=True, g=torch.Generator().manual_seed(0), opt=opt)
    assert restarted == 6  # codes 2..7 won nothing
    assert torch.all(tracker.usage[0, 2:] == 1 / k)  # their average was reset to a uniform share ...
    assert tracker.window_usage() == 2 / k  # ... but the logged usage counts only codes 0 and 1
    assert tracker.window_usage() == 0.0  # and a new window starts empty
    assert "seen" not in tracker.state_dict()  # checkpoints are unchanged
