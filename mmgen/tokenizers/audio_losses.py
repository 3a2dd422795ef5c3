"""Spectral and phase losses for training the audio codec.

A log-mel loss sees only magnitudes, so a decoder trained on it alone may give each frame the right
spectrum with an arbitrary phase: frames that overlap then interfere, and the waveform the listener
hears is not the input's. These terms constrain what the mel loss leaves free:

- :func:`stft_magnitude_loss`: log-magnitude L1 plus spectral convergence at several STFT resolutions
  (Parallel WaveGAN's multi-resolution STFT loss). Magnitudes at several resolutions only agree with
  each other when neighbouring frames' phases are consistent.
- :func:`phase_derivative_loss`: the instantaneous frequency (phase advance from one frame to the next)
  and the group delay (phase step from one bin to the next) of the output against the input's, weighted
  by the input's magnitude (APNet's anti-wrapped phase losses, written on unit phasors so that the
  distance is smooth and needs no unwrapping). Both are blind to a constant phase offset, which a
  listener does not hear either.
- :func:`complex_stft_loss`: L1 on the real and imaginary parts of power-law compressed spectra; it asks
  for the input's absolute phase (and so its waveform), which SI-SNR measures.

Every function takes waveforms ``(..., n)`` and returns a scalar tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Resolution = Sequence[int]  # (n_fft, hop)


def stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Complex STFT ``(batch, bins, frames)`` of waveforms ``(..., n)``, Hann window, centred frames."""
    x = x.reshape(-1, x.shape[-1])
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    return torch.stft(x, n_fft, hop, window=window, return_complex=True)


def _align(est: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(est.shape[-1], ref.shape[-1])
    return est[..., :n], ref[..., :n]


def stft_magnitude_loss(
    est: torch.Tensor, ref: torch.Tensor, resolutions: Sequence[Resolution], eps: float = 1e-5
) -> torch.Tensor:
    """Mean over ``resolutions`` of log-magnitude L1 + spectral convergence."""
    est, ref = _align(est, ref)
    total = est.new_zeros(())
    for n_fft, hop in resolutions:
        m_est, m_ref = stft(est, n_fft, hop).abs(), stft(ref, n_fft, hop).abs()
        log_l1 = (torch.log(m_est.clamp_min(eps)) - torch.log(m_ref.clamp_min(eps))).abs().mean()
        convergence = torch.linalg.norm(m_ref - m_est) / torch.linalg.norm(m_ref).clamp_min(eps)
        total = total + log_l1 + convergence
    return total / max(1, len(resolutions))


def _unit(z: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    return z / (z.abs() + floor)


def phase_derivative_loss(
    est: torch.Tensor, ref: torch.Tensor, resolutions: Sequence[Resolution], rel_floor: float = 1e-3
) -> torch.Tensor:
    """Instantaneous-frequency + group-delay distance, mean over ``resolutions``.

    For each pair of neighbouring frames (bins), the phase difference is the angle of ``S_t conj(S_{t-1})``;
    the distance between the output's and the input's is ``|u_est - u_ref|`` of those products as unit
    phasors (``2 |sin(dphi / 2)|``: zero for equal phases, 2 for opposite ones, smooth across the wrap).
    Each bin counts by the input's magnitude there, so phase in silence and between harmonics, which
    nobody hears, does not count. ``rel_floor`` (relative to each signal's peak magnitude) keeps the unit
    phasors' gradient bounded where the output is nearly silent."""
    est, ref = _align(est, ref)
    total = est.new_zeros(())
    for n_fft, hop in resolutions:
        s_est, s_ref = stft(est, n_fft, hop), stft(ref, n_fft, hop)
        mag = s_ref.abs()
        # Each signal's floor follows its own peak, so a gain changes nothing.
        f_ref = (rel_floor * mag.amax(dim=(-2, -1), keepdim=True)).clamp_min(1e-8) ** 2
        f_est = (rel_floor * s_est.detach().abs().amax(dim=(-2, -1), keepdim=True)).clamp_min(1e-8) ** 2
        for dim in (-1, -2):  # -1: along time (instantaneous frequency); -2: along frequency (group delay)
            n = s_ref.shape[dim]
            a, b = (torch.arange(1, n), torch.arange(0, n - 1))
            p_est = s_est.index_select(dim, a) * s_est.index_select(dim, b).conj()
            p_ref = s_ref.index_select(dim, a) * s_ref.index_select(dim, b).conj()
            w = torch.sqrt(mag.index_select(dim, a) * mag.index_select(dim, b))
            dist = (_unit(p_est, f_est) - _unit(p_ref, f_ref)).abs()
            total = total + (w * dist).sum() / w.sum().clamp_min(1e-8)
    return total / max(1, len(resolutions))


def complex_stft_loss(
    est: torch.Tensor, ref: torch.Tensor, resolutions: Sequence[Resolution], power: float = 0.3
) -> torch.Tensor:
    """L1 on real and imaginary parts of ``|S|^power * exp(i angle S)``, mean over ``resolutions``."""
    est, ref = _align(est, ref)
    total = est.new_zeros(())
    for n_fft, hop in resolutions:
        s_est, s_ref = stft(est, n_fft, hop), stft(ref, n_fft, hop)

        def compress(s):
            m = s.abs().clamp_min(1e-8)
            return s * (m ** (power - 1))

        total = total + torch.view_as_real(compress(s_est) - compress(s_ref)).abs().mean()
    return total / max(1, len(resolutions))


__all__ = ["complex_stft_loss", "phase_derivative_loss", "stft", "stft_magnitude_loss"]
