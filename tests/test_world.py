"""ShapesWorld: scenes, captions, QA, documents of every kind, labeled defects, determinism, CLI."""

import hashlib
import json
import random

import numpy as np
import pytest

from mmgen.data.doc import Doc, Text
from mmgen.data.shards import read_shard, write_shards
from mmgen.errors import MediaError, MMGenError
from mmgen.world import (
    BACKGROUNDS,
    COLORS,
    DEFECT_TYPES,
    DOC_KINDS,
    HELDOUT_PAIRS,
    Obj,
    Scene,
    generate_world,
    make_doc,
    random_scene,
    render,
    render_side,
    split_of,
    write_world,
)
from mmgen.world.scene_parser import parse_scene
from mmgen.world.text import CAPTION_TEMPLATES, caption, parse_caption, qa_pairs

NUMBERS = ["zero", "one", "two", "three"]


def _scenes_of(doc: Doc) -> list[Scene]:
    out = [Scene.from_dict(im.meta["scene"]) for im in doc.images if "scene" in im.meta]
    for v in doc.videos:
        out += [Scene.from_dict(v.meta["scene_start"]), Scene.from_dict(v.meta["scene_end"])]
    return out


def test_scene_dict_roundtrip_and_render_any_size():
    rng = random.Random(0)
    palette = {tuple(c) for c in COLORS.values()} | {tuple(c) for c in BACKGROUNDS.values()}
    for size in [(64, 64), (97, 41), (30, 200)]:
        scene = random_scene(rng, "train", n_objects=3)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        img = render(scene, *size)
        assert img.size == size
        colors = {c for _, c in img.getcolors(1 << 16)}
        assert colors <= palette  # aliased: every pixel is a palette colour
        assert len(colors) == 1 + len({o.color for o in scene.objects})
    with pytest.raises(ValueError):
        Scene("black", [Obj("circle", "red", "large", (0, 0)), Obj("cross", "blue", "small", (0, 0))]).validate()


def test_render_side_keeps_an_object_the_same_in_every_cell():
    """Rendered at render_side(36) = 72 and resized to 36 (a 3x3-code-per-cell tokenizer's size), the same
    object is the same 12x12 pixels in every cell up to the resize's clipped kernel at the border; from the
    world's plain 64 px the cells sit at fractional pixels and the blocks differ."""
    from PIL import Image as PILImage

    assert (render_side(32), render_side(36), render_side(100)) == (64, 72, 100)

    def worst_block_difference(side: int) -> int:
        worst = 0
        for shape in ("triangle", "cross"):
            blocks = []
            for r in range(3):
                for c in range(3):
                    img = render(Scene("white", [Obj(shape, "red", "large", (r, c))]), side, side)
                    a = np.asarray(img.resize((36, 36), PILImage.BICUBIC), dtype=int)
                    blocks.append(a[12 * r : 12 * (r + 1), 12 * c : 12 * (c + 1)])
            worst = max(worst, max(int(np.abs(b - blocks[4]).max()) for b in blocks))
        return worst

    assert worst_block_difference(render_side(36)) <= 8
    assert worst_block_difference(64) > 50


def test_caption_parse_roundtrip():
    rng = random.Random(1)
    for _ in range(300):
        scene = random_scene(rng, rng.choice(["train", "heldout"]))
        for t in range(len(CAPTION_TEMPLATES)):
            assert parse_caption(caption(scene, rng, template=t)) == scene
    with pytest.raises(MMGenError, match="not a ShapesWorld caption"):
        parse_caption("A cat sitting on a sofa.")


def test_qa_answers_are_exact():
    rng = random.Random(2)
    seen = set()
    for _ in range(200):
        scene = random_scene(rng)
        for q, a, kind in qa_pairs(scene, rng, n=4):
            seen.add(kind)
            if kind == "count":
                assert a == NUMBERS[len(scene.objects)]
            elif kind == "background":
                assert a == scene.background
            elif kind == "shape":
                assert a in {o.shape for o in scene.objects} and q.endswith("?")
            elif kind == "exists":
                c, s = q[len("Is there a ") : -1].split(" ")
                assert (a == "yes") == any(o.color == c and o.shape == s for o in scene.objects)
            elif kind == "count_color":
                c = q.split()[2]
                assert a == NUMBERS[sum(o.color == c for o in scene.objects)]
            else:
                assert a in {"yes", "no", "large", "small"} | set(COLORS) | {
                    "top left",
                    "top",
                    "top right",
                    "left",
                    "center",
                    "right",
                    "bottom left",
                    "bottom",
                    "bottom right",
                }
    assert seen >= {"color", "shape", "count", "exists", "position", "size", "background", "relation"}


def test_every_doc_kind_is_well_formed(tmp_path):
    rng = random.Random(3)
    docs = [make_doc(kind, rng, "train") for kind in DOC_KINDS]
    write_shards(docs, tmp_path)
    back = list(read_shard(next(tmp_path.glob("*.tar"))))
    assert [d.meta["kind"] for d in back] == list(DOC_KINDS)
    by_kind = {d.meta["kind"]: d for d in back}
    for d in back:
        for im in d.images:  # every image shows exactly its scene
            assert parse_scene(im.to_pil()) == Scene.from_dict(im.meta["scene"])
    cap = by_kind["caption"]
    assert parse_caption(cap.texts[0].text) == Scene.from_dict(cap.images[0].meta["scene"])
    qa = by_kind["qa"]
    assert [t.meta["role"] for t in qa.texts][:2] == ["question", "answer"]
    # build-up: step k's text is followed by the image after that step, and the steps chain
    bu = by_kind["buildup"]
    steps = [im.meta["step"] for im in bu.images]
    assert steps == list(range(len(steps))) and len(steps) >= 3
    assert parse_caption(bu.items[0].text) == Scene.from_dict(bu.images[0].meta["scene"])
    for k in range(1, len(steps)):
        before, after = (Scene.from_dict(bu.images[j].meta["scene"]) for j in (k - 1, k))
        assert before != after and bu.items[2 * k].meta["edit"]["op"] in {"add", "remove", "move", "recolor", "resize"}
    # video: decodes, frame count as stated, first/last frames are the start/end scenes
    v = by_kind["video"].videos[0]
    frames, times = v.frames()
    assert 8 <= len(frames) <= 16 and len(frames) == v.meta["frames"]
    assert parse_scene(frames[0]) == Scene.from_dict(v.meta["scene_start"])
    assert parse_scene(frames[-1]) == Scene.from_dict(v.meta["scene_end"])
    # speech: decodes to a second or more of non-silent audio with its transcript
    sp = by_kind["speech"]
    wav, sr = sp.audios[0].to_array()
    assert wav.shape[-1] / sr > 1.0 and np.abs(wav).max() > 0.05
    assert sp.audios[0].meta["transcript"] == sp.texts[0].text


def test_speech_without_espeak_is_a_clear_error(monkeypatch):
    import mmgen.world.media as media

    monkeypatch.setattr(media.shutil, "which", lambda name: None)
    with pytest.raises(MMGenError, match=r"espeak-ng not found: install it \(apt-get install espeak-ng\)"):
        media.speak("hello")


def test_world_is_deterministic(tmp_path):
    mix = "caption=0.4,qa=0.2,buildup=0.2,video=0.1,speech=0.1"
    runs = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        summary = write_world(tmp_path / name, 60, seed=seed, defect_rate=0.3, shard_size=25, mix=mix, progress=False)
        assert len(summary["shards"]) == 3 and sum(summary["kinds"].values()) == 60
        files = sorted(p for p in (tmp_path / name).iterdir())
        runs.append({p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in files})
    assert runs[0] == runs[1]
    assert runs[0].keys() == runs[2].keys()
    assert all(runs[0][k] != runs[2][k] for k in runs[0])
    with pytest.raises(MMGenError, match="already holds world shards"):
        write_world(tmp_path / "a", 5, progress=False)


def test_defects_labeled_and_checkable():
    pairs = list(generate_world(200, seed=11, defect_rate=0.4, mix="caption=0.6,qa=0.2,buildup=0.2"))
    by_id = {d.id: d for d, _ in pairs}
    found = {}
    for doc, label in pairs:
        assert label["id"] == doc.id and label["kind"] == doc.meta["kind"] and label["split"] == doc.meta["split"]
        if not label["defects"]:
            # clean docs: every item present, decodable, images as stated, captions true
            for it in doc.items:
                assert it.text.strip() if isinstance(it, Text) else it.load()
            for im in doc.images:
                assert parse_scene(im.to_pil()) == Scene.from_dict(im.meta["scene"])
            if doc.meta["kind"] == "caption":
                assert parse_caption(doc.texts[0].text) == Scene.from_dict(doc.images[0].meta["scene"])
            continue
        (d,) = label["defects"]
        assert d["reason"]
        found[d["type"]] = found.get(d["type"], 0) + 1
        t = d["type"]
        if t == "mismatched_caption":
            assert parse_caption(doc.texts[0].text) != Scene.from_dict(doc.images[0].meta["scene"])
        elif t == "duplicate_image":
            src = by_id[d["of"]]
            assert doc.images[0].load() in {im.load() for im in src.images} and doc.text != src.text
        elif t == "near_duplicate_image":
            src = by_id[d["of"]]
            assert doc.images[0].load() not in {im.load() for im in src.images}
            assert doc.images[0].meta["scene"] in [im.meta["scene"] for im in src.images]
        elif t == "duplicate_doc":
            src = by_id[d["of"]]
            assert doc.content_id() == src.content_id() and doc.id != src.id
        elif t == "near_duplicate_doc":
            src = by_id[d["of"]]
            assert doc.content_id() != src.content_id()
            assert [m.load() for m in doc.media] == [m.load() for m in src.media]
        elif t == "corrupt_image":
            with pytest.raises(MediaError):
                doc.images[0].to_pil()
        elif t == "tiny_image":
            assert max(doc.images[0].to_pil().size) <= 12
        elif t == "extreme_aspect":
            w, h = doc.images[0].to_pil().size
            assert max(w, h) / min(w, h) >= 8
        elif t == "empty_item":
            assert any((not it.text.strip()) if isinstance(it, Text) else not it.load() for it in doc.items)
        elif t in ("gibberish_text", "ngram_spam", "non_english"):
            with pytest.raises(MMGenError):
                parse_caption(doc.texts[0].text)
    assert set(found) == set(DEFECT_TYPES)
    assert 0.3 < sum(found.values()) / len(pairs) < 0.5
    # the only exact duplicate images are labelled ones: no natural repeats among the rest
    copies = {"duplicate_image", "duplicate_doc", "near_duplicate_doc", "empty_item"}
    dup_ids = {label["id"] for _, label in pairs if any(d["type"] in copies for d in label["defects"])}
    other_images = [im.load() for doc, _ in pairs if doc.id not in dup_ids for im in doc.images]
    assert len(set(other_images)) == len(other_images)
    assert not any(label["defects"] for _, label in generate_world(30, seed=11, defect_rate=0.0, mix="caption=1"))


def test_heldout_pairs_never_in_train():
    pairs = list(generate_world(250, seed=5, defect_rate=0.2, mix="caption=0.4,qa=0.2,buildup=0.3,video=0.1"))
    splits = {s: 0 for s in ("train", "val", "heldout")}
    for doc, label in pairs:
        splits[label["split"]] += 1
        scenes = _scenes_of(doc)
        held = [(o.color, o.shape) in HELDOUT_PAIRS for s in scenes for o in s.objects]
        if label["split"] == "heldout":
            assert any(held)
        else:
            assert not any(held), (label, [s.to_dict() for s in scenes])
        if scenes and not label["defects"]:
            assert split_of(scenes[0]) == label["split"]
    assert all(splits.values())


def test_world_cli(tmp_path, capsys):
    from mmgen.cli import main

    out = tmp_path / "w"
    assert (
        main(
            [
                "world",
                "--out",
                str(out),
                "--docs",
                "20",
                "--seed",
                "1",
                "--defect-rate",
                "0.25",
                "--mix",
                "caption=0.7,qa=0.3",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 20 == summary["docs"] and {r["kind"] for r in rows} <= {"caption", "qa"}
    docs = [d for p in sorted(out.glob("world-*.tar")) for d in read_shard(p)]
    assert [d.id for d in docs] == [r["id"] for r in rows]
    assert main(["world", "--out", str(tmp_path / "x"), "--docs", "3", "--mix", "captoin=1"]) == 2
    assert "did you mean 'caption'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
