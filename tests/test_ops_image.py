"""Image operators on the real photos (Data-Juicer's test images) and on hand-made images."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageFilter

from mmgen.data.doc import Doc, Image, Text
from mmgen.data.formats import read_records
from mmgen.data.ops import DocView, build_op
from mmgen.errors import MMGenError

PHOTOS = ["img1.png", "img2.jpg", "img3.jpg", "cat.jpg", "lena.jpg", "blip.jpg"]


@pytest.fixture(scope="module")
def dj_docs(real_dir):
    docs = list(
        read_records(str(real_dir / "dj-demo-images.jsonl"), "dj", path_map={"../../tests/ops/data/": f"{real_dir}/"})
    )
    assert len(docs) == 3 and all(isinstance(d, Doc) for d in docs)
    return docs


def photo_doc(real_dir, names):
    return Doc(items=[Text("photos")] + [Image(path=str(real_dir / n)) for n in names])


def doc_verdict(op, doc):
    [v] = [v for v in op.apply(DocView(doc)) if v.item is None]
    return v


def test_aspect_ratio_and_shape_match_dj_on_demo_images(dj_docs):
    """Data-Juicer's image_aspect_ratio_filter keeps w/h in [0.333, 3.0] (defaults) and
    image_shape_filter width/height in their ranges, with 'any' over a sample's images."""
    aspect = build_op("image_aspect_ratio_filter", params={"min_ratio": 0.7, "max_ratio": 1.4})
    shape = build_op("image_shape_filter", params={"min_width": 400, "min_height": 400})
    for doc in dj_docs:
        [img] = doc.images
        with PILImage.open(img.path) as p:
            w, h = p.size
        per = [v for v in aspect.apply(DocView(doc)) if v.item is not None]
        assert per[0].stats["aspect_ratio"] == pytest.approx(w / h, abs=1e-6)
        assert (doc_verdict(aspect, doc).reason is None) == (0.7 <= w / h <= 1.4)
        assert (doc_verdict(shape, doc).reason is None) == (w >= 400 and h >= 400)
    # img1 336x336 and img2 640x480 pass [0.7, 1.4]; img3 342x500 (0.684) fails
    assert [doc_verdict(aspect, d).reason for d in dj_docs] == [None, None, "aspect_ratio"]


def test_any_or_all_and_node_level(real_dir):
    doc = photo_doc(real_dir, ["img3.jpg", "blip.jpg"])  # 0.684 and 1.50
    any_op = build_op("image_aspect_ratio_filter", params={"min_ratio": 1.0, "max_ratio": 3.0})
    all_op = build_op("image_aspect_ratio_filter", params={"min_ratio": 1.0, "max_ratio": 3.0, "any_or_all": "all"})
    node = build_op("image_aspect_ratio_filter", level="node", params={"min_ratio": 1.0, "max_ratio": 3.0})
    assert doc_verdict(any_op, doc).reason is None
    assert doc_verdict(all_op, doc).reason == "aspect_ratio"
    assert [(v.item, v.reason) for v in node.apply(DocView(doc))] == [(1, "aspect_ratio"), (2, None)]
    with pytest.raises(MMGenError, match="any_or_all"):
        build_op("image_aspect_ratio_filter", params={"any_or_all": "some"})


def test_file_size_filter_uses_bytes_on_disk(real_dir):
    op = build_op("image_size_filter", level="node", params={"max_size": "100KB"})
    doc = photo_doc(real_dir, PHOTOS)
    got = {v.item: (v.stats["image_bytes"], v.reason) for v in op.apply(DocView(doc))}
    for i, name in enumerate(PHOTOS, start=1):
        size = os.path.getsize(real_dir / name)
        assert got[i] == (size, None if size <= 100 * 1024 else "image_file_size")
    with pytest.raises(MMGenError, match="cannot read size"):
        build_op("image_size_filter", params={"max_size": "ten megs"})


def test_blur_separates_sharp_from_blurred(real_dir):
    sharp = PILImage.open(real_dir / "lena.jpg").convert("RGB")
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    flat = PILImage.new("RGB", (128, 128), (90, 140, 200))
    doc = Doc(items=[Image.from_pil(x) for x in (sharp, blurred, flat)])
    op = build_op("image_blur", params={"min_variance": 50})
    vs = op.apply(DocView(doc))
    var = [v.stats["laplacian_var"] for v in vs]
    assert var[0] > 10 * var[1] and var[2] == 0.0
    assert [v.reason for v in vs] == [None, "blurry_image", "blurry_image"]
    # the statistic is the variance of the 4-neighbour Laplacian: check it on a known pattern
    checker = np.indices((16, 16)).sum(0) % 2 * 255
    img = Image.from_pil(PILImage.fromarray(checker.astype(np.uint8)).convert("RGB"))
    [v] = op.apply(DocView(Doc(items=[img])))
    assert v.stats["laplacian_var"] == pytest.approx(
        np.var(np.full((14, 14), 4 * 255.0) * np.where(np.indices((14, 14)).sum(0) % 2, -1, 1))
    )


def test_format_and_decode(real_dir):
    buf = io.BytesIO()
    PILImage.new("RGB", (40, 40), "red").save(buf, format="BMP")
    doc = Doc(
        items=[
            Image(path=str(real_dir / "img1.png")),
            Image(data=buf.getvalue()),
            Image(data=b"\xff\xd8\xff\xe0 not really a jpeg"),
        ]
    )
    fmt = build_op("image_format", params={"formats": ["png", "jpeg"]})
    assert [(v.stats["format"], v.reason) for v in fmt.apply(DocView(doc))] == [
        ("png", None),
        ("bmp", "image_format"),
        ("jpeg", None),
    ]
    dec = build_op("image_decode")
    vs = dec.apply(DocView(doc))
    assert [v.quarantine for v in vs] == [False, False, True] and vs[2].reason == "corrupt_image"


def test_undecodable_header_is_quarantined_not_rejected():
    doc = Doc(items=[Image(data=b"garbage bytes", format="png")])
    [v] = build_op("image_shape_filter", level="node").apply(DocView(doc))
    assert v.quarantine and v.reason == "not_an_image"
