"""Training a :class:`~mmgen.tokenizers.vq.PixelVQ` image tokenizer (plain PyTorch, CPU is fine).

    cfg = load_config(TokenizerTrainConfig, "tokenizers/tiny_vq.yaml", ["steps=50"])
    tokenizer_dir = train_tokenizer(cfg)

Data (:mod:`mmgen.tokenizers.train_data`): every image item of Doc shards, image folders and,
optionally, freshly drawn scenes, held in memory as uint8 at ``resolution``. A slice is held out for
the final evaluation. The configuration is :mod:`mmgen.tokenizers.train_config`; ``tokenizer:
dualvitok`` trains a DualViTok instead (:mod:`mmgen.tokenizers.dualvitok_train`).

Loss: L1 + L2 on pixels, an image-gradient (edge) term that keeps shape outlines sharp at almost no
cost, and the quantizer's codebook + commitment losses. Dead codes are restarted every
``restart_every`` steps from the current batch's encoder outputs.

Outputs in ``out_dir``: ``metrics.jsonl`` (loss, recon, commitment, codebook usage, perplexity...),
``checkpoints/step_N/`` (safetensors only), ``tokenizer/`` (``save_pretrained``), ``eval.json`` and
``recon.png`` (held-out inputs above their reconstructions).

Resumable and exact: the batch and the restart draws of step N come from a generator seeded by
(seed, N), so ``resume=true`` replays the same steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmgen.errors import MMGenError
from mmgen.tokenizers.dualvitok_train import train_dualvitok
from mmgen.tokenizers.losses import pixel_losses
from mmgen.tokenizers.train_config import TokenizerTrainConfig, check_train_config
from mmgen.tokenizers.train_data import load_training_images, save_recon_grid
from mmgen.tokenizers.vq import PixelVQ, psnr
from mmgen.utils.checkpoints import prepare_run_dir, resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.pixels import through_uint8, uint8_to_unit
from mmgen.utils.precision import autocast, float32_outputs, resolved_precision
from mmgen.utils.schedules import lr_scheduler


def build_model(cfg: TokenizerTrainConfig):
    m = cfg.model
    return PixelVQ(
        resolution=(cfg.resolution, cfg.resolution),
        channels=m.channels,
        layers_per_block=m.layers_per_block,
        patch_size=m.patch_size,
        code_dim=m.code_dim,
        codebook_size=m.codebook_size,
        norm_groups=m.norm_groups,
        attention=m.attention,
        l2_norm=m.l2_norm,
        beta=m.beta,
        usage_decay=m.usage_decay,
    )


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train the tokenizer the recipe names (``tokenizer: pixel_vq | dualvitok``); returns the
    directory it was saved to (``out_dir/tokenizer``)."""
    if cfg.tokenizer == "dualvitok":
        return train_dualvitok(cfg)
    if cfg.tokenizer != "pixel_vq":
        raise MMGenError(f"unknown tokenizer '{cfg.tokenizer}' (use pixel_vq or dualvitok)")
    if cfg.init_from or cfg.freeze or cfg.prune_codes or cfg.prune_min_share:
        raise MMGenError(
            "init_from, freeze, prune_codes and prune_min_share are DualViTok options (tokenizer: dualvitok)"
        )
    check_train_config(cfg)
    out = prepare_run_dir(cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.resolution % model.downsample:
        raise MMGenError(
            f"resolution {cfg.resolution} is not a multiple of the model's downsampling factor {model.downsample}"
        )
    images, data_stats = load_training_images(cfg)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = min(cfg.eval_images, len(images) // 10)
    eval_x, train_x = images[order[:n_eval]], images[order[n_eval:]]

    params_vq = [model.quantizer.embedding]
    params_rest = [p for n, p in model.named_parameters() if n != "quantizer.embedding"]
    opt = torch.optim.AdamW(
        [{"params": params_rest, "weight_decay": cfg.weight_decay}, {"params": params_vq, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )

    start = resume_or_start(out, cfg.resume, model, opt)
    sched = lr_scheduler(opt, "cosine", cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, start, peak_lr=cfg.lr)
    metrics = MetricLogger(out, start, loss_keys=("recon", "codebook", "commitment"))

    model.train()
    window: dict[str, float] = {}
    window_counts = torch.zeros(model.codebook_size)
    window_steps, restarts, t0 = 0, 0, time.time()
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="train tokenizer",
        disable=not cfg.progress,
        leave=False,
    )
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(train_x), (cfg.batch_size,), generator=g)
        x = uint8_to_unit(train_x[idx])
        lr = opt.param_groups[0]["lr"]  # this step's, from the schedule
        with autocast(cfg.precision):  # the model's pass only: the losses compare float32 tensors
            recon, _codes, st = model(x)
        recon, st = recon.float(), float32_outputs(st)
        px = pixel_losses(recon, x, cfg)
        l1, l2, edge, rec = px["l1"], px["l2"], px["edge"], px["rec"]
        loss = rec + cfg.vq_weight * st["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if cfg.restart_every > 0 and (step + 1) % cfg.restart_every == 0:
            dead = model.quantizer.restart_dead_codes(cfg.dead_threshold, generator=g)
            if dead.numel():
                restarts += dead.numel()
                # A re-seeded code starts afresh: forget Adam's moments from its old life.
                state = opt.state.get(model.quantizer.embedding, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in state:
                        state[k][dead] = 0
        vals = {
            "loss": loss.item(),
            "recon": rec.item(),
            "l1": l1.item(),
            "l2": l2.item(),
            "mse": px["mse"].item(),
            "edge": edge.item(),
            "codebook": st["codebook_loss"].item(),
            "commitment": st["commitment_loss"].item(),
            "perplexity": st["perplexity"].item(),
        }
        for k, v in vals.items():
            window[k] = window.get(k, 0.0) + v
        window_counts += st["counts"]
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec_ = {
                "step": done,
                **{k: round(v / window_steps, 6) for k, v in window.items()},
                "usage": round(float((window_counts > 0).float().mean()), 4),
                "window_perplexity": round(_perplexity(window_counts), 2),
                "restarted_codes": restarts,
                "lr": round(lr, 8),
                "psnr": round(float(10 * math.log10(4.0 / max(window["mse"] / window_steps, 1e-10))), 3),
                "elapsed_s": round(time.time() - t0, 2),
            }
            metrics.log(rec_)
            bar.set_postfix(loss=f"{rec_['loss']:.4f}", psnr=f"{rec_['psnr']:.1f}", usage=f"{rec_['usage']:.2f}")
            window, window_counts, window_steps, restarts = {}, torch.zeros(model.codebook_size), 0, 0
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(out / "checkpoints", model, opt, done, cfg.keep_checkpoints)
    bar.close()
    metrics.close()

    model.eval()
    tok_dir = out / "tokenizer"
    model.save_pretrained(tok_dir)
    report = {
        "steps": cfg.steps,
        "train_images": len(train_x),
        "eval_images": n_eval,
        "data": data_stats,
        "parameters": model.num_parameters(),
        "precision": resolved_precision(cfg.precision),
        "train_seconds": round(time.time() - t0, 1),
    }
    if n_eval:
        with torch.no_grad():
            xe = uint8_to_unit(eval_x)
            codes = model.encode_tensor(xe)
            recon = model.decode_tensor(codes).clamp(-1, 1)
            recon = through_uint8(recon)
            counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).float()
        report.update(
            {
                "eval_psnr": round(float(psnr(recon, xe).mean()), 3),
                "eval_codebook_usage": round(float((counts > 0).float().mean()), 4),
                "eval_perplexity": round(_perplexity(counts), 2),
            }
        )
        save_recon_grid(xe[:8], recon[:8], out / "recon.png")
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return tok_dir


def _perplexity(counts: torch.Tensor) -> float:
    p = counts / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))
