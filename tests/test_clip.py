"""CLIP loading/saving/encoding (open_clip local dir, transformers dir) and the tiny contrastive trainer."""

from __future__ import annotations

import json

import pytest
import torch

from mmgen.errors import MMGenError

from trainkit import assert_logged_run

MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0},
}


def _images(n=3):
    import random

    from mmgen.world import random_scene, render

    rng = random.Random(0)
    return [render(random_scene(rng, "train"), 40, 24) for _ in range(n)]


def test_save_load_encode_roundtrip(tmp_path):
    from mmgen.backbones.clip import build_open_clip, load_clip, open_clip_module, save_clip

    torch.manual_seed(0)
    model = build_open_clip(MICRO_CFG).eval()
    d = save_clip(model, tmp_path / "clip", MICRO_CFG)
    assert (d / "open_clip_config.json").is_file() and (d / "open_clip_model.safetensors").is_file()
    clip = load_clip(d)
    imgs = _images()
    a = clip.encode_image(imgs)
    t = clip.encode_text(["a red circle", "a blue square on a white background."])
    assert a.shape == (3, 32) and t.shape == (2, 32)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    # same numbers as the original model on the same pixels: weights survived the round trip
    ref = torch.nn.functional.normalize(model.encode_image(clip.pixels(imgs)), dim=-1)
    assert torch.allclose(a, ref, atol=1e-6)
    # open_clip itself reads the directory (its own local-dir format)
    oc = open_clip_module().create_model(f"local-dir:{d}")
    for k, v in oc.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    assert torch.equal(clip.encode_image(imgs), a)  # deterministic


def test_load_errors(tmp_path):
    from mmgen.backbones.clip import load_clip

    (tmp_path / "empty").mkdir()
    with pytest.raises(MMGenError, match="not a CLIP directory"):
        load_clip(tmp_path / "empty")
    with pytest.raises(MMGenError, match="no CLIP model directory"):
        load_clip(str(tmp_path / "missing"))
    with pytest.raises(MMGenError, match="cannot load open_clip model"):
        load_clip("no-such-model-name")


def test_transformers_clip_dir(tmp_path):
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from mmgen.backbones.clip import load_clip
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "a", "red", "blue", "circle", "square", "end"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path / "hf")
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(words),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 7,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "hf")
    clip = load_clip(tmp_path / "hf")
    a, t = clip.encode_image(_images(2)), clip.encode_text(["a red circle end", "a blue square end"])
    assert a.shape == (2, 8) and t.shape == (2, 8)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(t[0], t[1])


def test_train_clip_tiny(tmp_path):
    from mmgen.backbones.clip import load_clip
    from mmgen.config import load_config
    from mmgen.models.clip_train import ClipTrainConfig, phrase_separation, shapes_pairs, train_clip, zero_shot_accuracy

    cfg = load_config(
        ClipTrainConfig,
        None,
        [
            f"model={json.dumps(MICRO_CFG)}",
            "train_pairs=48",
            "eval_scenes=6",
            "steps=6",
            "batch_size=16",
            "warmup_steps=2",
            "log_every=3",
            f"out_dir={tmp_path}",
            "threads=1",
            "progress=false",
        ],
    )
    path = train_clip(cfg)
    rows = assert_logged_run(tmp_path)
    assert [r["step"] for r in rows] == [3, 6] and all(r["loss"] > 0 for r in rows)
    report = json.loads((tmp_path / "eval.json").read_text())
    # the report's numbers are what the saved model scores on the same held-out scenes
    clip = load_clip(path)
    held = shapes_pairs(cfg.eval_scenes, MICRO_CFG["vision_cfg"]["image_size"], cfg.seed, split="heldout")
    acc = zero_shot_accuracy(clip, [h[0] for h in held], [h[1] for h in held])
    assert (report["zero_shot_color_acc"], report["zero_shot_shape_acc"]) == (
        round(acc["color"], 4),
        round(acc["shape"], 4),
    )
    sep = report["phrase_separation"]
    assert sep == phrase_separation(clip)
    for attr in ("shape", "color"):
        assert sep[f"{attr}_pair_cosine_mean"] <= sep[f"{attr}_pair_cosine_max"]
    assert clip.encode_text(["a red circle"]).shape == (1, 32)
    with pytest.raises(MMGenError, match="batch_size"):
        train_clip(load_config(ClipTrainConfig, None, ["batch_size=1", f"out_dir={tmp_path}"]))


def test_clip_training_resumes_where_it_stopped(tmp_path):
    """A run stopped after 3 of 6 steps and resumed ends with the uninterrupted run's weights and log."""
    from safetensors.torch import load_file

    from mmgen.config import load_config
    from mmgen.models.clip_train import ClipTrainConfig, train_clip

    def cfg(out, **over):
        base = {"model": MICRO_CFG, "train_pairs": 48, "eval_scenes": 4, "steps": 6, "batch_size": 8}
        base.update({"warmup_steps": 2, "log_every": 1, "ckpt_every": 3, "threads": 1, "progress": False})
        base.update(out_dir=str(out), hard_negatives=0.5, **over)
        return load_config(ClipTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])

    full = train_clip(cfg(tmp_path / "full"))
    train_clip(cfg(tmp_path / "cut", steps=3))
    resumed = train_clip(cfg(tmp_path / "cut", resume=True))
    a, b = assert_logged_run(tmp_path / "full"), assert_logged_run(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "eval.json").read_text())["resumed_from"] == 3
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(str(next(full.glob("*.safetensors"))))
    wb = load_file(str(next(resumed.glob("*.safetensors"))))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cell_phrases_and_region_loss(tmp_path):
    """Each cell of a scene gets its own phrase; the region loss trains the patch tokens toward them."""
    import random

    import torch

    from mmgen.backbones.clip import build_open_clip, open_clip_module
    from mmgen.config import load_config
    from mmgen.models.clip_train import ClipTrainConfig, cell_loss, cell_phrases, train_clip
    from mmgen.world import random_scene

    scene = random_scene(random.Random(3), "train", n_objects=2)
    phrases = cell_phrases(scene)
    assert len(phrases) == 9 and phrases.count("an empty cell") == 7
    for o in scene.objects:
        assert phrases[3 * o.cell[0] + o.cell[1]] == f"a {o.size} {o.color} {o.shape}"
    torch.manual_seed(0)
    cfg = {**MICRO_CFG, "vision_cfg": {**MICRO_CFG["vision_cfg"], "image_size": 36, "patch_size": 4}}
    model = build_open_clip(cfg)
    tok = open_clip_module().get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    model.visual.output_tokens = True
    _, patches = model.visual(torch.randn(2, 3, 36, 36))
    loss = cell_loss(model, tok, patches, [phrases, phrases[::-1]])
    loss.backward()  # reaches the vision tower's blocks through the patch tokens
    assert loss.item() > 0 and model.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    out = train_clip(
        load_config(
            ClipTrainConfig,
            None,
            [
                f"model={json.dumps(cfg)}",
                "train_pairs=32",
                "eval_scenes=4",
                "steps=4",
                "batch_size=8",
                "warmup_steps=1",
                "log_every=2",
                "cell_weight=1.0",
                f"out_dir={tmp_path}",
                "threads=1",
                "progress=false",
            ],
        )
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert out.is_dir() and all(r["cell_loss"] > 0 and r["loss"] > r["cell_loss"] for r in rows)


def test_swap_attribute_changes_one_word_within_the_train_pairs():
    """A hard negative caption is the true caption with one object's colour or shape replaced, never
    by a held-out colour-shape pair, and still in the caption grammar."""
    import random

    from mmgen.world import HELDOUT_PAIRS, caption, random_scene
    from mmgen.world.text import parse_caption, swap_attribute

    rng = random.Random(5)
    seen = set()
    for _ in range(60):
        scene = random_scene(rng, "train")
        text = caption(scene, rng)
        neg = swap_attribute(text, rng)
        changed = [(a, b) for a, b in zip(text.split(), neg.split()) if a != b]
        assert len(text.split()) == len(neg.split()) and len(changed) == 1
        swapped = {p.cell: p for p in parse_caption(neg).objects}
        assert not any((p.color, p.shape) in HELDOUT_PAIRS for p in swapped.values())
        diff = [(o, swapped[o.cell]) for o in scene.objects if swapped[o.cell] != o]
        assert len(swapped) == len(scene.objects) and len(diff) == 1
        o, p = diff[0]
        seen.add("shape" if o.shape != p.shape else "color")
        assert (o.shape != p.shape) != (o.color != p.color) and o.size == p.size and o.cell == p.cell
    assert seen == {"shape", "color"}
    assert swap_attribute(text, random.Random(1)) == swap_attribute(text, random.Random(1))
    with pytest.raises(MMGenError, match="no 'a SIZE COLOR SHAPE"):
        swap_attribute("A black background.", rng)


def test_hard_negative_loss_trains_both_towers(tmp_path):
    import random

    import torch

    from mmgen.backbones.clip import build_open_clip, open_clip_module
    from mmgen.config import load_config
    from mmgen.models.clip_train import ClipTrainConfig, hard_negative_loss, train_clip

    torch.manual_seed(0)
    model = build_open_clip(MICRO_CFG)
    tok = open_clip_module().get_tokenizer("ViT-B-32", context_length=MICRO_CFG["text_cfg"]["context_length"])
    captions = [
        "A large red circle at the top, on a black background.",
        "A small blue square on the left, on a white background.",
    ]
    size = MICRO_CFG["vision_cfg"]["image_size"]
    img_f, txt_f, _ = model(torch.randn(2, 3, size, size), tok(captions))[:3]
    loss = hard_negative_loss(model, tok, img_f, txt_f, captions, random.Random(0))
    loss.backward()
    assert loss.item() > 0
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    train_clip(
        load_config(
            ClipTrainConfig,
            None,
            [
                f"model={json.dumps(MICRO_CFG)}",
                "train_pairs=32",
                "eval_scenes=4",
                "steps=4",
                "batch_size=8",
                "warmup_steps=1",
                "log_every=2",
                "hard_negatives=2.0",
                f"out_dir={tmp_path}",
                "threads=1",
                "progress=false",
            ],
        )
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 2.0 * r["hard_negative_loss"] > 0 for r in rows)


def test_phrase_separation_reads_the_one_word_pairs():
    """Pairs differing only in shape / colour, scored on a stand-in text tower whose embedding is the
    colour word alone: shape pairs are identical (cosine 1), colour pairs orthogonal (0)."""
    import torch

    from mmgen.models.clip_train import phrase_separation
    from mmgen.world import COLORS

    class ColourOnly:
        def encode_text(self, texts):
            return torch.stack([torch.eye(len(COLORS))[list(COLORS).index(t.split()[2])] for t in texts])

    assert phrase_separation(ColourOnly()) == {
        "shape_pair_cosine_mean": 1.0,
        "shape_pair_cosine_max": 1.0,
        "color_pair_cosine_mean": 0.0,
        "color_pair_cosine_max": 0.0,
    }
