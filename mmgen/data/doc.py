"""The ``Doc`` schema: one interleaved document, the type every stage of mmgen speaks.

A Doc is an ordered list of items (:class:`Text`, :class:`Image`, :class:`Audio`, :class:`Video`),
with per-item metadata, document metadata, a stable id and provenance (where it came from).

Media are held as *encoded bytes* (the original file's bytes, so round trips are byte-identical)
plus cheap header facts (format, size, duration); pixels and samples are decoded only on demand.
A media item may also be *by reference*: a ``path`` whose bytes are read the first time they are
needed (a missing file raises :class:`MediaError` with the path), or a ``url`` (MMC4, OBELICS and
OmniCorpus are distributed as image URLs). A URL is never fetched implicitly: reading the bytes of an
item that has only a URL raises :class:`NotFetchedError`, and ``mmgen fetch`` downloads them. An item
may hold both: the URL it came from and its local bytes or path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mmgen.data.media import decode_audio, decode_image, decode_video, open_image, probe_audio, probe_video
from mmgen.data.media_format import ext_for, format_from_name, is_url, sniff_format
from mmgen.errors import MediaError, NotFetchedError


@dataclass
class Text:
    text: str
    meta: dict = field(default_factory=dict)

    kind = "text"


@dataclass
class _Media:
    """Shared behaviour of media items: bytes held, read lazily from ``path``, or a ``url`` reference."""

    data: bytes | None = None
    path: str | None = None  # where the bytes came from (provenance, and for by-reference items)
    format: str | None = None
    meta: dict = field(default_factory=dict)
    url: str | None = None  # where the medium lives on the web; never fetched implicitly

    def __post_init__(self):
        if self.data is None and is_url(self.path):
            self.path, self.url = None, self.url or self.path  # a URL given as a path is a URL reference
        if self.data is None and self.path is None and self.url is None:
            raise ValueError(f"{type(self).__name__} needs data, path or url")
        if self.format is None:
            self.format = (
                (sniff_format(self.data) if self.data is not None else None)
                or format_from_name(self.path)
                or format_from_name(self.url)
            )

    @property
    def loaded(self) -> bool:
        return self.data is not None

    @property
    def fetched(self) -> bool:
        """Whether the bytes are here (held or at a local path); False for a URL-only reference."""
        return self.data is not None or self.path is not None

    def load(self) -> bytes:
        """The encoded bytes, reading ``path`` on first use."""
        if self.data is None and self.path is None:
            raise NotFetchedError(f"{self.kind} not fetched: {self.url} (run `mmgen fetch` to download it)")
        if self.data is None:
            try:
                with open(self.path, "rb") as f:
                    self.data = f.read()
            except FileNotFoundError:
                raise MediaError(f"{self.kind} file not found: {self.path}") from None
            except OSError as e:
                raise MediaError(f"cannot read {self.kind} file {self.path}: {e.strerror}") from None
            if self.format is None:
                self.format = sniff_format(self.data)
        return self.data

    def exists(self) -> bool:
        return self.data is not None or (self.path is not None and os.path.isfile(self.path))

    def sha1(self) -> str:
        return hashlib.sha1(self.load()).hexdigest()

    def content_key(self) -> str:
        """The bytes' SHA-1, or ``url:URL`` for a reference not fetched (identity without downloading)."""
        return self.sha1() if self.fetched else f"url:{self.url}"

    @property
    def ext(self) -> str:
        return ext_for(self.format)


@dataclass
class Image(_Media):
    kind = "image"

    @classmethod
    def from_pil(cls, img, format: str = "png", meta: dict | None = None, **save_kwargs) -> Image:
        buf = io.BytesIO()
        img.save(buf, format=format.upper(), **save_kwargs)
        return cls(data=buf.getvalue(), format=format.lower(), meta=dict(meta or {}))

    def to_pil(self, mode: str | None = "RGB"):
        """Decode to a PIL image (``mode=None`` keeps the file's own mode), after the header checks of
        :func:`mmgen.data.media.open_image` (pixel limit, declared format)."""
        return decode_image(self.load(), self.path, self.declared_format(), mode)

    def declared_format(self) -> str | None:
        """The format the corpus claims for the bytes; a URL's name is no such claim (servers lie)."""
        return None if self.url else self.format

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header only (checked against the pixel limit); cached in ``meta``."""
        if "width" not in self.meta or "height" not in self.meta:
            with open_image(self.load(), self.path, self.declared_format()) as img:
                self.meta["width"], self.meta["height"] = img.size
        return self.meta["width"], self.meta["height"]


@dataclass
class Audio(_Media):
    kind = "audio"

    def to_array(self, sample_rate: int | None = None, mono: bool = True):
        """Decode to float32 samples ``(channels, n)`` (or ``(n,)`` when mono) and the sample rate."""
        return decode_audio(self.load(), sample_rate=sample_rate, mono=mono, name=self.path)

    @property
    def duration(self) -> float:
        if "duration" not in self.meta:
            self.meta.update(probe_audio(self.load(), name=self.path))
        return self.meta["duration"]


@dataclass
class Video(_Media):
    kind = "video"

    def frames(self, fps: float | None = None, max_frames: int | None = None):
        """Decode to a list of PIL frames (optionally resampled to ``fps``) and their timestamps."""
        return decode_video(self.load(), fps=fps, max_frames=max_frames, name=self.path)

    @property
    def duration(self) -> float:
        if "duration" not in self.meta:
            self.meta.update(probe_video(self.load(), name=self.path))
        return self.meta["duration"]


Item = Text | Image | Audio | Video
MEDIA_TYPES = {"image": Image, "audio": Audio, "video": Video}


@dataclass
class Doc:
    """One interleaved document."""

    items: list[Item] = field(default_factory=list)
    id: str | None = None
    meta: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # e.g. {"source": path, "line": 3} or {"member": key}

    def __post_init__(self):
        if self.id is None:
            self.id = self.content_id()

    # -- views ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[Text]:
        return [it for it in self.items if isinstance(it, Text)]

    @property
    def images(self) -> list[Image]:
        return [it for it in self.items if isinstance(it, Image)]

    @property
    def audios(self) -> list[Audio]:
        return [it for it in self.items if isinstance(it, Audio)]

    @property
    def videos(self) -> list[Video]:
        return [it for it in self.items if isinstance(it, Video)]

    @property
    def media(self) -> list[Item]:
        return [it for it in self.items if not isinstance(it, Text)]

    @property
    def text(self) -> str:
        """All text items joined by blank lines (for text-only statistics)."""
        return "\n\n".join(t.text for t in self.texts)

    # -- identity ------------------------------------------------------------------------------
    def content_id(self) -> str:
        """A stable id from the content: same texts and media bytes in the same order, same id."""
        h = hashlib.sha1()
        for it in self.items:
            h.update(it.kind.encode())
            if isinstance(it, Text):
                h.update(it.text.encode())
            else:
                h.update(it.sha1().encode() if it.exists() else str(it.path or it.url).encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]

    # -- serialisation (the canonical JSON used inside WebDataset samples) ---------------------
    def to_json(self, media_names: list[str | None] | None = None) -> dict:
        """JSON-able form. ``media_names[i]`` names the member/file holding item i's bytes."""
        items = []
        for i, it in enumerate(self.items):
            entry: dict[str, Any] = {"type": it.kind}
            if isinstance(it, Text):
                entry["text"] = it.text
            else:
                name = media_names[i] if media_names else None
                if name is not None:
                    entry["member"] = name
                elif it.path is not None:
                    entry["path"] = it.path
                if it.format:
                    entry["format"] = it.format
                if it.path is not None:
                    entry["source_path"] = it.path
                if it.url is not None:
                    entry["url"] = it.url
            if it.meta:
                entry["meta"] = it.meta
            items.append(entry)
        return {"id": self.id, "meta": self.meta, "provenance": self.provenance, "items": items}

    @classmethod
    def from_json(cls, obj: dict, media: dict[str, bytes] | None = None, base_dir: str | None = None) -> Doc:
        """Inverse of :meth:`to_json`; ``media`` maps member names to bytes."""
        items: list[Item] = []
        for entry in obj.get("items", []):
            kind = entry.get("type")
            meta = dict(entry.get("meta") or {})
            if kind == "text":
                items.append(Text(entry.get("text", ""), meta))
            elif kind in MEDIA_TYPES:
                member = entry.get("member")
                if member is not None:
                    if media is None or member not in media:
                        raise MediaError(f"{kind} member '{member}' is missing from the sample")
                    items.append(
                        MEDIA_TYPES[kind](
                            data=media[member],
                            path=entry.get("source_path"),
                            format=entry.get("format"),
                            meta=meta,
                            url=entry.get("url"),
                        )
                    )
                else:
                    path = entry.get("path")
                    if path and base_dir and not os.path.isabs(path) and not is_url(path):
                        path = os.path.join(base_dir, path)
                    items.append(
                        MEDIA_TYPES[kind](path=path, format=entry.get("format"), meta=meta, url=entry.get("url"))
                    )
            else:
                raise ValueError(f"unknown item type {kind!r}")
        return cls(
            items=items,
            id=obj.get("id"),
            meta=dict(obj.get("meta") or {}),
            provenance=dict(obj.get("provenance") or {}),
        )

    def to_json_line(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)


@dataclass
class BadRecord:
    """An input record that could not become a Doc. Readers yield these instead of raising, so a
    run continues and the caller can quarantine the record with its reason."""

    source: str
    reason: str  # a short reason code, e.g. "bad_json", "missing_media", "corrupt_tar"
    detail: str = ""
    line: int | None = None
    member: str | None = None
    raw: str | bytes | None = None

    def to_json(self) -> dict:
        raw = self.raw.decode("utf-8", "replace") if isinstance(self.raw, bytes) else self.raw
        return {
            "source": self.source,
            "line": self.line,
            "member": self.member,
            "reason": self.reason,
            "detail": self.detail,
            "raw": raw,
        }

    def __str__(self) -> str:
        where = (
            self.source
            + (f":{self.line}" if self.line is not None else "")
            + (f"[{self.member}]" if self.member else "")
        )
        return f"{where}: {self.reason}: {self.detail}"
