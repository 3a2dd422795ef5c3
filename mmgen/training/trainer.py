"""Pretraining the unified LM on code shards with DeepSpeed (ZeRO, any number of ranks and nodes).

One rank's path through :func:`pretrain`:

1. distributed setup: under the ``deepspeed`` launcher the env (RANK, WORLD_SIZE, ...) is given;
   run in-process it becomes a single-rank job (gloo on CPU), so debugging needs no launcher;
2. data: get the text tokenizer (trained on a sample of the shards' texts by rank 0 and saved in the
   run directory, so a resumed run and every rank use the very same ids), build the
   :class:`~mmgen.processing.vocab.Vocab`; then either read the code shards, turn documents into
   sequences and pack them into rows in memory (``data.source=memory``), or open the packed shards
   ``mmgen pack`` wrote, which each rank streams (``data.source=packed``, :mod:`mmgen.training.streaming`);
3. model and engine: the tiny Llama from config, torch AdamW with a warmup + decay schedule, all
   handed to ``deepspeed.initialize``;
4. loop: each rank reads its own rows (in memory: a seeded permutation per epoch; streamed: its own
   shards, the streams' positions saved in the checkpoint; either way a resumed run reads exactly
   what an uninterrupted one would), ``engine.backward`` / ``engine.step``, metrics to JSONL
   and TensorBoard, a DeepSpeed checkpoint every ``save_every`` steps, a bundle snapshot every
   ``snapshot_every`` steps (``out_dir/snapshots/step-NNNNNN``);
5. rank 0 writes the mmgen bundle ``out_dir/final`` (model, text tokenizer, vocab, image tokenizer, audio codec)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mmgen.config import save_config
from mmgen.errors import MMGenError
from mmgen.models.lm import count_parameters
from mmgen.training.checkpointing import prune_checkpoints, rng_state, save_run_bundle, set_rng_state, write_snapshot
from mmgen.training.config import TrainConfig, check_global_batch, load_train_config
from mmgen.training.data import MemoryBatches, StreamedBatches, prepare_data
from mmgen.training.distributed import barrier, gather, init_distributed
from mmgen.training.losses import lm_loss, modality_names, modality_weights
from mmgen.training.metrics import MetricWindow, peak_rss_mib
from mmgen.training.model_setup import FEATURE_SOURCES, build_model, continuous_input_table, model_dtype
from mmgen.training.optim import build_optimizer, deepspeed_config
from mmgen.training.qlora import load_quantized_module, parameter_bytes
from mmgen.utils.metric_log import MetricLogger
from mmgen.utils.precision import autocast, resolved_precision
from mmgen.utils.schedules import seek


def pretrain(config_path: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train the unified LM (stage align, pretrain or sft, from the config); returns the path of the
    written bundle (``out_dir/final``).

    Works in-process (one rank) or under the ``deepspeed`` launcher (see ``training/pretrain.sh``)."""
    cfg = load_train_config(config_path, overrides)
    return run_training(cfg)


def train(config_path: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Alias of :func:`pretrain`: any stage, as the config says."""
    return pretrain(config_path, overrides)


def sft(config_path: str | Path | None = "tiny_sft", overrides: list[str] | None = None) -> Path:
    """Supervised fine-tuning: :func:`pretrain` with ``stage=sft`` forced."""
    return pretrain(config_path, [*(overrides or []), "stage=sft"])


def run_training(cfg: TrainConfig) -> Path:
    t_start = time.perf_counter()
    first_step_s = None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = init_distributed()
    check_global_batch(cfg, world)
    import deepspeed

    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

        save_config(cfg, out_dir / "config.yaml")
    barrier()

    data = prepare_data(cfg, out_dir, rank)
    tok, vocab = data["text_tokenizer"], data["vocab"]
    if rank == 0:
        vocab.save(out_dir / "vocab.json")
    n_rows = data["n_rows"]
    # Before the model is built: a tokenizer that does not fit the feature dims stops the run at once.
    tables = {m: t for m in FEATURE_SOURCES if (t := continuous_input_table(cfg, data, m)) is not None}
    model = build_model(cfg, vocab, tok, data.get("image_tokenizer"))
    for modality, table in tables.items():  # the model keeps them: inference then reads the same input
        getattr(model, "get_base_model", lambda: model)().set_code_vectors(modality, table)
    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )

    start, train_s0, data_state = 0, 0.0, None
    if cfg.resume and (ckpt_dir / "latest").is_file():
        custom = load_quantized_module if cfg.lora.quantize != "none" else None
        # The schedule is this run's, placed at the resumed step (seek), not the checkpoint's: a resume
        # that changes the total steps or the peak rate follows its own configuration.
        load_path, client = engine.load_checkpoint(str(ckpt_dir), custom_load_fn=custom, load_lr_scheduler_states=False)
        if load_path is None:
            raise MMGenError(f"could not resume from {ckpt_dir} (remove it or set resume=false)")
        start = int(client.get("step", engine.global_steps))
        seek(scheduler, start)
        train_s0 = float(client.get("train_s", 0.0))  # training seconds before the checkpoint
        set_rng_state(client.get("rng", {}).get(str(rank)))
        data_state = client.get("data")

    batches = (
        MemoryBatches(data["rows"], cfg, rank, world)
        if data["rows"] is not None
        else StreamedBatches(data["index"], cfg, rank, world, data_state)
    )
    dtype = model_dtype(engine.module)
    # Flash-attention kernels take packed rows as variable-length sequences found from the restarting
    # position ids (no mask); every other kernel gets the block-diagonal 4-D mask.
    attention = "varlen" if cfg.model.attn_implementation.startswith("flash") else "mask"
    weights = modality_weights(vocab, cfg.loss.weights)
    names = modality_names(vocab)
    metrics = MetricLogger(out_dir, start, tensorboard=cfg.tensorboard, enabled=rank == 0)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)

    fill = data["pack_stats"]["fill_rate"]
    t_run = time.perf_counter()
    snap_s = 0.0  # seconds spent writing snapshots: not training time

    def train_seconds() -> float:
        return train_s0 + time.perf_counter() - t_run - snap_s

    window = MetricWindow(len(names))
    run_tokens, last = 0, {}
    engine.train()
    for step in range(start, cfg.steps):
        step_batches, denom = batches.step(step, dtype, attention)
        for batch in step_batches:
            mask = {"attention_mask": batch["attention_mask"].to(engine.device)} if "attention_mask" in batch else {}
            with autocast(cfg.precision, engine.device):
                out = engine(
                    input_ids=batch["input_ids"].to(engine.device),
                    position_ids=batch["position_ids"].to(engine.device),
                    use_cache=False,
                    **mask,
                )
            # DeepSpeed averages gradients over ranks and divides the loss by grad_accum: scale back so
            # the step's gradient is that of the token mean over the whole global batch. The loss is
            # taken in float32 whatever the forward computed in.
            loss, stats = lm_loss(
                out.logits.float(),
                batch["labels"].to(engine.device),
                vocab,
                weights,
                denom / (world * cfg.grad_accum),
                z_loss=cfg.loss.z_loss,
            )
            engine.backward(loss)
            engine.step()
            window.add(loss.item() / (world * cfg.grad_accum), stats, int((batch["segment_ids"] >= 0).sum()))
        done = step + 1
        if first_step_s is None:  # start-up included: what a larger corpus would slow down
            first_step_s = time.perf_counter() - t_start
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = window.flush(world, done, n_rows, cfg, fill, scheduler.get_last_lr()[0], names, t_run)
            run_tokens += last.pop("_tokens")
            metrics.log(last)
            if bar is not None:  # rank 0's
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % cfg.save_every == 0 or done == cfg.steps:
            rng_all = gather(rng_state(), world)
            engine.save_checkpoint(
                str(ckpt_dir),
                tag=f"step_{done}",
                client_state={
                    "step": done,
                    "rng": {str(r): s for r, s in enumerate(rng_all)},
                    "train_s": train_seconds(),
                    "data": batches.state(),
                },
            )
            if rank == 0:
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.steps:
            t_snap = time.perf_counter()
            write_snapshot(engine, data, cfg, out_dir, done, train_seconds(), last, rank)
            snap_s += time.perf_counter() - t_snap
    if bar is not None:
        bar.close()
    metrics.close()  # TensorBoard flushed, loss.png drawn

    run_s = time.perf_counter() - t_run - snap_s
    source_summary = batches.summary()
    rss = gather(peak_rss_mib(), world)
    summary = {
        "stage": cfg.stage,
        "steps": cfg.steps,
        "resumed_from": start,
        "final_loss": last.get("loss"),
        "train_seconds": train_seconds(),
        "tokens_per_s": run_tokens / run_s if run_tokens else None,
        "world_size": world,
        "first_step_s": first_step_s,
        "peak_rss_mib_per_rank": rss,
        "data_source": cfg.data.source,
        "precision": resolved_precision(cfg.precision, engine.device),
        "block_factors": _block_factors(engine.module),
        "parameters": count_parameters(engine.module),
        "trainable_parameters": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
        "parameter_bytes": parameter_bytes(engine.module),
        "vocab_size": vocab.size,
        "data": {
            "sequences": data["seq_stats"],
            "packing": data["pack_stats"],
            "image_grids": data["image_grids"],
            **source_summary,
        },
    }
    final = out_dir / "final"
    save_run_bundle(engine, data, cfg, summary, final, out_dir / "lora_adapter", rank)
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    barrier()
    return final


def _block_factors(model) -> dict | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    factors = getattr(base, "block_factors", None)
    return None if factors is None else {k: base.config.block_factors[k] for k in ("rows", "attributes")}
