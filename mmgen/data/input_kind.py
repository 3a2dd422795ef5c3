"""What an input file holds, told by its bytes rather than its name, and a reader that undoes its
compression.

``sniff_input(path)`` is one of ``tar`` (a WebDataset shard, plain, gzip or zstd), ``parquet``,
``jsonl`` (also a ``.json`` array: ``array``) and ``compression`` is ``None``, ``gzip`` or ``zstd``. A file that is
none of these is a one-line :class:`MMGenError` naming what its first bytes look like: a ``.tar.gz``
shard is never parsed as text lines, and a picture passed as input never becomes thousands of
``bad_json`` records.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from typing import BinaryIO

from mmgen.errors import MMGenError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
# The names a directory input is searched for (content decides what each file is).
INPUT_EXTS = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.zst",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".json",
    ".json.gz",
    ".parquet",
)


@dataclass(frozen=True)
class InputKind:
    kind: str  # tar | parquet | jsonl
    compression: str | None = None  # None | gzip | zstd
    array: bool = False  # jsonl: the file is one JSON array (LLaVA's .json), not a record per line

    @property
    def seekable(self) -> bool:
        """Byte offsets in the file are offsets in the records (so it can be split into byte ranges)."""
        return self.compression is None


def _zstd_reader(raw: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise MMGenError("reading zstd-compressed input needs the zstandard package: pip install zstandard") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def open_decompressed(path: str, compression: str | None) -> BinaryIO:
    """A binary stream of the file's content with its compression undone."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return _zstd_reader(open(path, "rb"))
    return open(path, "rb")


def compression_of(magic: bytes) -> str | None:
    """``gzip``, ``zstd`` or None, told by a file's first bytes."""
    return "gzip" if magic.startswith(GZIP_MAGIC) else "zstd" if magic.startswith(ZSTD_MAGIC) else None


def _head(path: str, compression: str | None, n: int = 4096) -> bytes:
    try:
        with open_decompressed(path, compression) as f:
            return f.read(n)
    except (OSError, EOFError, ValueError) as e:  # a damaged compressed stream still tells its kind below
        if isinstance(e, MMGenError):
            raise
        return b""


def _looks_like_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def sniff_input(path: str) -> InputKind:
    """The kind of ``path`` from its first bytes; a one-line MMGenError for anything mmgen cannot read."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4096)
    except OSError as e:
        raise MMGenError(f"cannot read input {path}: {e.strerror}") from None
    compression = compression_of(magic)
    head = _head(path, compression) if compression else magic
    if magic.startswith(PARQUET_MAGIC):
        return InputKind("parquet")
    if _looks_like_tar(head):
        return InputKind("tar", compression)
    import tarfile

    if not compression and tarfile.is_tarfile(path):  # an old (v7) tar without the ustar magic
        return InputKind("tar")
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if b"\x00" not in head[: 1024 if compression else 512] or start in (b"{", b"["):
        # text: jsonl, whatever its first line holds (a damaged line is quarantined as bad_json)
        return InputKind("jsonl", compression, array=start == b"[")
    shown = head[:12]
    raise MMGenError(
        f"input {path} is not jsonl, parquet or a tar shard (its {'decompressed ' if compression else ''}"
        f"content starts with {shown!r}); pass only corpus files"
    )
