"""The audio codec's phase: the spectral and phase losses (each blind to what it should be blind to and
sensitive to what it constrains), the iSTFT decoder (shapes, save/load, training with the new terms),
and the STOI / PESQ metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError

from trainkit import TINY_AUDIO_CODEC

TINY_ISTFT = {**TINY_AUDIO_CODEC, "decoder": "istft", "istft_n_fft": 320, "istft_hop": 80, "decoder_layers": 2}
RES = [(256, 64), (512, 128)]


def voiced(seconds: float = 0.6, sr: int = 16000) -> torch.Tensor:
    """A speech-like test signal: a gliding 120-180 Hz pulse train through two formant-ish resonances."""
    from scipy.signal import lfilter

    n = int(seconds * sr)
    f0 = np.linspace(120, 180, n)
    phase = np.cumsum(2 * np.pi * f0 / sr)
    pulses = (np.diff(np.floor(phase / (2 * np.pi)), prepend=0) > 0).astype(np.float64)
    y = pulses
    for f, bw in ((700, 130), (1200, 150)):
        r = np.exp(-np.pi * bw / sr)
        y = lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r], y)
    y = y * np.hanning(n) ** 0.2
    return torch.from_numpy((0.3 * y / np.abs(y).max()).astype(np.float32))


def random_phase_copy(x: torch.Tensor, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """The same STFT magnitudes with a random phase in every bin of every frame."""
    w = torch.hann_window(n_fft)
    s = torch.stft(x, n_fft, hop, window=w, return_complex=True)
    phase = torch.rand(s.shape, generator=torch.Generator().manual_seed(0)) * 2 * np.pi
    return torch.istft(torch.polar(s.abs(), phase), n_fft, hop, window=w, length=len(x))


def test_phase_derivative_loss_sees_phase_that_magnitudes_miss():
    from mmgen.tokenizers.audio_losses import phase_derivative_loss, stft_magnitude_loss

    x = voiced()
    scrambled = random_phase_copy(x)
    assert phase_derivative_loss(x, x, RES) == 0
    assert float(phase_derivative_loss(x, 0.3 * x, RES)) < 1e-4  # a gain is no phase error
    # A 2-sample delay moves every bin's phase by a constant over time: a small group-delay error only.
    delayed = torch.cat([torch.zeros(2), x[:-2]])
    small = float(phase_derivative_loss(x, delayed, RES))
    large = float(phase_derivative_loss(x, scrambled, RES))
    assert small < 0.1 and large > 0.5 and large > 10 * small
    # The magnitudes of the scrambled copy are much closer to the input's than its phases.
    assert float(stft_magnitude_loss(x, scrambled, RES)) < float(stft_magnitude_loss(x, 0.2 * torch.randn_like(x), RES))


def test_complex_loss_asks_for_absolute_phase_the_others_do_not():
    from scipy.signal import hilbert

    from mmgen.tokenizers.audio_losses import complex_stft_loss, phase_derivative_loss, stft_magnitude_loss

    x = voiced(0.8)
    # A 90-degree shift of every frequency: the same magnitude spectrum, another waveform.
    shifted = torch.from_numpy(np.imag(hilbert(x.numpy().astype(np.float64))).astype(np.float32))
    inner = slice(2000, -2000)  # away from the edges, where the analytic signal's wrap-around shows
    x, shifted = x[inner], shifted[inner]
    assert complex_stft_loss(x, x, RES) == 0
    assert float(stft_magnitude_loss(x, shifted, RES)) < 0.2 * float(stft_magnitude_loss(x, 0.5 * x, RES))
    assert float(phase_derivative_loss(x, shifted, RES)) < 0.1
    # The shifted copy costs more than decoding nothing at all.
    assert float(complex_stft_loss(x, shifted, RES)) > float(complex_stft_loss(x, torch.zeros_like(x), RES))


def test_istft_decoder_shapes_and_bit_exact_save_load(tmp_path):
    from transformers import AutoModel

    from mmgen.tokenizers.audio import AudioCodec
    from mmgen.tokenizers.audio_istft import DacIstftModel

    torch.manual_seed(0)
    codec = AudioCodec.from_config(TINY_ISTFT)
    x = voiced(0.43).numpy()
    codes = codec.encode(x, sample_rate=16000)
    assert codes.shape == (2, codec.code_length(len(x))) == (2, 22)
    y = codec.decode(codes)
    assert y.shape == (22 * 320,) and np.isfinite(y).all()
    assert codec.decode(torch.stack([codes, codes])).shape == (2, 22 * 320)
    assert codec.decode_levels(codes[:1]).shape == (22 * 320,)
    spec = codec.model.decoder.spectrum(codec.model.quantizer.from_codes(codes[None])[0])
    assert spec.shape == (1, 320 // 2 + 1, 22 * 320 // 80) and spec.is_complex()

    codec.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "mmgen_dac_istft"
    back = AudioCodec.from_pretrained(tmp_path / "c")
    assert isinstance(back.model, DacIstftModel)
    assert torch.equal(back.encode(x, sample_rate=16000), codes)
    assert np.array_equal(back.decode(codes), y)
    assert isinstance(AutoModel.from_pretrained(str(tmp_path / "c")), DacIstftModel)  # the Auto classes know it


def test_istft_config_errors_are_clear():
    from mmgen.tokenizers.audio import AudioCodec

    with pytest.raises(MMGenError, match="istft_hop"):
        AudioCodec.from_config({**TINY_ISTFT, "istft_hop": 64})  # 320 / 64 = 5: odd
    with pytest.raises(MMGenError, match="decoder must be"):
        AudioCodec.from_config({**TINY_ISTFT, "decoder": "wavenet"})


def test_phase_loss_gradient_restores_phase():
    """Gradient descent on the waveform of a random-phase copy brings its phase derivatives back toward
    the input's: the loss's gradient points somewhere useful, not only its value."""
    from mmgen.tokenizers.audio_losses import phase_derivative_loss

    x = voiced(0.5)
    y = random_phase_copy(x).clone().requires_grad_()
    opt = torch.optim.Adam([y], lr=1e-3)
    losses = []
    for _ in range(40):
        loss = phase_derivative_loss(y, x, RES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_training_with_istft_decoder_and_phase_terms(tmp_path, real_dir):
    from mmgen.config import load_config
    from mmgen.tokenizers.audio import AudioCodec
    from mmgen.tokenizers.audio_istft import DacIstftModel
    from mmgen.tokenizers.audio_train import AudioTrainConfig, train_audio_tokenizer

    over = {
        "synthetic_captions": 2,
        "eval_captions": 1,
        "real_audio": [str(real_dir / "audio1.wav")],
        "segment_seconds": 0.2,
        "model": TINY_ISTFT,
        "steps": 3,
        "batch_size": 2,
        "log_every": 1,
        "out_dir": str(tmp_path / "run"),
        "threads": 1,
        "progress": False,
        "mel_ffts": [256],
        "stft_weight": 1.0,
        "stft_ffts": [128, 512],
        "phase_weight": 1.0,
        "phase_ffts": [256],
        "complex_weight": 0.5,
        "complex_ffts": [256],
        "lr_schedule": "cosine",
        "warmup_steps": 1,
    }
    cfg = load_config(AudioTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    path = train_audio_tokenizer(cfg)
    assert isinstance(AudioCodec.from_pretrained(path).model, DacIstftModel)
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["stft"], r["phase"], r["complex"], r["loss"]]).all() for r in logged)
    # After the last step the cosine has reached its floor, min_lr_ratio (0.1) of the peak.
    assert [r["lr"] for r in logged] == pytest.approx([1e-3, 0.55e-3, 1e-4])
    cfg.lr_schedule = "step"
    with pytest.raises(MMGenError, match="schedule must be one of"):
        train_audio_tokenizer(cfg)
    rep = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert all(-1 <= rep[k]["stoi"] <= 1 for k in ("heldout_speech", "real_tails"))  # a mean correlation


def test_stoi_and_pesq_rank_distortions():
    from mmgen.tokenizers.audio import pesq_wb, stoi
    from mmgen.tokenizers.audio_train import spoken_captions

    x = spoken_captions(1, "heldout", 1, 16000, [175])[0]
    g = np.random.default_rng(0)
    noisy = x + 0.003 * g.standard_normal(len(x)).astype(np.float32)  # about 30 dB SNR
    # Each frame's magnitudes with random phases: intelligible-ish, but smeared and rough.
    scrambled = random_phase_copy(torch.from_numpy(x), 1280, 320).numpy()
    assert stoi(x, scrambled, 16000) < 0.9 < stoi(x, noisy, 16000) < stoi(x, x, 16000)
    assert pesq_wb(x, scrambled, 16000) < 1.5 < pesq_wb(x, noisy, 16000) < 4.4 < pesq_wb(x, x, 16000)
    assert np.isnan(pesq_wb(np.zeros(16000, np.float32), np.zeros(16000, np.float32), 16000))
