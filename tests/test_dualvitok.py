"""DualViTok: shapes and determinism at several sizes, save/load, exact resume, real photos, errors,
pre-tokenization into the <sem>/<pix> layout, quantizer kinds, and the real-scale preset on meta."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgen.config import load_config
from mmgen.errors import MediaError, MMGenError

from trainkit import TEACHER_CFG, TINY_DUALVITOK, assert_logged_run, tiny_dualvitok_cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from mmgen.backbones.clip import build_open_clip, save_clip

    torch.manual_seed(0)
    return str(save_clip(build_open_clip(TEACHER_CFG), tmp_path_factory.mktemp("clip") / "clip", TEACHER_CFG))


@pytest.fixture(scope="module")
def tok(teacher_dir, tmp_path_factory):
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config

    torch.manual_seed(0)
    return build_dualvitok_from_config(tiny_dualvitok_cfg(tmp_path_factory.mktemp("t"), teacher_dir)).eval()


def scenes(n, w=32, h=32, seed=0):
    import random

    from mmgen.world import random_scene, render

    rng = random.Random(seed)
    return [render(random_scene(rng, "val"), w, h) for _ in range(n)]


@pytest.mark.parametrize("w,h", [(32, 32), (64, 32), (48, 80)])
def test_encode_decode_shapes_and_determinism(tok, w, h):
    imgs = scenes(3, w, h)
    c1 = tok.encode(imgs, size=(w, h), return_features=True)
    c2 = tok.encode(imgs, size=(w, h))
    assert c1["pix"].shape == (3, h // 8, w // 8) and c1["sem"].shape == (3, h // 16, w // 16)
    assert tok.code_shapes(w, h) == {"sem": (h // 16, w // 16), "pix": (h // 8, w // 8)}
    assert c1["sem_features"].shape == (3, 8, h // 16, w // 16) and c1["pix_features"].shape == (3, 4, h // 8, w // 8)
    assert torch.equal(c1["sem"], c2["sem"]) and torch.equal(c1["pix"], c2["pix"])
    out1, out2 = tok.decode(c2), tok.decode({"sem": c2["sem"].numpy(), "pix": c2["pix"].numpy()})
    assert [im.size for im in out1] == [(w, h)] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out1, out2))
    # batched == one by one
    single = tok.encode(imgs[1:2], size=(w, h))
    assert torch.equal(single["pix"][0], c1["pix"][1]) and torch.equal(single["sem"][0], c1["sem"][1])


def test_single_level_decoding_and_bad_codes(tok):
    c = tok.encode(scenes(2))
    assert tok.decode(c["pix"].numpy())[0].size == (32, 32)  # a bare pixel grid, as generation passes it
    assert tok.decode({"sem": c["sem"]})[0].size == (32, 32)
    with pytest.raises(MMGenError, match="pix code out of range"):
        tok.decode({"sem": c["sem"], "pix": c["pix"] + 1000})
    with pytest.raises(MMGenError, match="does not match"):
        tok.decode({"sem": c["sem"][:, :1], "pix": c["pix"]})
    with pytest.raises(MMGenError, match="multiple of 16"):
        tok.encode_tensor(torch.zeros(1, 3, 24, 32))


def test_save_load_bit_exact(tok, tmp_path):
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.dualvitok import DualViTok

    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["mmgen_type"] == "dualvitok" and "name" not in cfg["teacher"]  # self-contained: no hub lookups
    back = load_image_tokenizer(tmp_path / "tok")
    assert isinstance(back, DualViTok)
    sd1, sd2 = tok.state_dict(), back.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    imgs = scenes(4, 48, 32, seed=3)
    a, b = tok.encode(imgs, size=(48, 32)), back.encode(imgs, size=(48, 32))
    assert torch.equal(a["sem"], b["sem"]) and torch.equal(a["pix"], b["pix"])
    assert torch.equal(tok.decode_tensor(a), back.decode_tensor(b))


def test_teacher_input_downsample_sees_the_pooled_image(teacher_dir, tmp_path):
    """A tokenizer at twice its teacher's resolution: the teacher sees the 2x box-downscaled image,
    the semantic grid keeps its size in codes, and the factor survives save/load."""
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config

    torch.manual_seed(0)
    teacher = {"kind": "open_clip", "name": teacher_dir, "input_downsample": 2}
    big = build_dualvitok_from_config(
        tiny_dualvitok_cfg(tmp_path, teacher_dir, resolution=64, dualvitok={**TINY_DUALVITOK, "teacher": teacher})
    ).eval()
    assert big.teacher.patch == 16 and big.sem_downsample == 32
    assert big.code_shapes(64, 64) == {"sem": (2, 2), "pix": (8, 8)}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    small = torch.nn.functional.avg_pool2d(x, 2)
    big.teacher.input_downsample = 1  # the same tower without the pooling, fed the pooled image
    big.teacher.patch //= 2
    want = big.teacher(small)
    big.teacher.input_downsample, big.teacher.patch = 2, 16
    assert torch.allclose(big.teacher(x), want, atol=1e-6)
    big.save_pretrained(tmp_path / "tok")
    back = load_image_tokenizer(tmp_path / "tok")
    assert back.teacher.input_downsample == 2 and back.code_shapes(64, 64) == big.code_shapes(64, 64)
    with pytest.raises(MMGenError, match="input_downsample"):
        build_dualvitok_from_config(
            tiny_dualvitok_cfg(
                tmp_path / "bad",
                teacher_dir,
                dualvitok={**TINY_DUALVITOK, "teacher": {**teacher, "input_downsample": 0}},
            )
        )


def test_patch_encoder_codes_depend_only_on_their_own_pixels(teacher_dir, tmp_path):
    """pix_encoder=patch: a code is a function of its own 8x8 patch, whatever the rest of the image
    holds (the conv encoder's codes are not); it trains, and survives save/load bit-exactly."""
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config, train_dualvitok

    def build(enc):
        torch.manual_seed(0)
        return build_dualvitok_from_config(
            tiny_dualvitok_cfg(
                tmp_path / enc,
                teacher_dir,
                dualvitok={
                    **TINY_DUALVITOK,
                    "pix_encoder": enc,
                    "pix_encoder_width": 32,
                    "teacher": {"kind": "open_clip", "name": teacher_dir},
                },
            )
        ).eval()

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 8:, :] = torch.rand(2, 3, 24, 32) * 2 - 1  # change everything but the top row of patches
    for enc, local in (("patch", True), ("conv", False)):
        tok = build(enc)
        fx, fy = tok.pix_encode(x), tok.pix_encode(y)
        assert torch.equal(fx[:, :, 0], fy[:, :, 0]) is local, enc
        assert not torch.equal(fx[:, :, 1:], fy[:, :, 1:])
    cfg = tiny_dualvitok_cfg(
        tmp_path / "run",
        teacher_dir,
        dualvitok={
            **TINY_DUALVITOK,
            "pix_encoder": "patch",
            "pix_encoder_width": 32,
            "teacher": {"kind": "open_clip", "name": teacher_dir},
        },
    )
    out = train_dualvitok(cfg)
    back = load_image_tokenizer(out)
    assert back.hp["pix_encoder"] == "patch" and type(back.pix_encoder).__name__ == "PatchEncoder"
    imgs = scenes(3)
    assert torch.equal(back.encode(imgs)["pix"], load_image_tokenizer(out).encode(imgs)["pix"])
    with pytest.raises(MMGenError, match="unknown pix_encoder 'mlp'"):
        build("mlp")


@pytest.mark.parametrize("gan,text", [(0.0, 0.0), (0.1, 0.0), (0.0, 1.0)])
def test_train_resume_is_exact(teacher_dir, tmp_path, monkeypatch, gan, text):
    import mmgen.tokenizers.dualvitok_train as dt
    from mmgen.tokenizers.train import train_tokenizer

    over = {"gan_weight": gan, "gan_start": 1, "text_weight": text}
    if text:  # one semantic code per phrase cell (24 px, 3x3), dead codes restarted where the phrases fail
        over.update(
            resolution=24,
            text_prequant_weight=0.5,
            dualvitok={
                **TINY_DUALVITOK,
                "sem_merge": 1,
                "teacher": {"kind": "open_clip", "name": teacher_dir},
                "sem_quantizer": {**TINY_DUALVITOK["sem_quantizer"], "restart_sampling": "loss", "dead_code_window": 2},
            },
        )
    from mmgen.tokenizers.quantizers import Quantizer

    noted = []
    real_note = Quantizer.note_vector_losses
    monkeypatch.setattr(
        Quantizer, "note_vector_losses", lambda self, losses: noted.append(losses.shape) or real_note(self, losses)
    )
    full = train_tokenizer(tiny_dualvitok_cfg(tmp_path / "full", teacher_dir, **over))
    assert noted == ([(4, 9)] * 4 if text else [])  # each step's per-cell losses reach the semantic quantizer

    class Killed(Exception):
        pass

    real_save = dt.save_checkpoint

    def save_then_die(*args):
        path = real_save(*args)
        if args[3] == 2:
            raise Killed
        return path

    monkeypatch.setattr(dt, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "part", teacher_dir, **over))
    monkeypatch.setattr(dt, "save_checkpoint", real_save)
    part = train_tokenizer(tiny_dualvitok_cfg(tmp_path / "part", teacher_dir, **over, resume=True))
    m_full = assert_logged_run(tmp_path / "full")
    m_part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    drop = ("elapsed_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in m_full] == [
        {k: v for k, v in r.items() if k not in drop} for r in m_part
    ]
    assert [r["step"] for r in m_full] == [1, 2, 3, 4] and ("disc" in m_full[-1]) == (gan > 0)
    assert ("text" in m_full[-1]) == ("text_prequant" in m_full[-1]) == (text > 0)
    assert all(r.get("text", 1) > 0 for r in m_full)
    assert sum(r["restarted_codes"] for r in m_full) > 0
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not any("text" in k for k in a)  # the region-text head is for training only
    report = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert {"eval_psnr", "eval_sem_usage", "eval_pix_usage", "eval_teacher_cosine"} <= report.keys()
    assert ("eval_region_text_acc" in report) == (text > 0)
    assert (tmp_path / "full" / "recon.png").is_file()


def test_staged_training_keeps_the_pixel_codes(teacher_dir, tmp_path):
    """A second stage from a saved tokenizer (init_from) with the pixel encoder and codebook frozen
    retrains a resized, text-aligned semantic branch and the pixel decoder, and every pixel code
    stays exactly stage 1's."""
    from safetensors.torch import load_file

    from mmgen.backbones.clip import build_open_clip, save_clip
    from mmgen.tokenizers.base import load_image_tokenizer
    from mmgen.tokenizers.train import train_tokenizer

    first = train_tokenizer(tiny_dualvitok_cfg(tmp_path / "s1", teacher_dir))
    stage2 = {
        "init_from": str(first),
        "freeze": ["pix_encoder", "pix_quantizer"],
        "text_weight": 1.0,
        "dualvitok": {
            **TINY_DUALVITOK,
            "sem_code_dim": 12,
            "sem_swap": 0.2,
            "teacher": {"kind": "open_clip", "name": teacher_dir},
        },
    }
    second = train_tokenizer(tiny_dualvitok_cfg(tmp_path / "s2", teacher_dir, **stage2, steps=3))
    a, b = load_image_tokenizer(first), load_image_tokenizer(second)
    imgs = scenes(6)
    assert torch.equal(a.encode(imgs)["pix"], b.encode(imgs)["pix"])
    assert b.sem_quantizer.dim == 12 and a.sem_quantizer.dim == 8
    wa, wb = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    frozen = [k for k in wa if k.startswith(("pix_encoder.", "pix_quantizer.q."))]
    assert frozen and all(torch.equal(wa[k], wb[k]) for k in frozen)
    assert not torch.equal(wa["pix_decoder.conv_in.weight"], wb["pix_decoder.conv_in.weight"])  # retrained
    report = json.loads((tmp_path / "s2" / "eval.json").read_text())
    assert {"sem_quantizer", "sem_cond", "null_sem"} <= set(report["fresh_parts"])
    assert {"pix_decoder", "pix_encoder", "sem_encoder", "teacher"} <= set(report["loaded_parts"])
    assert report["frozen_parts"] == ["pix_encoder", "pix_quantizer"] and "eval_region_text_acc" in report

    with pytest.raises(MMGenError, match="freeze needs init_from"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "e1", teacher_dir, freeze=["pix_encoder"]))
    with pytest.raises(MMGenError, match="pix_encodr not a part of DualViTok"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "e2", teacher_dir, init_from=str(first), freeze=["pix_encodr"]))
    with pytest.raises(MMGenError, match="init_exclude: sem_encodr not a part"):
        train_tokenizer(
            tiny_dualvitok_cfg(tmp_path / "e5", teacher_dir, init_from=str(first), init_exclude=["sem_encodr"])
        )
    with pytest.raises(MMGenError, match="is not a saved tokenizer"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "e3", teacher_dir, init_from=str(tmp_path / "nowhere")))
    torch.manual_seed(1)
    other = str(save_clip(build_open_clip(TEACHER_CFG), tmp_path / "clip2", TEACHER_CFG))
    with pytest.raises(MMGenError, match="another teacher"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "e4", other, init_from=str(first)))


def test_region_text_options_need_the_region_text_cells(teacher_dir, tmp_path):
    from mmgen.tokenizers.train import train_tokenizer

    def cfg(name, level="sem", **over):
        dual = {
            **TINY_DUALVITOK,
            "teacher": {"kind": "open_clip", "name": teacher_dir},
            f"{level}_quantizer": {**TINY_DUALVITOK[f"{level}_quantizer"], "restart_sampling": "loss"},
        }
        return tiny_dualvitok_cfg(tmp_path / name, teacher_dir, dualvitok=dual, **over)

    with pytest.raises(MMGenError, match="needs the region-text loss"):
        train_tokenizer(cfg("a"))
    with pytest.raises(MMGenError, match="4 codes for 9 cells"):  # 32 px: 2x2 semantic codes
        train_tokenizer(cfg("b", text_weight=1.0))
    with pytest.raises(MMGenError, match="only the semantic codes have a per-code loss"):
        train_tokenizer(cfg("c", level="pix", text_weight=1.0))
    with pytest.raises(MMGenError, match="text_prequant_weight needs the region-text head"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "d", teacher_dir, text_prequant_weight=1.0))


def pruning_setup(tok):
    """A copy of ``tok`` to prune, 12 scenes, and those scenes as the uint8 batch prune_codes reads."""
    from mmgen.utils.pixels import pil_to_tensor, unit_to_uint8

    model = type(tok)(**tok.get_config())
    model.load_state_dict(tok.state_dict())
    model.eval()
    imgs = scenes(12)
    return model, imgs, unit_to_uint8(pil_to_tensor(imgs, (32, 32)))


def test_prune_codes_drops_entries_no_image_uses(tok, tmp_path):
    """Pruning keeps exactly the entries the images are encoded to, renumbered in order: the same
    images then get the renumbered codes and decode to the same pixels, and the smaller codebook
    saves and loads."""
    from mmgen.tokenizers.base import load_image_tokenizer

    model, imgs, x = pruning_setup(tok)
    before = model.encode(imgs)
    used = torch.unique(before["sem"])
    assert len(used) < 16  # the fixture's random codebook leaves entries unused
    report = model.prune_codes("sem", x)
    assert report == {"codebook_size_before": 16, "codebook_size": len(used)} and model.codebook_sizes["sem"] == len(
        used
    )
    after = model.encode(imgs)
    assert torch.equal(after["sem"], torch.searchsorted(used, before["sem"])) and torch.equal(
        after["pix"], before["pix"]
    )
    assert torch.allclose(model.decode_tensor(after), tok.decode_tensor(before), atol=1e-5)
    model.save_pretrained(tmp_path / "pruned")
    back = load_image_tokenizer(tmp_path / "pruned")
    assert back.codebook_sizes["sem"] == len(used) and torch.equal(back.encode(imgs)["sem"], after["sem"])
    from mmgen.tokenizers.train import train_tokenizer

    with pytest.raises(MMGenError, match="prune_codes takes code levels"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "bad", "unused", prune_codes=["semantic"]))
    with pytest.raises(MMGenError, match="prune_min_share must be in"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path / "bad2", "unused", prune_min_share=0.1))


def test_prune_min_share_drops_rarely_used_entries(tok):
    """With a minimum share, entries used by fewer vectors than min_share / codebook size go too, and
    the others keep their (renumbered) entries."""
    model, imgs, x = pruning_setup(tok)
    before = model.encode(imgs)["sem"]
    counts = torch.bincount(before.flatten(), minlength=16)
    rare = counts[counts > 0].min()
    assert (counts > rare).sum() >= 2  # something must stay
    min_share = float(rare + 0.5) / counts.sum().item() * 16  # just above the rarest used entry
    kept = torch.nonzero(counts > rare).flatten()
    codebook = model.sem_quantizer.q.codebook.clone()
    report = model.prune_codes("sem", x, min_share=min_share)
    assert report == {"codebook_size_before": 16, "codebook_size": len(kept)}
    after = model.encode(imgs)["sem"]
    keep_mask = counts[before] > rare
    assert torch.equal(after[keep_mask], torch.searchsorted(kept, before[keep_mask]))
    assert bool((~keep_mask).any())  # some vectors did have to move
    assert torch.allclose(model.sem_quantizer.q.codebook, codebook[kept])


def test_region_text_head_trains_the_semantic_codes(tok, teacher_dir):
    """The head scores every cell phrase; its loss reaches the semantic encoder through the codes'
    straight-through estimator, cells without a phrase (-100) are ignored, and the accuracy counts
    only known cells."""
    import random

    from mmgen.tokenizers.dualvitok_train import RegionTextHead, region_text_targets
    from mmgen.world import all_cell_phrases, cell_phrases, random_scene

    vocab = all_cell_phrases()
    assert len(vocab) == len(set(vocab)) == 1 + 2 * 7 * 4 and "a large red triangle" in vocab  # held-out pairs too
    rng = random.Random(0)
    known = [random_scene(rng, "train") for _ in range(3)]
    cfg = tiny_dualvitok_cfg("unused", teacher_dir)
    head, target = region_text_targets(cfg, known + [None])
    assert target.shape == (4, 9) and bool((target[3] == -100).all())
    assert [vocab[i] for i in target[0].tolist()] == cell_phrases(known[0])
    model = type(tok)(**tok.get_config()).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = model(x)
    loss, acc, cells = head(out["sem_q"], target)
    loss.backward()
    assert loss.item() > 0
    with torch.no_grad():  # the accuracy counts the 27 cells of the three known scenes, not the unknown one's
        hits = head.logits(out["sem_q"], 9).argmax(-1).view(4, 9)[:3] == target[:3]
    assert acc.item() == pytest.approx(hits.float().mean().item())
    # each cell's own cross-entropy (what restart_sampling=loss samples by): 0 where no phrase, mean = loss
    assert cells.shape == (4, 9) and bool((cells[3] == 0).all()) and bool((cells[:3] > 0).all())
    assert torch.allclose(cells[:3].mean(), loss)
    assert model.sem_to_code.weight.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.pix_decoder.parameters())  # it reads the codes, not the pixels
    # a perfect head on one-hot "codes": accuracy 1 over the known cells only
    perfect = RegionTextHead(len(vocab), torch.eye(len(vocab)), 50.0)
    perfect.proj.weight.data = torch.eye(len(vocab))
    perfect.proj.bias.data.zero_()
    onehot = torch.nn.functional.one_hot(target.clamp_min(0), len(vocab)).float().permute(0, 2, 1).reshape(4, -1, 3, 3)
    assert perfect(onehot, target)[1].item() == 1.0
    with pytest.raises(MMGenError, match="scene is known"):
        region_text_targets(cfg, [None, None])
    bad = tiny_dualvitok_cfg(
        "unused", teacher_dir, dualvitok={**TINY_DUALVITOK, "teacher": {"kind": "timm", "name": "x", "model_cfg": {}}}
    )
    with pytest.raises(MMGenError, match="text tower"):
        region_text_targets(bad, known)


def test_sem_swap_feeds_the_pixel_decoder_random_codes(tok):
    """sem_swap replaces that share of semantic cells by codebook vectors of random codes, seeded by
    the step's generator (resume stays exact), for the pixel decoder only."""
    model = type(tok)(**{**tok.get_config(), "sem_swap": 0.5})
    model.load_state_dict(tok.state_dict())
    model.train()
    sem_q = model.sem_quantizer.embed(torch.zeros(64, 2, 2, dtype=torch.long))
    a = model._swap_sem_codes(sem_q, torch.Generator().manual_seed(1))
    b = model._swap_sem_codes(sem_q, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed = (a != sem_q).any(1).float().mean().item()
    assert 0.35 < changed < 0.6  # half the cells drawn, ~1/16 of those draw code 0 again
    book = model.sem_quantizer.embed(torch.arange(16).view(1, 4, 4)).flatten(2)[0].T  # (16, D)
    # (cdist is computed through a matmul)
    assert torch.cdist(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]), book).min(1).values.max() < 2e-3
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x, generator=torch.Generator().manual_seed(0))
    # the text loss's view is unswapped
    assert torch.equal(out["sem_q"], model.sem_quantizer(model.sem_encode(model.teacher_features(x)))[0])


@pytest.mark.parametrize("grad", [True, False])
def test_sem_pixel_grad_decides_whether_pixels_train_the_semantic_codes(tok, grad):
    model = type(tok)(**{**tok.get_config(), "sem_pixel_grad": grad, "branch_dropout": 0.0}).train()
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    out["recon"].abs().sum().backward()
    reached = model.sem_to_code.weight.grad is not None and bool(model.sem_to_code.weight.grad.abs().sum() > 0)
    assert reached == grad
    assert model.sem_cond.weight.grad.abs().sum() > 0  # the decoder side learns the codes either way


def test_missing_teacher_is_a_clear_error(tmp_path):
    from mmgen.tokenizers.train import train_tokenizer

    with pytest.raises(MMGenError, match="mmgen train-clip"):
        train_tokenizer(tiny_dualvitok_cfg(tmp_path, str(tmp_path / "nope")))


def test_real_photos_and_undecodable_file(tok, real_dir, tmp_path):
    from mmgen.tokenizers.pretokenize import encode_image_files, target_size

    photos = sorted(p for p in real_dir.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert len(photos) >= 8
    from PIL import Image

    for p in photos:
        with Image.open(p) as im:
            w, h = target_size(tok, im.width, im.height, keep_aspect=True)
        codes = encode_image_files(tok, [p], size=(w, h))
        assert codes["pix"].shape[1:] == (h // 8, w // 8) and codes["sem"].shape[1:] == (h // 16, w // 16)
        out = tok.decode(codes)[0]
        assert out.size == (w, h) and np.asarray(out).std() > 0
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(MediaError, match="broken.jpg"):
        encode_image_files(tok, [bad])


def test_pretokenize_writes_sem_and_pix_layout(tok, tmp_path):
    from mmgen.data.code_shards import read_code_shards
    from mmgen.processing.sequence import build_sequence
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.pretokenize import pretokenize
    from mmgen.world import write_world

    tok.save_pretrained(tmp_path / "tok")
    write_world(tmp_path / "world", n_docs=12, seed=1, size=32, progress=False)
    s = pretokenize(tmp_path / "tok", str(tmp_path / "world"), tmp_path / "codes", batch_size=8, progress=False)
    assert s["docs_in"] == s["docs_written"] + s["quarantined"] and s["images_encoded"] > 0
    assert s["codebooks"] == {"sem": 16, "pix": 32}
    coded = [c for c in read_code_shards(str(tmp_path / "codes")) if c.codes]
    assert coded and all(c.sem.keys() == c.codes.keys() for c in coded)

    class Tok:  # the smallest text tokenizer build_sequence needs
        bos_token_id, eos_token_id = 1, 2

        def encode(self, text, add_special_tokens=False, split_special_tokens=False):
            return [3 + (hash(w) % 50) for w in text.split()]

    vocab = Vocab(text_size=60, codebooks=tok.codebook_sizes, max_grid=16, sem_ratio=tok.sem_ratio)
    seq = build_sequence(coded[0], Tok(), vocab)
    ids = seq["input_ids"].tolist()
    start = ids.index(vocab["<image>"])
    parsed = vocab.parse_image_block(ids[start:])
    i = next(iter(coded[0].codes))
    assert np.array_equal(parsed["pix"], coded[0].codes[i]) and np.array_equal(parsed["sem"], coded[0].sem[i])
    assert ids[start + 3] == vocab["<sem>"]


@pytest.mark.parametrize("kind", ["vq_ema", "fsq", "rvq"])
def test_other_quantizers(teacher_dir, kind, tmp_path):
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config

    q = {"kind": kind, "codebook_size": 8, "fsq_levels": [4, 4], "rvq_levels": 2}
    cfg = tiny_dualvitok_cfg(
        tmp_path,
        teacher_dir,
        dualvitok={**TINY_DUALVITOK, "teacher": {"kind": "open_clip", "name": teacher_dir}, "pix_quantizer": q},
    )
    torch.manual_seed(0)
    m = build_dualvitok_from_config(cfg)
    m(torch.rand(4, 3, 32, 32) * 2 - 1)  # a training pass (k-means init for the EMA codebooks)
    m.eval()
    assert m.codebook_sizes["pix"] == {"vq_ema": 8, "fsq": 16, "rvq": 64}[kind]
    c = m.encode(scenes(2))
    assert c["pix"].shape == (2, 4, 4) and int(c["pix"].max()) < m.codebook_sizes["pix"]
    m.save_pretrained(tmp_path / "q")
    back = load_image_tokenizer(tmp_path / "q")
    assert torch.equal(back.encode(scenes(2))["pix"], c["pix"])
    assert torch.equal(back.decode_tensor(c), m.decode_tensor(c))


def test_real_scale_preset_on_meta():
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config
    from mmgen.tokenizers.train_config import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, recipe_path("dualvitok_siglip_large", "tokenizers"))
    with torch.device("meta"):
        m = build_dualvitok_from_config(cfg, load_teacher=False).eval()
    teacher = sum(p.numel() for p in m.teacher.parameters())
    assert 300e6 < teacher < 330e6  # SigLIP-L/16 vision tower
    assert 100e6 < m.num_parameters(trainable_only=True) < 250e6
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert m.code_shapes(384, 384) == {"sem": (12, 12), "pix": (24, 24)} and m.sem_ratio == 2
    assert m.codebook_sizes == {"sem": 32768, "pix": 32768}
    c = m.encode_tensor(torch.empty(2, 3, 384, 256, device="meta"))
    assert c["sem"].shape == (2, 12, 8) and c["pix"].shape == (2, 24, 16)
    assert m.decode_tensor(c).shape == (2, 3, 384, 256)


def test_bundle_and_generation_with_dual_vocab(tok, tmp_path):
    """A DualViTok goes wherever the pixel VQ went: bundle save/load and t2i decoding through the API."""
    from mmgen.inference.generate import generate_interleaved
    from mmgen.models.bundle import Bundle, load_bundle
    from mmgen.models.lm import build_tiny_lm
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.dualvitok import DualViTok

    text = train_text_tokenizer(["a red circle on a white background", "a blue square at the top"] * 20, vocab_size=300)
    vocab = Vocab(len(text), tok.codebook_sizes, max_grid=8, sem_ratio=tok.sem_ratio)
    Bundle(build_tiny_lm(vocab, hidden=32, layers=1, heads=2, text_tokenizer=text, seed=0), text, vocab, tok, {}).save(
        tmp_path
    )
    bundle = load_bundle(tmp_path)
    assert isinstance(bundle.image_tokenizer, DualViTok)
    doc = generate_interleaved(
        bundle, "a red circle", mode="t2i", max_new_tokens=vocab.image_block_len(4, 4) - 1, seed=0, sizes=[(4, 4)]
    )
    img = doc.images[0]
    assert img.meta["codes_shape"] == [4, 4] and img.meta["sem_codes_shape"] == [2, 2]
    assert img.to_pil().size == (32, 32)
