"""Run-wide deduplication: exact and near duplicates of documents and of images.

Each operator keeps the first occurrence (in input order) and rejects later ones, naming the id of
the document they duplicate. Hashing runs in the workers (:meth:`signature`); the check against the
run-wide index runs in the parent in input order (:meth:`decide`), and a document's hashes enter the
index only once the document is finally kept (:meth:`commit`), so a rejected document never makes a
later one look like a duplicate. The hashes themselves are :mod:`mmgen.data.ops.hashing`'s.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from mmgen.data.doc import Image, Text
from mmgen.data.ops.base import DocView, Op, StatefulOp, Verdict, error_text, register_op
from mmgen.data.ops.hashing import (
    HASH_METHODS,
    HammingIndex,
    hamming,
    image_hash,
    minhash,
    minhash_from_values,
    normalize_text,
    normalize_url,
    phash,
    shingles,
)
from mmgen.errors import MediaError


def image_dup_verdict(item: int, h: int, hit: tuple[str, int] | None) -> Verdict:
    """The verdict of a near-duplicate image check: ``hit`` is (first doc id, Hamming distance) or None."""
    stats = {"phash": f"{h:x}"} | ({"distance": hit[1]} if hit else {})
    return Verdict("near_duplicate_image" if hit else None, stats, item=item, duplicate_of=hit[0] if hit else None)


# ---------------------------------------------------------------------------------------------------
# Exact duplicates


@register_op("doc_dedup")
class DocDedup(StatefulOp):
    """Exact duplicate documents: SHA-1 over the normalised text of each text item and the SHA-1 of
    each media item's bytes, in order."""

    levels = ("doc",)

    @dataclass
    class Params:
        # False: only byte-identical text is a copy; a change of case or punctuation is then left
        # to doc_near_dedup (whose shingles are normalised), as in corpora that label it a near copy.
        normalize: bool = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str, str] = {}

    def signature(self, view: DocView):
        h = hashlib.sha1()
        norm = normalize_text if self.params.normalize else (lambda t: t)
        for _, it in view.items():
            h.update(it.kind.encode() + b"\x00")
            h.update(norm(it.text).encode() if isinstance(it, Text) else it.content_key().encode())
            h.update(b"\x01")
        return h.hexdigest()

    def decide(self, view, sig, doc_id):
        first = self.seen.get(sig)
        return [Verdict("duplicate_doc" if first else None, {"content_sha1": sig}, duplicate_of=first)]

    def commit(self, view, sig, doc_id):
        if sig not in self.seen:
            self._add([sig, doc_id])

    def _insert(self, e):
        self.seen.setdefault(e[0], e[1])


@register_op("image_dedup")
class ImageDedup(StatefulOp):
    """Exact duplicate images across the run: SHA-1 of the encoded bytes. ``node`` level removes the
    repeated image; ``doc`` level rejects a document holding an image seen before."""

    default_level = "node"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str, str] = {}

    def signature(self, view):
        return {i: img.sha1() for i, img in view.images()}  # URLs not fetched: see url_dedup

    def decide(self, view, sig, doc_id):
        out, local = [], set()
        for i, _ in view.images():
            h = sig.get(i)
            if h is None:
                continue
            first = self.seen.get(h) or (doc_id if h in local else None)
            local.add(h)
            out.append(Verdict("duplicate_image" if first else None, {"sha1": h}, item=i, duplicate_of=first))
        return out

    def commit(self, view, sig, doc_id):
        for i, _ in view.images():
            if i in sig and sig[i] not in self.seen:
                self._add([sig[i], doc_id])

    def _insert(self, e):
        self.seen.setdefault(e[0], e[1])


# ---------------------------------------------------------------------------------------------------
# Near duplicates


@register_op("image_near_dedup")
class ImageNearDedup(StatefulOp):
    """Near-duplicate images (re-encoded, resized, lightly edited): a perceptual hash
    (:func:`image_hash`, pHash by default), duplicate when the Hamming distance to an earlier kept
    image is at most ``radius`` bits."""

    default_level = "node"

    @dataclass
    class Params:
        radius: int = 6
        hash_size: int = 8
        color: bool = False
        method: str = "phash"  # or dhash, whash, ahash (imagehash)
        # Also require the 8x8 RGB thumbnails to differ by at most this mean absolute value (0-255).
        # pHash ignores contrast and hue, so flat synthetic scenes with the same layout collide.
        max_thumb_diff: float | None = None
        # Compare images inside one document too. Off for step-by-step documents, whose
        # consecutive images legitimately differ by one small change.
        within_doc: bool = True

        def validate(self):
            if self.radius < 0 or self.hash_size < 2:
                raise ValueError("radius must be >= 0 and hash_size >= 2")
            if self.method not in HASH_METHODS:
                raise ValueError(f"method must be one of {', '.join(HASH_METHODS)}")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        p = self.params
        self.index = HammingIndex(p.hash_size**2 * (3 if p.color else 1), p.radius)
        self.thumbs: list[tuple[int, str]] = []

    def signature(self, view):
        from PIL import Image as PILImage

        out = {}
        for i, _ in view.images():
            try:
                pil = view.pil(i)
            except MediaError:
                out[i] = None  # undecodable: nothing to compare (image_decode quarantines it)
                continue
            thumb = np.asarray(pil.resize((8, 8), PILImage.Resampling.BOX), dtype=np.uint8).tobytes().hex()
            out[i] = (image_hash(pil, self.params.method, self.params.hash_size, self.params.color), thumb)
        return out

    def _close(self, a: tuple, b: tuple) -> int | None:
        """Hamming distance if the two (phash, thumbnail) pairs are near duplicates, else None."""
        d = hamming(a[0], b[0])
        if d > self.params.radius:
            return None
        if self.params.max_thumb_diff is not None:
            ta = np.frombuffer(bytes.fromhex(a[1]), np.uint8).astype(np.float32)
            tb = np.frombuffer(bytes.fromhex(b[1]), np.uint8).astype(np.float32)
            if float(np.abs(ta - tb).mean()) > self.params.max_thumb_diff:
                return None
        return d

    def decide(self, view, sig, doc_id):
        out, local = [], []
        for i, _ in view.images():
            h = sig.get(i)
            if h is None:
                continue
            hit = None
            for idx in self.index.candidates(h[0]):  # earliest kept image first
                d = self._close(self.thumbs[idx], h)
                if d is not None:
                    hit = (self.index.ids[idx], d)
                    break
            if hit is None and self.params.within_doc:
                near = [d for g in local if (d := self._close(g, h)) is not None]
                hit = (doc_id, min(near)) if near else None
            local.append(h)
            out.append(image_dup_verdict(i, h[0], hit))
        return out

    def commit(self, view, sig, doc_id):
        for i, _ in view.images():
            if sig.get(i) is not None:
                self._add([f"{sig[i][0]:x}", doc_id, sig[i][1]])

    def _insert(self, e):
        self.index.add(int(e[0], 16), e[1])
        self.thumbs.append((int(e[0], 16), e[2]))


@register_op("doc_near_dedup")
class DocNearDedup(StatefulOp):
    """Near-duplicate documents: datasketch MinHash over word (or character, ``shingle: char``)
    n-gram shingles of the normalised text, candidates from a datasketch MinHashLSH index (``bands``
    bands of num_perm/bands rows), then a check that the estimated Jaccard similarity reaches
    ``threshold`` AND that the documents carry the same media: as many images, pairwise within
    ``image_radius`` bits of perceptual hash (or byte-identical, ``exact_images``), and the same audio
    and video bytes (templated captions
    repeat across different pictures and clips; those are not copies). Documents with fewer than
    ``min_words`` words are not judged (short texts collide by chance).

    Character shingles suit short texts: one edited character changes at most ``ngram`` of them,
    while in a ten-word caption it changes three of eight word 3-grams (Jaccard 0.57).

    The media compared are the ones the document arrived with, including items that earlier node
    operators removed: two documents that carried different pictures are not copies of each other,
    even when filtering stripped both pictures and left two similar templated captions."""

    levels = ("doc",)

    @dataclass
    class Params:
        ngram: int = 3
        num_perm: int = 128
        bands: int = 32
        threshold: float = 0.7
        min_words: int = 5
        image_radius: int = 10
        shingle: str = "word"  # or "char"
        # True: images must be byte-identical (SHA-1) instead of within image_radius. For synthetic
        # flat scenes, whose perceptual hashes collide between different pictures.
        exact_images: bool = False

        def validate(self):
            if self.shingle not in ("word", "char"):
                raise ValueError(f"shingle must be 'word' or 'char', got {self.shingle!r}")
            if self.num_perm % self.bands:
                raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        from datasketch import MinHashLSH

        p = self.params
        # threshold only sizes the bands when params is not given; the exact check is ours below
        self.lsh = MinHashLSH(num_perm=p.num_perm, params=(p.bands, p.num_perm // p.bands))
        # Every kept signature as one row: a document's LSH candidates (thousands for templated captions)
        # are scored in one vectorised comparison instead of one MinHash.jaccard call each.
        self.hashes = np.zeros((0, p.num_perm), dtype=np.uint32)
        self.n = 0
        self.by_media: dict[tuple, list[int]] = {}  # exact_images: kept documents by media list
        self.phashes: list[list[int]] = []
        self.media: list[list[str]] = []
        self.ids: list[str] = []

    def signature(self, view):
        text = view.text
        if len(normalize_text(text).split()) < self.params.min_words:
            return None
        arrived = list(enumerate(view.doc.items))  # removed items included: see the class docstring
        ph = []
        for i, it in arrived:
            if isinstance(it, Image):
                try:
                    ph.append(phash(view.pil(i)))
                except MediaError:
                    ph.append(None)
        kinds = ("audio", "video", "image") if self.params.exact_images else ("audio", "video")
        media = [it.content_key() for _, it in arrived if it.kind in kinds]
        sh = shingles(text, self.params.ngram, self.params.shingle)
        return {"minhash": minhash(sh, self.params.num_perm).hashvalues, "phash": ph, "media": media}

    def _same_images(self, a: list, b: list) -> bool:
        return len(a) == len(b) and all(
            x is not None and y is not None and hamming(x, y) <= self.params.image_radius for x, y in zip(a, b)
        )

    def _same_media(self, i: int, sig: dict) -> bool:
        same = self.params.exact_images or self._same_images(self.phashes[i], sig["phash"])
        return same and self.media[i] == sig.get("media", [])

    def decide(self, view, sig, doc_id):
        if sig is None:
            return []
        values = np.asarray(sig["minhash"], dtype=np.uint32)
        cands = self._candidates(values, sig.get("media", []))
        if cands.size:
            # MinHash's Jaccard estimate: the share of equal hash values (datasketch's jaccard)
            sims = np.count_nonzero(self.hashes[cands] == values, axis=1) / values.size
            close = sims >= self.params.threshold
            for i, sim in zip(cands[close], sims[close]):
                if self._same_media(int(i), sig):  # the earliest kept document that is similar enough
                    return [
                        Verdict(
                            "near_duplicate_doc", {"jaccard_est": round(float(sim), 4)}, duplicate_of=self.ids[int(i)]
                        )
                    ]
        return [Verdict(None, {})]

    def _candidates(self, values: np.ndarray, media: list) -> np.ndarray:
        """Indices (ascending) of kept documents that share at least one LSH band with ``values``.

        With ``exact_images`` a copy must carry the same media bytes, so a document with media is
        compared only with the kept documents of the same media list, and the band test is run on
        them directly (exact band equality, the LSH's own rule): templated captions put thousands of
        documents in the same LSH buckets, and querying them costs a set union per document."""
        if self.params.exact_images and media:
            group = self.by_media.get(tuple(media))
            if not group:
                return np.zeros(0, dtype=np.int64)
            idx = np.asarray(group, dtype=np.int64)
            bands = self.params.bands
            same_band = (self.hashes[idx].reshape(len(idx), bands, -1) == values.reshape(bands, -1)).all(2).any(1)
            return idx[same_band]
        return np.array(sorted(self.lsh.query(minhash_from_values(values))), dtype=np.int64)

    def commit(self, view, sig, doc_id):
        if sig is not None:
            self._add(
                [
                    [int(v) for v in sig["minhash"]],
                    doc_id,
                    [None if h is None else f"{h:x}" for h in sig["phash"]],
                    sig.get("media", []),
                ]
            )

    def _insert(self, e):
        mh = minhash_from_values(e[0])
        idx = self.n
        if idx == len(self.hashes):  # grow by doubling: appends stay amortised O(1)
            self.hashes = np.concatenate([self.hashes, np.zeros((max(1024, idx), self.hashes.shape[1]), np.uint32)])
        self.hashes[idx] = mh.hashvalues
        self.n += 1
        self.ids.append(e[1])
        self.phashes.append([None if h is None else int(h, 16) for h in e[2]])
        media = e[3] if len(e) > 3 else []
        self.media.append(media)
        if self.params.exact_images and media:
            self.by_media.setdefault(tuple(media), []).append(idx)
        else:
            self.lsh.insert(idx, mh)


@register_op("image_doc_near_dedup")
class ImageDocNearDedup(Op):
    """Near-duplicate images inside one document (a gallery repeating a picture at another size or
    quality): perceptual hash (:func:`phash`), an image within ``radius`` bits of an earlier image
    of the same document is removed (``node``) or makes the document fail (``doc``). Stateless:
    runs in the workers. For copies across documents use ``image_near_dedup``."""

    default_level = "node"

    @dataclass
    class Params:
        radius: int = 4
        hash_size: int = 8

    def apply(self, view):
        out, seen = [], []
        for i, _ in list(view.images()):
            try:
                h = phash(view.pil(i), self.params.hash_size)
            except MediaError as e:
                out.append(Verdict(e.reason, {"error": error_text(e)}, item=i, quarantine=True))
                continue
            near = [(hamming(h, g), j) for g, j in seen if hamming(h, g) <= self.params.radius]
            seen.append((h, i))
            stats = {"phash": f"{h:x}"} | ({"distance": min(near)[0], "same_as_item": min(near)[1]} if near else {})
            out.append(Verdict("near_duplicate_image_in_doc" if near else None, stats, item=i))
        return out


@register_op("url_dedup")
class UrlDedup(StatefulOp):
    """Duplicate sources by URL or file path: ``doc`` level compares the document's URL (the first
    of ``doc_fields`` found in its metadata), ``node`` level each image's URL (the first of
    ``item_fields`` in the item metadata, else its file path). URLs are compared after
    :func:`normalize_url`; paths as given. Items and documents without a URL are not judged."""

    @dataclass
    class Params:
        doc_fields: list = field(default_factory=lambda: ["url", "source_url", "page_url"])
        item_fields: list = field(default_factory=lambda: ["url", "src", "raw_url", "image_url"])
        use_path: bool = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: dict[str, str] = {}

    def _key(self, meta: dict, fields: list, path: str | None = None, url: str | None = None) -> str | None:
        """The first of ``fields`` in ``meta``, else the item's own ``url``, else its ``path``."""
        for f in fields:
            v = meta.get(f)
            if isinstance(v, str) and v.strip():
                return "url:" + normalize_url(v) if "://" in v else "url:" + v.strip()
        if url:
            return "url:" + normalize_url(url)
        return "path:" + os.path.normpath(path) if path and self.params.use_path else None

    def signature(self, view):
        if self.level == "doc":
            return self._key(view.doc.meta, self.params.doc_fields)
        return {
            i: self._key(img.meta, self.params.item_fields, img.path, img.url) for i, img in view.images(fetched=False)
        }

    def decide(self, view, sig, doc_id):
        if self.level == "doc":
            if sig is None:
                return []
            first = self.seen.get(sig)
            return [Verdict("duplicate_url" if first else None, {"url_key": sig}, duplicate_of=first)]
        out, local = [], set()
        for i, _ in view.images(fetched=False):  # a URL needs no bytes to be compared
            key = (sig or {}).get(i)
            if key is None:
                continue
            first = self.seen.get(key) or (doc_id if key in local else None)
            local.add(key)
            out.append(Verdict("duplicate_url" if first else None, {"url_key": key}, item=i, duplicate_of=first))
        return out

    def commit(self, view, sig, doc_id):
        keys = [sig] if self.level == "doc" else [(sig or {}).get(i) for i, _ in view.images(fetched=False)]
        for key in keys:
            if key is not None and key not in self.seen:
                self._add([key, doc_id])

    def _insert(self, e):
        self.seen.setdefault(e[0], e[1])
