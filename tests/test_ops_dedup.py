"""Deduplication operators driven the way the runner drives them: signature (worker), decide and
commit (parent, input order), state persisted and reloaded."""

from __future__ import annotations

import io
import json

import imagehash
import pytest
from PIL import Image as PILImage

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.ops import DocView, build_op
from mmgen.data.ops.hashing import hamming, image_hash, minhash, normalize_url, phash, shingles


def feed(op, docs):
    """(reason, duplicate_of) per verdict, per document, in input order."""
    out = []
    for d in docs:
        view = DocView(d)
        sig = op.signature(view)
        vs = op.decide(view, sig, d.id)
        for v in vs:
            if v.reason and v.item is not None:
                view.remove(v.item)
        if not any(v.reason and v.item is None for v in vs):
            op.commit(view, sig, d.id)
        out.append([(v.reason, v.duplicate_of) for v in vs])
    return out


def jpeg(pil, quality=70, size=None):
    buf = io.BytesIO()
    (pil.resize(size) if size else pil).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_doc_near_dedup_on_demo_texts(real_dir):
    texts = [json.loads(x)["text"] for x in (real_dir / "dj-demo-dedup.jsonl").read_text().splitlines() if x.strip()]
    docs = [Doc([Text(t)], id=f"d{i}") for i, t in enumerate(texts)]
    op = build_op("doc_near_dedup", params={"ngram": 1, "min_words": 5, "threshold": 0.6})
    res = feed(op, docs)
    by_text = {t[:30]: r for t, r in zip(texts, res)}
    # "Today is sunday and it's really a happy day!" repeats the first record with one word added
    assert by_text["Today is sunday and it's reall"] == [("near_duplicate_doc", "d0")]
    assert by_text["Today is Sunday and it's a hap"] == [(None, None)]
    assert by_text["Do you need a cup of coffee?"] == [(None, None)]
    # the estimate is datasketch's MinHash Jaccard, close to the true Jaccard of the shingle sets
    a, b = shingles(texts[0], 1), shingles(texts[5], 1)
    est = minhash(a, 128).jaccard(minhash(b, 128))
    assert est == pytest.approx(len(a & b) / len(a | b), abs=0.15)


def test_doc_near_dedup_state_round_trip():
    base = "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence"
    docs = [
        Doc([Text(base)], id="a"),
        Doc([Text("an entirely different text about stars, planets and moons far away")], id="b"),
    ]
    later = [Doc([Text(base.replace("old", "very old"))], id="c")]
    op = build_op("doc_near_dedup", params={"threshold": 0.6})
    feed(op, docs)
    state = json.loads(json.dumps(op.state_delta()))  # what the runner writes to state/K.json
    fresh = build_op("doc_near_dedup", params={"threshold": 0.6})
    fresh.load_state(state)
    assert feed(fresh, later) == feed(op, later) == [[("near_duplicate_doc", "a")]]


def test_phash_agrees_with_imagehash_and_finds_reencoded_copies(real_dir):
    lena = PILImage.open(real_dir / "lena.jpg")
    # same DCT and frequencies as imagehash.phash; only the median (DC left out here) differs
    for name in ("lena.jpg", "cat.jpg", "img2.jpg", "blip.jpg"):
        pil = PILImage.open(real_dir / name)
        assert hamming(phash(pil), int(str(imagehash.phash(pil)), 16)) <= 4
    assert image_hash(lena, "dhash") == int(str(imagehash.dhash(lena.convert("L"))), 16)
    copy = PILImage.open(io.BytesIO(jpeg(lena, 40, (256, 256))))
    assert hamming(phash(lena), phash(copy)) <= 4
    for other in ("cat.jpg", "img2.jpg", "img8.jpg"):
        assert hamming(phash(lena), phash(PILImage.open(real_dir / other))) > 16

    docs = [
        Doc([Text("portrait"), Image(path=str(real_dir / "lena.jpg"))], id="p"),
        Doc([Text("a cat"), Image(path=str(real_dir / "cat.jpg"))], id="c"),
        Doc([Text("again"), Image(data=jpeg(lena, 40, (300, 300))), Image(path=str(real_dir / "img2.jpg"))], id="q"),
    ]
    for method in ("phash", "dhash"):
        op = build_op("image_near_dedup", params={"radius": 6, "method": method})
        assert feed(op, docs)[2] == [("near_duplicate_image", "p"), (None, None)], method


def test_near_duplicates_inside_one_document(real_dir):
    cat = PILImage.open(real_dir / "cat.jpg")
    doc = Doc(
        [
            Image(path=str(real_dir / "cat.jpg")),
            Text("the same cat, smaller:"),
            Image(data=jpeg(cat, 50, (320, 240))),
            Image(path=str(real_dir / "img2.jpg")),
        ]
    )
    vs = build_op("image_doc_near_dedup").apply(DocView(doc))
    assert [(v.item, v.reason) for v in vs] == [(0, None), (2, "near_duplicate_image_in_doc"), (3, None)]
    assert vs[1].stats["same_as_item"] == 0


def test_url_dedup_doc_and_node(real_dir):
    assert normalize_url("HTTPS://www.Example.com/a/?utm_source=x&b=2&a=1#top") == "http://example.com/a?a=1&b=2"
    docs = [
        Doc([Text("x")], meta={"url": "https://example.com/page?id=3"}, id="a"),
        Doc([Text("y")], meta={"url": "http://www.example.com/page/?id=3&utm_medium=mail"}, id="b"),
        Doc([Text("z")], meta={"url": "https://example.com/page?id=4"}, id="c"),
        Doc([Text("no url")], id="d"),
    ]
    assert feed(build_op("url_dedup", level="doc"), docs) == [
        [(None, None)],
        [("duplicate_url", "a")],
        [(None, None)],
        [],
    ]
    lena = str(real_dir / "lena.jpg")
    imgs = [
        Doc([Image(path=lena), Image(data=b"x", meta={"src": "http://i.example.com/1.png"})], id="p"),
        Doc([Image(path=lena), Image(data=b"y", meta={"src": "http://i.example.com/2.png"})], id="q"),
    ]
    assert feed(build_op("url_dedup", level="node"), imgs) == [
        [(None, None), (None, None)],
        [("duplicate_url", "p"), (None, None)],
    ]


def _two_passes(op, docs):
    """Pass 1 (observe, state round trip through JSON), finalize, pass 2 (decide)."""
    for d in docs:
        v = DocView(d)
        sig = op.signature(v)
        assert op.decide(v, sig, d.id)[0].reason is None
        op.commit(v, sig, d.id)
    fresh = build_op(op.name, params=dict(vars(op.params)))
    fresh.load_state(json.loads(json.dumps(op.state_delta())))  # a resumed runner rebuilds the same picture
    fresh.finalize()
    return [fresh.decide(DocView(d), None, d.id)[0].reason for d in docs]


def test_top_k_and_fraction_by_meta_field():
    docs = [
        Doc([Text(f"doc {i}")], meta={"clip_score": s}, id=f"d{i}")
        for i, s in enumerate([0.31, 0.12, 0.31, 0.45, None, 0.05])
    ]
    assert _two_passes(build_op("top_k", params={"meta_field": "clip_score", "k": 2}), docs) == [
        None,
        "not_selected",
        "not_selected",
        None,
        "not_selected",
        "not_selected",
    ]  # tie 0.31: input order
    assert _two_passes(build_op("top_fraction", params={"meta_field": "clip_score", "fraction": 0.4}), docs) == [
        None,
        "not_selected",
        "not_selected",
        None,
        "not_selected",
        "not_selected",
    ]  # round(0.4 * 5) = 2
    low = build_op("top_k", params={"meta_field": "clip_score", "k": 1, "descending": False})
    assert _two_passes(low, docs) == ["not_selected"] * 5 + [None]


def test_top_k_by_an_inner_operator_stat():
    docs = [
        Doc([Text(t)], id=str(i))
        for i, t in enumerate(["short", "a much longer text than the others here", "medium length text"])
    ]
    op = build_op("top_k", params={"op": "text_length_filter", "stat": "text_len", "k": 2})
    assert _two_passes(op, docs) == ["not_selected", None, None]
    with pytest.raises(Exception, match="either params.op"):
        build_op("top_k", params={"k": 2})


def test_source_quota_one_pass_and_ranked():
    docs = [
        Doc([Text("x")], meta={"url": u, "q": q}, id=f"d{i}")
        for i, (u, q) in enumerate(
            [("https://a.com/1", 1), ("https://www.a.com/2", 3), ("https://b.org/1", 1), ("http://a.com/3", 2)]
        )
    ]
    op = build_op("source_quota", params={"max_docs": 1})
    assert not op.two_pass
    assert [r for r, _ in (x[0] for x in feed(op, docs))] == [None, "source_quota", None, "source_quota"]
    ranked = build_op("source_quota", params={"max_docs": 2, "meta_field": "q"})
    assert ranked.two_pass
    assert _two_passes(ranked, docs) == ["source_quota", None, None, None]


def test_doc_near_dedup_char_shingles_and_same_media():
    from mmgen.data.doc import Video

    cap = "A small red circle at the top left, on a black background."
    edited = cap.replace("circle", "cirle")  # one dropped character
    word = build_op("doc_near_dedup", params={"threshold": 0.8})
    char = build_op("doc_near_dedup", params={"shingle": "char", "ngram": 5, "threshold": 0.8})
    pair = [Doc([Text(cap)], id="a"), Doc([Text(edited)], id="b")]
    assert feed(word, pair)[1] == [(None, None)]  # 3 of 10 word 3-grams changed
    assert feed(char, pair)[1] == [("near_duplicate_doc", "a")]
    # the same templated text over another clip is not a copy; over the same clip it is
    clip = lambda b: Video(data=b, format="mp4")  # noqa: E731 - only the bytes are compared
    op = build_op("doc_near_dedup", params={"shingle": "char", "ngram": 5, "threshold": 0.8})
    docs = [
        Doc([clip(b"one"), Text(cap)], id="v1"),
        Doc([clip(b"two"), Text(edited)], id="v2"),
        Doc([clip(b"one"), Text(edited)], id="v3"),
    ]
    assert [r[0] for r in feed(op, docs)] == [(None, None), (None, None), ("near_duplicate_doc", "v1")]
    with pytest.raises(Exception, match="shingle"):
        build_op("doc_near_dedup", params={"shingle": "byte"})


def test_doc_near_dedup_compares_the_media_documents_arrived_with():
    """Two captions over different pictures are not copies, even after an earlier node operator
    removed both pictures; over the same picture they are."""
    cap = "A small red circle at the top left, on a black background."
    edited = cap.replace("top left", "top right")
    png = lambda colour: Image.from_pil(PILImage.new("RGB", (8, 8), colour))  # noqa: E731
    docs = [
        Doc([png("red"), Text(cap)], id="a"),
        Doc([png("blue"), Text(edited)], id="b"),
        Doc([png("red"), Text(edited)], id="c"),
    ]
    op = build_op("doc_near_dedup", params={"shingle": "char", "ngram": 5, "threshold": 0.7, "exact_images": True})
    out = []
    for d in docs:  # as the runner does after an image filter took every picture
        view = DocView(d)
        view.remove(0)
        sig = op.signature(view)
        vs = op.decide(view, sig, d.id)
        if not any(v.reason for v in vs):
            op.commit(view, sig, d.id)
        out.append([(v.reason, v.duplicate_of) for v in vs])
    assert out == [[(None, None)], [(None, None)], [("near_duplicate_doc", "a")]]


def test_scene_near_dedup_finds_cropped_copies_and_tells_scenes_apart():
    from mmgen.world.ops import uncropped_canvases
    from mmgen.world.scene import Obj, Scene, render

    scene = Scene("navy", [Obj("circle", "orange", "large", (0, 1))])
    other = Scene("navy", [Obj("square", "orange", "large", (0, 1))])  # same layout, other shape
    pic = render(scene, 64, 64)
    crop = pic.crop((0, 2, 64, 63))  # the world's near-duplicate crop that the parser cannot read
    from mmgen.world.scene_parser import parse_scene

    assert parse_scene(crop) is None and parse_scene(pic).key() == scene.key()
    canvases = uncropped_canvases(crop, 4)
    assert [c.size for c in canvases] == [(s, s) for s in range(64, 69)]
    assert any(parse_scene(c) is not None and parse_scene(c).key() == scene.key() for c in canvases)
    img = lambda p: Image.from_pil(p)  # noqa: E731
    docs = [Doc([img(pic)], id="orig"), Doc([img(render(other, 64, 64))], id="other"), Doc([img(crop)], id="crop")]
    assert feed(build_op("scene_near_dedup"), docs) == [
        [(None, None)],
        [(None, None)],
        [("near_duplicate_image", "orig")],
    ]
    # the crop kept first: the original is found by the key of the crop's uncropped canvas
    assert feed(build_op("scene_near_dedup"), docs[::-1])[2] == [("near_duplicate_image", "crop")]
    # with uncropping off, only the tight perceptual-hash fallback is left, and it misses the crop
    assert feed(build_op("scene_near_dedup", params={"uncrop": 0}), docs)[2] == [(None, None)]


def test_stopwords_shared_function_words_count_for_neither():
    op = build_op("stopwords", "doc")
    s = op.text_stats("Die Bibliothek bleibt am Sonntag leider geschlossen.")
    assert s["en_stopword_ratio"] == 0.0 and op.judge(s) == "non_english"  # "am" is German here
    assert op.judge(op.text_stats("A large blue square sits at the top left of a gray background.")) is None


@pytest.mark.parametrize("exact_images", [True, False])
def test_doc_near_dedup_finds_the_earliest_band_sharing_copy(exact_images):
    """Templated captions: the operator's verdicts equal a brute-force reading of its rule (the
    earliest kept document sharing an LSH band, at Jaccard >= threshold, with the same media), whether
    candidates come from the LSH index or, with exact_images, from the documents of the same media."""
    import random

    import numpy as np

    rng = random.Random(0)
    colors, shapes = ["red", "blue", "green", "cyan"], ["circle", "square", "cross", "triangle"]
    texts = [
        f"On a {rng.choice(colors)} background: a small {rng.choice(colors)} {rng.choice(shapes)} at the top "
        f"and a large {rng.choice(colors)} {rng.choice(shapes)} on the left."
        for _ in range(300)
    ]
    texts += [t.lower() for t in texts[:40]] + [t.replace(".", "!") for t in texts[40:80]]
    media = [[f"m{i % 50}"] if i % 3 else [] for i in range(len(texts))]
    params = {
        "shingle": "char",
        "ngram": 5,
        "num_perm": 64,
        "bands": 16,
        "threshold": 0.8,
        "min_words": 5,
        "exact_images": exact_images,
    }
    op = build_op("doc_near_dedup", params=params)
    kept: list[tuple[np.ndarray, list, str]] = []
    n_dups = 0
    for i, (text, med) in enumerate(zip(texts, media)):
        values = minhash(shingles(text, 5, "char"), 64).hashvalues
        sig = {"minhash": values, "phash": [], "media": med}
        expected = None
        for hv, m, doc_id in kept:
            band = (hv.reshape(16, -1) == values.reshape(16, -1)).all(1).any()
            if band and np.mean(hv == values) >= 0.8 and m == med:
                expected = doc_id
                break
        verdict = op.decide(None, sig, str(i))[0]
        assert verdict.duplicate_of == expected
        if expected is None:
            op.commit(None, sig, str(i))
            kept.append((values, med, str(i)))
        n_dups += expected is not None
    assert n_dups >= 20  # the lower-cased / re-punctuated copies that share their original's media


def test_a_picture_is_parsed_once_for_the_caption_check_and_the_scene_dedup(monkeypatch):
    """scene_caption_match and scene_near_dedup both need the parsed scene: one parse per picture."""
    import random

    import mmgen.world.ops as world_ops  # where both operators look the parser up
    from mmgen.world.scene import random_scene, render
    from mmgen.world.text import caption

    calls = []
    real = world_ops.parse_scene
    monkeypatch.setattr(world_ops, "parse_scene", lambda pil: calls.append(1) or real(pil))

    scene = random_scene(random.Random(3))
    doc = Doc([Image.from_pil(render(scene)), Text(caption(scene, random.Random(3)))])
    view = DocView(doc)
    match, dedup = build_op("scene_caption_match", level="node"), build_op("scene_near_dedup")
    match.apply(view)
    dedup.signature(view)
    assert len(calls) == 1
