"""DAC with an iSTFT decoder: DAC's encoder and residual VQ, and a Vocos-style decoder that predicts a
complex spectrum per STFT frame and lets ``torch.istft`` make the waveform.

DAC's own decoder builds the waveform sample by sample through transposed convolutions, so the phase of
every harmonic must be drawn by the network itself; a tiny one trained on spectral losses on a CPU budget
learns the spectrum and not the waveform. Here the decoder works at the STFT frame rate: ConvNeXt blocks
(Vocos) turn the quantized latent into a log-magnitude and a phase for each bin (the phase through cos and
sin, so it never wraps), and the overlap-add of the inverse STFT ties neighbouring frames together. It is
also far cheaper than sample-rate convolutions, which leaves room for a wider decoder.

The model is a :class:`~transformers.DacModel` subclass with its own config class
(``model_type="mmgen_dac_istft"``, registered with ``AutoConfig`` and ``AutoModel``): a checkpoint is a
plain transformers directory (``config.json`` + ``model.safetensors``) that ``AutoModel.from_pretrained``
reads once :mod:`mmgen.tokenizers` is imported. ``encode``, the quantizer and the codes are DAC's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmgen.utils.compat import ensure_torchvision, register_auto_model

ensure_torchvision()  # transformers' modeling import touches torchvision: install the CPU shim first

from transformers import AutoModel, DacConfig, DacModel  # noqa: E402
from transformers.models.dac.modeling_dac import (  # noqa: E402
    DacEncoder,
    DacPreTrainedModel,
    DacResidualVectorQuantizer,
)


class DacIstftConfig(DacConfig):
    """DacConfig plus the iSTFT decoder's sizes; ``decoder_hidden_size`` is the ConvNeXt width."""

    model_type = "mmgen_dac_istft"

    istft_n_fft: int = 640
    istft_hop: int = 160  # must divide the code hop; the decoder upsamples code frames to STFT frames
    decoder_layers: int = 8


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm, pointwise MLP, layer scale, residual (ConvNeXt as Vocos uses it)."""

    def __init__(self, dim: int, layer_scale: float, kernel_size: int = 7, mult: int = 3):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mult * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mult * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, frames)
        h = self.norm(self.dwconv(x).transpose(1, 2))
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class IstftDecoder(nn.Module):
    """Quantized latent ``(B, hidden, T)`` -> waveform ``(B, 1, T * code_hop)``."""

    def __init__(self, config: DacIstftConfig):
        super().__init__()
        code_hop = int(config.hop_length)
        if code_hop % config.istft_hop or config.istft_n_fft < config.istft_hop:
            raise ValueError(
                f"istft_hop ({config.istft_hop}) must divide the code hop ({code_hop}) and be <= istft_n_fft"
            )
        self.n_fft, self.hop = int(config.istft_n_fft), int(config.istft_hop)
        self.upsample_factor = code_hop // self.hop
        width = config.decoder_hidden_size
        self.embed = nn.Conv1d(config.hidden_size, width, kernel_size=7, padding=3)
        u = self.upsample_factor
        # Kernel 2u, stride u, padding u/2 gives exactly T * u frames for an even u.
        self.upsample = nn.ConvTranspose1d(width, width, 2 * u, stride=u, padding=u // 2) if u > 1 else nn.Identity()
        if u > 1 and u % 2:
            raise ValueError(f"the code hop / istft_hop ratio must be 1 or even, got {u}")
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(width, 1.0 / config.decoder_layers) for _ in range(config.decoder_layers)
        )
        self.final_norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, self.n_fft + 2)  # log-magnitude and phase of n_fft // 2 + 1 bins

    def spectrum(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """The complex STFT ``(B, bins, T * upsample_factor)`` the decoder predicts."""
        x = self.upsample(self.embed(hidden_state))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        log_mag, phase = self.out(self.final_norm(x.transpose(1, 2))).transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(log_mag).clamp(max=100.0)  # the bound keeps an early large step from overflowing
        return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        spec = self.spectrum(hidden_state)
        frames = spec.shape[-1]
        # Centred frames: one more frame than hops makes the overlap-add exactly frames * hop long.
        spec = torch.cat([spec, spec[..., -1:]], dim=-1)
        # The window is made here, not held as a buffer: from_pretrained builds the module on the meta
        # device and a non-persistent buffer would come back uninitialised.
        window = torch.hann_window(self.n_fft, device=spec.device, dtype=spec.real.dtype)
        y = torch.istft(spec, self.n_fft, self.hop, window=window, center=True, length=frames * self.hop)
        return y[:, None]


class DacIstftModel(DacModel):
    """DacModel whose decoder is :class:`IstftDecoder`; encode/decode/forward are DacModel's."""

    config_class = DacIstftConfig
    config: DacIstftConfig

    def __init__(self, config: DacIstftConfig):
        DacPreTrainedModel.__init__(self, config)  # DacModel.__init__ would build a decoder only to drop it
        self.config = config
        self.encoder = DacEncoder(config)
        self.decoder = IstftDecoder(config)
        self.quantizer = DacResidualVectorQuantizer(config)
        self.bits_per_codebook = int(math.log2(config.codebook_size))
        if 2**self.bits_per_codebook != config.codebook_size:
            raise ValueError("The codebook_size must be a power of 2.")
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ConvNeXtBlock):
            nn.init.constant_(module.gamma, 1.0 / self.config.decoder_layers)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know ``model_type="mmgen_dac_istft"`` (idempotent)."""
    register_auto_model(DacIstftConfig, DacIstftModel, AutoModel)


register_auto_classes()

__all__ = ["ConvNeXtBlock", "DacIstftConfig", "DacIstftModel", "IstftDecoder", "register_auto_classes"]
