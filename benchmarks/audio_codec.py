"""Audio codec reconstruction: log-mel L1, SI-SNR, STOI and wideband PESQ at each number of residual
levels (tokens/s), on held-out synthetic speech (espeak-ng, held-out ShapesWorld scenes) and on the
held-out tails of the real clips (no PESQ there: PESQ models speech in a telephone-like chain, and these
clips are mostly sound and music); codebook usage per level on both sets; plus a bit-exact save/load round
trip of the codes.

    python benchmarks/audio_codec.py --codec runs/tokenizer/tiny_audio/codec

Reference row: silence (all-zero output) has SI-SNR undefined and the mel L1 of "nothing decoded".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmgen.tokenizers.audio import AudioCodec, codebook_usage, mel_l1, pesq_wb, si_snr, stoi
from mmgen.tokenizers.audio_train import default_real_audio, real_clips, spoken_captions
from mmgen.utils.bench import md_table, write_section
from mmgen.utils.files import read_json


def scores(
    codec: AudioCodec, clips: list[np.ndarray], codes: list[torch.Tensor], levels: int, pesq: bool
) -> dict[str, float]:
    """Mean log-mel L1, SI-SNR, STOI (and wideband PESQ) of ``clips`` decoded from the first ``levels``
    levels of their ``codes``."""
    out: dict[str, list[float]] = {"mel": [], "snr": [], "stoi": [], "pesq": []}
    sr = codec.sample_rate
    for x, c in zip(clips, codes):
        y = codec.decode_levels(c[:levels]) if levels < codec.n_q else codec.decode(c)
        ref, est = torch.from_numpy(x), torch.from_numpy(y)
        out["mel"].append(mel_l1(ref, est, sr))
        out["snr"].append(si_snr(ref, est))
        out["stoi"].append(stoi(x, y, sr))
        if pesq:
            out["pesq"].append(pesq_wb(x, y, sr))
    return {k: float(np.nanmean(v)) if v else float("nan") for k, v in out.items()}


def _fmt(v: float, digits: int):
    return "n/a" if np.isnan(v) else round(v, digits)


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
    istft = getattr(codec.model.config, "model_type", "") == "mmgen_dac_istft"
    decoder_name = "tiny DAC, iSTFT decoder" if istft else "tiny DAC"
    speech = spoken_captions(args.heldout, "heldout", 1, sr, [150, 175, 200])
    _, tails, names = real_clips(default_real_audio(), sr, 0.2)
    tails = [t[: int(args.seconds * sr)] for t in tails]
    sets = {"held-out synthetic speech": speech, "real clips (held-out tails)": tails}
    codes = {name: [codec.encode(x, sample_rate=sr) for x in clips] for name, clips in sets.items()}

    rows = []
    for set_name, clips in sets.items():
        is_speech = set_name == "held-out synthetic speech"
        silence = float(np.mean([mel_l1(torch.from_numpy(x), torch.zeros(len(x)), sr) for x in clips]))
        rows.append([set_name, "silence (reference)", 0, round(silence, 3), "n/a", "n/a", "n/a"])
        for q in range(1, codec.n_q + 1):
            r = scores(codec, clips, codes[set_name], q, pesq=is_speech)
            rows.append(
                [
                    set_name,
                    f"{decoder_name}, {q} level(s)",
                    int(q * codec.frame_rate),
                    round(r["mel"], 3),
                    round(r["snr"], 2),
                    round(r["stoi"], 3),
                    _fmt(r["pesq"], 2),
                ]
            )

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
        + md_table(
            [
                "set",
                "decoder",
                "tokens/s",
                "log-mel L1 (lower better)",
                "SI-SNR dB (higher better)",
                "STOI (higher better)",
                "PESQ wb (higher better)",
            ],
            rows,
        )
        + "\n\nSTOI (`pystoi`, 0-1) and wideband PESQ (`pesq`, ITU-T P.862.2, 1.0-4.6) score each decoded clip "
        "against the espeak-ng (or real) input it was encoded from. STOI on the real clips is reported as "
        "measured, but it is built for speech and these clips are mostly sound and music."
        + "\n\nCodebook usage per level (the share of its entries that encode at least one frame):\n"
        + "\n".join(usage_lines)
        + f"\n\nCodes round-trip through save_pretrained/from_pretrained bit-exactly: **{'yes' if exact else 'NO'}** "
        f"({len(speech) + len(tails)} clips)."
    )
    write_section("audio_codec", "Audio codec reconstruction (tiny)", body)
    print(body)


if __name__ == "__main__":
    main()
