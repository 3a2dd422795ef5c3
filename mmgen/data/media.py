"""Decoding and probing of audio and video bytes (soundfile for audio, PyAV for everything else)."""

from __future__ import annotations

import io

import numpy as np

from mmgen.errors import MediaError


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Band-limited polyphase resampling along the last axis."""
    if sr == target:
        return x
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(sr, target)
    return resample_poly(x, target // g, sr // g, axis=-1).astype(np.float32)


def _decode_audio_av(data: bytes, name: str | None) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data)) as box:
            stream = next((s for s in box.streams if s.type == "audio"), None)
            if stream is None:
                raise MediaError(f"no audio stream in {name or 'embedded media'}")
            chunks, sr = [], stream.rate
            for frame in box.decode(stream):
                arr = frame.to_ndarray().astype(np.float32)
                if frame.format.is_planar:
                    chunks.append(arr)
                else:  # interleaved: (1, n*channels)
                    chunks.append(arr.reshape(-1, len(frame.layout.channels)).T)
        x = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
        if np.abs(x).max(initial=0) > 1.5:  # integer PCM decoded to float range
            x = x / 32768.0
        return x, sr
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for bad input
        raise MediaError(f"cannot decode audio ({name or 'embedded'}): {e}") from None


def decode_audio(data: bytes, sample_rate: int | None = None, mono: bool = True, name: str | None = None):
    """Bytes of any audio file -> (float32 samples, sample rate). Mono gives ``(n,)``, else ``(c, n)``."""
    import soundfile as sf

    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        x = x.T
    except Exception:  # noqa: BLE001 - formats libsndfile lacks (mp3 on old builds, m4a) go to PyAV
        x, sr = _decode_audio_av(data, name)
    if mono:
        x = x.mean(axis=0)
    if sample_rate:
        x = _resample(x, sr, sample_rate)
        sr = sample_rate
    return np.ascontiguousarray(x, dtype=np.float32), sr


def encode_wav(x: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples -> 16-bit PCM WAV bytes (clipped to [-1, 1]: PCM has no headroom)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def probe_audio(data: bytes, name: str | None = None) -> dict:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        return {"duration": float(info.duration), "sample_rate": int(info.samplerate), "channels": int(info.channels)}
    except Exception:  # noqa: BLE001
        x, sr = _decode_audio_av(data, name)
        return {"duration": x.shape[-1] / sr, "sample_rate": sr, "channels": x.shape[0]}


def probe_video(data: bytes, name: str | None = None) -> dict:
    import av

    try:
        with av.open(io.BytesIO(data)) as box:
            stream = next((s for s in box.streams if s.type == "video"), None)
            if stream is None:
                raise MediaError(f"no video stream in {name or 'embedded media'}")
            duration = float(stream.duration * stream.time_base) if stream.duration else (box.duration or 0) / 1e6
            return {"duration": duration, "fps": float(stream.average_rate or 0), "width": stream.width,
                    "height": stream.height, "frames": int(stream.frames or 0)}
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read video ({name or 'embedded'}): {e}") from None


def decode_video(data: bytes, fps: float | None = None, max_frames: int | None = None, name: str | None = None):
    """Bytes of a video -> (list of PIL RGB frames, list of timestamps in seconds).

    With ``fps`` set, frames are sampled uniformly at that rate (nearest decoded frame)."""
    import av

    frames, times = [], []
    next_t = 0.0
    try:
        with av.open(io.BytesIO(data)) as box:
            stream = next((s for s in box.streams if s.type == "video"), None)
            if stream is None:
                raise MediaError(f"no video stream in {name or 'embedded media'}")
            for frame in box.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(frames) / 25.0
                if fps is not None and t + 1e-6 < next_t:
                    continue
                frames.append(frame.to_image().convert("RGB"))
                times.append(t)
                next_t = t + 1.0 / fps if fps else 0.0
                if max_frames and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot decode video ({name or 'embedded'}): {e}") from None
    if not frames:
        raise MediaError(f"video has no decodable frames ({name or 'embedded'})")
    return frames, times
