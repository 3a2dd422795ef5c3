"""Training the tiny :class:`~mmgen.tokenizers.audio.AudioCodec` (plain PyTorch, CPU is fine).

    cfg = load_config(AudioTrainConfig, "tokenizers/tiny_audio.yaml", ["steps=100"])
    codec_dir = train_audio_tokenizer(cfg)

Data: ShapesWorld captions spoken by espeak-ng (train split scenes; a separate set of held-out split
scenes is spoken for evaluation) plus real recordings (``real_audio``: audio files, or videos whose
audio track is used). Each real clip is cut in time: the first ``1 - real_eval_fraction`` trains, the
tail is held out, so the real-clip numbers are on audio the codec never saw.

Loss: waveform L1 + multi-resolution log-mel L1 (the spectral term DAC and EnCodec train with; no
discriminator at this size) + DAC's codebook and commitment losses, and optionally the terms of
:mod:`mmgen.tokenizers.audio_losses` (multi-resolution STFT magnitude, phase derivatives, complex STFT),
which the tiny recipe uses to get a waveform whose phase is consistent enough to be intelligible (STOI).
Quantizer dropout trains some items with fewer residual levels.

Resumable and exact like the image tokenizer trainer: step N's crops come from a generator seeded by
(seed, N), and the torch RNG (quantizer dropout) is saved in each checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmgen.data.media import decode_audio
from mmgen.errors import MediaError, MMGenError
from mmgen.tokenizers.audio import AudioCodec, AudioCodecConfig, codebook_usage, log_mel, mel_l1, si_snr, stoi
from mmgen.tokenizers.audio_losses import complex_stft_loss, phase_derivative_loss, stft_magnitude_loss
from mmgen.utils.checkpoints import prepare_run_dir, resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.schedules import lr_scheduler
from mmgen.world import random_scene
from mmgen.world.media import speak
from mmgen.world.text import caption

REAL_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real"


@dataclass
class AudioTrainConfig:
    # data
    synthetic_captions: int = 80  # train-split ShapesWorld captions spoken by espeak-ng
    eval_captions: int = 12  # held-out split captions, for the final numbers
    real_audio: list[str] = field(default_factory=list)  # audio files or videos with an audio track
    real_eval_fraction: float = 0.2  # tail of each real clip held out
    real_weight: float = 0.3  # share of training crops drawn from the real clips
    segment_seconds: float = 0.5
    voice_speeds: list[int] = field(default_factory=lambda: [150, 175, 200])
    # model
    model: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    # optimisation
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20  # linear warmup from 0 (mmgen.utils.schedules)
    lr_schedule: str = "constant"  # after the warmup: "constant", or a "cosine" / "linear" decay to min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    wave_weight: float = 1.0
    mel_weight: float = 1.0
    mel_ffts: list[int] = field(default_factory=lambda: [256, 1024])
    # Terms that constrain what the log-mel loss leaves free (mmgen.tokenizers.audio_losses); each at
    # the STFT sizes listed, hop a quarter of the size.
    stft_weight: float = 0.0  # multi-resolution log-magnitude L1 + spectral convergence
    stft_ffts: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    phase_weight: float = 0.0  # instantaneous frequency + group delay against the input's
    phase_ffts: list[int] = field(default_factory=lambda: [256, 640])
    complex_weight: float = 0.0  # compressed complex STFT L1: asks for the input's absolute phase
    complex_ffts: list[int] = field(default_factory=lambda: [256, 640])
    vq_weight: float = 1.0
    restart_every: int = 5  # dead-code restarts (also seeds the codebooks from data on step 1)
    dead_threshold: float = 0.03  # a code is dead below this fraction of uniform usage
    usage_decay: float = 0.95
    # bookkeeping
    out_dir: str = "runs/tokenizer/tiny_audio"
    log_every: int = 20
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    threads: int = 0
    progress: bool = True


# -- data --------------------------------------------------------------------------------------------


def spoken_captions(n: int, split: str, seed: int, sample_rate: int, speeds: list[int]) -> list[np.ndarray]:
    """``n`` ShapesWorld captions of ``split`` scenes, spoken by espeak-ng at varied speeds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = caption(random_scene(rng, split), rng)
        wav = speak(text, speed=rng.choice(speeds))
        out.append(decode_audio(wav, sample_rate=sample_rate, mono=True)[0])
    return out


def real_clips(paths: list[str], sample_rate: int, eval_fraction: float) -> tuple[list, list, list[str]]:
    """(train heads, held-out tails, names) of the real recordings."""
    heads, tails, names = [], [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise MMGenError(f"real_audio file not found: {p} (list audio files or videos with sound)")
        try:
            x, _ = decode_audio(path.read_bytes(), sample_rate=sample_rate, mono=True, name=str(path))
        except MediaError as e:
            raise MMGenError(f"real_audio: {e}") from None
        cut = int(len(x) * (1 - eval_fraction))
        heads.append(x[:cut])
        tails.append(x[cut:])
        names.append(path.name)
    return heads, tails, names


def default_real_audio() -> list[str]:
    names = ["audio1.wav", "audio3.ogg", "video1.mp4", "video4.mp4"]
    return [str((REAL_DIR / n).resolve()) for n in names if (REAL_DIR / n).is_file()]


def _crop_batch(
    clips: list[np.ndarray], real: list[np.ndarray], cfg: AudioTrainConfig, seg: int, g: torch.Generator
) -> torch.Tensor:
    batch = torch.zeros(cfg.batch_size, 1, seg)
    for i in range(cfg.batch_size):
        pool = real if real and float(torch.rand((), generator=g)) < cfg.real_weight else clips
        x = pool[int(torch.randint(0, len(pool), (), generator=g))]
        if len(x) > seg:
            s = int(torch.randint(0, len(x) - seg, (), generator=g))
            x = x[s : s + seg]
        batch[i, 0, : len(x)] = torch.from_numpy(np.ascontiguousarray(x))
    return batch


# -- the loop ----------------------------------------------------------------------------------------


class CodebookUsage(torch.nn.Module):
    """Per-level usage EMA of every code, and restarts of dead codes from recent encoder outputs.

    transformers' DAC trains its codebooks by gradient only; from a random start every frame picks the
    same code and the codec collapses to one code per level. Re-seeding unused codes from the latents
    they should cover (as the image tokenizer does) keeps the codebooks populated."""

    def __init__(self, n_q: int, codebook_size: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("usage", torch.zeros(n_q, codebook_size))
        # Which codes won a frame since the last log line. Not the usage average: a restart resets a
        # code's average to a uniform share, so the average counts restarted codes as used.
        # Not persistent: a checkpoint holds what training needs, and a log window starts afresh.
        self.register_buffer("seen", torch.zeros(n_q, codebook_size, dtype=torch.bool), persistent=False)

    def window_usage(self) -> float:
        """Share of all levels' entries that won at least one frame since the last call."""
        share = float(self.seen.float().mean())
        self.seen.zero_()
        return share

    @torch.no_grad()
    def update(self, model, out, threshold: float, restart: bool, g: torch.Generator, opt) -> int:
        n_q, k = self.usage.shape
        d = out.projected_latents.shape[1] // n_q
        restarted = 0
        for q, quant in enumerate(model.quantizer.quantizers):
            counts = torch.bincount(out.audio_codes[:, q].flatten(), minlength=k).float()
            self.seen[q] |= counts > 0
            self.usage[q].mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
            dead = torch.nonzero(self.usage[q] < threshold / k).flatten()
            if not restart or dead.numel() == 0:
                continue
            z = out.projected_latents[:, q * d : (q + 1) * d].permute(0, 2, 1).reshape(-1, d)
            pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=g)
            quant.codebook.weight.data[dead] = z[pick] + 0.01 * torch.randn(dead.numel(), d, generator=g)
            self.usage[q, dead] = 1.0 / k
            state = opt.state.get(quant.codebook.weight, {})
            for name in ("exp_avg", "exp_avg_sq"):  # a re-seeded code starts afresh
                if name in state:
                    state[name][dead] = 0
            restarted += dead.numel()
        return restarted


def codec_loss(model, x: torch.Tensor, cfg: AudioTrainConfig, sample_rate: int):
    out = model(x, return_dict=True)
    y = out.audio_values
    ref = x[:, 0, : y.shape[-1]]
    wave = (y - ref).abs().mean()
    mel = sum(
        (log_mel(y, sample_rate, n, n // 4) - log_mel(ref, sample_rate, n, n // 4)).abs().mean() for n in cfg.mel_ffts
    ) / max(1, len(cfg.mel_ffts))
    vq = out.loss.mean()
    loss = cfg.wave_weight * wave + cfg.mel_weight * mel + cfg.vq_weight * vq
    vals = {"wave_l1": wave.item(), "mel_l1": mel.item(), "vq": vq.item()}
    extra = (
        ("stft", cfg.stft_weight, stft_magnitude_loss, cfg.stft_ffts),
        ("phase", cfg.phase_weight, phase_derivative_loss, cfg.phase_ffts),
        ("complex", cfg.complex_weight, complex_stft_loss, cfg.complex_ffts),
    )
    for name, weight, fn, ffts in extra:
        if weight:
            term = fn(y, ref, [(n, n // 4) for n in ffts])
            loss = loss + weight * term
            vals[name] = term.item()
    return loss, {"loss": loss.item(), **vals}, out


def evaluate(codec: AudioCodec, clips: list[np.ndarray]) -> dict:
    """Mean mel L1, SI-SNR and STOI of encode -> decode over ``clips``, and codebook usage per level."""
    mels, snrs, stois, all_codes = [], [], [], []
    for x in clips:
        codes = codec.encode(x, sample_rate=codec.sample_rate)
        all_codes.append(codes)
        y = codec.decode(codes)
        ref, est = torch.from_numpy(x), torch.from_numpy(y[: len(x)])
        mels.append(mel_l1(ref, est, codec.sample_rate))
        snrs.append(si_snr(ref, est))
        stois.append(stoi(x, y[: len(x)], codec.sample_rate))
    return {
        "mel_l1": round(float(np.mean(mels)), 4),
        "si_snr_db": round(float(np.mean(snrs)), 3),
        "stoi": round(float(np.mean(stois)), 4),
        "clips": len(clips),
        "codebook_usage": [round(u, 3) for u in codebook_usage(all_codes, codec.codebook_size)],
    }


def train_audio_tokenizer(cfg: AudioTrainConfig) -> Path:
    """Train the audio codec; returns the directory it was saved to (``out_dir/codec``)."""
    from tqdm import tqdm

    for name in ("steps", "batch_size", "log_every", "ckpt_every"):
        if getattr(cfg, name) <= 0:
            raise MMGenError(f"{name} must be positive, got {getattr(cfg, name)}")
    out = prepare_run_dir(cfg)

    torch.manual_seed(cfg.seed)
    codec = AudioCodec.from_config(cfg.model)
    sr = codec.sample_rate
    seg = codec.code_length(int(cfg.segment_seconds * sr)) * codec.hop_length
    t_data = time.time()
    clips = spoken_captions(cfg.synthetic_captions, "train", cfg.seed, sr, cfg.voice_speeds)
    real_paths = cfg.real_audio or default_real_audio()
    real_heads, real_tails, real_names = real_clips(real_paths, sr, cfg.real_eval_fraction)
    if not clips and not real_heads:
        raise MMGenError("no training audio: set synthetic_captions=N or real_audio=[files...]")
    clips = clips or real_heads

    model = codec.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.8, 0.99))
    tracker = CodebookUsage(codec.n_q, codec.codebook_size, cfg.usage_decay)
    state = torch.nn.ModuleDict({"codec": model, "tracker": tracker})  # what a checkpoint holds

    start = resume_or_start(out, cfg.resume, state, opt)
    sched = lr_scheduler(
        opt, cfg.lr_schedule, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, start_step=start, peak_lr=cfg.lr
    )
    metrics = MetricLogger(out, start, loss_keys=("mel_l1",))

    model.train()
    window: dict[str, float] = {}
    n_window, t0 = 0, time.time()
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="train audio codec",
        disable=not cfg.progress,
        leave=False,
    )
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x = _crop_batch(clips, real_heads, cfg, seg, g)
        loss, vals, fwd = codec_loss(model, x, cfg, sr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        restart = cfg.restart_every > 0 and step % cfg.restart_every == 0
        vals["restarted_codes"] = tracker.update(model, fwd, cfg.dead_threshold, restart, g, opt)
        for k, v in vals.items():
            window[k] = window.get(k, 0.0) + v
        n_window += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {
                "step": done,
                **{k: round(v / n_window, 5) for k, v in window.items()},
                "usage": round(tracker.window_usage(), 5),
                "lr": float(f"{opt.param_groups[0]['lr']:.6g}"),
                "elapsed_s": round(time.time() - t0, 2),
            }
            metrics.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", mel=f"{rec['mel_l1']:.3f}")
            window, n_window = {}, 0
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(out / "checkpoints", state, opt, done, cfg.keep_checkpoints)
    bar.close()
    metrics.close()
    train_s = time.time() - t0

    codec.eval()
    codec_dir = out / "codec"
    codec.save_pretrained(codec_dir)
    held = (
        spoken_captions(cfg.eval_captions, "heldout", cfg.seed + 1, sr, cfg.voice_speeds) if cfg.eval_captions else []
    )
    report = {
        "steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "data_seconds": round(t0 - t_data, 1),
        "parameters": codec.num_parameters(),
        "tokens_per_second": codec.tokens_per_second,
        "train_clips": {"synthetic": len(clips), "real": real_names},
    }
    if held:
        report["heldout_speech"] = evaluate(codec, held)
    if real_tails:
        report["real_tails"] = evaluate(codec, [t[: 5 * sr] for t in real_tails])
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return codec_dir


__all__ = [
    "AudioTrainConfig",
    "default_real_audio",
    "evaluate",
    "real_clips",
    "spoken_captions",
    "train_audio_tokenizer",
]
