"""Decoding and probing of media bytes: images (Pillow) behind an explicit pixel limit, audio
(soundfile, PyAV for the rest) and video (PyAV).

Every image decode in mmgen goes through :func:`open_image`, which reads the header first and refuses
an image of more than :func:`max_image_pixels` pixels (a decompression bomb: a 1 MB PNG can claim
20000x20000 pixels, 1.2 GB once decoded) before any pixel is decoded. The limit is process-wide, set
by :func:`set_max_image_pixels` (``max_image_pixels`` in a filter recipe, ``--max-image-pixels`` on the
command line); the default is Pillow's own warning threshold. Failures are :class:`MediaError` with a
reason code for the quarantine: ``too_many_pixels``, ``not_an_image`` (no image signature at all),
``format_mismatch`` (the bytes are one format, the name or record says another), ``truncated_image``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from mmgen.data.media_format import sniff_format
from mmgen.errors import MediaError, MMGenError

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS: 0.25 GiB of RGBA
_limits = {"pixels": DEFAULT_MAX_IMAGE_PIXELS}
# Formats that sniff_format names from the first bytes; only these are compared with a declared format.
_SNIFFED_IMAGE = {"png", "jpeg", "webp", "gif", "bmp"}


def set_max_image_pixels(n: int | None) -> None:
    """Set the process-wide pixel limit (None: back to the default)."""
    if n is None:
        n = DEFAULT_MAX_IMAGE_PIXELS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MMGenError(f"max_image_pixels must be a positive integer, got {n!r}")
    _limits["pixels"] = n


def max_image_pixels() -> int:
    return _limits["pixels"]


def check_pixels(width: int, height: int, name: str | None = None, what: str = "image") -> None:
    limit = _limits["pixels"]
    if width * height > limit:
        raise MediaError(
            f"{what} of {width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
            f"({name or 'embedded'}; raise max_image_pixels to allow it)",
            reason="too_many_pixels",
        )


def open_image(data: bytes, name: str | None = None, declared: str | None = None):
    """A lazily decoded PIL image whose header passed the checks (format, pixel limit). Nothing but the
    header has been read; call :func:`decode_image` for the pixels."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    where = name or "embedded image"
    sniffed = sniff_format(data)
    if declared in _SNIFFED_IMAGE and sniffed is not None and sniffed != declared:
        raise MediaError(f"{where} is declared {declared} but its bytes are {sniffed}", reason="format_mismatch")
    pil_limit = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None  # the limit is checked here, once, with this process's setting
    try:
        img = PILImage.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if sniffed is not None:  # an image signature followed by bytes no decoder reads: a damaged image
            raise MediaError(f"cannot read image header ({where}): {sniffed} signature, unreadable header") from None
        what = "empty file" if not data else f"{len(data)} bytes starting {data[:8]!r}"
        raise MediaError(f"{where} is not an image of a known format ({what})", reason="not_an_image") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on a damaged header
        reason = "truncated_image" if "runcated" in str(e) else "undecodable_media"
        raise MediaError(f"cannot read image header ({where}): {type(e).__name__}: {e}", reason=reason) from None
    finally:
        PILImage.MAX_IMAGE_PIXELS = pil_limit
    check_pixels(*img.size, name=where)
    return img


def decode_image(data: bytes, name: str | None = None, declared: str | None = None, mode: str | None = "RGB"):
    """Bytes -> a decoded PIL image, after :func:`open_image`'s header checks."""
    img = open_image(data, name, declared)
    where = name or "embedded image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd but decodable files (EXIF, palettes)
            img.load()
    except OSError as e:
        reason = "truncated_image" if "runcated" in str(e) or "broken data stream" in str(e) else "undecodable_media"
        raise MediaError(f"cannot decode image ({where}): {e}", reason=reason) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a media error
        raise MediaError(f"cannot decode image ({where}): {type(e).__name__}: {e}") from None
    return img.convert(mode) if mode and img.mode != mode else img


def resample_audio(x: np.ndarray, sr: int, target: int) -> np.ndarray:
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
        x = resample_audio(x, sr, sample_rate)
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
            check_pixels(stream.width or 0, stream.height or 0, name, what="video frame")
            duration = float(stream.duration * stream.time_base) if stream.duration else (box.duration or 0) / 1e6
            return {
                "duration": duration,
                "fps": float(stream.average_rate or 0),
                "width": stream.width,
                "height": stream.height,
                "frames": int(stream.frames or 0),
            }
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
            check_pixels(stream.width or 0, stream.height or 0, name, what="video frame")
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
