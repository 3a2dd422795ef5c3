"""Training the diffusion detokenizer on the codes of a saved image tokenizer (plain PyTorch).

    cfg = load_config(DetokenizerTrainConfig, "tokenizers/tiny_detokenizer.yaml", ["tokenizer=runs/vq/tokenizer"])
    pipeline_dir = train_detokenizer(cfg)

Data: ShapesWorld scenes (train split) rendered twice, at the tokenizer's resolution (encoded once, up
front, into code grids) and at ``scale`` times it (the target). ``scale: 2`` trains the 2x
super-resolution decoder; since the renders are exact at any size, the high-resolution target is
true detail, not an upsampled guess.

Objective: the diffusers noise schedule's ``add_noise``, the UNet predicts ``prediction_type``
("sample": the clean image, which converges fastest when the codes pin the image down, as here;
"epsilon" and "v_prediction" also work), MSE. A ``cond_drop`` share of items gets null codes so that
sampling can use classifier-free guidance.

Resumable and exact: step N's batch, timesteps, noise and condition drops come from a generator seeded
by (seed, N); checkpoints are safetensors + JSON.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.errors import MMGenError
from mmgen.models.detokenizer_set import grid_spec
from mmgen.tokenizers import load_image_tokenizer
from mmgen.tokenizers.train_data import square_image
from mmgen.tokenizers.vq import psnr
from mmgen.utils.checkpoints import prepare_run_dir, resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.pixels import tensor_to_pil, uint8_to_unit
from mmgen.utils.schedules import lr_scheduler
from mmgen.world import random_scene, render


@dataclass
class DetokenizerModelConfig:
    embed_dims: list[int] = field(default_factory=list)  # per code grid; empty: 16 each
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False
    prediction_type: str = "sample"
    scheduler: str = "ddim"  # the sampler saved with the pipeline (ddim, dpm, ddpm)
    # Also condition on the tokenizer's own decode of the codes (upsampled): the UNet then learns the
    # detail the VQ decoder misses instead of the whole decoder (see mmgen.models.detokenizer).
    condition_on_decode: bool = False


@dataclass
class DetokenizerTrainConfig:
    tokenizer: str = "runs/tokenizer/tiny_vq/tokenizer"  # directory of a saved image tokenizer
    # Which of the tokenizer's code grids condition the pipeline (empty: all of them). A generated
    # picture has only the grids its LM writes: the quick start's LM writes pixel codes alone.
    grids: list[str] = field(default_factory=list)
    # A bundle to train for: its image tokenizer and the grids its LM writes (tokenizer and grids are
    # then taken from it), and the trained pipeline is added to it as detokenizer/x{scale}/.
    bundle: str = ""
    scale: int = 1  # output size / tokenizer resolution: 2 trains the 2x super-resolution decoder
    train_images: int = 2000
    eval_images: int = 8
    model: DetokenizerModelConfig = field(default_factory=DetokenizerModelConfig)
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    cond_drop: float = 0.1
    # Per-pixel loss weight 1 + edge_weight * (edge strength of the target, 0..1): a flat ShapesWorld
    # background is most of the pixels, and the detail a decode-conditioned model must add is at edges.
    edge_weight: float = 0.0
    eval_steps: int = 8
    guidance_scale: float = 1.5
    out_dir: str = "runs/detokenizer/tiny"
    log_every: int = 20
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    threads: int = 0
    progress: bool = True


def code_grids(tokenizer, x: torch.Tensor, names: list[str] | None = None) -> list[torch.Tensor]:
    """The code grids an image tokenizer gives for pixels ``x``, in :func:`grid_spec` order (or the
    order of ``names``): a multi-grid tokenizer (DualViTok) returns a dict of grids from
    ``encode_tensor``, a single-grid one (PixelVQ) one grid."""
    out = tokenizer.encode_tensor(x)
    if isinstance(out, dict):
        return [out[name] for name in (names or grid_spec(tokenizer)[1])]
    return [out]


def chosen_grids(tokenizer, names: list[str]) -> tuple[list[int], list[str]]:
    """(codebook sizes, names) of the grids ``names`` picks from the tokenizer's (all when empty)."""
    sizes, all_names = grid_spec(tokenizer)
    if not names:
        return sizes, all_names
    bad = [n for n in names if n not in all_names]
    if bad:
        raise MMGenError(f"grids: the tokenizer has no '{bad[0]}' code grid (it has {', '.join(all_names)})")
    return [sizes[all_names.index(n)] for n in names], list(names)


def shapes_pairs(
    n: int, low: int, high: int, seed: int, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``n`` ShapesWorld scenes at ``low`` and ``high`` pixels: (low uint8, high uint8, scenes). Each is
    rendered at twice its side and brought down by the tokenizer's own bicubic resize, as the quick
    start's corpus reaches a tokenizer (render_side); a direct render at 36 px is aliased enough that
    the scene parser reads only ~70% of them."""
    import numpy as np

    rng = random.Random(seed)
    scenes = [random_scene(rng, split) for _ in range(n)]
    draw = lambda s, side: square_image(render(s, 2 * side, 2 * side), side)  # noqa: E731
    lo = np.stack([draw(s, low) for s in scenes])
    hi = lo if high == low else np.stack([draw(s, high) for s in scenes])

    def to_tensor(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    return to_tensor(lo), to_tensor(hi), scenes


@torch.no_grad()
def encode_all(
    tokenizer, images_u8: torch.Tensor, batch: int = 64, names: list[str] | None = None
) -> list[torch.Tensor]:
    grids: list[list[torch.Tensor]] = []
    for i in range(0, len(images_u8), batch):
        grids.append(code_grids(tokenizer, uint8_to_unit(images_u8[i : i + batch]), names))
    return [torch.cat(parts) for parts in zip(*grids)]


@torch.no_grad()
def decode_all(tokenizer, grids: list[torch.Tensor], batch: int = 64, names: list[str] | None = None) -> torch.Tensor:
    """The tokenizer's own decode of every item of ``grids`` (as :func:`encode_all` returns them, the
    grids of ``names``), ``(N, 3, h, w)`` in [-1, 1]."""
    from mmgen.models.detokenizer import decode_grids

    names = names or grid_spec(tokenizer)[1]
    return torch.cat(
        [decode_grids(tokenizer, names, [g[i : i + batch] for g in grids]) for i in range(0, len(grids[0]), batch)]
    )


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` in [0, 1]: the largest colour step from each pixel to its right / lower neighbour
    (pixels in [-1, 1], so a full step is 2)."""
    dx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True), (0, 1, 0, 0))
    dy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True), (0, 0, 0, 1))
    return (torch.maximum(dx, dy) / 2).clamp(0, 1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, edge_weight: float) -> torch.Tensor:
    if edge_weight <= 0:
        return F.mse_loss(pred, target)
    w = 1 + edge_weight * edge_map(x0)
    return ((pred - target).pow(2) * w).sum() / (w.sum() * pred.shape[1])


def train_detokenizer(cfg: DetokenizerTrainConfig) -> Path:
    """Train the detokenizer; returns the saved pipeline's directory (``out_dir/pipeline``)."""
    from tqdm import tqdm

    from mmgen.models.detokenizer import build_pipeline

    for name in ("steps", "batch_size", "log_every", "ckpt_every", "scale", "train_images"):
        if getattr(cfg, name) <= 0:
            raise MMGenError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.cond_drop < 1:
        raise MMGenError(f"cond_drop must be in [0, 1), got {cfg.cond_drop}")
    if cfg.bundle:
        cfg = for_bundle(cfg)
    out = prepare_run_dir(cfg)

    tok = load_image_tokenizer(cfg.tokenizer).eval()
    res = int(tok.resolution[0])
    sizes, names = chosen_grids(tok, cfg.grids)
    lo, hi, _ = shapes_pairs(cfg.train_images, res, res * cfg.scale, cfg.seed)
    grids = encode_all(tok, lo, names=names)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    pipe = build_pipeline(
        sizes,
        names,
        tok.downsample * cfg.scale,
        max(g.shape[-1] for g in grids),
        embed_dims=m.embed_dims or None,
        block_out_channels=m.block_out_channels,
        layers_per_block=m.layers_per_block,
        norm_num_groups=m.norm_num_groups,
        attention=m.attention,
        scheduler=m.scheduler,
        prediction_type=m.prediction_type,
        tokenizer=str(cfg.tokenizer),
        tokenizer_type=getattr(tok, "mmgen_type", ""),
        tokenizer_resolution=res,
        decoded_channels=3 if m.condition_on_decode else 0,
        tokenizer_sha256=tok.fingerprint(),
    )
    pipe.set_progress_bar_config(disable=True)
    decoded = decode_all(tok, grids, names=names) if m.condition_on_decode else None
    from mmgen.models.detokenizer import make_scheduler

    noise_sched = make_scheduler("ddpm", dict(pipe.scheduler.config))
    model = torch.nn.ModuleDict({"unet": pipe.unet, "conditioner": pipe.conditioner})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    start = resume_or_start(out, cfg.resume, model, opt)
    sched = lr_scheduler(opt, "constant", cfg.warmup_steps, cfg.steps, start_step=start, peak_lr=cfg.lr)
    metrics = MetricLogger(out, start)

    model.train()
    total, n_win, t0 = 0.0, 0, time.time()
    T = noise_sched.config.num_train_timesteps
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="train detokenizer",
        disable=not cfg.progress,
        leave=False,
    )
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(hi), (cfg.batch_size,), generator=g)
        x0 = uint8_to_unit(hi[idx])
        cond_grids = [gr[idx] for gr in grids]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_drop
        nulls = pipe.conditioner.null_codes(cond_grids)
        cond_grids = [torch.where(drop[:, None, None], nl, gr) for gr, nl in zip(cond_grids, nulls)]
        t = torch.randint(0, T, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = noise_sched.add_noise(x0, noise, t)
        dec = None
        if decoded is not None:  # dropped items lose the decode too: the null condition is all zeros
            dec = torch.where(drop[:, None, None, None], torch.zeros(()), decoded[idx])
        cond = pipe.conditioner(cond_grids, x0.shape[-2:], dec)
        pred = pipe.predict(x_t, t, cond)
        target = {"sample": x0, "epsilon": noise}.get(m.prediction_type)
        if target is None:
            target = noise_sched.get_velocity(x0, noise, t)
        loss = weighted_mse(pred, target, x0, cfg.edge_weight)
        lr = opt.param_groups[0]["lr"]  # this step's, from the schedule
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        total += loss.item()
        n_win += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {
                "step": done,
                "loss": round(total / n_win, 6),
                "lr": lr,
                "elapsed_s": round(time.time() - t0, 2),
            }
            metrics.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            total, n_win = 0.0, 0
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(out / "checkpoints", model, opt, done, cfg.keep_checkpoints)
    bar.close()
    metrics.close()
    train_s = time.time() - t0

    model.eval()
    pipe_dir = out / "pipeline"
    pipe.save_pretrained(str(pipe_dir))
    report = {
        "steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "train_images": cfg.train_images,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "scale": cfg.scale,
    }
    if cfg.eval_images:
        elo, ehi, _ = shapes_pairs(cfg.eval_images, res, res * cfg.scale, cfg.seed + 1, split="heldout")
        eg = encode_all(tok, elo, names=names)
        pipe.image_tokenizer = tok
        y = pipe(
            eg,
            num_inference_steps=cfg.eval_steps,
            guidance_scale=cfg.guidance_scale,
            generator=torch.Generator().manual_seed(cfg.seed),
            output_type="pt",
        ).images
        ref = uint8_to_unit(ehi)
        report["eval_psnr"] = round(float(psnr(y, ref).mean()), 3)
        report["eval_sampler"] = f"{type(pipe.scheduler).__name__}, {cfg.eval_steps} steps, cfg {cfg.guidance_scale}"
        grid = torch.cat([torch.cat(list(ref), -1), torch.cat(list(y), -1)], -2)
        tensor_to_pil(grid[None])[0].save(out / "samples.png")
    if cfg.bundle:
        from mmgen.models.detokenizer_set import add_detokenizer

        report["bundle"] = str(add_detokenizer(cfg.bundle, pipe_dir))
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return pipe_dir


def for_bundle(cfg: DetokenizerTrainConfig) -> DetokenizerTrainConfig:
    """``cfg`` training for the bundle ``cfg.bundle``: its image tokenizer, and the code grids its LM
    writes (a one-line error for a bundle that writes no pictures)."""
    from dataclasses import replace

    from mmgen.models.bundle import check_bundle_dir
    from mmgen.processing.vocab import Vocab

    b = check_bundle_dir(cfg.bundle)
    vocab = Vocab.load(b / "vocab.json")
    if not (b / "image_tokenizer").is_dir() or not vocab.has("pix"):
        raise MMGenError(
            f"{b} writes no pictures (no image_tokenizer/ or no pixel codes in its vocab): "
            "it has nothing for a detokenizer to draw"
        )
    return replace(cfg, tokenizer=str(b / "image_tokenizer"), grids=[g for g in ("sem", "pix") if vocab.has(g)])


__all__ = [
    "DetokenizerModelConfig",
    "DetokenizerTrainConfig",
    "chosen_grids",
    "code_grids",
    "for_bundle",
    "decode_all",
    "encode_all",
    "grid_spec",
    "shapes_pairs",
    "train_detokenizer",
]
