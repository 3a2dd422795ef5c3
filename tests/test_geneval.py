"""GenEval-style compositional evaluation: the metadata format, each rule on hand-made ShapesWorld scenes
judged through the scene parser, and the open-vocabulary detector's plumbing with a tiny random OWL-ViT."""

from __future__ import annotations

import json

import pytest

from mmgen.errors import MMGenError
from mmgen.eval.geneval import (
    TAGS,
    SceneParserDetector,
    judge,
    load_metadata,
    result_record,
    shapesworld_metadata,
    summarize,
    write_metadata,
)
from mmgen.world import Obj, Scene, parse_caption, render
from mmgen.world.scene import HELDOUT_PAIRS


def _verdict(entry, *objs, bg="black"):
    img = render(Scene(bg, list(objs)), 72, 72)
    return judge(entry, SceneParserDetector().detect(img, []))


def test_counting_needs_the_exact_count():
    entry = {
        "tag": "counting",
        "prompt": "",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    two = [Obj("circle", "red", "large", (0, 0)), Obj("circle", "blue", "small", (2, 2))]
    assert _verdict(entry, *two) == (True, "")
    ok, reason = _verdict(entry, *two, Obj("circle", "green", "large", (1, 1)))  # an extra circle
    assert not ok and reason == "expected circle<3, found 3"
    ok, reason = _verdict(entry, two[0])
    assert not ok and reason == "expected circle>=2, found 1"
    # another shape does not count against the circles
    assert _verdict(entry, *two, Obj("square", "green", "large", (1, 1)))[0]


def test_colour_binding_across_two_objects():
    entry = {
        "tag": "color_attr",
        "prompt": "",
        "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    }
    assert _verdict(entry, Obj("circle", "red", "large", (0, 0)), Obj("square", "blue", "large", (1, 2)))[0]
    ok, reason = _verdict(entry, Obj("circle", "blue", "large", (0, 0)), Obj("square", "red", "large", (1, 2)))
    assert not ok and "expected red circle>=1, found 0 red; and blue circle" in reason and "blue square" in reason


def test_colour_of_one_object():
    entry = {"tag": "colors", "prompt": "", "include": [{"class": "cross", "count": 1, "color": "green"}]}
    assert _verdict(entry, Obj("cross", "green", "small", (1, 1)))[0]
    assert not _verdict(entry, Obj("cross", "cyan", "small", (1, 1)))[0]


def test_position_off_by_one_cell_fails():
    entry = {
        "tag": "position",
        "prompt": "",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["right of", 0]}],
    }
    circle = Obj("circle", "red", "large", (1, 1))
    assert _verdict(entry, circle, Obj("square", "blue", "large", (0, 2)))[0]  # right column, other row: still right of
    ok, reason = _verdict(entry, circle, Obj("square", "blue", "large", (0, 1)))  # one cell up: same column
    assert not ok and reason == "expected square right of target, found above"
    assert not _verdict(entry, circle, Obj("square", "blue", "large", (1, 0)))[0]


def test_missing_target_and_unreadable_image():
    entry = {
        "tag": "position",
        "prompt": "p",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["above", 0]}],
    }
    ok, reason = _verdict(entry, Obj("square", "blue", "large", (0, 1)))
    assert not ok and reason.splitlines() == ["expected circle>=1, found 0", "no target for square to be above"]
    from PIL import Image

    det = SceneParserDetector()
    rec = result_record(
        entry, det.detect(Image.new("RGB", (72, 72), (120, 60, 10)), []), "x.png", unreadable=det.last_reason
    )
    assert rec["correct"] is False and "(detector: border colour is no palette background" in rec["reason"]
    assert set(rec) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(rec["metadata"]) == entry and json.loads(rec["details"]) == {}


def test_shapesworld_metadata_is_geneval_format_and_its_own_scenes_pass(tmp_path):
    entries = shapesworld_metadata(n_per_tag=8, seed=3)
    assert [e["tag"] for e in entries] == [t for t in TAGS for _ in range(8)]
    back = load_metadata(write_metadata(entries, tmp_path / "m.jsonl"))
    assert back == entries
    records = []
    for e in entries:
        scene = Scene.from_dict(e["scene"])
        assert parse_caption(e["prompt"]) == scene  # a caption in the world's grammar, of exactly that scene
        has_heldout = any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)
        assert has_heldout == e["heldout"]
        if e["tag"] == "counting":
            n = e["include"][0]["count"]
            assert e["exclude"] == [{"class": e["include"][0]["class"], "count": n + 1}] and len(scene.objects) == n
        dets = SceneParserDetector().detect(render(scene, 72, 72), [])
        records.append(result_record(e, dets, "img.png"))
        assert records[-1]["correct"], (e, records[-1]["reason"])  # the truth passes every rule
    s = summarize(records)
    assert s["overall"] == 1.0 and s["images"]["n"] == 48 and s["heldout_pairs"]["images"]["n"] == 12
    assert set(s["tags"]) == set(TAGS) and s["tags"]["counting"]["ci95"][1] == 1.0


def test_wrong_prompt_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a red circle"}) + "\n")
    with pytest.raises(MMGenError, match=r"bad.jsonl:1: missing tag, prompt, include"):
        load_metadata(bad)
    bad.write_text("a red circle\n")
    with pytest.raises(MMGenError, match="not JSON"):
        load_metadata(bad)
    bad.write_text(json.dumps({"tag": "shapes", "prompt": "x", "include": []}) + "\n")
    with pytest.raises(MMGenError, match="unknown tag 'shapes'"):
        load_metadata(bad)


def tiny_owlvit(path):
    """A randomly initialised OWL-ViT with its processor, built from config and saved to ``path``."""
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    cfg = OwlViTConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    OwlViTForObjectDetection(cfg).save_pretrained(path)
    ip = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    OwlViTProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def test_zero_shot_detector_plumbing(tmp_path):
    """A random OWL-ViT loaded by local path through AutoModelForZeroShotObjectDetection: detections come
    back as classes of the queries with a box and a colour, above the detector's threshold, and feed the rules."""
    from mmgen.eval.geneval import ZeroShotDetector

    det = ZeroShotDetector(tiny_owlvit(tmp_path / "owl"), threshold=0.0)
    img = render(Scene("white", [Obj("circle", "red", "large", (1, 1))]), 64, 64)
    found = det.detect(img, ["circle", "square"])
    assert len(found) == 16  # threshold 0: one box per image patch (4 x 4 patches of 8 px)
    assert {d.cls for d in found} <= {"circle", "square"}
    assert all(len(d.box) == 4 and d.color is not None for d in found)
    cut = sorted(d.score for d in found)[len(found) // 2]  # a threshold between the scores keeps those above it
    det.threshold = cut
    assert sorted(d.score for d in det.detect(img, ["circle", "square"])) == sorted(
        d.score for d in found if d.score > cut
    )
    entry = {"tag": "single_object", "prompt": "p", "include": [{"class": "circle", "count": 1}]}
    rec = result_record(entry, found)
    assert rec["correct"] == any(d.cls == "circle" for d in found)
    with pytest.raises(MMGenError, match="detector not found"):
        ZeroShotDetector(tmp_path / "missing")
