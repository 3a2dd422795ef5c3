"""PixelVQ image tokenizer: shapes, determinism, save/load, training + exact resume, pre-tokenization, CLI."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from mmgen.config import load_config
from mmgen.errors import MediaError, MMGenError

from trainkit import assert_logged_run

TINY_MODEL = {
    "channels": [8, 16],
    "layers_per_block": 1,
    "patch_size": 2,
    "code_dim": 4,
    "codebook_size": 32,
    "norm_groups": 4,
}


def tiny_tokenizer(seed: int = 0):
    from mmgen.tokenizers.vq import PixelVQ

    torch.manual_seed(seed)
    return PixelVQ(resolution=(32, 32), **TINY_MODEL).eval()


def tiny_cfg(out_dir, **over):
    from mmgen.tokenizers.train_config import TokenizerTrainConfig

    base = {
        "synthetic_images": 80,
        "synthetic_source": "shapes",
        "resolution": 32,
        "eval_images": 8,
        "model": dict(TINY_MODEL),
        "steps": 12,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_every": 4,
        "ckpt_every": 4,
        "restart_every": 2,
        "out_dir": str(out_dir),
        "threads": 1,
        "progress": False,
    }
    base.update(over)
    return load_config(TokenizerTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def shapes(n: int, size: int = 32, seed: int = 0):
    from mmgen.tokenizers.train_data import random_shapes_image

    rng = random.Random(seed)
    return [random_shapes_image(rng, size) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tokenizer trained for a few steps (shared by several tests)."""
    from mmgen.tokenizers.train import train_tokenizer

    out = tmp_path_factory.mktemp("vq_train")
    return out, train_tokenizer(tiny_cfg(out))


# -- the model ---------------------------------------------------------------------------------------


def test_encode_decode_shapes_for_sizes_and_aspects():
    tok = tiny_tokenizer()
    assert tok.downsample == 4 and tok.codebook_size == 32
    assert tok.code_shape(64, 64) == (16, 16)
    assert tok.code_shape(96, 48) == (12, 24)
    assert tok.code_shape(30, 50) == (12, 8)  # rounded to the downsampling factor
    for w, h in [(32, 32), (48, 24), (20, 36)]:
        imgs = shapes(2, 40)
        codes = tok.encode(imgs, size=(w, h))
        assert codes.dtype == torch.int64 and tuple(codes.shape) == (2, *tok.code_shape(w, h))
        assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
        out = tok.decode(codes)
        assert len(out) == 2 and out[0].size == tok.image_size_for(w, h) and out[0].mode == "RGB"
    one = tok.decode(codes[0].numpy())  # a single (h, w) grid from numpy works too
    assert len(one) == 1


def test_encode_is_deterministic():
    tok = tiny_tokenizer()
    imgs = shapes(4)
    a, b = tok.encode(imgs), tok.encode(imgs)
    assert torch.equal(a, b)
    assert torch.equal(tiny_tokenizer().encode(imgs), a)  # same seed, same weights, same codes


def test_save_load_round_trip_is_bit_identical(tmp_path):
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.vq import PixelVQ

    tok = tiny_tokenizer()
    imgs = shapes(3)
    tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["mmgen_type"] == "pixel_vq" and cfg["codebook_size"] == 32
    loaded = load_image_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PixelVQ) and not loaded.training
    codes = tok.encode(imgs)
    assert torch.equal(loaded.encode(imgs), codes)
    with torch.no_grad():
        assert torch.equal(loaded.decode_tensor(codes), tok.decode_tensor(codes))


def test_tokenizers_save_and_load_as_hub_models(tmp_path):
    """PyTorchModelHubMixin: the class's own from_pretrained reads what save_pretrained wrote (with a model
    card), a missing weight fails instead of loading half a model, and an unknown type is one clear line."""
    from safetensors.torch import load_file, save_file

    from mmgen.tokenizers import ImageTokenizer, load_image_tokenizer, register_tokenizer
    from mmgen.tokenizers.vq import PixelVQ

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "library_name: mmgen" in (tmp_path / "tok" / "README.md").read_text()
    direct = PixelVQ.from_pretrained(tmp_path / "tok")
    assert direct.fingerprint() == tok.fingerprint() == load_image_tokenizer(tmp_path / "tok").fingerprint()
    assert not direct.training

    weights = load_file(str(tmp_path / "tok" / "model.safetensors"))
    weights.pop(next(k for k in weights if k.startswith("decoder.")))
    save_file(weights, str(tmp_path / "tok" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="[Mm]issing"):
        load_image_tokenizer(tmp_path / "tok")

    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**cfg, "mmgen_type": "no_such_tokenizer"}))
    with pytest.raises(MMGenError, match="unknown tokenizer type 'no_such_tokenizer'"):
        load_image_tokenizer(tmp_path / "tok")
    with pytest.raises(MMGenError, match="not an ImageTokenizer subclass"):
        register_tokenizer(ImageTokenizer)


def test_out_of_range_codes_and_bad_tensors_are_clear_errors():
    tok = tiny_tokenizer()
    with pytest.raises(MMGenError, match="out of range"):
        tok.decode(np.full((8, 8), 32))
    with pytest.raises(MMGenError, match="out of range"):
        tok.decode_tensor(torch.full((1, 8, 8), -1))
    with pytest.raises(MMGenError, match="multiple of the downsampling factor"):
        tok.encode_tensor(torch.zeros(1, 3, 30, 32))


def test_undecodable_file_is_a_clear_error(tmp_path):
    from mmgen.tokenizers.pretokenize import encode_image_files

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(MediaError, match="broken.png"):
        encode_image_files(tiny_tokenizer(), [bad])
    with pytest.raises(MediaError, match="not found"):
        encode_image_files(tiny_tokenizer(), [tmp_path / "missing.jpg"])


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    from mmgen.tokenizers.vq import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).train()
    z = torch.randn(2, 4, 4, 4)
    vq(z)  # first batch seeds the codebook from the data
    assert bool(vq.initialized)
    # A batch of one repeated vector: every code but one goes unused and its usage decays.
    z_same = torch.ones(2, 4, 4, 4)
    for _ in range(60):
        _, codes, stats = vq(z_same)
    assert len(codes.unique()) == 1 and stats["perplexity"].item() == pytest.approx(1.0)
    before = vq.embedding.detach().clone()
    vq._recent = torch.nn.functional.normalize(torch.randn(32, 4), dim=-1)
    dead = vq.restart_dead_codes(0.03, generator=torch.Generator().manual_seed(0))
    assert dead.numel() == 15
    changed = (vq.embedding.detach() != before).any(dim=1)
    assert changed[dead].all() and int(changed.sum()) == 15
    # Each restarted code sits (up to a little noise) on one of the recent encoder outputs.
    dist = torch.cdist(vq.embedding.detach()[dead], vq._recent).min(dim=1).values
    assert (dist < 0.1).all()


@pytest.mark.parametrize("sampling", ["error", "uniform"])
def test_simvq_restarts_dead_codes_where_the_codebook_fits_worst(sampling):
    """restart_sampling=error puts dead SimVQ codes on the vectors the codebook fits worst (a rare
    far cluster), not on the flat majority that one code already holds; uniform may pick either."""
    from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig

    torch.manual_seed(0)
    q = Quantizer(
        QuantizerConfig(kind="simvq", codebook_size=16, dead_code_threshold=0.5, restart_sampling=sampling), 4
    )
    common = q.q.codebook[0].detach()
    far = common + 5.0 + 0.1 * torch.randn(8, 4)  # 8 "edge" vectors no code is near
    q._recent = torch.cat([common.expand(248, 4), far])
    q.usage.zero_()
    q.usage[0] = 1.0  # every code but the one on the majority is dead
    restarted = q.restart_dead_codes(torch.Generator().manual_seed(0))
    assert restarted == 15
    cb = q.q.codebook.detach()
    assert torch.allclose(cb[0], common)  # the live code is left alone
    on_far = int((torch.cdist(cb[1:], far).min(1).values < 1e-3).sum())
    on_common = int((torch.cdist(cb[1:], common[None]).min(1).values < 1e-3).sum())
    assert on_far + on_common == 15  # every restarted code sits on a recent encoder output
    assert (on_far == 15) if sampling == "error" else (on_common > on_far)
    with pytest.raises(MMGenError, match="restart_sampling"):
        Quantizer(QuantizerConfig(kind="simvq", restart_sampling="kmeans"), 4)


@pytest.mark.parametrize("rtol", [0.0, 1e-2])
def test_simvq_restart_rtol_bounds_the_frozen_row_of_a_near_singular_transform(rtol):
    """A SimVQ restart solves frozen @ W.T = target. With W nearly singular the exact solve (rtol 0)
    hits the target through a huge frozen row, which any later change of W then throws far; with
    restart_rtol the row stays small and the code lands on the part of the target that W reaches."""
    from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig

    torch.manual_seed(0)
    q = Quantizer(
        QuantizerConfig(
            kind="simvq", codebook_size=8, dead_code_threshold=0.5, restart_sampling="uniform", restart_rtol=rtol
        ),
        4,
    )
    with torch.no_grad():
        q.q.code_transform.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-5])))
    target = torch.ones(4)
    q._recent = target[None]
    q.usage.fill_(1.0)
    q.usage[3] = 0.0
    assert q.restart_dead_codes(torch.Generator().manual_seed(0)) == 1
    row, code = q.q.frozen_codebook[3], q.q.codebook[3].detach()
    if rtol == 0:
        assert torch.allclose(code, target, atol=1e-3) and float(row.norm()) > 1e4
    else:
        assert torch.allclose(code, torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=1e-4) and float(row.norm()) < 2
    with pytest.raises(MMGenError, match="restart_rtol"):
        Quantizer(QuantizerConfig(kind="simvq", restart_rtol=-0.1), 4)
    with pytest.raises(MMGenError, match="restart_rtol"):
        Quantizer(QuantizerConfig(kind="fsq", restart_rtol=0.01), 4)


def test_simvq_loss_restarts_go_where_the_noted_losses_are():
    """restart_sampling=loss puts dead codes on the vectors whose noted training loss is high (two
    classes sharing one code fit it closely, so the residual cannot find them); with no losses noted
    for the last forward it falls back to error sampling; a loss count that does not match is an error."""
    from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig

    torch.manual_seed(0)
    q = Quantizer(
        QuantizerConfig(kind="simvq", codebook_size=16, dead_code_threshold=0.5, restart_sampling="loss"), 4
    ).train()
    z = torch.randn(2, 4, 4, 4)
    q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    losses = torch.zeros(2, 4, 4)
    losses[1, 2, 3] = 1.0  # the one vector the trainer's task gets wrong
    q.note_vector_losses(losses)
    q.usage.fill_(1.0)
    q.usage[[3, 7]] = 0.0
    assert q.restart_dead_codes(torch.Generator().manual_seed(0)) == 2
    target = flat[1 * 16 + 2 * 4 + 3]
    assert torch.allclose(q.q.codebook[3], target, atol=1e-4) and torch.allclose(q.q.codebook[7], target, atol=1e-4)
    q(z)  # a new forward forgets the losses: error sampling, onto some recent vector
    q.usage[5] = 0.0
    assert q.restart_dead_codes(torch.Generator().manual_seed(0)) == 1
    assert float(torch.cdist(q.q.codebook[5:6], flat).min()) < 1e-3
    with pytest.raises(MMGenError, match="3 vector losses for 32"):
        q.note_vector_losses(torch.zeros(3))


def test_simvq_dead_code_window_spares_rare_codes():
    """With dead_code_window, a code is dead only after that many forwards without a vector, however
    low its usage EMA (a rare object's code); the idle counts are saved, follow pruning, and the window
    is refused for codebooks mmgen does not restart."""
    from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig

    torch.manual_seed(0)
    q = Quantizer(QuantizerConfig(kind="simvq", codebook_size=8, dead_code_window=3), 4).train()
    cb = q.q.codebook.detach()
    z = lambda codes: cb[codes].T.reshape(1, 4, 1, -1)  # noqa: E731 -- vectors exactly on the given codes
    q(z([0, 1, 2]))
    for _ in range(2):
        q(z([0, 1]))
    assert q.idle.tolist() == [0, 0, 2, 3, 3, 3, 3, 3]
    q.usage.fill_(0.0)  # the EMA alone would call every code dead
    assert q.restart_dead_codes(torch.Generator().manual_seed(0)) == 5 and q.idle.tolist() == [0, 0, 2, 0, 0, 0, 0, 0]
    assert "idle" in q.state_dict()
    q.keep_codes(torch.tensor([0, 2, 5]))
    assert q.idle.shape == (3,) and q.codebook_size == 3
    with pytest.raises(MMGenError, match="dead_code_window"):
        Quantizer(QuantizerConfig(kind="fsq", dead_code_window=5), 4)
    with pytest.raises(MMGenError, match="dead_code_window"):
        Quantizer(QuantizerConfig(kind="simvq", dead_code_window=-1), 4)


def test_foreground_weighting_targets_the_objects_of_a_scene():
    from mmgen.tokenizers.losses import foreground_mask, pixel_losses
    from mmgen.tokenizers.train_config import TokenizerTrainConfig
    from mmgen.world import Obj, Scene, render

    scene = Scene("white", [Obj("square", "blue", "large", (1, 1))])
    pil = render(scene, 64, 64)
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = foreground_mask(x)[0, 0]
    truth = torch.from_numpy((np.array(pil) != 255).any(axis=2))
    assert torch.equal(mask.bool(), truth) and 0.05 < truth.float().mean() < 0.2
    # painting the background everywhere: the weighted loss charges the missed object far more
    recon = torch.ones_like(x)
    plain = pixel_losses(recon, x, TokenizerTrainConfig(foreground_weight=0.0))
    weighted = pixel_losses(recon, x, TokenizerTrainConfig(foreground_weight=8.0))
    assert plain["l1"].item() == pytest.approx((recon - x).abs().mean().item())
    assert weighted["l1"].item() == pytest.approx(9 * plain["l1"].item(), rel=1e-5)  # all error is on the object
    assert weighted["rec"] > plain["rec"]


# -- training ----------------------------------------------------------------------------------------


def test_training_lowers_loss_and_writes_metrics_and_eval(trained):
    from mmgen.tokenizers import load_image_tokenizer

    out, tok_dir = trained
    rows = assert_logged_run(out)  # metrics.jsonl, TensorBoard and loss.png
    assert [r["step"] for r in rows] == [4, 8, 12]
    for key in ("loss", "recon", "commitment", "codebook", "usage", "perplexity", "psnr", "lr"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["usage"] > 0 and rows[-1]["perplexity"] > 1  # more than one code in use: no collapse
    report = json.loads((out / "eval.json").read_text())
    assert report["eval_images"] == 8 and report["train_images"] == 72 and report["data"]["synthetic"] == 80
    assert report["eval_psnr"] > 0 and report["eval_codebook_usage"] > 0 and report["eval_perplexity"] > 1
    assert (out / "recon.png").is_file()
    assert tok_dir == out / "tokenizer"
    tok = load_image_tokenizer(tok_dir)
    assert tuple(tok.encode(shapes(2)).shape) == (2, 8, 8)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import mmgen.tokenizers.train as tr
    from mmgen.utils.checkpoints import latest_checkpoint

    full = tr.train_tokenizer(tiny_cfg(tmp_path / "full", steps=8, restart_every=3))

    class Killed(Exception):
        pass

    real_save = tr.save_checkpoint

    def save_then_die(ckpt_dir, model, opt, step, keep):
        path = real_save(ckpt_dir, model, opt, step, keep)
        if step == 4:
            raise Killed
        return path

    monkeypatch.setattr(tr, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        tr.train_tokenizer(tiny_cfg(tmp_path / "cut", steps=8, restart_every=3))
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000004"
    resumed = tr.train_tokenizer(tiny_cfg(tmp_path / "cut", steps=8, restart_every=3, resume=True))

    def losses(d):
        return [
            {k: r[k] for k in ("step", "loss", "recon", "commitment", "perplexity", "usage")}
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        ]

    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_reads_images_from_doc_shards_and_folders(tmp_path):
    from mmgen.data.doc import Doc, Image, Text
    from mmgen.data.shards import write_shards
    from mmgen.tokenizers.train_data import load_training_images

    docs = [
        Doc([Text("a scene"), Image.from_pil(im), Image.from_pil(im2)]) for im, im2 in zip(shapes(3), shapes(3, seed=1))
    ]
    docs.append(Doc([Image(data=b"\x89PNG\r\n\x1a\nbroken", format="png")]))
    shard_dir = tmp_path / "shards"
    write_shards(docs, shard_dir)
    folder = tmp_path / "imgs"
    folder.mkdir()
    shapes(1, 48)[0].save(folder / "a.png")
    shapes(1, 20)[0].resize((40, 20)).save(folder / "wide.jpg")
    (folder / "notes.txt").write_text("not an image")
    cfg = tiny_cfg(tmp_path / "out", inputs=[str(shard_dir)], image_dirs=[str(folder)], synthetic_images=0)
    x, stats = load_training_images(cfg)
    assert tuple(x.shape) == (8, 3, 32, 32) and x.dtype == torch.uint8
    assert stats["from_shards"] == 6 and stats["from_dirs"] == 2 and stats["undecodable"] == 1


# -- pre-tokenization --------------------------------------------------------------------------------


def _wav_bytes() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(800, dtype=np.float32), 8000, format="WAV")
    return buf.getvalue()


def test_pretokenize_quarantines_bad_records_and_counts_add_up(trained, tmp_path):
    from mmgen.data.code_shards import read_code_shards
    from mmgen.data.doc import Audio, Doc, Image, Text
    from mmgen.data.shards import write_shards
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.pretokenize import pretokenize

    _, tok_dir = trained
    imgs = shapes(5, 32, seed=7)
    docs = [
        Doc([Text("one"), Image.from_pil(imgs[0]), Text("two"), Image.from_pil(imgs[1])]),
        Doc([Text("broken"), Image(data=b"\x89PNG\r\n\x1a\ngarbage", format="png")]),
        Doc([Text("just text")]),
        Doc([Image.from_pil(imgs[2]), Audio(data=_wav_bytes(), format="wav")]),
        Doc([Image.from_pil(imgs[3], format="jpeg")]),
    ]
    shard_dir = tmp_path / "in"
    write_shards(docs, shard_dir)
    (shard_dir / "zz-broken.tar").write_bytes(b"not a tar file at all")  # -> a BadRecord
    out = tmp_path / "codes"
    summary = pretokenize(tok_dir, str(shard_dir), out, batch_size=2, progress=False)

    assert summary["docs_in"] == 6
    assert summary["docs_written"] == 4 and summary["quarantined"] == 2
    assert summary["docs_in"] == summary["docs_written"] + summary["quarantined"]
    assert summary["quarantine_reasons"] == {"undecodable_image": 1, "corrupt_tar": 1}
    assert summary["images_encoded"] == 4 and summary["audio_items_without_codes"] == 1
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in q) == ["corrupt_tar", "undecodable_image"]
    assert json.loads((out / "summary.json").read_text())["docs_written"] == 4

    tok = load_image_tokenizer(tok_dir)
    coded = list(read_code_shards(summary["shards"]))
    assert len(coded) == 4
    first = coded[0]
    assert sorted(first.codes) == [1, 3] and first.codes[1].dtype == np.int16 and first.codes[1].shape == (8, 8)
    assert np.array_equal(first.codes[1], tok.encode([imgs[0]])[0].numpy())
    assert np.array_equal(first.codes[3], tok.encode([imgs[1]])[0].numpy())
    assert coded[1].codes == {}  # text only
    assert sorted(coded[2].codes) == [0]  # the audio item has no codes yet


def test_keep_aspect_encodes_at_the_image_aspect(trained, tmp_path):
    from mmgen.data.code_shards import read_code_shards
    from mmgen.data.doc import Doc, Image
    from mmgen.data.shards import write_shards
    from mmgen.tokenizers.pretokenize import pretokenize

    _, tok_dir = trained
    write_shards([Doc([Image.from_pil(shapes(1, 64)[0].resize((128, 32)))])], tmp_path / "in")
    s = pretokenize(tok_dir, str(tmp_path / "in"), tmp_path / "out", keep_aspect=True, progress=False)
    (cd,) = list(read_code_shards(s["shards"]))
    h, w = cd.codes[0].shape
    assert w > h and h * w == pytest.approx(64, rel=0.15)


def test_real_photos_encode_and_decode(trained, real_dir):
    from PIL import Image as PILImage

    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.pretokenize import encode_image_files

    tok = load_image_tokenizer(trained[1])
    codes = encode_image_files(tok, [real_dir / "img1.png", real_dir / "cat.jpg"])
    assert tuple(codes.shape) == (2, 8, 8)
    out = tok.decode(codes)
    assert [im.size for im in out] == [(32, 32), (32, 32)]
    arr = np.asarray(out[1], dtype=np.float32)
    assert np.isfinite(arr).all() and arr.std() > 0
    with PILImage.open(real_dir / "cat.jpg") as cat:  # 640x480 at its own aspect
        wide = tok.encode([cat], size=(48, 36))
    assert tuple(wide.shape) == (1, 9, 12) and tok.decode(wide)[0].size == (48, 36)


# -- recipe and CLI ----------------------------------------------------------------------------------


def test_tiny_recipe_loads_and_builds_the_preset():
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.train import build_model
    from mmgen.tokenizers.train_config import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, recipe_path("tiny_vq", "tokenizers"))
    model = build_model(cfg)
    assert cfg.resolution == 32 and model.code_shape(32, 32) == (8, 8) and model.downsample == 4
    assert 256 <= model.codebook_size <= 512 and model.num_parameters() < 5_000_000
    with pytest.raises(MMGenError, match="did you mean 'steps'"):
        load_config(TokenizerTrainConfig, recipe_path("tiny_vq", "tokenizers"), ["stepz=3"])


def test_cli_train_and_tokenize(tmp_path, capsys):
    import yaml

    from mmgen.cli import main
    from mmgen.data.doc import Doc, Image
    from mmgen.data.shards import write_shards

    recipe = tmp_path / "r.yaml"
    cfg = tiny_cfg(tmp_path / "run", steps=2, synthetic_images=24, eval_images=4)
    from mmgen.config import to_dict

    recipe.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train-tokenizer", str(recipe), "steps=3", "log_every=1"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    tok_dir = tmp_path / "run" / "tokenizer"
    write_shards([Doc([Image.from_pil(im)]) for im in shapes(3)], tmp_path / "in")
    assert (
        main(
            ["tokenize", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "codes")]
        )
        == 0
    )
    assert "3 docs in: 3 written, 0 quarantined" in capsys.readouterr().out
    assert (
        main(
            [
                "tokenize",
                "--tokenizer",
                str(tmp_path / "nope"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "codes2"),
            ]
        )
        == 2
    )
    assert "not a tokenizer directory" in capsys.readouterr().err
    assert main(["train-tokenizer", str(recipe), "lr=-1"]) == 2
    assert main(["train-tokenizer", "no_such_recipe"]) == 2


def test_bf16_training_keeps_the_code_search_in_float32(tmp_path):
    """precision=bf16 autocasts the model's pass; the quantizers still search and return float32, so a
    pass under autocast picks the codes a float32 pass picks, and training writes a float32 tokenizer."""
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig
    from mmgen.tokenizers.train import train_tokenizer

    torch.manual_seed(0)
    z = torch.randn(4, 8, 5, 5)
    for q in (Quantizer(QuantizerConfig(kind="simvq", codebook_size=64), 8).eval(), tiny_tokenizer().quantizer):
        dim = q.dim if hasattr(q, "dim") else 4
        zz = z[:, :dim]
        plain, rounded = q(zz), q(zz.bfloat16().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = q(zz)
            cast_bf16 = q(zz.bfloat16())  # an encoder under autocast hands over bf16 features
        assert torch.equal(plain[1], cast[1]) and cast[0].dtype == torch.float32
        assert torch.equal(rounded[1], cast_bf16[1]) and cast_bf16[0].dtype == torch.float32
    tok_dir = train_tokenizer(tiny_cfg(tmp_path / "bf16", steps=4, precision="bf16"))
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((tmp_path / "bf16" / "eval.json").read_text())["precision"] == "bf16"
    tok = load_image_tokenizer(tok_dir)
    assert all(p.dtype == torch.float32 for p in tok.parameters())
    with pytest.raises(MMGenError, match="precision"):
        train_tokenizer(tiny_cfg(tmp_path / "bad", precision="fp8"))
