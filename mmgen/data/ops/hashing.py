"""The hashes and keys deduplication compares: normalised text and its shingles with their MinHash,
perceptual image hashes and an exact Hamming-radius index over them, and normalised URLs."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from PIL import Image as PILImage


def normalize_text(text: str) -> str:
    """Case, Unicode form, punctuation and spacing removed: the text two copies must share."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def shingles(text: str, n: int, unit: str = "word") -> set[str]:
    """Word (or, with ``unit="char"``, character) n-grams of the normalised text."""
    if unit == "char":
        t = normalize_text(text)
        return {t[i : i + n] for i in range(max(1, len(t) - n + 1))} if t else set()
    ws = normalize_text(text).split()
    if not ws:
        return set()
    if len(ws) <= n:
        return {" ".join(ws)}
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


# Named explicitly: stored hash values must be rebuilt with the scheme that made them, whatever
# datasketch's default becomes.
MINHASH_SCHEME = "affine32"


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
    """The hash permutations of a (num_perm, seed) MinHash: drawing them costs more than hashing a
    caption, so they are drawn once per process."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations


def minhash(items: set[str], num_perm: int, seed: int = 1):
    """datasketch MinHash of a set of strings (its hash values travel between processes and into
    the JSON state; :func:`minhash_from_values` rebuilds it)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME, permutations=_permutations(num_perm, seed))
    m.update_batch([x.encode("utf-8") for x in sorted(items)])
    return m


def minhash_from_values(values, seed: int = 1):
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=np.asarray(values, dtype=np.uint32), scheme=MINHASH_SCHEME)


@lru_cache(maxsize=8)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is cos(pi (2x+1) k / 2n), scaled."""
    x = np.arange(n)
    m = np.cos(np.pi * (2 * x[None, :] + 1) * np.arange(n)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(pil, hash_size: int = 8, highfreq_factor: int = 4, color: bool = False) -> int:
    """DCT perceptual hash as an int: shrink to (hash_size*highfreq_factor)^2, 2-D DCT, keep the
    lowest hash_size x hash_size frequencies, one bit per coefficient above their median with the
    DC term left out of the median, as the reference description of pHash does (hackerfactor's
    "Looks Like It"). ``imagehash.phash`` puts DC into the median; on ShapesWorld's flat scenes
    that made ``image_near_dedup`` remove 23-27 more clean images per 600 documents (two worlds,
    the shapesworld recipe), so this one is kept; imagehash's other hashes are available through
    :func:`image_hash`. With ``color`` one hash per RGB channel, concatenated (3x the bits): flat
    synthetic scenes that differ only in hue look alike in gray."""
    n = hash_size * highfreq_factor
    small = pil.convert("RGB" if color else "L").resize((n, n), PILImage.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.float64)
    d = _dct_matrix(n)
    out = 0
    for ch in [arr[..., c] for c in range(3)] if color else [arr]:
        low = (d @ ch @ d.T)[:hash_size, :hash_size].ravel()
        for b in low > np.median(low[1:]):
            out = (out << 1) | int(b)
    return out


HASH_METHODS = ("phash", "dhash", "whash", "ahash")


def image_hash(pil, method: str = "phash", hash_size: int = 8, color: bool = False) -> int:
    """A perceptual hash of ``hash_size``^2 bits (x3 with ``color``) as an int: ``phash`` is
    :func:`phash`; ``dhash`` (gradient), ``whash`` (Haar wavelet; hash_size a power of 2) and
    ``ahash`` (mean) come from the ``imagehash`` package."""
    if method == "phash":
        return phash(pil, hash_size, color=color)
    import imagehash

    fn = {"dhash": imagehash.dhash, "whash": imagehash.whash, "ahash": imagehash.average_hash}[method]
    out = 0
    for plane in pil.convert("RGB").split() if color else [pil.convert("L")]:
        for b in fn(plane, hash_size=hash_size).hash.ravel():
            out = (out << 1) | int(b)
    return out


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HammingIndex:
    """Exact radius search over fixed-width bit strings by the pigeonhole principle: split the bits
    into radius+1 blocks; two strings within the radius agree exactly on at least one block."""

    def __init__(self, nbits: int, radius: int):
        self.nbits, self.radius = nbits, radius
        k = radius + 1
        edges = np.linspace(0, nbits, k + 1).round().astype(int)
        self.blocks = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.blocks]
        self.hashes: list[int] = []
        self.ids: list[str] = []

    def _parts(self, h: int):
        for lo, hi in self.blocks:
            yield (h >> lo) & ((1 << (hi - lo)) - 1)

    def candidates(self, h: int) -> list[int]:
        """Indices of entries within the radius, earliest first."""
        found = {idx for table, part in zip(self.tables, self._parts(h)) for idx in table.get(part, ())}
        return sorted(i for i in found if hamming(self.hashes[i], h) <= self.radius)

    def query(self, h: int) -> tuple[str, int] | None:
        """The earliest inserted entry within the radius: (id, distance)."""
        best = None
        for table, part in zip(self.tables, self._parts(h)):
            for idx in table.get(part, ()):
                if best is not None and idx >= best:
                    continue
                if hamming(self.hashes[idx], h) <= self.radius:
                    best = idx
        return (self.ids[best], hamming(self.hashes[best], h)) if best is not None else None

    def add(self, h: int, doc_id: str) -> None:
        idx = len(self.hashes)
        self.hashes.append(h)
        self.ids.append(doc_id)
        for table, part in zip(self.tables, self._parts(h)):
            table.setdefault(part, []).append(idx)


_TRACKING = re.compile(r"^(utm_[a-z]+|fbclid|gclid|mc_cid|mc_eid|ref|ref_src)$")


def normalize_url(url: str) -> str:
    """The part of a URL that names the resource: scheme and host lower-cased, default port,
    'www.', fragment, tracking parameters and a trailing slash dropped, other parameters sorted."""
    u = urlsplit(url.strip())
    host = (u.hostname or "").lower()
    host = host[4:] if host.startswith("www.") else host
    if u.port and (u.scheme, u.port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{u.port}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(u.query, keep_blank_values=True) if not _TRACKING.match(k)))
    scheme = u.scheme.lower()
    scheme = "http" if scheme == "https" else scheme  # the same page served both ways
    return urlunsplit((scheme, host, u.path.rstrip("/") or "/", query, ""))
