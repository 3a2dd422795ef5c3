"""AudioCodec: speech and sound -> residual-VQ codes ``(n_q, T)`` -> waveform.

The network is transformers' :class:`~transformers.DacModel` (the Descript Audio Codec: a strided
convolutional encoder with Snake activations, a residual stack of factorised, l2-normalised vector
quantizers, and a mirrored decoder), built from a :class:`~transformers.DacConfig`. With
``decoder="istft"`` the decoder is instead a Vocos-style one that predicts the complex STFT and inverts
it (:class:`~mmgen.tokenizers.audio_istft.DacIstftModel`, a DacModel subclass with its own registered
``model_type``); encoder, quantizer and codes are DAC's either way. The tiny preset is trained by mmgen
(:mod:`mmgen.tokenizers.audio_train`); real-scale presets load a pretrained DAC by hub id or local path
through the same :meth:`AudioCodec.from_pretrained`.

Inputs may be a file path, encoded bytes, or float samples (``(n,)`` mono or ``(channels, n)``) with
their sample rate: everything is mixed down to mono and resampled (polyphase, scipy) to the codec's
rate. A checkpoint directory is a plain transformers one (``config.json`` + ``model.safetensors``), so
``DacModel.from_pretrained`` (``AutoModel.from_pretrained`` for the iSTFT decoder, once
:mod:`mmgen.tokenizers.audio_istft` is imported) reads it too.

Encoding is deterministic: eval mode, nearest-codebook argmax, no quantizer dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmgen.data.media import decode_audio, resample_audio
from mmgen.errors import MediaError, MMGenError
from mmgen.utils.compat import ensure_torchvision


def _transformers():
    # transformers' modeling import touches torchvision: install the CPU shim first.

    ensure_torchvision()
    import transformers

    return transformers


@dataclass
class AudioCodecConfig:
    """The DacConfig fields mmgen exposes; names follow transformers' DacConfig."""

    sampling_rate: int = 16000
    encoder_hidden_size: int = 16
    downsampling_ratios: list[int] = field(default_factory=lambda: [2, 4, 5, 8])  # hop = product
    decoder_hidden_size: int = 128
    hidden_size: int = 64
    n_codebooks: int = 4
    codebook_size: int = 256
    codebook_dim: int = 8
    quantizer_dropout: float = 0.5  # train some batches with fewer levels, so coarse codes stand alone
    commitment_loss_weight: float = 0.25
    codebook_loss_weight: float = 1.0
    # "torch": PyTorch's fan-in init for every conv. transformers' DAC init (std 0.02 everywhere) shrinks
    # the signal ~1e5-fold through a small encoder, and the codebooks seeded from such latents collapse.
    init: str = "torch"
    # "dac": DAC's sample-rate convolutional decoder. "istft": a Vocos-style decoder that predicts the
    # complex STFT and inverts it (mmgen.tokenizers.audio_istft); decoder_hidden_size is then its width.
    decoder: str = "dac"
    istft_n_fft: int = 640
    istft_hop: int = 160
    decoder_layers: int = 8

    def dac_config(self):
        d = asdict(self)
        for k in ("init", "decoder", "istft_n_fft", "istft_hop", "decoder_layers"):
            d.pop(k)
        d["upsampling_ratios"] = list(reversed(self.downsampling_ratios))
        if self.decoder == "istft":
            from mmgen.tokenizers.audio_istft import DacIstftConfig

            return DacIstftConfig(
                **d, istft_n_fft=self.istft_n_fft, istft_hop=self.istft_hop, decoder_layers=self.decoder_layers
            )
        return _transformers().DacConfig(**d)


class AudioCodec(torch.nn.Module):
    """A DAC codec behind mmgen's tokenizer API (encode/decode/save_pretrained/from_pretrained)."""

    mmgen_type = "dac_audio"

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: AudioCodecConfig | dict) -> AudioCodec:
        if isinstance(cfg, dict):
            cfg = AudioCodecConfig(**cfg)
        _check_config(cfg)
        dac_config = cfg.dac_config()
        if cfg.decoder == "istft":
            from mmgen.tokenizers.audio_istft import DacIstftModel

            model = DacIstftModel(dac_config)
        else:
            model = _transformers().DacModel(dac_config)
        if cfg.init == "torch":
            for m in model.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
                    m.reset_parameters()
        elif cfg.init != "transformers":
            raise MMGenError(f"init must be 'torch' or 'transformers', got '{cfg.init}'")
        return cls(model)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str = "cpu") -> AudioCodec:
        """A local directory (``save_pretrained`` output, or any transformers DAC checkpoint) or a
        Hugging Face hub id such as ``descript/dac_16khz``."""
        p = Path(path_or_id)
        if p.exists() and not (p / "config.json").is_file():
            raise MMGenError(f"{p} is not an audio codec directory (needs config.json and model.safetensors)")
        import mmgen.tokenizers.audio_istft  # noqa: F401  (registers the iSTFT decoder's model_type)

        transformers = _transformers()
        try:
            model = transformers.AutoModel.from_pretrained(str(path_or_id), use_safetensors=True)
        except OSError as e:
            raise MMGenError(
                f"cannot load audio codec '{path_or_id}': {str(e).splitlines()[0]} "
                f"(give a local directory, or a hub id with network access)"
            ) from None
        if not isinstance(model, transformers.DacModel):
            raise MMGenError(f"{path_or_id} holds a {type(model).__name__}, not a DAC audio codec")
        return cls(model).to(device)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)

    # -- facts --------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.model.config.downsampling_ratios))

    @property
    def n_q(self) -> int:
        return int(self.model.config.n_codebooks)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def frame_rate(self) -> float:
        """Code frames per second (each frame has ``n_q`` codes)."""
        return self.sample_rate / self.hop_length

    @property
    def tokens_per_second(self) -> float:
        return self.frame_rate * self.n_q

    def code_length(self, n_samples: int) -> int:
        return max(1, math.ceil(n_samples / self.hop_length))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- input handling -----------------------------------------------------------------------
    def load_waveform(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Any accepted audio input -> mono float32 samples at the codec's rate."""
        if isinstance(audio, (str, Path)):
            p = Path(audio)
            if not p.is_file():
                raise MediaError(f"audio file not found: {p}")
            x, _ = decode_audio(p.read_bytes(), sample_rate=self.sample_rate, mono=True, name=str(p))
            return x
        if isinstance(audio, (bytes, bytearray)):
            x, _ = decode_audio(bytes(audio), sample_rate=self.sample_rate, mono=True)
            return x
        x = audio.detach().cpu().float().numpy() if torch.is_tensor(audio) else np.asarray(audio, dtype=np.float32)
        if x.ndim == 2:  # (channels, n): mix down
            x = x.mean(axis=0)
        if x.ndim != 1:
            raise MMGenError(f"expected samples shaped (n,) or (channels, n), got {x.shape}")
        if sample_rate is None:
            raise MMGenError("raw samples need their sample_rate (e.g. encode(x, sample_rate=44100))")
        return resample_audio(x.astype(np.float32), int(sample_rate), self.sample_rate)

    # -- the API --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_batch(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Mono waveforms at the codec's rate -> codes ``(n_q, T_i)`` each, batched with padding.

        Padding is zeros to a common multiple of the hop; each item keeps ceil(n_i / hop) frames, so
        its codes depend on the rest of the batch only near its end (receptive field) and through
        float rounding of batched convolutions, which can flip a near-tied code."""
        if not len(waveforms):
            return []
        lengths = [len(w) for w in waveforms]
        n = self.code_length(max(lengths)) * self.hop_length
        x = torch.zeros(len(waveforms), 1, n)
        for i, w in enumerate(waveforms):
            x[i, 0, : len(w)] = torch.as_tensor(np.asarray(w, np.float32))
        self.model.eval()
        codes = self.model.encode(x.to(self.device), return_dict=True).audio_codes
        return [codes[i, :, : self.code_length(m)].cpu() for i, m in enumerate(lengths)]

    def encode(self, audio, sample_rate: int | None = None):
        """A file path / bytes / samples -> codes ``(n_q, T)`` int64; a list of inputs -> a list."""
        if isinstance(audio, list):
            return self.encode_batch([self.load_waveform(a, sample_rate) for a in audio])
        return self.encode_batch([self.load_waveform(audio, sample_rate)])[0]

    @torch.no_grad()
    def decode(self, codes) -> np.ndarray:
        """Codes ``(n_q, T)`` -> mono float32 waveform at :attr:`sample_rate`; ``(B, n_q, T)`` ->
        ``(B, T * hop)``."""
        codes = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes, dtype=torch.long)
        single = codes.ndim == 2
        if single:
            codes = codes[None]
        if codes.ndim != 3 or codes.shape[1] != self.n_q:
            got = tuple(codes.shape[-2:]) if codes.ndim >= 2 else tuple(codes.shape)
            raise MMGenError(f"expected audio codes shaped ({self.n_q}, T), got {got}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise MMGenError(
                f"audio code out of range 0..{self.codebook_size - 1}; were these codes made by another codec?"
            )
        self.model.eval()
        y = self.model.decode(audio_codes=codes.to(self.device), return_dict=True).audio_values.cpu().numpy()
        return y[0] if single else y

    @torch.no_grad()
    def decode_levels(self, codes) -> np.ndarray:
        """Decode only the first ``codes.shape[0]`` residual levels (coarse codes alone); ``(q, T)``."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or not 1 <= codes.shape[0] <= self.n_q:
            raise MMGenError(f"expected (q, T) codes with 1 <= q <= {self.n_q}, got {tuple(codes.shape)}")
        self.model.eval()
        z = self.model.quantizer.from_codes(codes[None].to(self.device))[0]
        return self.model.decoder(z).squeeze(1)[0].cpu().numpy()

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """``(n_q * codebook_size, hidden_size)``: row ``level * codebook_size + code`` is what that code
        adds to the quantized latent (its level's codebook vector through the level's out-projection),
        so a frame's latent is the sum of its levels' rows. The order is Vocab's audio sub-ranges."""
        rows = [q.out_proj(q.codebook.weight.t()[None])[0].t() for q in self.model.quantizer.quantizers[: self.n_q]]
        return torch.cat(rows).float().cpu()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_config(cfg: AudioCodecConfig) -> None:
    if cfg.codebook_size & (cfg.codebook_size - 1):
        raise MMGenError(f"codebook_size must be a power of 2 (DAC stores log2 bits per code), got {cfg.codebook_size}")
    if any(r <= 0 for r in cfg.downsampling_ratios) or not cfg.downsampling_ratios:
        raise MMGenError(f"downsampling_ratios must be positive integers, got {cfg.downsampling_ratios}")
    if cfg.decoder not in ("dac", "istft"):
        raise MMGenError(f"decoder must be 'dac' or 'istft', got '{cfg.decoder}'")
    if cfg.decoder == "istft":
        hop = int(np.prod(cfg.downsampling_ratios))
        ratio = hop // cfg.istft_hop if cfg.istft_hop > 0 else 0
        if cfg.istft_hop <= 0 or hop % cfg.istft_hop or (ratio > 1 and ratio % 2) or cfg.istft_n_fft < cfg.istft_hop:
            raise MMGenError(
                f"istft_hop ({cfg.istft_hop}) must divide the code hop ({hop}) by 1 or an even number, "
                f"and istft_n_fft ({cfg.istft_n_fft}) must be at least istft_hop"
            )
    if cfg.n_codebooks <= 0:
        raise MMGenError(f"n_codebooks must be positive, got {cfg.n_codebooks}")


def build_on_meta(cfg: AudioCodecConfig | dict) -> AudioCodec:
    """The codec's modules with parameters on the meta device: shapes and counts without memory,
    how tests check a real-scale preset that cannot be downloaded here."""
    with torch.device("meta"):
        return AudioCodec.from_config(cfg)


# -- metrics ---------------------------------------------------------------------------------------


def log_mel(x: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64) -> torch.Tensor:
    """Log-mel spectrogram ``(..., n_mels, frames)`` of waveforms ``(..., n)`` (Slaney mel filters
    from transformers' audio utilities; torchaudio is not needed)."""
    from transformers.audio_utils import mel_filter_bank

    fb = (
        torch.from_numpy(
            mel_filter_bank(
                num_frequency_bins=n_fft // 2 + 1,
                num_mel_filters=n_mels,
                min_frequency=0.0,
                max_frequency=sample_rate / 2,
                sampling_rate=sample_rate,
                norm="slaney",
                mel_scale="slaney",
            )
        )
        .float()
        .to(x.device)
    )
    lead = x.shape[:-1]
    spec = torch.stft(
        x.reshape(-1, x.shape[-1]), n_fft, hop, window=torch.hann_window(n_fft, device=x.device), return_complex=True
    ).abs()
    mel = torch.einsum("bft,fm->bmt", spec, fb)
    return torch.log(mel.clamp_min(1e-5)).reshape(*lead, n_mels, -1)


def mel_l1(ref: torch.Tensor, est: torch.Tensor, sample_rate: int) -> float:
    n = min(ref.shape[-1], est.shape[-1])
    return float((log_mel(ref[..., :n], sample_rate) - log_mel(est[..., :n], sample_rate)).abs().mean())


def si_snr(ref: torch.Tensor, est: torch.Tensor, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-noise ratio in dB (higher is better)."""
    n = min(ref.shape[-1], est.shape[-1])
    ref, est = ref[..., :n] - ref[..., :n].mean(), est[..., :n] - est[..., :n].mean()
    target = (est * ref).sum() / (ref.pow(2).sum() + eps) * ref
    noise = est - target
    return float(10 * torch.log10(target.pow(2).sum() / (noise.pow(2).sum() + eps) + eps))


def stoi(ref, est, sample_rate: int) -> float:
    """Short-Time Objective Intelligibility (Taal et al. 2011, ``pystoi``) of ``est`` against the clean
    ``ref`` (1-D samples): a mean correlation, 1 for a perfect copy, near 0 (or below) for unrelated
    audio. It compares 1/3-octave band envelopes over 384 ms, so it hears a frame's phase only through how
    neighbouring frames add up."""
    from pystoi import stoi as _stoi

    ref, est = _as_numpy(ref), _as_numpy(est)
    n = min(len(ref), len(est))
    return float(_stoi(ref[:n], est[:n], sample_rate, extended=False))


def pesq_wb(ref, est, sample_rate: int) -> float:
    """Wideband PESQ (ITU-T P.862.2, the ``pesq`` package) of ``est`` against ``ref`` at 16 kHz (both
    resampled there when the codec runs at another rate); about 1.0 (bad) to 4.6 (transparent). NaN when
    PESQ finds no speech in the reference."""
    from pesq import NoUtterancesError, pesq

    ref, est = _as_numpy(ref), _as_numpy(est)
    if sample_rate != 16000:
        ref, est = (resample_audio(a.astype(np.float32), sample_rate, 16000) for a in (ref, est))
    n = min(len(ref), len(est))
    try:
        return float(pesq(16000, ref[:n].astype(np.float64), est[:n].astype(np.float64), "wb"))
    except NoUtterancesError:
        return float("nan")


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def codebook_usage(codes: Sequence[torch.Tensor], codebook_size: int) -> list[float]:
    """Per residual level, the share of its entries that encode at least one frame of ``codes``
    (each ``(n_q, T)``, as :meth:`AudioCodec.encode` gives them)."""
    used = torch.zeros(codes[0].shape[0], codebook_size, dtype=torch.bool)
    for c in codes:
        used.scatter_(1, c.cpu(), True)
    return [float(u) for u in used.float().mean(1)]


__all__ = [
    "AudioCodec",
    "AudioCodecConfig",
    "build_on_meta",
    "codebook_usage",
    "log_mel",
    "mel_l1",
    "pesq_wb",
    "si_snr",
    "stoi",
]
