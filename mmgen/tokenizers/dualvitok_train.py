"""Training DualViTok (``mmgen train-tokenizer`` with ``tokenizer: dualvitok``); plain PyTorch.

Shares its configuration, data loading, losses and LR schedule (:mod:`mmgen.utils.schedules`) with the pixel VQ
trainer (:mod:`mmgen.tokenizers.train_config`, :mod:`~mmgen.tokenizers.train_data`, :mod:`~mmgen.tokenizers.losses`) and
the safetensors checkpoints with every small trainer (:mod:`mmgen.utils.checkpoints`).

Loss = L1 + L2 + edge on pixels
     + ``feature_weight`` * (1 - cos) between the semantic decoder's output and the teacher's features
     + ``perceptual_weight`` * (1 - cos) between teacher features of the reconstruction and of the input
       (the teacher stands in for VGG/LPIPS, whose pretrained weights are not available here)
     + ``vq_weight`` * the quantizers' commitment losses
     + ``gan_weight`` * PatchGAN hinge loss from step ``gan_start`` (0 turns it off)
     + ``text_weight`` * region-text cross-entropy of the semantic codes (:class:`RegionTextHead`, 0: off)
     + ``text_prequant_weight`` * the same on the semantic encoder's output before quantization.

Stages: ``init_from`` starts from a saved tokenizer (:func:`init_from_tokenizer`), ``freeze`` keeps parts
fixed (:func:`freeze_parts`; the text-aligned second stage freezes the pixel side, so the pixel codes do
not move), and ``prune_codes`` drops, after training, the entries no training image is encoded to.

Dead codes: the library restarts EMA codebooks (``dead_code_threshold``); SimVQ codebooks are
restarted by mmgen every ``restart_every`` steps, with ``sem_quantizer.restart_sampling: loss`` on the
cells the region-text head names worst (two phrases sharing one code are invisible to the residual).
Resume is exact: step N's batch and branch-dropout draws come from a generator seeded by (seed, N),
and checkpoints carry both optimizers and the RNG.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.backbones.clip import cell_regions, load_clip, region_text_logits
from mmgen.errors import MMGenError
from mmgen.tokenizers.dualvitok import PatchGAN, build_dualvitok
from mmgen.tokenizers.losses import pixel_losses
from mmgen.tokenizers.quantizers import perplexity, usage_fraction
from mmgen.tokenizers.train_config import TokenizerTrainConfig, check_train_config
from mmgen.tokenizers.train_data import load_training_images, save_recon_grid
from mmgen.tokenizers.vq import psnr
from mmgen.utils.checkpoints import prepare_run_dir, resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.pixels import through_uint8, uint8_to_unit
from mmgen.utils.precision import autocast, float32_outputs, resolved_precision
from mmgen.utils.schedules import lr_scheduler
from mmgen.world import all_cell_phrases, cell_phrases


def build_dualvitok_from_config(cfg: TokenizerTrainConfig, load_teacher: bool = True):
    import dataclasses

    d = dataclasses.asdict(cfg.dualvitok)
    teacher = dict(d.pop("teacher"))
    name = teacher.get("name")
    if "model_cfg" not in teacher:
        if teacher.get("kind") != "open_clip" or not name:
            raise MMGenError(
                "dualvitok.teacher needs model_cfg (the tower's config), or kind=open_clip with name= a CLIP dir"
            )
        teacher["model_cfg"] = _clip_model_cfg(name)
    return build_dualvitok(
        {"resolution": (cfg.resolution, cfg.resolution), "teacher": teacher, **d}, load_teacher=load_teacher
    )


def _clip_model_cfg(name: str) -> dict:
    p = Path(name) / "open_clip_config.json"
    if not p.is_file():
        raise MMGenError(
            f"teacher CLIP not found at {name}: train it first with `mmgen train-clip tiny_clip` "
            f"(or set dualvitok.teacher.name=DIR)"
        )
    return json.loads(p.read_text())["model_cfg"]


class RegionTextHead(nn.Module):
    """Training-only head of the region-text loss: a linear map from semantic code vectors to the
    teacher CLIP's text space, scored against every cell phrase (``texts``: their unit text
    embeddings) at CLIP's temperature. The saved tokenizer does not keep it: what it shapes is the
    semantic codes themselves, which must tell apart what the phrases tell apart."""

    def __init__(self, code_dim: int, texts: torch.Tensor, scale: float):
        super().__init__()
        self.proj = nn.Linear(code_dim, texts.shape[1])
        self.register_buffer("texts", texts.float())
        self.scale = float(scale)

    def logits(self, sem_q: torch.Tensor, cells: int) -> torch.Tensor:
        """``(B, D, h, w)`` quantized semantic map -> ``(B * cells, phrases)``, cells row-major (the
        code map is pooled to the phrase grid when the two differ)."""
        return region_text_logits(self.proj(cell_regions(sem_q, cells)), self.texts, self.scale)

    def forward(self, sem_q: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss and accuracy over the cells with a phrase (``target`` ``(B, cells)``, -100: none), and
        each cell's own cross-entropy ``(B, cells)`` (0 where there is no phrase)."""
        logits = self.logits(sem_q, target.shape[1])
        flat = target.reshape(-1)
        known = flat >= 0
        # each cell's own loss, for restart_sampling=loss; the mean below stays cross_entropy's own
        # reduction, so runs without loss restarts are bitwise what they were
        with torch.no_grad():
            cell = F.cross_entropy(logits, flat, ignore_index=-100, reduction="none").view_as(target)
        if not bool(known.any()):
            return sem_q.new_zeros(()), sem_q.new_zeros(()), cell
        acc = (logits.argmax(-1)[known] == flat[known]).float().mean()
        return F.cross_entropy(logits, flat, ignore_index=-100), acc, cell


def region_text_targets(cfg: TokenizerTrainConfig, scenes: list):
    """The region-text head and each image's cell-phrase indices ``(N, cells)`` (-100 where the scene
    is unknown), with the phrases embedded once by the teacher CLIP's text tower."""
    teacher = cfg.dualvitok.teacher
    if teacher.get("kind") != "open_clip" or not teacher.get("name"):
        raise MMGenError(
            "text_weight needs a CLIP teacher with a text tower (dualvitok.teacher kind=open_clip, name=DIR)"
        )
    known = [s for s in scenes if s is not None]
    if not known:
        raise MMGenError(
            "text_weight needs images whose scene is known: synthetic_images=N with synthetic_source=shapesworld"
        )
    vocab = all_cell_phrases()
    clip = load_clip(teacher["name"])
    texts = clip.encode_text(vocab)
    index = {p: i for i, p in enumerate(vocab)}
    cells = len(cell_phrases(known[0]))
    target = torch.tensor([[index[p] for p in cell_phrases(s)] if s is not None else [-100] * cells for s in scenes])
    return RegionTextHead(cfg.dualvitok.sem_code_dim, texts, clip.model.logit_scale.exp().item()), target


def init_from_tokenizer(model, path: str, exclude: tuple = ()) -> dict:
    """Copy a saved DualViTok's weights into ``model``, one top-level part at a time (``sem_encoder``,
    ``pix_decoder``, ``null_sem``, ...): a part is copied when all its tensors match in name and
    shape, and otherwise keeps its fresh initialisation (a resized semantic codebook, say, with the
    layers around it). Returns what was copied and what was not, for eval.json."""
    from safetensors.torch import load_file

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise MMGenError(f"init_from: {path} is not a saved tokenizer (no model.safetensors there)")
    saved, own = load_file(str(f)), model.state_dict()
    part = lambda k: k.split(".", 1)[0]  # noqa: E731
    parts = sorted({part(k) for k in own})
    if set(exclude) - set(parts):
        raise MMGenError(f"init_exclude: {', '.join(sorted(set(exclude) - set(parts)))} not a part of DualViTok")
    loaded = [
        n
        for n in parts
        if n not in exclude
        and all(k in saved and saved[k].shape == v.shape for k, v in own.items() if part(k) == n)
        and not any(part(k) == n and k not in own for k in saved)
    ]
    changed = [k for k in own if part(k) == "teacher" and "teacher" in loaded and not torch.equal(own[k], saved[k])]
    if changed:
        raise MMGenError(
            f"init_from: {path} was trained on another teacher than dualvitok.teacher.name "
            f"({len(changed)} teacher tensors differ); name the teacher it was trained on"
        )
    model.load_state_dict({k: saved[k] for k in own if part(k) in loaded}, strict=False)
    return {"init_from": str(path), "loaded_parts": loaded, "fresh_parts": [n for n in parts if n not in loaded]}


def freeze_parts(model, names: list[str]) -> list[nn.Module]:
    """Stop gradients to the named top-level parts (modules, or parameters such as ``null_pix``);
    returns the modules, to be kept in eval mode (a frozen quantizer then neither tracks usage nor
    restarts codes, so the codes it assigns cannot move)."""
    unknown = [n for n in names if not isinstance(getattr(model, n, None), (nn.Module, nn.Parameter))]
    if unknown:
        raise MMGenError(
            f"freeze: {', '.join(unknown)} not a part of DualViTok (top-level parts such as "
            f"pix_encoder, pix_quantizer, sem_encoder, pix_decoder, null_pix)"
        )
    for n in names:
        getattr(model, n).requires_grad_(False)
    return [getattr(model, n) for n in names if isinstance(getattr(model, n), nn.Module)]


def _cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=1)).mean()


def dualvitok_losses(
    model,
    out: dict,
    x: torch.Tensor,
    cfg: TokenizerTrainConfig,
    disc=None,
    step: int = 0,
    text_head: RegionTextHead | None = None,
    text_target: torch.Tensor | None = None,
) -> dict:
    recon = out["recon"]
    px = pixel_losses(recon, x, cfg)
    losses = {
        "l1": px["l1"],
        "l2": px["l2"],
        "mse": px["mse"],
        "edge": px["edge"],
        "feature": _cosine_loss(out["feat_rec"], out["teacher"]),
        "quant": out["quant_loss"],
    }
    losses["perceptual"] = (
        _cosine_loss(model.teacher(recon), out["teacher"]) if cfg.perceptual_weight > 0 else recon.new_zeros(())
    )
    use_gan = disc is not None and step >= cfg.gan_start
    losses["gan_g"] = -disc(recon).mean() if use_gan else recon.new_zeros(())
    losses["loss"] = (
        px["rec"]
        + cfg.feature_weight * losses["feature"]
        + cfg.perceptual_weight * losses["perceptual"]
        + cfg.vq_weight * losses["quant"]
        + (cfg.gan_weight * losses["gan_g"] if use_gan else 0)
    )
    if text_head is not None:
        losses["text"], losses["text_acc"], losses["text_cells"] = text_head(out["sem_q"], text_target)
        losses["loss"] = losses["loss"] + cfg.text_weight * losses["text"]
        if cfg.text_prequant_weight > 0:
            losses["text_prequant"] = text_head(out["sem_z"], text_target)[0]
            losses["loss"] = losses["loss"] + cfg.text_prequant_weight * losses["text_prequant"]
    return losses


def _check_loss_restarts(model, cfg: TokenizerTrainConfig, text_target: torch.Tensor | None) -> None:
    """``restart_sampling: loss`` restarts dead codes on the cells the region-text head names worst, so
    it needs that head and one phrase cell per semantic code."""
    if model.pix_quantizer.cfg.restart_sampling == "loss":
        raise MMGenError(
            "pix_quantizer.restart_sampling=loss: only the semantic codes have a per-code loss "
            "(the region-text cells); use error or uniform"
        )
    if model.sem_quantizer.cfg.restart_sampling != "loss":
        return
    if text_target is None:
        raise MMGenError("sem_quantizer.restart_sampling=loss needs the region-text loss (text_weight > 0)")
    h, w = model.code_shapes(cfg.resolution, cfg.resolution)["sem"]
    if h * w != text_target.shape[1]:
        raise MMGenError(
            f"sem_quantizer.restart_sampling=loss needs one semantic code per phrase cell: "
            f"{h * w} codes for {text_target.shape[1]} cells"
        )


def _disc_step(disc, opt_d, recon: torch.Tensor, x: torch.Tensor) -> float:
    loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()  # hinge
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss.item()


def train_dualvitok(cfg: TokenizerTrainConfig) -> Path:
    """Train DualViTok from ``cfg``; returns ``out_dir/tokenizer``."""
    from tqdm import tqdm

    check_train_config(cfg)
    if set(cfg.prune_codes) - {"sem", "pix"}:
        raise MMGenError(f"prune_codes takes code levels sem and pix, got {cfg.prune_codes}")
    if not 0 <= cfg.prune_min_share < 1 or (cfg.prune_min_share > 0 and not cfg.prune_codes):
        raise MMGenError(f"prune_min_share must be in [0, 1) and needs prune_codes, got {cfg.prune_min_share}")
    if cfg.text_prequant_weight > 0 and cfg.text_weight <= 0:
        raise MMGenError("text_prequant_weight needs the region-text head: set text_weight > 0")
    if cfg.freeze and not cfg.init_from:
        raise MMGenError("freeze needs init_from: frozen parts of a fresh model would stay random")
    out = prepare_run_dir(cfg)
    torch.manual_seed(cfg.seed)
    model = build_dualvitok_from_config(cfg)
    if cfg.resolution % model.sem_downsample:
        raise MMGenError(
            f"resolution {cfg.resolution} is not a multiple of DualViTok's semantic downsampling {model.sem_downsample}"
        )
    init = init_from_tokenizer(model, cfg.init_from, tuple(cfg.init_exclude)) if cfg.init_from else {}
    frozen = freeze_parts(model, cfg.freeze)
    disc = PatchGAN() if cfg.gan_weight > 0 else None
    images, data_stats, scenes = load_training_images(cfg, with_scenes=True)
    text_head, text_target = region_text_targets(cfg, scenes) if cfg.text_weight > 0 else (None, None)
    _check_loss_restarts(model, cfg, text_target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = min(cfg.eval_images, len(images) // 10)
    eval_x, train_x = images[order[:n_eval]], images[order[n_eval:]]
    if text_head is not None:
        eval_t, train_t = text_target[order[:n_eval]], text_target[order[n_eval:]]

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(text_head.parameters()) if text_head is not None else []
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    extra = {"disc_optimizer": opt_d} if disc is not None else None
    holder = torch.nn.ModuleDict(
        {
            "tokenizer": model,
            **({"disc": disc} if disc is not None else {}),
            **({"text_head": text_head} if text_head is not None else {}),
        }
    )

    start = resume_or_start(out, cfg.resume, holder, opt, extra)
    sched = lr_scheduler(opt, "cosine", cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, start, peak_lr=cfg.lr)
    metrics = MetricLogger(out, start, loss_keys=("l1", "feature", "quant", "perceptual"))

    holder.train()
    for m in frozen:
        m.eval()
    window: dict[str, float] = {}
    counts = {"sem": torch.zeros(model.codebook_sizes["sem"]), "pix": torch.zeros(model.codebook_sizes["pix"])}
    n_win, restarts, t0 = 0, 0, time.time()
    for step in tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="train dualvitok",
        disable=not cfg.progress,
        leave=False,
    ):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(train_x), (cfg.batch_size,), generator=g)
        x = uint8_to_unit(train_x[idx])
        lr = opt.param_groups[0]["lr"]  # this step's, from the schedule
        with autocast(cfg.precision):  # the model's pass only: the losses compare float32 tensors
            o = model(x, generator=g)
        o = float32_outputs(o)
        losses = dualvitok_losses(
            model, o, x, cfg, disc, step, text_head, train_t[idx] if text_head is not None else None
        )
        cell_losses = losses.pop("text_cells", None)
        if cell_losses is not None and model.sem_quantizer.cfg.restart_sampling == "loss":
            model.sem_quantizer.note_vector_losses(cell_losses)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        sched.step()
        if disc is not None and step >= cfg.gan_start:
            losses["disc"] = torch.tensor(_disc_step(disc, opt_d, o["recon"], x))
        if cfg.restart_every > 0 and (step + 1) % cfg.restart_every == 0:
            restarts += sum(
                q.restart_dead_codes(g) for q in (model.sem_quantizer, model.pix_quantizer) if q not in frozen
            )
        for k, v in losses.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
        for name in counts:
            counts[name] += torch.bincount(o[f"{name}_codes"].flatten(), minlength=len(counts[name])).float()
        n_win += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {
                "step": done,
                **{k: round(v / n_win, 6) for k, v in window.items()},
                **{f"{n}_usage": round(float((c > 0).float().mean()), 4) for n, c in counts.items()},
                "restarted_codes": restarts,
                "lr": round(lr, 8),
                "psnr": round(10 * math.log10(4.0 / max(window["mse"] / n_win, 1e-10)), 3),
                "elapsed_s": round(time.time() - t0, 2),
            }
            metrics.log(rec)
            window, n_win, restarts = {}, 0, 0
            counts = {n: torch.zeros_like(c) for n, c in counts.items()}
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(out / "checkpoints", holder, opt, done, cfg.keep_checkpoints, extra)
    metrics.close()

    model.eval()
    pruned = {level: model.prune_codes(level, train_x, cfg.prune_min_share) for level in cfg.prune_codes}
    tok_dir = out / "tokenizer"
    model.save_pretrained(tok_dir)
    report = {
        "steps": cfg.steps,
        "resumed_from_step": start,
        "train_images": len(train_x),
        "eval_images": n_eval,
        "data": data_stats,
        **init,
        "frozen_parts": list(cfg.freeze),
        **({"pruned_codes": pruned} if pruned else {}),
        "parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(True),
        "precision": resolved_precision(cfg.precision),
        "train_seconds": round(time.time() - t0, 1),
    }  # of this run, i.e. steps resumed_from_step..steps
    if n_eval:
        report.update(
            evaluate_dualvitok(
                model, eval_x, out / "recon.png", (text_head.eval(), eval_t) if text_head is not None else None
            )
        )
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return tok_dir


@torch.no_grad()
def evaluate_dualvitok(model, images_u8: torch.Tensor, grid_path: Path | None = None, region_text=None) -> dict:
    """Held-out PSNR (uint8 round trip), codebook usage of both quantizers, teacher-feature cosine;
    with ``region_text`` = (head, cell targets), the share of known cells the head names right from
    the encoded semantic codes."""
    x = uint8_to_unit(images_u8)
    codes, recons, feats = {"sem": [], "pix": []}, [], []
    for i in range(0, len(x), 64):
        xb = x[i : i + 64]
        c = model.encode_tensor(xb)
        r = model.decode_tensor(c).clamp(-1, 1)
        recons.append(through_uint8(r))
        feats.append(
            F.cosine_similarity(
                model.sem_decode(model.sem_quantizer.embed(c["sem"])), model.teacher_features(xb), dim=1
            ).mean()
        )
        for n in codes:
            codes[n].append(c[n])
    recon = torch.cat(recons)
    codes = {n: torch.cat(v) for n, v in codes.items()}
    if grid_path is not None:
        save_recon_grid(x[:8], recon[:8], grid_path)
    report = {
        "eval_psnr": round(float(psnr(recon, x).mean()), 3),
        "eval_teacher_cosine": round(float(torch.stack(feats).mean()), 4),
        **{
            f"eval_{n}_usage": [round(u, 4) for u in usage_fraction(getattr(model, f"{n}_quantizer"), c)]
            for n, c in codes.items()
        },
        **{f"eval_{n}_perplexity": round(perplexity(c, model.codebook_sizes[n]), 2) for n, c in codes.items()},
    }
    if region_text is not None:
        head, target = region_text
        report["eval_region_text_acc"] = round(float(head(model.sem_quantizer.embed(codes["sem"]), target)[1]), 4)
    return report
