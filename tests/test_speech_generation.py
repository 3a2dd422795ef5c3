"""Speech output: the audio-frame constraint, the audio codec inside the bundle, the tts mode and the CLI.

Audio blocks are ``<audio> codes </audio>`` with the residual levels taking turns frame by frame (each
level its own sub-range of the "audio" range); generation must write only whole frames and decode
each closed block into a WAV of ``frames x hop`` samples."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError
from mmgen.processing.vocab import Vocab

from bundlekit import PaletteTokenizer, bias_head, make_tiny_bundle
from trainkit import AUDIO_HOP, AUDIO_SR, TINY_AUDIO_CODEC, tiny_audio_codec

LEVELS, PER = TINY_AUDIO_CODEC["n_codebooks"], TINY_AUDIO_CODEC["codebook_size"]
HOP, SR = AUDIO_HOP, AUDIO_SR


def _allowed(proc, rows) -> list[set[int]]:
    """Per row, the ids the constraint leaves finite after ``rows`` (equal-length token lists)."""
    ids = torch.tensor(rows)
    out = proc(ids, torch.zeros(len(rows), proc.vocab.size))
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in out]


def _ids(rng: tuple[int, int]) -> set[int]:
    return set(range(*rng))


# -- the constraint -------------------------------------------------------------------------------
def test_levels_take_turns_and_close_only_at_frame_boundaries():
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(40, {"pix": 8, "audio": 3 * 5}, max_grid=4, audio_levels=3)
    proc = ImageGridConstraint(vocab, sizes=[(2, 2)], allow_audio=True)
    close = vocab["</audio>"]
    levels = [_ids(vocab.audio_level_range(k)) for k in range(3)]
    assert set().union(*levels) == _ids(vocab.code_range("audio")) and not levels[0] & levels[1]
    row, rng = [1, vocab["<audio>"]], random.Random(0)
    for n in range(12):  # n codes written so far
        got = _allowed(proc, [row])[0]
        want = set(levels[n % 3]) | ({close} if n % 3 == 0 and n >= 3 else set())
        assert got == want, n
        row.append(rng.choice(sorted(levels[n % 3])))
    assert _allowed(proc, [row])[0] == levels[0] | {close}  # 4 whole frames: go on or close
    row.append(close)
    codes = vocab.parse_audio_block(row[1:])
    assert codes.shape == (3, 4) and codes.min() >= 0 and codes.max() < 5
    # After </audio> the row is free again: text, <image> and <audio>, no stray code.
    assert _allowed(proc, [row])[0] == set(range(40)) | {vocab["<image>"], vocab["<audio>"]}
    assert proc.completed_audio == [1] and not proc.in_block[0]
    # A prompt that leaves a block open mid-frame is picked up by the first call's scan.
    fresh = ImageGridConstraint(vocab, allow_audio=True)
    assert _allowed(fresh, [[1, vocab["<audio>"], levels[0].pop()]])[0] == levels[1] and fresh.in_block == [True]


def test_audio_off_keeps_the_image_only_masks():
    """Without allow_audio (or without an "audio" range) nothing changes: <audio> is a stray token."""
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(40, {"pix": 8, "audio": 2 * 4}, max_grid=4, audio_levels=2)
    row = [1, 2, 3]
    text_and_image = set(range(40)) | {vocab["<image>"]}
    assert _allowed(ImageGridConstraint(vocab, sizes=[(2, 2)]), [row])[0] == text_and_image
    no_audio = Vocab(40, {"pix": 8}, max_grid=4)
    assert _allowed(ImageGridConstraint(no_audio, allow_audio=True), [row])[0] == set(range(40)) | {no_audio["<image>"]}
    # An <audio> in the prompt is not tracked when audio is off: the row stays free text.
    assert _allowed(ImageGridConstraint(vocab, sizes=[(2, 2)]), [[1, vocab["<audio>"], 40 + 30]])[0] == text_and_image
    # Images keep their grid constraint when audio is on.
    on = ImageGridConstraint(vocab, sizes=[(2, 2)], allow_audio=True)
    assert _allowed(on, [[1, 2, vocab["<image>"]]])[0] == {vocab["<h_2>"]}


def test_max_audio_frames_forces_the_close():
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(40, {"audio": 2 * 4}, max_grid=4, audio_levels=2)
    proc = ImageGridConstraint(vocab, allow_audio=True, max_audio_frames=2)
    a0, a1 = vocab.audio_level_range(0)[0], vocab.audio_level_range(1)[0]
    row = [1, vocab["<audio>"], a0, a1]
    assert vocab["</audio>"] in _allowed(proc, [row])[0] and a0 in _allowed(proc, [row])[0]  # one frame: either
    assert _allowed(proc, [row + [a0]])[0] == _ids(vocab.audio_level_range(1))  # mid-frame: no close
    assert _allowed(proc, [row + [a0, a1]])[0] == {vocab["</audio>"]}  # two frames: must close
    with pytest.raises(MMGenError, match="max_audio_frames must be >= 1"):
        ImageGridConstraint(vocab, allow_audio=True, max_audio_frames=0)


def test_budget_only_opens_a_block_that_fits_and_closes_it_in_time():
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(40, {"audio": 2 * 4}, max_grid=4, audio_levels=2)
    opener, close = vocab["<audio>"], vocab["</audio>"]
    row = [1, 2]
    need = vocab.audio_block_len(1)  # <audio> a b </audio>
    assert need == 4
    tight = ImageGridConstraint(vocab, allow_audio=True, max_length=len(row) + need - 1)
    assert opener not in _allowed(tight, [row])[0]
    roomy = ImageGridConstraint(vocab, allow_audio=True, max_length=len(row) + need)
    assert opener in _allowed(roomy, [row])[0]
    # With room for 2 frames: after the first frame another fits; after the second only </audio> does.
    a0, a1 = vocab.audio_level_range(0)[0], vocab.audio_level_range(1)[0]
    proc = ImageGridConstraint(vocab, allow_audio=True, max_length=len(row) + vocab.audio_block_len(2))
    assert _allowed(proc, [row + [opener, a0, a1]])[0] == _ids(vocab.audio_level_range(0)) | {close}
    proc = ImageGridConstraint(vocab, allow_audio=True, max_length=len(row) + vocab.audio_block_len(2))
    assert _allowed(proc, [row + [opener, a0, a1, a0, a1]])[0] == {close}


def test_random_rows_write_only_whole_frames_and_whole_images():
    """Random sampling under the constraint, rows advancing one token per call: every closed audio
    block parses into whole frames within max_audio_frames, every image block parses."""
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(30, {"pix": 6, "audio": 3 * 4}, max_grid=3, audio_levels=3)
    proc = ImageGridConstraint(vocab, sizes=[(2, 2)], allow_audio=True, max_audio_frames=4)
    rng = random.Random(1)
    ids = torch.tensor([[1, 2], [1, vocab["<audio>"]]])
    for _ in range(300):
        masked = proc(ids, torch.zeros(2, vocab.size))
        nxt = []
        for b in range(2):
            choices = torch.nonzero(torch.isfinite(masked[b])).flatten().tolist()
            media = [t for t in choices if t in (vocab["<audio>"], vocab["<image>"])]
            nxt.append(rng.choice(media) if media and rng.random() < 0.3 else rng.choice(choices))
        ids = torch.cat([ids, torch.tensor(nxt)[:, None]], dim=1)
    n_audio = n_image = 0
    for row in ids.tolist():
        i = 0
        while i < len(row):
            if row[i] == vocab["<audio>"] and vocab["</audio>"] in row[i:]:
                end = row.index(vocab["</audio>"], i)
                codes = vocab.parse_audio_block(row[i : end + 1])
                assert 1 <= codes.shape[1] <= 4 and codes.min() >= 0 and codes.max() < 4
                n_audio, i = n_audio + 1, end + 1
            elif row[i] == vocab["<image>"] and i + 3 <= len(row):
                n = vocab.image_block_len(row[i + 1] - vocab.h_start + 1, row[i + 2] - vocab.w_start + 1)
                if i + n <= len(row):
                    assert vocab.parse_image_block(row[i : i + n])["pix"].shape == (2, 2)
                    n_image += 1
                i += n
            else:
                i += 1
    assert n_audio >= 5 and n_image >= 3
    assert sum(proc.completed_audio) >= 4


def _wave(item):
    """(samples, sample rate) of an Audio item, read back from its WAV bytes."""
    return item.to_array()


def test_bundle_carries_the_audio_codec(speech, speech_dir):
    from mmgen.tokenizers.audio import AudioCodec

    assert (speech_dir / "audio_tokenizer" / "model.safetensors").is_file()
    assert isinstance(speech.audio_tokenizer, AudioCodec)
    codes = torch.randint(0, PER, (LEVELS, 6), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(speech.audio_tokenizer.decode(codes), tiny_audio_codec().decode(codes))


def test_old_bundle_without_audio_still_loads(tmp_path):
    bundle = make_tiny_bundle(tmp_path)
    assert bundle.audio_tokenizer is None and not (tmp_path / "audio_tokenizer").exists()
    assert isinstance(bundle.image_tokenizer, PaletteTokenizer)


def test_tts_writes_one_whole_speech_block(speech):
    from mmgen.data.doc import Audio
    from mmgen.inference.generate import generate_interleaved

    vocab = speech.vocab
    bias_head(speech, {vocab["</audio>"]: -30.0})  # a random model might stop at once; make it talk
    doc = generate_interleaved(speech, "a red sound.", mode="tts", max_new_tokens=40, max_audio_frames=5, seed=0)
    audio = doc.items[0]
    assert isinstance(audio, Audio) and audio.format == "wav"
    assert audio.meta["frames"] == 5 and audio.meta["codes_shape"] == [LEVELS, 5]
    assert audio.meta["num_tokens"] == vocab.audio_block_len(5) and audio.meta["sample_rate"] == SR
    x, sr = _wave(audio)
    assert sr == SR and x.shape == (5 * HOP,) and np.isfinite(x).all() and np.abs(x).max() > 0
    assert audio.duration == pytest.approx(5 * HOP / SR)
    assert doc.meta["mode"] == "tts" and doc.meta["max_audio_frames"] == 5


def test_the_budget_closes_the_block(speech):
    """No frame cap: the token budget alone ends the block, whole, with nothing left unfinished."""
    from mmgen.inference.generate import generate_interleaved

    bias_head(speech, {speech.vocab["</audio>"]: -30.0})
    doc = generate_interleaved(speech, "a blue sound.", mode="tts", max_new_tokens=3 * LEVELS + 1, seed=1)
    assert [it.kind for it in doc.items] == ["audio"] and doc.items[0].meta["frames"] == 3
    assert _wave(doc.items[0])[0].shape == (3 * HOP,)
    assert doc.meta["stop"] == "max_new_tokens" and "unfinished_audio_tokens" not in doc.meta


def test_wav_is_the_codec_decoding_of_the_sampled_codes(speech):
    """The WAV holds exactly what the codec makes of the block's codes (up to 16-bit PCM)."""
    from mmgen.inference.generate import prompt_ids, sample_tokens
    from mmgen.processing.processor import audio_item, decode_audio_codes

    vocab, tok = speech.vocab, speech.text_tokenizer
    row = prompt_ids(speech, "a green sound.", image=False) + [vocab["<audio>"]]
    block = [vocab["<audio>"]]
    for t, _ in sample_tokens(
        speech.model,
        vocab,
        [row],
        max_new_tokens=4 * LEVELS + 1,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        seed=2,
        allow_audio=True,
        allow_images=False,
    ):
        block.append(int(t[0]))
        if block[-1] == vocab["</audio>"]:
            break
    codes = vocab.parse_audio_block(block)
    want = decode_audio_codes(speech.audio_tokenizer, codes)
    assert want.shape == (codes.shape[1] * HOP,)
    got, _ = _wave(audio_item(speech.audio_tokenizer, codes))
    assert np.abs(got - np.clip(want, -1, 1)).max() < 2e-4


def test_tts_is_deterministic_by_seed(speech):
    from mmgen.inference.generate import generate_interleaved

    def run(seed):
        doc = generate_interleaved(speech, "a yellow sound.", mode="tts", max_new_tokens=16, seed=seed, cfg_scale=2.0)
        return [it.text if it.kind == "text" else it.load() for it in doc.items]

    a, b, c = run(4), run(4), run(5)
    assert a == b and any(isinstance(x, bytes) for x in a)
    assert a != c


def test_auto_mode_writes_audio_only_when_allowed(speech):
    from mmgen.inference.generate import generate_interleaved

    vocab = speech.vocab
    bias_head(speech, {vocab["<audio>"]: 20.0, vocab["<image>"]: -30.0})
    doc = generate_interleaved(
        speech, "a red sound.", mode="auto", max_new_tokens=20, seed=0, allow_audio=True, max_audio_frames=2
    )
    assert doc.items[0].kind == "audio" and len(doc.audios) >= 2  # it loves <audio>: block after block
    assert all(a.meta["frames"] <= 2 for a in doc.audios)
    doc = generate_interleaved(speech, "a red sound.", mode="auto", max_new_tokens=20, seed=0)
    assert doc.audios == []  # the default is unchanged: no audio


def test_speech_errors_are_one_line(speech, tmp_path):
    from mmgen.inference.generate import generate_interleaved

    old = make_tiny_bundle(tmp_path)
    with pytest.raises(MMGenError, match="tts mode needs a checkpoint whose vocab has audio codes"):
        generate_interleaved(old, "x", mode="tts")
    with pytest.raises(MMGenError, match="allow_audio needs a checkpoint whose vocab has audio codes"):
        generate_interleaved(old, "x", allow_audio=True)
    mute = dataclasses.replace(speech, audio_tokenizer=None)
    with pytest.raises(MMGenError, match="needs a checkpoint with an audio codec"):
        generate_interleaved(mute, "x", mode="tts")
    with pytest.raises(MMGenError, match="too small for one audio frame"):
        generate_interleaved(speech, "x", mode="tts", max_new_tokens=LEVELS)
    with pytest.raises(MMGenError, match="text mode writes no audio"):
        generate_interleaved(speech, "x", mode="text", allow_audio=True)
    with pytest.raises(MMGenError, match="max_audio_frames must be >= 1"):
        generate_interleaved(speech, "x", mode="tts", max_audio_frames=0)
    other = Vocab(speech.vocab.text_size, {"pix": 16, "audio": 4 * 8}, max_grid=8, audio_levels=4)
    with pytest.raises(MMGenError, match="audio codec has 2 levels x 16 codes but the vocab expects 4 x 8"):
        generate_interleaved(dataclasses.replace(speech, vocab=other), "x", mode="tts")
    with pytest.raises(MMGenError) as e:
        generate_interleaved(mute, "x", mode="tts")
    assert "\n" not in str(e.value)


# -- the CLI ----------------------------------------------------------------------------------------
def test_cli_tts_writes_wav(speech_dir, tmp_path, capsys):
    import soundfile as sf

    from mmgen.cli import main

    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(speech_dir),
            "--prompt",
            "a red sound.",
            "--mode",
            "tts",
            "--max-audio-frames",
            "3",
            "--max-new-tokens",
            "12",
            "--seed",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    wav = out / "audio_0.wav"
    assert f"s: {wav}]" in capsys.readouterr().out
    x, sr = sf.read(io.BytesIO(wav.read_bytes()))
    doc = json.loads((out / "doc.json").read_text())
    item = doc["items"][0]
    assert item["type"] == "audio" and item["member"] == "audio_0.wav"
    assert sr == SR and 1 <= item["meta"]["frames"] <= 3 and len(x) == item["meta"]["frames"] * HOP


# -- training writes the codec into the bundle ---------------------------------------------------------
def test_the_trainers_bundle_carries_the_codec_it_trained_with(speech, tmp_path):
    """What the trainer writes at the end of a run with data.audio_tokenizer loads back able to speak
    (the bundle writer itself: a whole DeepSpeed run would cost minutes for the same check)."""
    from mmgen.inference.generate import generate_interleaved
    from mmgen.models.bundle import load_bundle
    from mmgen.training.checkpointing import save_bundle
    from mmgen.training.config import TrainConfig

    data = {
        "text_tokenizer": speech.text_tokenizer,
        "vocab": speech.vocab,
        "image_tokenizer": None,
        "audio_tokenizer": speech.audio_tokenizer,
        "image_grids": {},
    }
    save_bundle(speech.model, data, TrainConfig(), {"steps": 0}, tmp_path / "final")
    bundle = load_bundle(tmp_path / "final")
    assert bundle.audio_tokenizer is not None and bundle.meta["audio_sample_rate"] == SR
    doc = generate_interleaved(bundle, "a red sound.", mode="tts", max_new_tokens=2 * LEVELS + 1, seed=0)
    assert doc.audios and _wave(doc.audios[0])[0].shape == (doc.audios[0].meta["frames"] * HOP,)
