"""Training the learned image-text quality scorer (:mod:`mmgen.data.ops.quality`) on ShapesWorld.

The examples are semi-synthetic pairs at graded quality levels, made from ShapesWorld where the truth
is exact:

    level 3  the scene's own caption
    level 2  the caption of the scene with one attribute of one object changed (colour, shape,
             size or position): partially wrong
    level 1  the caption of an unrelated scene
    level 0  gibberish text, or a caption paired with a corrupted (noise) picture

    mmgen train-quality --out runs/quality   # 8000 pairs x 30 epochs, about 2 CPU-minutes
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from safetensors.torch import save_file

from mmgen.data.ops.quality import (
    CONFIG_FILE,
    N_LEVELS,
    WEIGHTS_FILE,
    QualityConfig,
    batch_inputs,
    build_model,
    score_pairs,
)
from mmgen.errors import MMGenError
from mmgen.utils.checkpoints import resume_or_start, save_checkpoint
from mmgen.utils.metric_log import MetricLogger
from mmgen.world import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, caption, random_scene, render
from mmgen.world.text import gibberish


def _perturb(scene, rng: random.Random):
    """The scene with one attribute of one object changed."""
    objs = list(scene.objects)
    k = rng.randrange(len(objs))
    o = objs[k]
    what = rng.choice(["color", "shape", "size", "cell"])
    free = [c for c in POSITIONS if scene.at(c) is None]
    if what == "cell" and not free:
        what = "color"
    pool = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "cell": free}[what]
    value = rng.choice([x for x in pool if x != getattr(o, what)])
    objs[k] = Obj(**{**dataclasses.asdict(o), what: value})
    return Scene(background=scene.background, objects=objs)


def make_examples(n: int, seed: int = 0, size: int = 64) -> list[tuple]:
    """``n`` (PIL image, text, level) triples, levels balanced."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = i % N_LEVELS
        scene = random_scene(rng)
        img = render(scene, size, size)
        if level == 3:
            text = caption(scene, rng)
        elif level == 2:
            text = caption(_perturb(scene, rng), rng)
        elif level == 1:
            text = caption(random_scene(rng), rng)
        elif rng.random() < 0.5:
            text = gibberish(rng)
        else:
            text = caption(scene, rng)
            noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size, size, 3), dtype=np.uint8)
            img = PILImage.fromarray(noise)
        out.append((img, text, level))
    rng.shuffle(out)
    return out


def train_quality(
    out: str | Path,
    examples: int = 8000,
    epochs: int = 30,
    seed: int = 0,
    image_size: int = 32,
    batch_size: int = 64,
    lr: float = 3e-3,
    val_examples: int = 400,
    resume: bool = False,
) -> dict:
    """Train the scorer on ``examples`` generated pairs; save it to ``out``; return validation
    accuracy, per-level mean score and the path. A checkpoint is kept after each epoch (the last two):
    ``resume`` continues from the latest one, with the epochs' shuffles an uninterrupted run draws."""
    if examples < N_LEVELS * 4 or epochs < 1:
        raise MMGenError("train-quality needs --examples >= 16 and --epochs >= 1")
    torch.manual_seed(seed)
    cfg = QualityConfig(image_size=image_size)
    model = build_model(cfg)
    train, val = make_examples(examples, seed), make_examples(val_examples, seed + 1_000_003)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = -(-len(train) // batch_size)
    step = resume_or_start(out, resume, model, opt)  # epoch ends only: a multiple of steps_per_epoch
    # one cycle over the whole run; a resumed run rebuilds it at its step from the restored groups
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, last_epoch=step - 1 if step else -1
    )
    inputs = batch_inputs([x[0] for x in train], [x[1] for x in train], cfg)
    labels = torch.tensor([x[2] for x in train])
    order = torch.Generator().manual_seed(seed)
    for _ in range(step // steps_per_epoch):  # the shuffles of the epochs already trained
        torch.randperm(len(train), generator=order)
    log = MetricLogger(out, step)
    model.train()
    for epoch in range(step // steps_per_epoch, epochs):
        perm = torch.randperm(len(train), generator=order)
        total, n = 0.0, 0
        for s in range(0, len(train), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(*_select(inputs, idx)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n, step = total + loss.item(), n + 1, step + 1
        log.log({"step": step, "epoch": epoch + 1, "loss": round(total / n, 6), "lr": sched.get_last_lr()[0]})
        save_checkpoint(out / "checkpoints", model, opt, step, keep=2)
    log.close()
    model.eval()
    metrics = evaluate(model, val)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "levels": N_LEVELS,
                "train_examples": examples,
                "epochs": epochs,
                "seed": seed,
                "val": metrics,
            },
            indent=1,
        )
    )
    return {**metrics, "path": str(out)}


def _select(inputs, idx):
    px, ids, mask = inputs
    return px[idx], ids[idx], mask[idx]


def evaluate(model, examples) -> dict:
    with torch.inference_mode():
        logits = model(*batch_inputs([x[0] for x in examples], [x[1] for x in examples], model.cfg))
    pred = logits.argmax(-1).numpy()
    levels = np.array([x[2] for x in examples])
    scores = np.array(score_pairs(model, [x[0] for x in examples], [x[1] for x in examples]))
    return {
        "accuracy": round(float((pred == levels).mean()), 4),
        "mean_score_by_level": {int(k): round(float(scores[levels == k].mean()), 4) for k in range(N_LEVELS)},
    }
