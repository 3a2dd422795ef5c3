"""Decoding of the real audio, video and image files; garbage bytes raise MediaError."""

from __future__ import annotations

import numpy as np
import pytest

from mmgen.data.doc import Audio, Image, Video
from mmgen.data.media import decode_audio, decode_video, probe_audio, probe_video
from mmgen.errors import MediaError

AUDIO = ["audio1.wav", "audio3.ogg"]
VIDEO = ["video1.mp4", "video4.mp4"]
IMAGES = {
    "img1.png": (336, 336),
    "img2.jpg": (640, 480),
    "img3.jpg": (342, 500),
    "cat.jpg": (640, 480),
    "lena-face.jpg": (200, 200),
}


@pytest.mark.parametrize("name", AUDIO)
def test_real_audio_decodes(real_dir, name):
    data = (real_dir / name).read_bytes()
    info = probe_audio(data, name=name)
    x, sr = decode_audio(data)
    assert info["duration"] > 0 and x.ndim == 1 and x.dtype == np.float32
    assert abs(len(x) / sr - info["duration"]) < 0.05 and 0 < np.abs(x).max() <= 1.0
    y, sr16 = decode_audio(data, sample_rate=16000)
    assert sr16 == 16000 and abs(len(y) - len(x) * 16000 / sr) <= 2
    a = Audio(path=str(real_dir / name))
    assert a.duration == pytest.approx(info["duration"]) and a.format == name.rsplit(".", 1)[1]


@pytest.mark.parametrize("name", VIDEO)
def test_real_video_decodes(real_dir, name):
    data = (real_dir / name).read_bytes()
    info = probe_video(data, name=name)
    assert info["duration"] > 0 and info["width"] > 0 and info["height"] > 0
    frames, times = decode_video(data, fps=2.0, max_frames=4)
    assert 1 <= len(frames) <= 4 and frames[0].size == (info["width"], info["height"])
    assert times == sorted(times) and all(b - a >= 0.5 - 1e-3 for a, b in zip(times, times[1:]))
    assert Video(path=str(real_dir / name)).duration == pytest.approx(info["duration"])


def test_real_images_header_and_pixels(real_dir):
    for name, size in IMAGES.items():
        img = Image(path=str(real_dir / name))
        assert img.size == size and img.to_pil().size == size and img.to_pil().mode == "RGB"


def test_garbage_raises_media_error(real_dir):
    garbage = b"\x00\x01not a media file" * 100
    with pytest.raises(MediaError):
        decode_audio(garbage)
    with pytest.raises(MediaError):
        probe_video(garbage)
    with pytest.raises(MediaError):
        decode_video(garbage)
    with pytest.raises(MediaError):
        Image(data=garbage).to_pil()
    # An audio file is not a video: no video stream is a clear error, not a crash.
    with pytest.raises(MediaError):
        decode_video((real_dir / "audio1.wav").read_bytes())
    with pytest.raises(MediaError, match="not found"):
        Audio(path=str(real_dir / "no-such.wav")).load()
