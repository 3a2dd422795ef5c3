"""Quantizers for the image tokenizers, from ``vector-quantize-pytorch``, behind one interface.

    q = build_quantizer(QuantizerConfig(kind="simvq", codebook_size=256), dim=32)
    zq, codes, loss = q(z)          # z (B, D, h, w) -> straight-through zq, codes (B, h, w) int64, aux loss
    z2 = q.embed(codes)             # codes -> quantized vectors, what the decoder sees

Kinds (all from the library, chosen by config):

* ``vq_ema``  -- ``VectorQuantize``: k-means initialised codebook updated by EMA (VQ-VAE-2), optional
  cosine lookup and a low-dimensional factorised code space, dead codes restarted by the library's
  ``threshold_ema_dead_code``;
* ``simvq``   -- ``SimVQ``: a frozen random codebook seen through a learned linear map (the whole
  codebook moves together, so it does not collapse); the library has no dead-code restart, so mmgen
  restarts a dead code by solving for the frozen vector that the linear map sends to a recent
  encoder output (pseudo-inverse), drawn uniformly, by residual (``error``) or by a per-vector
  training loss the trainer notes (``loss``: DualViTok's region-text cells);
* ``fsq``     -- ``FSQ``: finite scalar quantization, an implicit product codebook (no codebook to die);
* ``rvq``     -- ``ResidualVQ``: several EMA codebooks on successive residuals; the per-level codes are
  combined into one index (mixed radix), so the LM still sees one token per position.

Every kind tracks codebook usage: ``usage`` is an EMA of each code's share of recent assignments
(updated in training), and :func:`usage_fraction` scores a held-out set. Encoding is deterministic in
eval mode (nearest code, no sampling, no EMA updates).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mmgen.errors import MMGenError

KINDS = ("vq_ema", "simvq", "fsq", "rvq")


@dataclass
class QuantizerConfig:
    kind: str = "simvq"  # vq_ema | simvq | fsq | rvq
    codebook_size: int = 256  # vq_ema / simvq; per level for rvq; fsq: prod(fsq_levels)
    codebook_dim: int = 0  # vq_ema/rvq: low-dim factorised lookup (0: the input dim)
    cosine: bool = True  # vq_ema/rvq: l2-normalised (cosine) lookup
    decay: float = 0.9  # EMA decay of codebook updates (vq_ema/rvq) and of usage tracking
    dead_code_threshold: float = 1.0  # a code whose EMA cluster size falls below this is restarted
    commitment_weight: float = 0.25
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    rvq_levels: int = 2
    # simvq dead-code restarts: uniform (any recent vector) | error (where the codebook fits worst) |
    # loss (where a trainer-supplied per-vector loss is highest, see Quantizer.note_vector_losses)
    restart_sampling: str = "uniform"
    # simvq: a code is dead when no vector was assigned to it in this many training forwards (0: when its
    # usage EMA falls below dead_code_threshold / codebook_size). The EMA also kills live codes of rare
    # contents: a phrase met 0.6 times per batch is absent for 10 batches running every few hundred steps.
    dead_code_window: int = 0
    # simvq restarts solve frozen @ W.T = target with pinv(W), cutting singular values under restart_rtol
    # x the largest (0: torch's float-precision cutoff, the exact solve, which gives huge frozen rows when W
    # is near-singular; a cut lands the code on the target's part that W reaches well).
    restart_rtol: float = 0.0


def quantize_in_float32(quantize, z: torch.Tensor):
    """``quantize(z)``, in float32 while autocast is on: the nearest-code search and the codebook's losses
    with bf16 distances tie near codes, and which one wins would then be rounding noise."""
    if z.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(z.device.type):
        with torch.autocast(z.device.type, enabled=False):
            return quantize(z.float())
    return quantize(z)


class Quantizer(nn.Module):
    """Wraps one library quantizer; inputs are channel-first feature maps ``(B, D, h, w)``."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__()
        if cfg.kind not in KINDS:
            raise MMGenError(f"unknown quantizer kind '{cfg.kind}' (use one of {', '.join(KINDS)})")
        if cfg.dead_code_window < 0 or (cfg.dead_code_window > 0 and cfg.kind != "simvq"):
            raise MMGenError(
                f"dead_code_window is a number of steps >= 0 for simvq codebooks, got "
                f"{cfg.dead_code_window} for {cfg.kind}"
            )
        if not 0 <= cfg.restart_rtol < 1 or (cfg.restart_rtol > 0 and cfg.kind != "simvq"):
            raise MMGenError(
                f"restart_rtol is a share of the largest singular value in [0, 1) for simvq codebooks, "
                f"got {cfg.restart_rtol} for {cfg.kind}"
            )
        self.kind = cfg.kind
        self.dim = dim
        self.cfg = cfg
        self.q, self.codebook_size, self.level_size = _library_quantizer(cfg, dim)
        n_usage = self.codebook_size if cfg.kind != "rvq" else cfg.rvq_levels * self.level_size
        self.register_buffer("usage", torch.full((n_usage,), 1.0 / self.level_size))
        if cfg.dead_code_window > 0:  # forwards since each code last won a vector (saved: resume stays exact)
            self.register_buffer("idle", torch.zeros(self.codebook_size, dtype=torch.long))
        self._recent: torch.Tensor | None = None
        self._recent_loss: torch.Tensor | None = None

    # -- forward / lookup ---------------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        return quantize_in_float32(self._quantize, z)

    def _quantize(self, z: torch.Tensor):
        b, d, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.kind == "fsq":
            zq, idx = self.q(x)
            loss = zq.new_zeros(())
        else:
            zq, idx, loss = self.q(x)
            loss = loss.sum()
        levels = idx if self.kind == "rvq" else idx[..., None]  # (B, N, L)
        if self.training:
            self._track(levels.reshape(-1, levels.shape[-1]))
            self._recent = x.detach().reshape(-1, d)
            self._recent_loss = None
        codes = self._combine(levels).view(b, h, w)
        return zq.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(), codes, loss

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> quantized vectors ``(B, D, h, w)``."""
        b, h, w = codes.shape
        flat = codes.reshape(b, h * w)
        if self.kind == "fsq":
            out = self.q.indices_to_codes(flat)
        elif self.kind == "simvq":
            out = self.q.indices_to_codes(flat)
        elif self.kind == "rvq":
            out = self.q.get_output_from_indices(self._split(flat))
        else:
            out = self.q.get_output_from_indices(flat)
        return out.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

    # -- residual levels as one index -----------------------------------------------------------------
    def _combine(self, levels: torch.Tensor) -> torch.Tensor:
        radix = self.level_size ** torch.arange(levels.shape[-1], device=levels.device)
        return (levels.long() * radix).sum(-1)

    def _split(self, codes: torch.Tensor) -> torch.Tensor:
        n = self.cfg.rvq_levels
        return torch.stack([(codes // self.level_size**i) % self.level_size for i in range(n)], dim=-1)

    # -- usage and restarts ---------------------------------------------------------------------------
    @torch.no_grad()
    def _track(self, levels: torch.Tensor) -> None:
        shares = []
        for li in range(levels.shape[-1]):
            counts = torch.bincount(levels[:, li].long(), minlength=self.level_size).float()
            shares.append(counts / counts.sum())
        self.usage.mul_(self.cfg.decay).add_(torch.cat(shares), alpha=1 - self.cfg.decay)
        if self.cfg.dead_code_window > 0:
            self.idle.add_(1).masked_fill_(shares[0] > 0, 0)

    def level_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` per-level indices of combined codes (L = 1 except for rvq)."""
        return self._split(codes) if self.kind == "rvq" else codes[..., None]

    @torch.no_grad()
    def restart_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """mmgen's restart for SimVQ (the library restarts vq_ema/rvq itself; fsq cannot die): codes
        whose usage EMA fell below ``dead_code_threshold`` / codebook_size (or, with
        ``dead_code_window``, that won no vector in that many forwards) are moved onto recent encoder
        outputs chosen by ``restart_sampling``. Returns how many were restarted."""
        if self.kind != "simvq" or self._recent is None:
            return 0
        if self.cfg.dead_code_window > 0:
            dead = torch.nonzero(self.idle >= self.cfg.dead_code_window).flatten()
        else:
            dead = torch.nonzero(self.usage < self.cfg.dead_code_threshold / self.codebook_size).flatten()
        if dead.numel() == 0:
            return 0
        target = self._recent[self._restart_targets(dead.numel(), generator)]
        # codebook = frozen @ W.T: the frozen rows that W maps onto the targets. pinv (SVD) rather than
        # lstsq: LAPACK's lstsq is not bitwise repeatable here, and resume must be exact.
        # rtol None: torch's default cutoff (an explicit 0 would invert every singular value).
        sol = (torch.linalg.pinv(self.q.code_transform.weight, rtol=self.cfg.restart_rtol or None) @ target.T).T
        self.q.frozen_codebook[dead] = sol
        self.usage[dead] = 1.0 / self.codebook_size
        if self.cfg.dead_code_window > 0:
            self.idle[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def keep_codes(self, keep: torch.Tensor) -> None:
        """Shrink a SimVQ codebook to the entries ``keep`` (ascending indices; entry ``keep[i]`` becomes
        code ``i``). For entries that dead-code restarts keep cycling without ever winning a vector:
        dropped, they stop counting as unused."""
        if self.kind != "simvq":
            raise MMGenError(f"pruning codes is for simvq codebooks, not {self.kind}")
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        if keep.numel() < 2:
            raise MMGenError(f"pruning would leave {keep.numel()} code(s); a codebook needs at least 2")
        state = self.q.state_dict()
        state["frozen_codebook"] = state["frozen_codebook"][keep]
        self.cfg = dataclasses.replace(self.cfg, codebook_size=int(keep.numel()))
        self.q, self.codebook_size, self.level_size = _library_quantizer(self.cfg, self.dim)
        self.q.load_state_dict(state)
        self.usage = self.usage[keep].clone()
        if self.cfg.dead_code_window > 0:
            self.idle = self.idle[keep].clone()
        self._recent, self._recent_loss = None, None

    @torch.no_grad()
    def note_vector_losses(self, losses: torch.Tensor) -> None:
        """A training loss per vector of the last forward (row-major ``(B, h, w)`` order), for
        ``restart_sampling=loss``: a dead code then restarts where the codes serve the trainer's task
        worst. What the residual cannot see: two phrases sharing one code fit that code closely
        (the commitment loss pulls both onto it) while one of them is always named wrong."""
        if self._recent is None or losses.numel() != self._recent.shape[0]:
            recent = 0 if self._recent is None else self._recent.shape[0]
            raise MMGenError(
                f"{losses.numel()} vector losses for {recent} "
                f"recent vectors: note them right after the forward, one per code position"
            )
        self._recent_loss = losses.detach().reshape(-1).clamp_min(0).float()

    def _restart_targets(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Indices of recent encoder outputs to restart ``n`` dead codes on. ``restart_sampling=error``
        draws them in proportion to how badly the codebook fits them now: on flat-coloured scenes half
        the vectors are background, and a code restarted on one of those only splits a region that was
        already well coded (and leaves the shape edges coarse). ``loss`` draws them in proportion to the
        losses noted by :meth:`note_vector_losses` (``error`` when none were noted for this forward).
        ``uniform`` draws any recent vector."""
        x = self._recent
        w = self._recent_loss if self.cfg.restart_sampling == "loss" else None
        if w is not None and float(w.sum()) > 0:
            return torch.multinomial(w, n, replacement=int((w > 0).sum()) < n, generator=generator)
        if self.cfg.restart_sampling in ("error", "loss"):
            err = torch.cdist(x, self.q.codebook).min(1).values.pow(2)  # squared distance to the nearest code
            if float(err.sum()) > 0:
                return torch.multinomial(err, n, replacement=int((err > 0).sum()) < n, generator=generator)
        return torch.randint(0, x.shape[0], (n,), generator=generator)


def _library_quantizer(cfg: QuantizerConfig, dim: int):
    from vector_quantize_pytorch import FSQ, ResidualVQ, SimVQ, VectorQuantize

    if cfg.kind == "fsq":
        if not cfg.fsq_levels or any(lv < 2 for lv in cfg.fsq_levels):
            raise MMGenError(f"fsq_levels must be a list of integers >= 2, got {cfg.fsq_levels}")
        n = math.prod(cfg.fsq_levels)
        return FSQ(levels=list(cfg.fsq_levels), dim=dim), n, n
    if cfg.codebook_size < 2:
        raise MMGenError(f"codebook_size must be at least 2, got {cfg.codebook_size}")
    if cfg.restart_sampling not in ("error", "loss", "uniform"):
        raise MMGenError(f"restart_sampling must be error, loss or uniform, got '{cfg.restart_sampling}'")
    if cfg.kind == "simvq":
        # rotation trick off: plain straight-through keeps encode/decode exactly the codebook lookup
        return (
            SimVQ(
                dim=dim,
                codebook_size=cfg.codebook_size,
                rotation_trick=False,
                commitment_weight=1.0,
                input_to_quantize_commit_loss_weight=cfg.commitment_weight,
            ),
            cfg.codebook_size,
            cfg.codebook_size,
        )
    common = dict(
        dim=dim,
        codebook_size=cfg.codebook_size,
        codebook_dim=cfg.codebook_dim or None,
        decay=cfg.decay,
        kmeans_init=True,
        kmeans_iters=10,
        use_cosine_sim=cfg.cosine,
        threshold_ema_dead_code=cfg.dead_code_threshold,
        commitment_weight=cfg.commitment_weight,
    )
    if cfg.kind == "vq_ema":
        return VectorQuantize(**common), cfg.codebook_size, cfg.codebook_size
    if cfg.rvq_levels < 1:
        raise MMGenError(f"rvq_levels must be >= 1, got {cfg.rvq_levels}")
    return ResidualVQ(num_quantizers=cfg.rvq_levels, **common), cfg.codebook_size**cfg.rvq_levels, cfg.codebook_size


def usage_fraction(quantizer: Quantizer, codes: torch.Tensor) -> list[float]:
    """Fraction of codebook entries used by ``codes`` (one value per residual level)."""
    levels = quantizer.level_codes(codes.reshape(-1))
    return [
        float((torch.bincount(levels[:, i], minlength=quantizer.level_size) > 0).float().mean())
        for i in range(levels.shape[-1])
    ]


def perplexity(codes: torch.Tensor, n: int) -> float:
    p = torch.bincount(codes.reshape(-1), minlength=n).float()
    p = p / p.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))


__all__ = ["KINDS", "QuantizerConfig", "Quantizer", "usage_fraction", "perplexity"]
