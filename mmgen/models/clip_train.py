"""Contrastive training of a tiny open_clip model on ShapesWorld captions (``mmgen train-clip``).

The model is open_clip's own ``CLIP`` class built from a model-config dict; the loss is open_clip's
``ClipLoss`` (symmetric InfoNCE with a learned temperature). Pairs are ShapesWorld train-split scenes
rendered at the vision tower's resolution with a caption from the world's grammar. The evaluation is
zero-shot classification on held-out-pair scenes (colour-shape pairs never seen in training): for the
largest object, which colour (shape) prompt out of all colours (shapes) is nearest to the image.

Outputs in ``out_dir``: ``clip/`` (open_clip local-dir format, see :func:`mmgen.backbones.clip.save_clip`),
``metrics.jsonl`` and ``eval.json``.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmgen.backbones.clip import (
    TINY_CLIP_CFG,
    ClipEncoder,
    build_open_clip,
    cell_regions,
    open_clip_module,
    region_text_logits,
    save_clip,
)
from mmgen.errors import MMGenError
from mmgen.utils.checkpoints import prepare_run_dir, resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.schedules import lr_scheduler
from mmgen.world import COLORS, SHAPES, caption, random_scene, render, render_side
from mmgen.world.text import EMPTY_CELL, all_cell_phrases, cell_phrases, position_phrase, swap_attribute


@dataclass
class ClipTrainConfig:
    model: dict = field(default_factory=lambda: json.loads(json.dumps(TINY_CLIP_CFG)))  # open_clip model config
    train_pairs: int = 4000
    eval_scenes: int = 200
    steps: int = 400
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    # Region-text alignment (the RegionCLIP / FG-CLIP idea) on top of the image-caption loss: the patch
    # tokens of each ShapesWorld cell, pooled and projected like the image embedding, classified among
    # the batch's cell phrases ("a large red circle", "an empty cell") by text-embedding similarity.
    # CLIP's loss acts on the pooled embedding only; DualViTok's semantic branch reads the patch tokens.
    cell_weight: float = 0.0
    # Hard negatives (NegCLIP): each image is also contrasted with its own caption with one object's shape
    # or colour swapped (swap_attribute, drawn afresh each step), at this weight beside ClipLoss. Without
    # them a batch of multi-object captions is told apart by colour, position and background: the text
    # tower then embeds "a large cyan circle" and "a large cyan cross" at cosine 0.9999.
    hard_negatives: float = 0.0
    out_dir: str = "runs/clip/tiny"
    log_every: int = 50
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False  # continue from out_dir/checkpoints when a run was stopped
    seed: int = 0
    threads: int = 0
    progress: bool = True


def largest_object(scene):
    """The scene's largest object (ties: the first in cell order), the probe target everywhere."""
    return max(scene.objects, key=lambda o: (o.size == "large", -scene.objects.index(o)))


def shapes_pairs(n: int, size: int, seed: int, split: str = "train"):
    """``n`` (scene, PIL image, caption) triples from ShapesWorld. Pictures are rendered at a whole
    multiple of ``size`` of at least the world's 64 px (``render_side``) and left to the encoder's
    bicubic resize, as corpus pictures reach it."""
    rng = random.Random(f"clip-{split}-{seed}")
    out = []
    side = render_side(size)
    for _ in range(n):
        s = random_scene(rng, split)
        out.append((s, render(s, side, side), caption(s, rng)))
    return out


def _prompt(obj, color: str, shape: str, background: str) -> str:
    text = f"a {obj.size} {color} {shape} {position_phrase(obj.cell)}, on a {background} background."
    return text[0].upper() + text[1:]


@torch.no_grad()
def zero_shot_accuracy(clip, scenes, images) -> dict:
    """Zero-shot colour and shape accuracy of the largest object: one prompt per candidate value,
    everything else in the prompt true to the scene."""
    img = clip.encode_image(images)
    hits = {"color": 0, "shape": 0}
    for i, s in enumerate(scenes):
        o = largest_object(s)
        for attr, values in (("color", list(COLORS)), ("shape", list(SHAPES))):
            prompts = [
                _prompt(o, v if attr == "color" else o.color, v if attr == "shape" else o.shape, s.background)
                for v in values
            ]
            txt = clip.encode_text(prompts)
            pred = values[int((txt @ img[i]).argmax())]
            hits[attr] += pred == getattr(o, attr)
    return {k: v / len(scenes) for k, v in hits.items()}


def phrase_separation(clip) -> dict:
    """How far apart the text tower puts cell phrases that differ in one word: mean and max cosine over
    the pairs differing only in shape ("a large cyan circle" / "a large cyan cross") and only in colour.
    DualViTok's region-text loss can only part codes whose phrases the text tower parts."""
    phrases = [p for p in all_cell_phrases() if p != EMPTY_CELL]
    words = [p.split() for p in phrases]  # a SIZE COLOR SHAPE
    text = clip.encode_text(phrases)
    cos = text @ text.T
    out = {}
    for attr, k in (("shape", 3), ("color", 2)):
        # the pairs whose words differ at position k and nowhere else
        vals = torch.stack(
            [
                cos[i, j]
                for i, j in itertools.combinations(range(len(words)), 2)
                if [a != b for a, b in zip(words[i], words[j])] == [m == k for m in range(4)]
            ]
        )
        out[f"{attr}_pair_cosine_mean"] = round(float(vals.mean()), 4)
        out[f"{attr}_pair_cosine_max"] = round(float(vals.max()), 4)
    return out


def cell_loss(model, tokenizer, patch_tokens: torch.Tensor, phrases: list[list[str]]) -> torch.Tensor:
    """Cross-entropy of each cell's pooled, projected patch tokens against the text embeddings of the
    distinct phrases in the batch (temperature: the model's logit scale)."""
    import torch.nn.functional as F

    b, n, w = patch_tokens.shape
    g = int(round(n**0.5))
    cells = cell_regions(patch_tokens.transpose(1, 2).reshape(b, w, g, g), len(phrases[0]))
    proj = model.visual.proj
    cells = cells @ proj if proj is not None else cells
    vocab = sorted({p for ps in phrases for p in ps})
    index = {p: i for i, p in enumerate(vocab)}
    text = model.encode_text(tokenizer(vocab))
    target = torch.tensor([index[p] for ps in phrases for p in ps])
    return F.cross_entropy(region_text_logits(cells, text, model.logit_scale.exp()), target)


def hard_negative_loss(model, tokenizer, img_f, txt_f, captions: list[str], rng: random.Random) -> torch.Tensor:
    """Image-to-text cross-entropy over the batch's captions plus one attribute-swapped negative per
    caption (NegCLIP's hard negatives); ``img_f`` / ``txt_f`` are the batch's unit embeddings."""
    import torch.nn.functional as F

    neg_f = model.encode_text(tokenizer([swap_attribute(c, rng) for c in captions]), normalize=True)
    logits = model.logit_scale.exp() * img_f @ torch.cat([txt_f, neg_f]).T
    return F.cross_entropy(logits, torch.arange(len(captions)))


def train_clip(cfg: ClipTrainConfig) -> Path:
    """Train the tiny CLIP; returns the saved model directory (``out_dir/clip``)."""
    from tqdm import tqdm

    open_clip = open_clip_module()

    if cfg.steps <= 0 or cfg.batch_size <= 1:
        raise MMGenError("steps must be positive and batch_size at least 2 (contrastive loss needs negatives)")
    out = prepare_run_dir(cfg)
    torch.manual_seed(cfg.seed)

    model = build_open_clip(cfg.model)
    size = int(model.visual.image_size[0])
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg.model["text_cfg"]["context_length"])
    clip = ClipEncoder(model, tokenizer, (size, size), (0.5,) * 3, (0.5,) * 3, "open_clip", cfg.model)

    pairs = shapes_pairs(cfg.train_pairs, size, cfg.seed)
    pixels = clip.pixels([p[1] for p in pairs])
    captions = [p[2] for p in pairs]
    tokens = tokenizer(captions)
    phrases = [cell_phrases(p[0]) for p in pairs]
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # Each step draws its batch and its hard negatives from seeds of its own, so a resumed run sees the
    # batches an uninterrupted one would.
    start = resume_or_start(out, cfg.resume, model, opt)
    sched = lr_scheduler(opt, "cosine", cfg.warmup_steps, cfg.steps, start_step=start, peak_lr=cfg.lr)
    metrics = MetricLogger(out, start, loss_keys=("cell_loss", "hard_negative_loss"))
    t0 = time.time()
    model.train()
    for step in tqdm(range(start, cfg.steps), desc="train clip", disable=not cfg.progress, leave=False):
        idx = torch.randint(
            0, len(pairs), (cfg.batch_size,), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)
        )
        if cfg.cell_weight > 0:
            model.visual.output_tokens = True  # the pooled embedding and the patch tokens in one pass
            pooled, patches = model.visual(pixels[idx])
            model.visual.output_tokens = False
            img_f = torch.nn.functional.normalize(pooled, dim=-1)
            txt_f = model.encode_text(tokens[idx], normalize=True)
            clip_loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            region = cell_loss(model, tokenizer, patches, [phrases[i] for i in idx.tolist()])
            loss = clip_loss + cfg.cell_weight * region
        else:
            img_f, txt_f, scale = model(pixels[idx], tokens[idx])[:3]
            loss = loss_fn(img_f, txt_f, scale)
        if cfg.hard_negatives > 0:
            hard = hard_negative_loss(
                model,
                tokenizer,
                img_f,
                txt_f,
                [captions[i] for i in idx.tolist()],
                random.Random(f"neg-{cfg.seed}-{step}"),
            )
            loss = loss + cfg.hard_negatives * hard
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            extra = {"cell_loss": round(region.item(), 5)} if cfg.cell_weight > 0 else {}
            if cfg.hard_negatives > 0:
                extra["hard_negative_loss"] = round(hard.item(), 5)
            metrics.log(
                {
                    "step": step + 1,
                    "loss": round(loss.item(), 5),
                    **extra,
                    "logit_scale": round(model.logit_scale.exp().item(), 3),
                    "elapsed_s": round(time.time() - t0, 1),
                }
            )
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out / "checkpoints", model, opt, step + 1, cfg.keep_checkpoints)
    metrics.close()
    model.eval()
    path = save_clip(model, out / "clip", cfg.model)
    held = shapes_pairs(cfg.eval_scenes, size, cfg.seed, split="heldout")
    acc = zero_shot_accuracy(clip, [h[0] for h in held], [h[1] for h in held])
    report = {
        "steps": cfg.steps,
        "resumed_from": start,
        "train_pairs": len(pairs),
        "train_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_scenes": len(held),
        "zero_shot_color_acc": round(acc["color"], 4),
        "zero_shot_shape_acc": round(acc["shape"], 4),
        "phrase_separation": phrase_separation(clip),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return path
