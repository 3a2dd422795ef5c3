"""PixelVQ: a VQ-VAE image tokenizer (pixels -> a grid of discrete codes -> pixels).

The encoder and decoder are diffusers' VAE building blocks (:class:`diffusers.models.autoencoders.vae.Encoder`
/ ``Decoder``: ResNet blocks with GroupNorm, strided-conv downsampling, nearest upsampling), built
from config. Between them sits :class:`VectorQuantizer`, a nearest-neighbour codebook lookup in the
style of ViT-VQGAN / LlamaGen:

* a low-dimensional code space with l2-normalised (cosine) lookup, which keeps most codes in use;
* straight-through gradients with a codebook loss and a commitment loss (beta);
* usage tracking (an EMA of how often each code is picked) and dead-code restarts: codes that have
  gone unused are re-seeded from recent encoder outputs, so the codebook stays populated.

An optional pixel (un)shuffle "patchify" in front of the encoder trades the costliest full-resolution
convolutions for channels, which is what makes the tiny preset trainable on two CPU cores; for
flat-coloured ShapesWorld scenes nothing is lost.

Encoding is deterministic: eval mode, no sampling, argmax over cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.errors import MMGenError
from mmgen.tokenizers.base import ImageTokenizer
from mmgen.tokenizers.quantizers import quantize_in_float32
from mmgen.utils.compat import ensure_torchvision


def diffusers_vae_blocks():
    # diffusers pulls in transformers, whose import touches torchvision: install the CPU shim first.
    ensure_torchvision()
    from diffusers.models.autoencoders.vae import Decoder, Encoder

    return Encoder, Decoder


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with usage tracking and dead-code restarts."""

    def __init__(
        self, codebook_size: int, dim: int, beta: float = 0.25, l2_norm: bool = True, usage_decay: float = 0.9
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.usage_decay = usage_decay
        self.embedding = nn.Parameter(torch.randn(codebook_size, dim) * (1.0 if l2_norm else dim**-0.5))
        # EMA of the fraction of vectors assigned to each code; starts uniform so that no code is
        # "dead" before it had a chance to be picked.
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        # Set on the first training batch, when the codebook is re-seeded from encoder outputs: a
        # random codebook far from the data collapses onto a handful of codes.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._recent: torch.Tensor | None = None  # last training batch's encoder outputs

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding, dim=-1) if self.l2_norm else self.embedding

    def lookup(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest codebook entries for ``(N, dim)`` vectors."""
        e = self.codebook()
        if self.l2_norm:
            return (F.normalize(z_flat, dim=-1) @ e.t()).argmax(dim=-1)
        dist = z_flat.pow(2).sum(-1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(-1)[None]
        return dist.argmin(dim=-1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> quantized vectors ``(B, dim, h, w)``."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """``z`` (B, dim, h, w) -> (straight-through quantized z, codes (B, h, w), stats dict)."""
        return quantize_in_float32(self._quantize, z)

    def _quantize(self, z: torch.Tensor):
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.l2_norm:
            z_flat = F.normalize(z_flat, dim=-1)
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                pick = torch.randint(0, z_flat.shape[0], (self.codebook_size,))
                self.embedding.data.copy_(z_flat[pick] + 0.01 * torch.randn_like(self.embedding))
                self.initialized.fill_(True)
        codes = self.lookup(z_flat)
        q = self.codebook()[codes]
        codebook_loss = F.mse_loss(q, z_flat.detach())
        commitment_loss = F.mse_loss(z_flat, q.detach())
        zq = z_flat + (q - z_flat).detach()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        if self.training:
            with torch.no_grad():
                self.usage.mul_(self.usage_decay).add_(probs, alpha=1 - self.usage_decay)
                self._recent = z_flat.detach()
        stats = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "perplexity": perplexity.detach(),
            "counts": counts.detach(),
        }
        return zq.view(b, h, w, c).permute(0, 3, 1, 2).contiguous(), codes.view(b, h, w), stats

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float = 0.03, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-seed codes whose usage EMA fell below ``threshold / codebook_size`` with randomly chosen
        recent encoder outputs; returns the restarted code indices (empty if none or no batch yet)."""
        dead = torch.nonzero(self.usage < threshold / self.codebook_size).flatten()
        if dead.numel() == 0 or self._recent is None:
            return dead[:0]
        src = self._recent
        pick = torch.randint(0, src.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), self.dim, generator=generator) * 0.01
        self.embedding.data[dead] = src[pick] + noise
        self.usage[dead] = 1.0 / self.codebook_size
        return dead


class PixelVQ(ImageTokenizer):
    """VQ-VAE tokenizer: diffusers Encoder -> VectorQuantizer -> diffusers Decoder.

    ``downsample = patch_size * 2 ** (len(channels) - 1)``; the tiny preset (patch 2, three
    levels) maps 64x64 images to 8x8 codes."""

    mmgen_type = "pixel_vq"

    def __init__(
        self,
        resolution=(64, 64),
        channels=(32, 64, 128),
        layers_per_block: int = 1,
        patch_size: int = 2,
        code_dim: int = 8,
        codebook_size: int = 512,
        norm_groups: int = 8,
        attention: bool = False,
        l2_norm: bool = True,
        beta: float = 0.25,
        usage_decay: float = 0.9,
    ):
        super().__init__()
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.channels = tuple(int(c) for c in channels)
        if any(c % norm_groups for c in self.channels):
            raise MMGenError(
                f"every channel count in {list(self.channels)} must be divisible by norm_groups={norm_groups}"
            )
        self.layers_per_block = layers_per_block
        self.patch_size = patch_size
        self.code_dim = code_dim
        self.codebook_size = codebook_size
        self.norm_groups = norm_groups
        self.attention = attention
        self.l2_norm = l2_norm
        self.beta = beta
        self.usage_decay = usage_decay
        self.downsample = patch_size * 2 ** (len(self.channels) - 1)

        Encoder, Decoder = diffusers_vae_blocks()
        levels = len(self.channels)
        pix = 3 * patch_size * patch_size
        self.encoder = Encoder(
            in_channels=pix,
            out_channels=code_dim,
            down_block_types=("DownEncoderBlock2D",) * levels,
            block_out_channels=self.channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            double_z=False,
            mid_block_add_attention=attention,
        )
        self.quantizer = VectorQuantizer(codebook_size, code_dim, beta=beta, l2_norm=l2_norm, usage_decay=usage_decay)
        self.decoder = Decoder(
            in_channels=code_dim,
            out_channels=pix,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=self.channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            mid_block_add_attention=attention,
        )

    def get_config(self) -> dict:
        return {
            "resolution": list(self.resolution),
            "channels": list(self.channels),
            "layers_per_block": self.layers_per_block,
            "patch_size": self.patch_size,
            "code_dim": self.code_dim,
            "codebook_size": self.codebook_size,
            "norm_groups": self.norm_groups,
            "attention": self.attention,
            "l2_norm": self.l2_norm,
            "beta": self.beta,
            "usage_decay": self.usage_decay,
        }

    # -- the three stages --------------------------------------------------------------------------
    def _check_pixels(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise MMGenError(f"expected images as a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise MMGenError(
                f"image size {w}x{h} is not a multiple of the downsampling factor {self.downsample}; "
                f"resize it (encode() does this for PIL images)"
            )

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> continuous pre-quantization features ``(B, code_dim, h, w)``."""
        self._check_pixels(x)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        return self.encoder(x)

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        y = self.decoder(zq)
        if self.patch_size > 1:
            y = F.pixel_shuffle(y, self.patch_size)
        return y

    def forward(self, x: torch.Tensor):
        """Training pass: pixels -> (reconstruction, codes, quantizer stats)."""
        zq, codes, stats = self.quantizer(self.encode_latents(x))
        return self.decode_latents(zq), codes, stats

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode_latents(x.to(self.device, torch.float32))
        b, c, h, w = z.shape
        return self.quantizer.lookup(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h, w)

    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(self.device, torch.long)
        if codes.ndim != 3:
            raise MMGenError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise MMGenError(
                f"code out of range 0..{self.codebook_size - 1} (got "
                f"{int(codes.min())}..{int(codes.max())}); "
                f"were these codes made by another tokenizer?"
            )
        return self.decode_latents(self.quantizer.embed(codes))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of tensors in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


__all__ = ["PixelVQ", "VectorQuantizer", "psnr"]
