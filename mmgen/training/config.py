"""The pretraining config: YAML (``training/*.yaml``) -> typed dataclasses, with ``key=value`` overrides.

The YAML is the single source of truth for batch sizes and clipping: the trainer writes
``micro_batch``, ``grad_accum`` and ``optim.grad_clip`` into the DeepSpeed JSON it loads, so the two
files can never disagree. The JSON holds only what is DeepSpeed's own business (ZeRO stage, offload,
precision, communication).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmgen.config import load_config
from mmgen.errors import MMGenError
from mmgen.paths import REPO_ROOT, recipe_path
from mmgen.utils.precision import check_precision


@dataclass
class DataConfig:
    code_shards: str | list[str] = field(default_factory=list)  # file(s), directories or globs of code shards
    # Where training rows come from: "memory" reads every code shard and packs on every rank at start
    # (small corpora); "packed" streams the packed shards `mmgen pack` wrote to data.packed_shards, each
    # rank its own shards through a shuffle buffer, so memory and start-up do not grow with the corpus.
    source: Literal["memory", "packed"] = "memory"
    packed_shards: str | None = None  # directory written by `mmgen pack` (data.source=packed)
    shuffle_buffer: int = 512  # rows held by each data stream's shuffle buffer (data.source=packed)
    streams: int | None = None  # data streams of the global batch; default the world size (data.source=packed)
    # Documents (the first ones, in shard order) the text BPE is trained on when no tokenizer is given;
    # large enough that the demo's corpus (about 25,000 documents) is read whole
    text_sample_docs: int = 200000
    image_tokenizer: str | None = None  # directory of the image tokenizer that made the codes
    codebook_size: int | None = None  # pixel codebook size when no image tokenizer is given
    # Which of the image tokenizer's code levels the LM reads and writes (DualViTok: sem, pix); None: all.
    image_levels: list[str] | None = None
    # Directory of the audio codec that made the shards' audio codes: the vocab gets its "audio" range
    # (levels x codebook) and model.audio_feature_dim reads its code vectors.
    audio_tokenizer: str | None = None
    # Video layout in the vocab (<time_k> tokens every video_time_step seconds, <skip_n>): 0 leaves the
    # vocab as it was, and video items are skipped (counted) when sequences are built.
    video_times: int = 0
    video_time_step: float = 0.5
    text_tokenizer: str | None = None  # a saved Hugging Face tokenizer; None: train a BPE on the shards' texts
    text_vocab_size: int = 1000
    max_grid: int = 16  # largest image code-grid side the vocab can express
    # Text id space; default len(text tokenizer). Real decoders pad their embedding table beyond the
    # tokenizer (Qwen2.5: 151936 rows for 151665 tokens): set it to the decoder's vocab_size.
    text_size: int | None = None
    # Code ranges in id order, name -> size, for tokenizers other than the pixel VQ (DualViTok: sem and
    # pix; an audio codec: audio). Default: {pix: the image tokenizer's codebook size}.
    codebooks: dict | None = None
    seq_len: int = 512  # packed row length
    packing: Literal["mbs", "ffd"] = "mbs"  # minimum bin slack (fuller rows) or first-fit-decreasing
    max_docs: int | None = None
    # Train only on documents whose meta "split" is listed (documents without one are kept): held-out
    # and validation documents of a corpus such as ShapesWorld must never reach training.
    splits: list[str] = field(default_factory=lambda: ["train"])
    loss_targets: list[str] = field(default_factory=lambda: ["text", "structural", "image", "audio"])
    # Which documents take the chat template: "all" (the sft stage's default), "roles" (only documents
    # whose items carry roles, e.g. ShapesWorld QA: conversations mixed into pretraining, so SFT meets a
    # layout the model already reads), "none" (pretraining's default). The sft stage learns the assistant's
    # turns only; other stages every item of either role (a user's picture still teaches image codes).
    chat: Literal["auto", "all", "roles", "none"] = "auto"
    # Share of text-to-image prompts (a caption in the world's grammar right before its picture) rewritten
    # as people type them: lower-case first letter, no final period, odd spacing, another word order or a
    # synonym the grammar allows (mmgen.world.surface). The picture, its codes and the scene stay;
    # the text tokenizer trained by the run sees the rewritten forms too. 0: every text as written.
    prompt_variation: float = 0.0


@dataclass
class ModelConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    max_len: int | None = None  # RoPE positions; default: data.seq_len
    tie_embeddings: bool = True
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # A real decoder instead of the tiny Llama: a checkpoint path / hub id (``base``), or a config
    # dict with model_type (``base_config``, random weights: real-scale shapes without a download).
    base: str | None = None
    base_config: dict | None = None
    code_head: bool = False  # separate output head for the code ranges (Janus)
    # Rows of labelled code blocks kept as sums of attribute vectors (mmgen.training.block_factors), when
    # the image tokenizer labels its blocks; so a held-out colour-shape pair can be written.
    block_factors: bool = False
    image_feature_dim: int | None = None  # continuous image input: the projector's input width
    audio_feature_dim: int | None = None
    projector_depth: int = 2
    input_placement: Literal["codes", "placeholder"] = "codes"
    # the code range image features stand for: pix, or sem (DualViTok's CLIP-aligned codes)
    image_input_range: str = "pix"
    # Learned (branch, row, col) embeddings added to image-code inputs (LlamaGen-style 2-D positions):
    # a small decoder learns where each code sits far faster than from RoPE's 1-D distances alone.
    grid_positions: bool = False
    # ...naming the cell of the code each input predicts (RandAR's position instructions) instead of its own
    grid_target: bool = False
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    # Per-modality weights of the next-token loss: text, structural, and each code range (pix, sem,
    # audio); "image" sets sem and pix together. Unlisted modalities weigh 1.
    weights: dict = field(default_factory=dict)
    z_loss: float = 0.0  # PaLM's z-loss coefficient on log(Z)^2 of the target positions (1e-4 typical)
    prompt_dropout: float = 0.0  # CFG: share of text-to-image captions dropped (ILLUME+/Emu3 use 0.05-0.1)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # e.g. [code_head, image_projector]
    # QLoRA: the frozen base's decoder Linear layers held in bitsandbytes 4-bit (NF4/FP4) or LLM.int8
    # 8-bit while the adapters learn in full precision. Embeddings, output heads, projectors and
    # modules_to_save are never quantized.
    quantize: Literal["none", "4bit", "8bit"] = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the 4-bit blocks' absmax constants too (~0.37 bits/param saved)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bfloat16 on GPUs


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr of the cosine/linear decay, as a fraction of lr
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: Literal["align", "pretrain", "sft"] = "pretrain"
    # Start from a bundle (e.g. the pretraining's final/) instead of a fresh model: its weights, text
    # tokenizer and vocab are used, so SFT continues exactly where pretraining stopped.
    init_from: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    steps: int = 300  # optimizer steps
    micro_batch: int = 8  # packed rows per rank per forward
    # Rows per optimizer step over all ranks; when set, a launch on a world size that does not give
    # micro_batch * grad_accum * world == global_batch stops with an error instead of silently
    # training another recipe.
    global_batch: int | None = None
    grad_accum: int = 1
    deepspeed: str = "training/ds_zero2_cpu.json"
    seed: int = 0
    out_dir: str = "runs/pretrain"
    log_every: int = 10
    save_every: int = 100  # DeepSpeed checkpoint interval (and always at the last step)
    keep_checkpoints: int = 2
    # Every N optimizer steps (never at the last, which writes final/) a loadable bundle in
    # out_dir/snapshots/step-NNNNNN/, with the step and the training seconds so far in its mmgen.json:
    # the quality-against-training-time curve (benchmarks/quality_curve.py) evaluates them. 0: none.
    snapshot_every: int = 0
    resume: bool = True  # continue from out_dir/checkpoints/latest when it exists
    threads: int | None = None  # torch CPU threads per rank (None: torch's default)
    # fp32, bf16 or auto (mmgen.utils.precision): bf16 runs the forward pass under torch.autocast in
    # bfloat16 while weights, Adam and the loss stay float32. That is mixed precision for the CPU DeepSpeed
    # configs, whose own bf16 block is off; the GPU configs' bf16 block (bf16 weights, float32 master
    # copies) already computes in bf16, and autocast on top changes nothing.
    precision: str = "fp32"
    tensorboard: bool = True
    progress: bool = True
    preset: str = "tiny"


def load_train_config(config: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a pretraining config from a YAML path or a recipe name in ``training/`` (e.g. ``tiny_pretrain``)."""
    path = recipe_path(config, "training") if config is not None else None
    cfg = load_config(TrainConfig, path, list(overrides or []))
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    check_precision(cfg.precision)
    for name in ("steps", "micro_batch", "grad_accum", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise MMGenError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.snapshot_every < 0:
        raise MMGenError(f"snapshot_every must be 0 (no snapshots) or a step interval, got {cfg.snapshot_every}")
    if cfg.data.seq_len < 16:
        raise MMGenError(f"data.seq_len {cfg.data.seq_len} is too short (use at least 16)")
    if not 0.0 <= cfg.loss.prompt_dropout < 1.0:
        raise MMGenError(f"loss.prompt_dropout must be in [0, 1), got {cfg.loss.prompt_dropout}")
    if not 0.0 <= cfg.data.prompt_variation <= 1.0:
        raise MMGenError(f"data.prompt_variation must be in [0, 1], got {cfg.data.prompt_variation}")
    if cfg.lora.enabled and cfg.stage != "sft":
        raise MMGenError("lora.enabled is for stage=sft (align and pretrain train the full model or the projectors)")
    check_qlora(cfg)
    if cfg.init_from and not (Path(cfg.init_from) / "vocab.json").is_file():
        raise MMGenError(
            f"init_from={cfg.init_from} is not an mmgen bundle (no vocab.json); give a training run's final/"
        )
    if cfg.data.source == "packed":
        if not cfg.data.packed_shards:
            raise MMGenError("data.source=packed needs data.packed_shards=DIR (packed shards from `mmgen pack`)")
        if cfg.data.max_docs is not None:
            raise MMGenError("data.max_docs applies to data.source=memory; pack fewer code shards instead")
        if cfg.data.shuffle_buffer < 1 or (cfg.data.streams is not None and cfg.data.streams < 1):
            raise MMGenError("data.shuffle_buffer and data.streams must be at least 1")
    elif not cfg.data.code_shards:
        raise MMGenError("no training data: set data.code_shards=DIR (code shards from `mmgen tokenize`)")
    if cfg.data.text_sample_docs < 1:
        raise MMGenError(f"data.text_sample_docs must be at least 1, got {cfg.data.text_sample_docs}")
    if cfg.model.max_len is not None and cfg.model.max_len < cfg.data.seq_len:
        raise MMGenError(f"model.max_len {cfg.model.max_len} is shorter than data.seq_len {cfg.data.seq_len}")


def check_qlora(cfg: TrainConfig) -> None:
    q = cfg.lora.quantize
    if q == "none":
        return
    if cfg.stage != "sft" or not cfg.lora.enabled:
        raise MMGenError(
            f"lora.quantize={q} (QLoRA) is for stage=sft with lora.enabled=true: a quantized base "
            "cannot learn, only adapters on it can"
        )
    # ZeRO-3 partitions every parameter across ranks, and bitsandbytes keeps each packed weight's scales
    # (quant_state) on the tensor object itself, which a partitioned shard loses. (DeepSpeed's own
    # QLoRA + ZeRO-3 route loads the model inside zero.Init with quant_storage set; this trainer builds
    # the model before deepspeed.initialize, so that route is not open.)
    zero = (read_deepspeed_config(cfg.deepspeed).get("zero_optimization") or {}).get("stage", 0)
    if zero == 3:
        raise MMGenError(
            f"lora.quantize={q} does not work with ZeRO stage 3 ({cfg.deepspeed}): ZeRO-3 partitions the "
            "bitsandbytes weights and loses their quantization state; use "
            "deepspeed=training/ds_zero2_cpu.json "
            "(or ds_zero2_gpu.json): the frozen 4/8-bit base is small enough to keep whole on every rank"
        )


def resolve_deepspeed_config(path: str) -> Path:
    """A DeepSpeed JSON by path (relative to the cwd) or by its place in the repository."""
    p = Path(path)
    for candidate in (p, REPO_ROOT / p, REPO_ROOT / "training" / p.name):
        if candidate.is_file():
            return candidate
    raise MMGenError(f"DeepSpeed config not found: {path} (give a path, e.g. deepspeed=training/ds_zero2_cpu.json)")


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed JSON at ``path`` (see :func:`resolve_deepspeed_config`), parsed."""
    p = resolve_deepspeed_config(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MMGenError(f"DeepSpeed config {p} is not valid JSON: {e}") from None


def check_global_batch(cfg: TrainConfig, world: int) -> None:
    if cfg.global_batch is None:
        return
    got = cfg.micro_batch * cfg.grad_accum * world
    if got != cfg.global_batch:
        need = cfg.global_batch / (cfg.micro_batch * world)
        hint = f"grad_accum={int(need)}" if need == int(need) and need >= 1 else "another micro_batch"
        raise MMGenError(
            f"global_batch={cfg.global_batch} but micro_batch {cfg.micro_batch} x grad_accum "
            f"{cfg.grad_accum} "
            f"x {world} ranks = {got}; set {hint} for {world} ranks"
        )
