"""Audio codec reconstruction: log-mel L1 and SI-SNR at each number of residual levels (tokens/s), on
held-out synthetic speech (espeak-ng, held-out ShapesWorld scenes) and on the held-out tails of the
real clips; codebook usage per level on both sets; plus a bit-exact save/load round trip of the codes.

    python benchmarks/audio_codec.py --codec runs/tokenizer/tiny_audio/codec

Reference row: silence (all-zero output) has SI-SNR undefined and the mel L1 of "nothing decoded".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmgen.tokenizers.audio import AudioCodec, codebook_usage, mel_l1, si_snr
from mmgen.tokenizers.audio_train import default_real_audio, real_clips, spoken_captions
from mmgen.utils.bench import md_table, write_section
from mmgen.utils.files import read_json


def scores(codec: AudioCodec, clips: list[np.ndarray], codes: list[torch.Tensor], levels: int) -> tuple[float, float]:
    """Mean log-mel L1 and SI-SNR of ``clips`` decoded from the first ``levels`` levels of their ``codes``."""
    mels, snrs = [], []
    for x, c in zip(clips, codes):
        y = torch.from_numpy(codec.decode_levels(c[:levels]) if levels < codec.n_q else codec.decode(c))
        ref = torch.from_numpy(x)
        mels.append(mel_l1(ref, y, codec.sample_rate))
        snrs.append(si_snr(ref, y))
    return float(np.mean(mels)), float(np.mean(snrs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", default="runs/tokenizer/tiny_audio/codec")
    # 48 captions give ~13,000 frames, ~50 per entry of a 256-entry level: about what the image tokenizer's
    # usage is measured on (300 scenes x 81 pixel codes for 512 entries). 12 (the trainer's eval) give ~13.
    ap.add_argument("--heldout", type=int, default=48, help="held-out captions spoken for the speech set")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each real tail scored")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = AudioCodec.from_pretrained(args.codec)
    sr = codec.sample_rate
    train_cfg = read_json(Path(args.codec).parent / "eval.json", {})
    speech = spoken_captions(args.heldout, "heldout", 1, sr, [150, 175, 200])
    _, tails, names = real_clips(default_real_audio(), sr, 0.2)
    tails = [t[: int(args.seconds * sr)] for t in tails]
    sets = {"held-out synthetic speech": speech, "real clips (held-out tails)": tails}
    codes = {name: [codec.encode(x, sample_rate=sr) for x in clips] for name, clips in sets.items()}

    rows = []
    for set_name, clips in sets.items():
        silence = float(np.mean([mel_l1(torch.from_numpy(x), torch.zeros(len(x)), sr) for x in clips]))
        rows.append([set_name, "silence (reference)", 0, round(silence, 3), "n/a"])
        for q in range(1, codec.n_q + 1):
            m, s = scores(codec, clips, codes[set_name], q)
            rows.append([set_name, f"tiny DAC, {q} level(s)", int(q * codec.frame_rate), round(m, 3), round(s, 2)])

    usage_lines = []
    for set_name, clips in sets.items():
        frames = sum(c.shape[1] for c in codes[set_name])
        usage = codebook_usage(codes[set_name], codec.codebook_size)
        usage_lines.append(
            f"- {set_name}: {' / '.join(f'{100 * u:.1f}%' for u in usage)} ({len(clips)} clips, "
            f"{frames:,} frames, {frames / codec.codebook_size:.0f} per entry)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        codec.save_pretrained(tmp)
        back = AudioCodec.from_pretrained(tmp)
        exact = all(
            torch.equal(c, back.encode(x, sample_rate=sr))
            for name, clips in sets.items()
            for x, c in zip(clips, codes[name])
        )
    body = (
        f"Codec `{args.codec}`: {codec.n_q} residual levels x {codec.frame_rate:g} frames/s, codebooks of "
        f"{codec.codebook_size}, {codec.num_parameters() / 1e6:.2f}M parameters"
        + (
            f", trained {train_cfg.get('steps')} steps in {train_cfg.get('train_seconds')} s on a shared CPU"
            if train_cfg
            else ""
        )
        + f". Held-out speech: {len(speech)} espeak-ng captions of held-out-split scenes; real: the last 20% "
        f"(first {args.seconds:g} s) of {', '.join(names)}, never trained on.\n\n"
        + md_table(["set", "decoder", "tokens/s", "log-mel L1 (lower better)", "SI-SNR dB (higher better)"], rows)
        + "\n\nCodebook usage per level (the share of its entries that encode at least one frame):\n"
        + "\n".join(usage_lines)
        + f"\n\nCodes round-trip through save_pretrained/from_pretrained bit-exactly: **{'yes' if exact else 'NO'}** "
        f"({len(speech) + len(tails)} clips)."
    )
    write_section("audio_codec", "Audio codec reconstruction (tiny)", body)
    print(body)


if __name__ == "__main__":
    main()
