"""Optimisation: AdamW with a warmup + decay schedule (:mod:`mmgen.utils.schedules`), and the DeepSpeed
config the run hands ``deepspeed.initialize``."""

from __future__ import annotations

import torch

from mmgen.training.config import TrainConfig, read_deepspeed_config
from mmgen.utils.schedules import lr_scheduler


def build_optimizer(model, cfg: TrainConfig):
    # No weight decay on norms and biases (1-D tensors): decaying them only fights the normalisation.
    frozen_rows = getattr(model, "_mmgen_frozen_rows", None)
    emb = model.get_input_embeddings().weight if frozen_rows else None
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p is not emb]
    no_decay = [p for p in model.parameters() if p.requires_grad and (p.ndim < 2 or p is emb)]
    # Empty groups are left out: ZeRO drops them, and the scheduler must see the same groups.
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # at step 0: a resumed run seeks it to the checkpoint's step (see the trainer)
    sched = lr_scheduler(opt, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    return opt, sched


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = read_deepspeed_config(cfg.deepspeed)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two below and the world size
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["zero_allow_untested_optimizer"] = True  # a plain torch AdamW, which ZeRO 1/2 handle fine
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's own printing quiet
    return ds
