"""ShapesWorld documents, labeled defects and the world writer (``mmgen world``).

Everything is drawn from one ``random.Random(seed)`` in a fixed order and every encoder runs
single-threaded with fixed settings, so the same arguments give byte-identical shards and labels.
"""

from __future__ import annotations

import difflib
import json
import random
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

from mmgen.data.doc import Audio, Doc, Image, Text, Video
from mmgen.data.shards import ShardWriter
from mmgen.errors import MMGenError
from mmgen.world.media import VIDEO_FPS, encode_mp4, make_motion, render_motion, speak
from mmgen.world.scene import HELDOUT_PAIRS, Scene, pairs_allowed, random_scene, render, split_of
from mmgen.world.text import (
    FOREIGN_SENTENCES,
    caption,
    gibberish,
    join_phrases,
    ngram_spam,
    object_phrase,
    parse_objects,
    qa_pairs,
    random_edit,
    small_text_edit,
)

DOC_KINDS = ("caption", "qa", "buildup", "video", "speech")
DEFAULT_MIX = {"caption": 0.4, "qa": 0.2, "buildup": 0.2, "video": 0.1, "speech": 0.1}
SPLIT_WEIGHTS = {"train": 0.85, "val": 0.05, "heldout": 0.10}
# Question-answer pairs per QA document (inclusive range). A picture costs ~110 tokens, a pair ~12, so
# more pairs per picture buy understanding examples at a fraction of the tokens.
QA_PAIRS = (4, 8)
DEFECT_TYPES = (
    "mismatched_caption",
    "duplicate_image",
    "near_duplicate_image",
    "duplicate_doc",
    "near_duplicate_doc",
    "corrupt_image",
    "tiny_image",
    "extreme_aspect",
    "gibberish_text",
    "ngram_spam",
    "non_english",
    "empty_item",
)
_NEEDS_SOURCE = {"duplicate_image", "near_duplicate_image", "duplicate_doc", "near_duplicate_doc"}
# Recent clean docs that duplicates copy from: near each other, as crawled duplicates tend to be.
_SOURCE_POOL = 64


class UniqueScenes:
    """The pictures already placed in the world. Redrawing a scene that was drawn before keeps every
    picture unique, so that each exact duplicate image in a world is a *labelled* defect: with only
    ~1,500 distinct one-object scenes, natural repeats would otherwise be unlabelled duplicates that a
    correct deduplicator is then scored against. Defect documents that copy an image on purpose bypass it.
    ``tries=1`` keeps the first draw (no bookkeeping beyond the set)."""

    def __init__(self, tries: int = 100):
        self.tries = tries
        self.seen: set[str] = set()
        # docs whose picture a duplicate_image / near_duplicate_image doc already reused: a second
        # reuse of the same picture under a caption would be a near-duplicate document of the first
        self.reused: set[str] = set()

    def draw(self, make, key=lambda scene: scene.key()):
        """Call ``make()`` until its result's ``key`` is new (at most ``tries`` times) and record it."""
        for _ in range(self.tries):
            out = make()
            k = key(out)
            if k not in self.seen:
                break
        self.seen.add(k)
        return out


def _image_item(scene: Scene, size: tuple[int, int], **meta) -> Image:
    return Image.from_pil(render(scene, *size), meta={"scene": scene.to_dict(), **meta})


def _ordered(rng: random.Random, media, text: Text) -> tuple[list, str]:
    """Media before text (captioning / understanding) or text before media (generation)."""
    return ([media, text], "media_first") if rng.random() < 0.5 else ([text, media], "text_first")


def make_doc(
    kind: str,
    rng: random.Random,
    split: str = "train",
    size: int | tuple[int, int] = 64,
    speaker=None,
    unique: UniqueScenes | None = None,
) -> Doc:
    """One clean ShapesWorld document of ``kind`` whose scenes belong to ``split``. ``speaker``
    (text -> wav bytes, or a Future of them) replaces espeak-ng for speech docs; ``unique`` keeps its
    pictures new across a world."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    unique = unique or UniqueScenes(tries=1)
    meta = {"kind": kind, "split": split, "source": "shapesworld"}
    if kind == "caption":
        scene = unique.draw(lambda: random_scene(rng, split))
        items, meta["order"] = _ordered(rng, _image_item(scene, size), Text(caption(scene, rng)))
    elif kind == "qa":
        scene = unique.draw(lambda: random_scene(rng, split))
        items = [_image_item(scene, size)]
        for q, a, qtype in qa_pairs(scene, rng, n=rng.randint(*QA_PAIRS)):
            items += [Text(q, {"role": "question", "qa_type": qtype}), Text(a, {"role": "answer"})]
    elif kind == "buildup":
        scene = unique.draw(lambda: random_scene(rng, split, n_objects=rng.randint(1, 2)))
        first = (
            f"Start with {join_phrases([object_phrase(o) for o in scene.objects])}, on a {scene.background} background."
        )
        items = [Text(first, {"step": 0}), _image_item(scene, size, step=0)]
        # later steps must not bring a held-out pair into a train/val document
        allowed = pairs_allowed(split)
        for k in range(1, rng.randint(3, 5)):
            scene, text, edit = unique.draw(
                lambda prev=scene: random_edit(prev, rng, allowed), key=lambda r: r[0].key()
            )
            items += [Text(text, {"step": k, "edit": edit}), _image_item(scene, size, step=k)]
    elif kind == "video":

        def motion():
            for _ in range(1000):
                m = make_motion(rng, split)
                if split_of(m[0]) == split:
                    return m
            return m

        # a clip is its start and end scene: a repeat would be an unlabelled duplicate document
        start, end, facts, text = unique.draw(motion, key=lambda m: f"video {m[0].key()} {m[1].key()}")
        n = rng.randint(8, 16)
        video = Video(
            data=encode_mp4(render_motion(start, end, n, *size), VIDEO_FPS),
            format="mp4",
            meta={
                "fps": VIDEO_FPS,
                "frames": n,
                "width": size[0] - size[0] % 2,
                "height": size[1] - size[1] % 2,
                "duration": n / VIDEO_FPS,
                "scene_start": start.to_dict(),
                "scene_end": end.to_dict(),
                **facts,
            },
        )
        items, meta["order"] = _ordered(rng, video, Text(text))
    elif kind == "speech":
        scene = unique.draw(lambda: random_scene(rng, split))
        text = caption(scene, rng)
        wav = (speaker or speak)(text)
        audio = Audio(
            data=wav if isinstance(wav, bytes) else b"", format="wav", meta={"transcript": text, "voice": "en"}
        )
        if not isinstance(wav, bytes):
            audio._pending = wav  # filled in by generate_world before the doc leaves it
        items = [_image_item(scene, size), audio, Text(text, {"role": "transcript"})]
    else:
        raise MMGenError(f"unknown doc kind {kind!r}; use one of {', '.join(DOC_KINDS)}")
    return Doc(items=items, meta=meta)


# -- defects ------------------------------------------------------------------------------------------
def _caption_doc(scene: Scene, text: str, size, split: str, image: Image | None = None) -> Doc:
    img = image if image is not None else _image_item(scene, size)
    return Doc(items=[img, Text(text)], meta={"kind": "caption", "split": split, "source": "shapesworld"})


def _reused_image_doc(src: Doc, scene: Scene, image: Image, rng: random.Random, size, split: str) -> Doc:
    """A document that reuses ``src``'s picture around text of another kind: questions and answers
    about it, or a caption when ``src`` is itself a QA document. The picture is the only thing the two
    share, as when a web page reuses an image under its own text. A fresh caption under a caption would
    not do: ShapesWorld's caption grammar makes two captions of one scene near-identical text, so such
    a document is just as much a near-duplicate *document* of its source (an ambiguous label)."""
    if any(t.meta.get("role") == "question" for t in src.texts):
        return _caption_doc(scene, caption(scene, rng), size, split, image=image)
    items = [image]
    for q, a, qtype in qa_pairs(scene, rng, n=rng.randint(2, 4)):
        items += [Text(q, {"role": "question", "qa_type": qtype}), Text(a, {"role": "answer"})]
    return Doc(items=items, meta={"kind": "qa", "split": split, "source": "shapesworld"})


def _facts(text: str) -> tuple:
    """What the caption grammar reads in ``text``: its object phrases and backgrounds."""
    import re

    return tuple(parse_objects(text)), tuple(re.findall(r"(\w+) background", text.lower()))


def _copy_items(doc: Doc) -> list:
    out = []
    for it in doc.items:
        if isinstance(it, Text):
            out.append(Text(it.text, json.loads(json.dumps(it.meta))))
        else:
            pending = getattr(it, "_pending", None)  # speech still being synthesised
            data = pending.result() if pending is not None else it.load()
            out.append(type(it)(data=data, format=it.format, meta=json.loads(json.dumps(it.meta))))
    return out


def _near_duplicate_image(img: Image, rng: random.Random) -> tuple[Image, str]:
    pil = img.to_pil()
    w, h = pil.size
    op = rng.choice(["jpeg", "resize", "crop"])
    if op == "jpeg":
        q = rng.randint(60, 90)
        out = Image.from_pil(pil, format="jpeg", quality=q)
        why = f"re-encoded as JPEG quality {q}"
    elif op == "resize":
        f = rng.choice([0.75, 1.25, 1.5])
        out = Image.from_pil(pil.resize((round(w * f), round(h * f)), 2))  # 2 = bilinear
        why = f"resized by {f}"
    else:
        d = max(1, w // 32)
        box = (0, 0, w, h)
        while box == (0, 0, w, h):  # an empty crop would be an exact duplicate, not a near one
            box = (rng.randint(0, d), rng.randint(0, d), w - rng.randint(0, d), h - rng.randint(0, d))
        out = Image.from_pil(pil.crop(box))
        why = f"cropped to {box}"
    out.meta = {**img.meta, "transform": why}
    out.meta.pop("width", None), out.meta.pop("height", None)
    return out, why


def _corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        keep = rng.randint(len(data) // 5, len(data) * 3 // 5)
        return data[:keep], f"truncated to {keep} of {len(data)} bytes"
    # a valid signature followed by garbage: sniffers accept it, decoders must not
    return data[:16] + rng.randbytes(max(32, len(data) - 16)), "garbage after a valid header"


def make_defective(
    dtype: str, rng: random.Random, split: str, size, sources: list[Doc], unique: UniqueScenes | None = None
) -> tuple[Doc, dict]:
    """A document with exactly one defect of type ``dtype`` and its label ``{"type", "reason", ...}``."""
    label: dict = {"type": dtype}
    unique = unique or UniqueScenes(tries=1)
    if dtype == "mismatched_caption":
        scene = unique.draw(lambda: random_scene(rng, split))
        other = random_scene(rng, split)
        while other.key() == scene.key():
            other = random_scene(rng, split)
        doc = _caption_doc(scene, caption(other, rng), size, split)
        doc.items[1].meta["describes"] = other.to_dict()
        label["reason"] = "caption describes a different scene than the image shows"
    elif dtype in ("duplicate_image", "near_duplicate_image"):
        pool = [d for d in sources if d.images and d.id not in unique.reused]
        src = rng.choice(pool or [d for d in sources if d.images])
        unique.reused.add(src.id)
        img = src.images[0]
        scene = Scene.from_dict(img.meta["scene"])
        if dtype == "duplicate_image":
            new = Image(data=img.load(), format=img.format, meta=dict(img.meta))
            label["reason"] = f"image bytes identical to an image of doc {src.id}"
        else:
            new, why = _near_duplicate_image(img, rng)
            label["reason"] = f"image of doc {src.id} {why}"
        doc = _reused_image_doc(src, scene, new, rng, size, split)
        doc.meta["split"] = src.meta.get("split", split)
        label["of"] = src.id
    elif dtype in ("duplicate_doc", "near_duplicate_doc"):
        src = rng.choice(sources)
        doc = Doc(items=_copy_items(src), meta=dict(src.meta))
        if dtype == "duplicate_doc":
            label["reason"] = f"exact copy of doc {src.id}"
        else:
            i = max(
                range(len(doc.items)), key=lambda j: len(doc.items[j].text) if isinstance(doc.items[j], Text) else -1
            )
            before = doc.items[i].text
            after = small_text_edit(before, rng)
            # An edit inside a fact word ("red" -> "rd") makes the text describe another picture, a
            # mismatched caption as much as a near duplicate: such edits are drawn again.
            while after == before or _facts(after) != _facts(before):
                after = small_text_edit(before, rng)
            doc.items[i].text = after
            ratio = difflib.SequenceMatcher(None, before, after).ratio()
            label["reason"] = f"doc {src.id} with a small text edit (similarity {ratio:.3f}), same media"
        label["of"] = src.id
    elif dtype == "corrupt_image":
        scene = unique.draw(lambda: random_scene(rng, split))
        doc = _caption_doc(scene, caption(scene, rng), size, split)
        data, why = _corrupt(doc.items[0].load(), rng)
        doc.items[0] = Image(data=data, format="png", meta={"scene": scene.to_dict()})
        label["reason"] = f"image bytes {why}"
    elif dtype == "tiny_image":
        scene = unique.draw(lambda: random_scene(rng, split))
        w, h = rng.randint(4, 12), rng.randint(4, 12)
        img = Image.from_pil(render(scene, w, h), meta={"scene": scene.to_dict()})
        doc = _caption_doc(scene, caption(scene, rng), size, split, image=img)
        label["reason"] = f"image is {w}x{h} pixels"
    elif dtype == "extreme_aspect":
        scene = unique.draw(lambda: random_scene(rng, split))
        long, short = rng.randint(160, 320), rng.randint(8, 16)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        img = Image.from_pil(render(scene, w, h), meta={"scene": scene.to_dict()})
        doc = _caption_doc(scene, caption(scene, rng), size, split, image=img)
        label["reason"] = f"image aspect ratio {max(w, h) / min(w, h):.1f}:1 ({w}x{h})"
    elif dtype in ("gibberish_text", "ngram_spam", "non_english"):
        scene = unique.draw(lambda: random_scene(rng, split))
        if dtype == "gibberish_text":
            text, label["reason"] = gibberish(rng), "text is random letter strings"
        elif dtype == "ngram_spam":
            text = ngram_spam(rng, scene)
            label["reason"] = "text repeats one n-gram"
        else:
            lang = rng.choice(sorted(FOREIGN_SENTENCES))
            text = rng.choice(FOREIGN_SENTENCES[lang])
            label["reason"], label["lang"] = f"text is in {lang}, not English", lang
        doc = _caption_doc(scene, text, size, split)
    elif dtype == "empty_item":
        scene = unique.draw(lambda: random_scene(rng, split))
        doc = _caption_doc(scene, caption(scene, rng), size, split)
        if rng.random() < 0.5:
            doc.items.append(Text(rng.choice(["", " ", "\n"])))
            label["reason"] = "a text item is empty"
        else:
            doc.items.append(Image(data=b"", format="png", meta={}))
            label["reason"] = "an image item has no bytes"
    else:
        raise MMGenError(f"unknown defect type {dtype!r}; use one of {', '.join(DEFECT_TYPES)}")
    doc.id = doc.content_id()
    return doc, label


# -- the world ----------------------------------------------------------------------------------------
def parse_mix(mix: str | dict | None) -> dict[str, float]:
    """``"caption=0.5,qa=0.2"`` (or a dict) -> normalised weights over :data:`DOC_KINDS`."""
    if mix is None or mix == "":
        return dict(DEFAULT_MIX)
    if isinstance(mix, str):
        out = {}
        for part in mix.split(","):
            if "=" not in part:
                raise MMGenError(f"bad --mix entry {part!r}: use KIND=WEIGHT, e.g. caption=0.5,qa=0.2")
            k, v = part.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise MMGenError(
                    f"bad --mix weight {v!r} for {k.strip()}: use a number, e.g. {k.strip()}=0.5"
                ) from None
        mix = out
    for k, v in mix.items():
        if k not in DOC_KINDS:
            near = difflib.get_close_matches(k, DOC_KINDS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise MMGenError(f"unknown doc kind '{k}' in mix{hint}; kinds: {', '.join(DOC_KINDS)}")
        if v < 0:
            raise MMGenError(f"mix weight for {k} is negative ({v}); use weights >= 0")
    total = sum(mix.values())
    if total <= 0:
        raise MMGenError("mix weights sum to zero; give at least one positive weight")
    return {k: v / total for k, v in mix.items() if v > 0}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def generate_world(
    n_docs: int,
    seed: int = 0,
    defect_rate: float = 0.0,
    mix: str | dict | None = None,
    size: int | tuple[int, int] = 64,
) -> Iterator[tuple[Doc, dict]]:
    """``n_docs`` (doc, label) pairs, deterministic in ``seed``. A ``defect_rate`` share of docs
    carry one labeled defect; defect types are drawn in shuffled rounds so every type appears once
    per ``len(DEFECT_TYPES)`` defective docs. Labels: ``{"id", "split", "kind", "defects"}``."""
    if not 0.0 <= defect_rate <= 1.0:
        raise MMGenError(f"defect rate must be between 0 and 1, got {defect_rate}")
    if n_docs < 0:
        raise MMGenError(f"number of docs must be >= 0, got {n_docs}")
    weights = parse_mix(mix)
    size = (size, size) if isinstance(size, int) else tuple(size)
    rng = random.Random(seed)
    sources: deque[Doc] = deque(maxlen=_SOURCE_POOL)
    cycle: list[str] = []
    unique = UniqueScenes()
    # espeak-ng runs as a subprocess: a few run in threads while the next docs are drawn, and docs
    # leave in order once their speech is in (the bytes do not depend on timing).
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    pending: deque[tuple[Doc, dict]] = deque()

    def speaker(text: str):
        return pool.submit(speak, text)

    def finish(doc: Doc, label: dict) -> tuple[Doc, dict]:
        for it in doc.audios:
            fut = getattr(it, "_pending", None)
            if fut is not None:
                it.data = fut.result()
                del it._pending
        return doc, label

    try:
        for doc, label in _draw_docs(n_docs, seed, defect_rate, weights, size, rng, sources, cycle, speaker, unique):
            pending.append((doc, label))
            if len(pending) > 16:
                yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _draw_docs(n_docs, seed, defect_rate, weights, size, rng, sources, cycle, speaker, unique):
    for i in range(n_docs):
        split = _pick(rng, SPLIT_WEIGHTS)
        defects = []
        if defect_rate > 0 and rng.random() < defect_rate:
            if not cycle:
                cycle = list(DEFECT_TYPES)
                rng.shuffle(cycle)
            dtype = cycle.pop()
            if dtype in _NEEDS_SOURCE and not any(d.images for d in sources):
                cycle.append(dtype)  # nothing to duplicate yet: keep the type for a later doc
                others = [t for t in cycle if t not in _NEEDS_SOURCE]
                dtype = others[-1] if others else rng.choice([t for t in DEFECT_TYPES if t not in _NEEDS_SOURCE])
                if others:
                    cycle.remove(dtype)
            doc, label = make_defective(dtype, rng, split, size, list(sources), unique)
            defects.append(label)
        else:
            doc = make_doc(_pick(rng, weights), rng, split, size, speaker=speaker, unique=unique)
        doc.id = f"sw{seed}-{i:07d}"
        doc.meta["world_index"] = i
        if not defects:
            sources.append(doc)
        yield doc, {"id": doc.id, "split": doc.meta["split"], "kind": doc.meta["kind"], "defects": defects}


def write_world(
    out_dir: str | Path,
    n_docs: int = 1000,
    seed: int = 0,
    defect_rate: float = 0.0,
    shard_size: int = 1000,
    mix: str | dict | None = None,
    size: int = 64,
    progress: bool = True,
) -> dict:
    """Write ``n_docs`` ShapesWorld docs as WebDataset shards ``world-NNNNNN.tar`` plus
    ``labels.jsonl`` (one row per doc, in shard order) into ``out_dir``; returns a summary."""
    import time

    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and any(out.glob("world-*.tar")):
        raise MMGenError(f"{out} already holds world shards: choose an empty --out directory or delete them")
    if shard_size < 1:
        raise MMGenError(f"shard size must be >= 1, got {shard_size}")
    if not 0.0 <= defect_rate <= 1.0:
        raise MMGenError(f"defect rate must be between 0 and 1, got {defect_rate}")
    mix = parse_mix(mix)  # fail on a bad mix before any file is created
    t0 = time.perf_counter()
    kinds, splits, defects = Counter(), Counter(), Counter()
    with (
        ShardWriter(out, prefix="world", max_docs=shard_size, mtime=0) as writer,
        open(out / "labels.jsonl", "w", encoding="utf-8") as labels,
        tqdm(total=n_docs, desc="world", unit="doc", disable=not progress) as bar,
    ):
        for doc, label in generate_world(n_docs, seed, defect_rate, mix, size):
            writer.write(doc)
            labels.write(json.dumps(label, ensure_ascii=False) + "\n")
            kinds[label["kind"]] += 1
            splits[label["split"]] += 1
            for d in label["defects"]:
                defects[d["type"]] += 1
            bar.update(1)
        shards = writer.shards
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "docs": n_docs,
        "shards": shards,
        "labels": str(out / "labels.jsonl"),
        "kinds": dict(kinds),
        "splits": dict(splits),
        "defects": dict(defects),
        "clean": n_docs - sum(defects.values()),
        "seconds": round(seconds, 2),
        "docs_per_second": round(n_docs / seconds, 1) if seconds > 0 else None,
        "heldout_pairs": sorted(map(list, HELDOUT_PAIRS)),
    }
