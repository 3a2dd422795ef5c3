"""VideoEncoder: PyAV decoding of the real clips and ShapesWorld clips, uniform and shot-change
sampling, temporal token merging with a keep ratio, frame blocks with timestamps, decode back; and
pre-tokenized videos that round-trip through the LM sequence's video blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmgen.errors import MediaError, MMGenError

from trainkit import tiny_pixel_vq


@pytest.fixture(scope="module")
def tok():
    return tiny_pixel_vq()


def motion_frames(n: int = 6, seed: int = 0, size: int = 32):
    from mmgen.world.media import make_motion, render_motion

    start, end, _, _ = make_motion(random.Random(seed), "train")
    return render_motion(start, end, n, size, size)


@pytest.mark.parametrize("name", ["video1.mp4", "video4.mp4"])
def test_every_real_video_encodes_and_decodes(tok, real_dir, name):
    from mmgen.data.media import probe_video
    from mmgen.tokenizers.video import VideoEncoder

    info = probe_video((real_dir / name).read_bytes(), name)
    enc = VideoEncoder(tok, fps=1.0, max_frames=5)
    vt = enc.encode(real_dir / name)
    assert len(vt.blocks) == 5 and vt.grid == (8, 8) and vt.blocks[0].keyframe
    times = vt.times
    assert times == sorted(times) and times[0] == 0 and times[-1] <= info["duration"]
    assert times[-1] > info["duration"] / 2  # spread over the clip, not its first seconds
    assert vt.tokens_after <= vt.tokens_before
    frames = enc.decode(vt)
    assert len(frames) == 5 and frames[0].size == (32, 32)


def test_shot_change_keyframes_sampling(tok, real_dir):
    from mmgen.tokenizers.video import VideoEncoder

    keys = VideoEncoder(tok, sampling="keyframes", max_frames=50).encode(real_dir / "video1.mp4")
    uniform = VideoEncoder(tok, fps=8.0, max_frames=500).sample_frames(real_dir / "video1.mp4")
    assert all(b.keyframe and len(b) == 64 for b in keys.blocks)
    assert 1 <= len(keys.blocks) < len(uniform[0])  # a few shots, far fewer than frames


def test_merging_keeps_static_tokens_out_and_respects_the_keep_ratio(tok):
    from mmgen.tokenizers.video import VideoEncoder

    frames = motion_frames()
    static = [frames[0]] * 4
    enc = VideoEncoder(tok, keep_ratio=0.25, similarity_threshold=0.999, scene_threshold=1.0)
    vt = enc.encode(static)
    assert [len(b) for b in vt.blocks] == [64, 0, 0, 0]  # nothing changes: one keyframe only
    moving = enc.encode(frames)
    assert all(len(b) <= 16 for b in moving.blocks[1:]) and moving.tokens_after < moving.tokens_before
    lossless = VideoEncoder(tok, keep_ratio=1.0, similarity_threshold=1.0, scene_threshold=1.0)
    full = lossless.encode(frames)
    assert torch.equal(lossless.full_grids(full), lossless.encode_frames(frames))  # copy-forward is exact


def test_encode_is_deterministic_and_blocks_serialise(tok):
    from mmgen.tokenizers.video import VideoEncoder

    enc = VideoEncoder(tok, keep_ratio=0.5)
    a, b = enc.encode(motion_frames()), enc.encode(motion_frames())
    assert a.to_dict() == b.to_dict()
    d = a.to_dict()
    assert d["tokens_before"] == 6 * 64 and d["blocks"][0]["time"] == 0.0 and d["blocks"][1]["time"] == 0.5


def test_shapesworld_mp4_round_trip(tok):
    from mmgen.tokenizers.video import VideoEncoder
    from mmgen.world.media import encode_mp4

    data = encode_mp4(motion_frames(8, size=64), fps=8)
    vt = VideoEncoder(tok, fps=4.0, max_frames=8).encode(data)
    assert len(vt.blocks) == 4 and vt.times == [0.0, 0.25, 0.5, 0.75]


def test_bad_inputs_are_clear_errors(tok, tmp_path):
    from mmgen.tokenizers.video import VideoEncoder

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    enc = VideoEncoder(tok)
    with pytest.raises(MediaError) as e:
        enc.encode(bad)
    assert "\n" not in str(e.value) and "broken.mp4" in str(e.value)
    with pytest.raises(MediaError, match="not found"):
        enc.encode(tmp_path / "missing.mp4")
    with pytest.raises(MMGenError, match="keep_ratio"):
        VideoEncoder(tok, keep_ratio=0)
    with pytest.raises(MMGenError, match="sampling"):
        VideoEncoder(tok, sampling="random")


class TwoGridTokenizer:
    """The shape of DualViTok's API (dict of 'sem' and 'pix' grids) over a tiny PixelVQ."""

    def __init__(self, tok):
        self.tok, self.device = tok, tok.device
        self.sem_quantizer = self.pix_quantizer = tok.quantizer

    def encode(self, frames):
        pix = self.tok.encode(frames)
        return {"sem": pix[:, ::2, ::2].contiguous(), "pix": pix}

    def decode(self, codes):
        assert set(codes) == {"sem", "pix"}
        return self.tok.decode(codes["pix"])


def test_multi_grid_tokenizers_are_merged_grid_by_grid(tok):
    from mmgen.tokenizers.video import VideoEncoder

    enc = VideoEncoder(TwoGridTokenizer(tok), keep_ratio=1.0, similarity_threshold=1.0, scene_threshold=1.0)
    frames = motion_frames()
    vt = enc.encode(frames)
    assert set(vt) == {"sem", "pix"} and vt["sem"].grid == (4, 4) and vt["pix"].grid == (8, 8)
    codes = enc.encode_frames(frames)
    assert all(torch.equal(enc.full_grids(vt[k]), codes[k]) for k in ("sem", "pix"))
    assert len(enc.decode(vt)) == len(frames)


BROKEN_MP4 = b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50


@pytest.fixture(scope="module")
def text_tok():
    from mmgen.models.text_tokenizer import train_text_tokenizer

    return train_text_tokenizer(["a shape moves.", "a real clip.", "broken."] * 10, vocab_size=300)


def _frames(tokens):
    return [(b.index, b.keyframe, b.positions.tolist(), b.codes.tolist()) for b in tokens.blocks]


def _parsed_video(cd, text_tok, vocab) -> dict:
    from mmgen.processing.sequence import build_sequence

    seq = build_sequence(cd, text_tok, vocab)
    assert not seq["skipped"]
    ids = seq["input_ids"].tolist()
    return vocab.parse_video_block(ids[ids.index(vocab["<video>"]) :])


def test_pretokenized_video_round_trips_through_the_sequence(tok, text_tok, real_dir, tmp_path):
    from mmgen.data.code_shards import read_code_shards
    from mmgen.data.doc import Doc, Text, Video
    from mmgen.data.shards import write_shards
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.pretokenize import pretokenize
    from mmgen.tokenizers.video import VideoEncoder, VideoTokens
    from mmgen.world.media import encode_mp4

    tok.save_pretrained(tmp_path / "vq")
    clips = [encode_mp4(motion_frames(8, size=64), fps=8), (real_dir / "video1.mp4").read_bytes()]
    docs = [
        Doc([Text("a shape moves."), Video(data=clips[0], format="mp4")]),
        Doc([Text("a real clip."), Video(data=clips[1], format="mp4")]),
        Doc([Text("broken."), Video(data=BROKEN_MP4, format="mp4")]),
    ]
    write_shards(docs, tmp_path / "in")
    plain = pretokenize(tmp_path / "vq", str(tmp_path / "in"), tmp_path / "plain", progress=False)
    assert plain["docs_written"] == 3 and plain["video_items_without_codes"] == 3  # off by default: as before
    assert all(not c.codes for c in read_code_shards(plain["shards"]))

    s = pretokenize(
        tmp_path / "vq",
        str(tmp_path / "in"),
        tmp_path / "codes",
        video=True,
        video_fps=4.0,
        video_max_frames=8,
        progress=False,
    )
    assert s["docs_in"] == s["docs_written"] + s["quarantined"] == 3
    assert s["quarantine_reasons"] == {"undecodable_video": 1} and s["video_items_encoded"] == 2
    assert 0 < s["video_tokens_after"] < s["video_tokens_before"] == s["video_frames"] * 64
    vocab = Vocab(len(text_tok), {"pix": 32}, max_grid=8, video_times=64, video_time_step=0.25)
    enc = VideoEncoder(tok, fps=4.0, max_frames=8)
    for cd, clip in zip(read_code_shards(s["shards"]), clips):
        want = enc.encode(clip)
        parsed = _parsed_video(cd, text_tok, vocab)
        got = VideoTokens.from_grids(parsed["pix"], parsed["times"], parsed["keyframes"])
        assert _frames(got) == _frames(want)
        assert np.allclose(got.times, want.times, atol=0.125)  # quantized to 0.25 s steps
        unmerged = vocab.video_block(enc.full_grids(want).numpy(), got.times, [True] * len(got.blocks))
        assert parsed["length"] < len(unmerged)


def test_two_grid_video_codes_round_trip_grid_by_grid(tok, text_tok):
    from mmgen.data.code_shards import CodedDoc
    from mmgen.data.doc import Doc, Text, Video
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.pretokenize import encode_video_item
    from mmgen.tokenizers.video import VideoEncoder
    from mmgen.world.media import encode_mp4

    enc = VideoEncoder(TwoGridTokenizer(tok), fps=8.0, keep_ratio=0.5)
    v = encode_video_item(enc, Video(data=encode_mp4(motion_frames(6, size=32), fps=8), format="mp4"))
    assert v["sem"].shape == (6, 4, 4) and v["codes"].shape == (6, 8, 8) and v["after"] < v["before"]
    cd = CodedDoc(
        Doc([Text("a shape moves."), Video(path="<codes:1>", format="mp4")]),
        codes={1: v["codes"]},
        sem={1: v["sem"]},
        frames={1: v["frames"]},
    )
    vocab = Vocab(len(text_tok), {"sem": 32, "pix": 32}, max_grid=8, video_times=16, video_time_step=0.125)
    parsed = _parsed_video(cd, text_tok, vocab)
    assert np.array_equal(parsed["pix"], v["codes"]) and np.array_equal(parsed["sem"], v["sem"])
    assert parsed["keyframes"].tolist() == (v["frames"][:, 1] > 0).tolist()
