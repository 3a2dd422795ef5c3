"""The pixel reconstruction losses both image-tokenizer trainers (pixel VQ, DualViTok) share."""

from __future__ import annotations

import torch

from mmgen.tokenizers.train_config import TokenizerTrainConfig


def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: a cheap stand-in for a perceptual
    loss that penalises blurred or shifted shape outlines."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(recon) - dx(x)).abs().mean() + (dy(recon) - dy(x)).abs().mean()


def foreground_mask(x: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel of ``x`` (in [-1, 1]) differs by more than ``tol`` in some
    channel from the median colour of its image's border, else 0.0."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    return ((x - bg).abs().amax(dim=1, keepdim=True) > tol).to(x.dtype)


def pixel_losses(recon: torch.Tensor, x: torch.Tensor, cfg: TokenizerTrainConfig) -> dict:
    """The reconstruction terms both image trainers share: (foreground-weighted) L1 and L2, the edge
    loss, and ``rec``, their weighted sum."""
    d = recon - x
    w = 1 + cfg.foreground_weight * foreground_mask(x) if cfg.foreground_weight > 0 else None
    l1 = (d.abs() * w).mean() if w is not None else d.abs().mean()
    l2 = (d.pow(2) * w).mean() if w is not None else d.pow(2).mean()
    edge = edge_loss(recon, x) if cfg.edge_weight > 0 else recon.new_zeros(())
    return {
        "l1": l1,
        "l2": l2,
        "edge": edge,
        "mse": d.detach().pow(2).mean(),  # unweighted, for PSNR
        "rec": cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.edge_weight * edge,
    }
