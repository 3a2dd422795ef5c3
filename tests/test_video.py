"""VideoEncoder: PyAV decoding of the real clips and ShapesWorld clips, uniform and shot-change
sampling, temporal token merging with a keep ratio, frame blocks with timestamps, decode back."""

from __future__ import annotations

import random

import pytest
import torch

from mmgen.errors import MediaError, MMGenError


@pytest.fixture(scope="module")
def tok():
    from mmgen.tokenizers.vq import PixelVQ

    torch.manual_seed(0)
    return PixelVQ(resolution=(32, 32), channels=(8, 16), code_dim=4, codebook_size=32, norm_groups=4).eval()


def motion_frames(n: int = 6, seed: int = 0, size: int = 32):
    from mmgen.data.synthetic.media import make_motion, render_motion

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
    from mmgen.data.synthetic.media import encode_mp4
    from mmgen.tokenizers.video import VideoEncoder

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
