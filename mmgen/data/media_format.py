"""What a media file is, from its name or its first bytes: the canonical format names every reader,
writer and decoder of mmgen uses, and whether a reference is a URL."""

from __future__ import annotations

import re

# File extension -> canonical format name, for media identified by path or by sniffing.
_EXT_FORMAT = {
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "tif": "tiff",
    "tiff": "tiff",
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "mp3": "mp3",
    "opus": "opus",
    "m4a": "m4a",
    "mp4": "mp4",
    "avi": "avi",
    "mov": "mov",
    "mkv": "mkv",
    "webm": "webm",
}
_FORMAT_EXT = {"jpeg": "jpg", "tiff": "tif"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(ref) -> bool:
    return isinstance(ref, str) and bool(_URL.match(ref))


def format_from_name(name: str | None) -> str | None:
    if is_url(name):
        name = name.split("?", 1)[0].split("#", 1)[0]
    if not name or "." not in name:
        return None
    return _EXT_FORMAT.get(name.rsplit(".", 1)[-1].lower())


def ext_for(fmt: str | None, default: str = "bin") -> str:
    return _FORMAT_EXT.get(fmt, fmt) if fmt else default


def sniff_format(data: bytes) -> str | None:
    """Recognise a media container from its first bytes (no decoding)."""
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"GIF8"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"ID3") or head[:2] == b"\xff\xfb":
        return "mp3"
    return None
