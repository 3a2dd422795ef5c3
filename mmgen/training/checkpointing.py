"""Checkpoints and bundles: DeepSpeed checkpoints (with the RNG state, so a resume is exact), bundle
snapshots during training, and the final mmgen bundle."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from mmgen.config import to_dict
from mmgen.models.bundle import Bundle
from mmgen.training.config import TrainConfig
from mmgen.training.model_setup import unwrap_for_saving


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict | None) -> None:
    if state:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])


def save_run_bundle(
    engine,
    data: dict,
    cfg: TrainConfig,
    summary: dict,
    dest: Path,
    adapter_dir: Path,
    rank: int,
    extra_meta: dict | None = None,
) -> None:
    """Rank 0 writes the engine's model as a bundle at ``dest`` (LoRA merged); every rank must call it."""
    import deepspeed

    # ZeRO 3 partitions the weights themselves: gather them (on every rank) before rank 0 saves.
    gather = (
        deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            if cfg.lora.enabled:
                engine.module.save_pretrained(adapter_dir)
            save_bundle(unwrap_for_saving(engine.module, adapter_dir), data, cfg, summary, dest, extra_meta)


def write_snapshot(
    engine, data: dict, cfg: TrainConfig, out_dir: Path, step: int, train_s: float, logged: dict, rank: int
) -> Path:
    """The bundle the run would write if it ended now, at ``out_dir/snapshots/step-NNNNNN``.

    Written under a ``.partial`` name and renamed, so a run killed mid-write leaves no half bundle for an
    evaluator to load; a resumed run that passes the step again replaces it with the same weights."""
    dest = out_dir / "snapshots" / f"step-{step:06d}"
    part = dest.with_name(dest.name + ".partial")
    if rank == 0:
        shutil.rmtree(part, ignore_errors=True)
    facts = {"step": step, "train_seconds": train_s}
    summary = {
        "stage": cfg.stage,
        "steps": step,
        "of_steps": cfg.steps,
        "train_seconds": train_s,
        "last_logged": logged,
    }
    # Saving must leave the training stream untouched, so that a run with snapshots trains the same weights.
    rng = rng_state()
    save_run_bundle(engine, data, cfg, summary, part, part / "lora_adapter", rank, {"snapshot": facts})
    set_rng_state(rng)
    if rank == 0:
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
    return dest


def save_bundle(
    model, data: dict, cfg: TrainConfig, summary: dict, final: Path, extra_meta: dict | None = None
) -> None:
    image_tok = data["image_tokenizer"]
    meta = {
        "preset": cfg.preset,
        "stage": cfg.stage,
        "train": summary,
        "config": to_dict(cfg),
        "image_grids": data["image_grids"],
        **(extra_meta or {}),
    }
    if image_tok is not None:
        meta["image_resolution"] = list(image_tok.resolution)
    audio_tok = data.get("audio_tokenizer")
    if audio_tok is not None:
        meta["audio_sample_rate"] = audio_tok.sample_rate
    # The audio codec goes in too: without it a model that writes audio codes could not be heard.
    Bundle(model, data["text_tokenizer"], data["vocab"], image_tok, meta, audio_tok).save(final)
