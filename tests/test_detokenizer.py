"""Diffusion detokenizer: conditioning on code grids, CFG, schedulers, pipeline save/load, training +
exact resume, 2x mode, CLI, and the real-scale preset on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from mmgen.errors import MMGenError

from trainkit import assert_logged_run


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    from mmgen.tokenizers.vq import PixelVQ

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vq") / "tokenizer"
    PixelVQ(resolution=(32, 32), channels=(8, 16), code_dim=4, codebook_size=32, norm_groups=4).save_pretrained(d)
    return d


def tiny_pipe(sizes=(32,), names=("pix",), ppc=4, side=8):
    from mmgen.models.detokenizer import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(
        list(sizes), list(names), ppc, side, embed_dims=[4] * len(sizes), block_out_channels=(8, 16), norm_num_groups=4
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampling_shapes_determinism_and_schedulers():
    pipe = tiny_pipe()
    codes = torch.randint(0, 32, (2, 8, 8), generator=torch.Generator().manual_seed(1))

    def run(**k):
        return pipe(
            codes, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt", **k
        ).images

    a = run()
    assert a.shape == (2, 3, 32, 32) and not torch.equal(a[0], a[1])  # two code grids, two pictures
    assert torch.equal(a, run())
    assert not torch.equal(a, run(guidance_scale=1.0))  # guidance changes the result
    pipe.use_scheduler("dpm")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert run().shape == (2, 3, 32, 32)
    pil = pipe(codes[0], num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (32, 32)


def test_conditioning_is_a_list_of_grids_each_with_its_own_embedding():
    pipe = tiny_pipe(sizes=(16, 32), names=("sem", "pix"))
    sem, pix = torch.randint(0, 16, (1, 4, 4)), torch.randint(0, 32, (1, 8, 8))
    assert len(pipe.conditioner.embeds) == 2 and pipe.conditioner.embeds[0].num_embeddings == 17
    out = pipe([sem, pix], num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)  # the finest grid (8x8) x 4 px
    with pytest.raises(MMGenError, match="2 code grid"):
        pipe([pix], num_inference_steps=2)
    with pytest.raises(MMGenError, match="out of range"):
        pipe([sem, pix + 100], num_inference_steps=2)


def test_pipeline_save_load_round_trip(tmp_path):
    from mmgen.models.detokenizer import CodeConditioner, load_pipeline

    pipe = tiny_pipe()
    pipe.save_pretrained(str(tmp_path / "p"))
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["conditioner"][1] == "CodeConditioner"
    back = load_pipeline(tmp_path / "p")
    assert isinstance(back.conditioner, CodeConditioner)
    codes = torch.randint(0, 32, (1, 8, 8))
    kw = {"num_inference_steps": 2, "output_type": "pt"}
    assert torch.equal(
        pipe(codes, generator=torch.Generator().manual_seed(0), **kw).images,
        back(codes, generator=torch.Generator().manual_seed(0), **kw).images,
    )
    with pytest.raises(MMGenError, match="not a detokenizer pipeline"):
        load_pipeline(tmp_path)


def _cfg(out_dir, vq_dir, **over):
    from mmgen.config import load_config
    from mmgen.models.detokenizer_train import DetokenizerTrainConfig

    base = {
        "tokenizer": str(vq_dir),
        "train_images": 16,
        "eval_images": 2,
        "eval_steps": 2,
        "steps": 4,
        "batch_size": 4,
        "log_every": 1,
        "ckpt_every": 2,
        "out_dir": str(out_dir),
        "threads": 1,
        "progress": False,
        "model": {"embed_dims": [4], "block_out_channels": [8, 16], "norm_num_groups": 4},
    }
    base.update(over)
    return load_config(DetokenizerTrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_training_names_the_tokenizer_and_resumes_exactly(tmp_path, vq_dir):
    from safetensors.torch import load_file

    from mmgen.models.detokenizer import load_pipeline
    from mmgen.models.detokenizer_train import train_detokenizer

    full = train_detokenizer(_cfg(tmp_path / "full", vq_dir))
    pipe = load_pipeline(full)
    assert pipe.conditioner.config.tokenizer == str(vq_dir) and pipe.conditioner.config.tokenizer_type == "pixel_vq"
    assert "eval_psnr" in json.loads((tmp_path / "full" / "eval.json").read_text())
    assert (tmp_path / "full" / "samples.png").is_file()
    assert_logged_run(tmp_path / "full")

    train_detokenizer(_cfg(tmp_path / "cut", vq_dir, steps=2, eval_images=0))
    resumed = train_detokenizer(_cfg(tmp_path / "cut", vq_dir, resume=True, eval_images=0))
    a = [json.loads(ln)["loss"] for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln)["loss"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 4 and a == b
    wa = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_super_resolution_mode_doubles_the_output(tmp_path, vq_dir):
    from mmgen.models.detokenizer import load_pipeline
    from mmgen.models.detokenizer_train import train_detokenizer

    path = train_detokenizer(_cfg(tmp_path / "sr", vq_dir, scale=2, steps=1, eval_images=1))
    pipe = load_pipeline(path)
    out = pipe(torch.zeros(1, 8, 8, dtype=torch.long), num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 64, 64)  # 32x32 tokenizer, 2x


def test_decode_conditioned_pipeline_refines_the_tokenizers_own_decode(tmp_path, vq_dir):
    from mmgen.models.detokenizer import load_pipeline
    from mmgen.models.detokenizer_train import train_detokenizer
    from mmgen.tokenizers import load_image_tokenizer

    path = train_detokenizer(
        _cfg(
            tmp_path / "dec",
            vq_dir,
            scale=2,
            steps=2,
            eval_images=1,
            model={"embed_dims": [4], "block_out_channels": [8, 16], "norm_num_groups": 4, "condition_on_decode": True},
        )
    )
    pipe = load_pipeline(path)  # loads the tokenizer its conditioner names
    assert pipe.conditioner.config.decoded_channels == 3 and pipe.unet.config.in_channels == 3 + 4 + 3
    assert pipe.image_tokenizer is not None
    codes = torch.randint(0, 32, (1, 8, 8), generator=torch.Generator().manual_seed(3))

    def run(**k):
        return pipe(
            codes, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **k
        ).images

    own = run()
    assert own.shape == (1, 3, 64, 64)
    tok = load_image_tokenizer(vq_dir)
    with torch.no_grad():
        assert torch.equal(own, run(decoded=tok.decode_tensor(codes).clamp(-1, 1)))  # the same decode, passed in
    assert not torch.equal(own, run(decoded=torch.zeros(1, 3, 32, 32)))  # the decode is an input, not ignored

    bare = load_pipeline(path, tokenizer=tmp_path / "missing")  # no tokenizer: a clear error at sampling
    with pytest.raises(MMGenError, match="refines its tokenizer's decode"):
        bare(codes, num_inference_steps=2)


def test_decode_alone_conditioning_with_zero_width_code_maps():
    from mmgen.models.detokenizer import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(
        [32], ["pix"], 8, 8, embed_dims=[0], block_out_channels=(8, 16), norm_num_groups=4, decoded_channels=3
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 3 + 3  # noisy image + the decode; the codes draw no maps
    codes = torch.randint(0, 32, (1, 8, 8))
    decoded = torch.rand(1, 3, 32, 32) * 2 - 1
    out = pipe(
        codes,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
        decoded=decoded,
        generator=torch.Generator().manual_seed(0),
    ).images
    # zero-initialised residual: an untrained model returns the bicubic upscale of the decode
    up = torch.nn.functional.interpolate(decoded, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert out.shape == (1, 3, 64, 64) and torch.allclose(out, up, atol=1e-5)
    with pytest.raises(MMGenError, match="out of range"):
        pipe(codes + 100, num_inference_steps=2, decoded=decoded)  # the grid is still checked


def test_edge_weighted_loss_counts_edges_more():
    from mmgen.models.detokenizer_train import edge_map, weighted_mse

    x0 = -torch.ones(1, 3, 8, 8)
    x0[..., :, 4:] = 1  # a full black-to-white step between columns 3 and 4
    e = edge_map(x0)
    assert e.shape == (1, 1, 8, 8) and torch.equal(e[0, 0, :, 3], torch.ones(8)) and e.sum() == 8
    pred, target = torch.zeros_like(x0), torch.zeros_like(x0)
    pred[..., :, 3] = 0.5  # the same error on the edge column ...
    on_edge = weighted_mse(pred, target, x0, 16.0)
    pred2 = torch.zeros_like(x0)
    pred2[..., :, 0] = 0.5  # ... or on a flat column
    assert on_edge > weighted_mse(pred2, target, x0, 16.0)
    assert torch.isclose(weighted_mse(pred, target, x0, 0.0), torch.nn.functional.mse_loss(pred, target))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from mmgen.cli import main

    assert main(["train-detokenizer", "--help"]) == 0
    assert "super-resolution" in capsys.readouterr().out
    assert main(["train-detokenizer", "tiny_detokenizer", f"tokenizer={tmp_path}", f"out_dir={tmp_path / 'o'}"]) == 2
    assert "not a tokenizer directory" in capsys.readouterr().err


def test_real_scale_preset_builds_on_meta():
    from mmgen.config import load_config
    from mmgen.models.detokenizer import build_pipeline
    from mmgen.models.detokenizer_train import DetokenizerTrainConfig
    from mmgen.paths import recipe_path

    cfg = load_config(DetokenizerTrainConfig, recipe_path("detokenizer_large", "tokenizers"))
    m = cfg.model
    with torch.device("meta"):
        # DualViTok-like codes: a semantic and a pixel grid of 32x32 for 256px inputs, drawn at 2x.
        pipe = build_pipeline(
            [32768, 32768],
            ["sem", "pix"],
            8 * cfg.scale,
            32,
            block_out_channels=m.block_out_channels,
            layers_per_block=m.layers_per_block,
            norm_num_groups=m.norm_num_groups,
            attention=m.attention,
            scheduler=m.scheduler,
            prediction_type=m.prediction_type,
        )
    n = sum(p.numel() for p in pipe.unet.parameters())
    assert next(pipe.unet.parameters()).device.type == "meta"
    assert 50e6 < n < 400e6 and pipe.unet.config.sample_size == 512 and pipe.unet.config.in_channels == 3 + 32
