"""The pretraining config: YAML (``training/*.yaml``) -> typed dataclasses, with ``key=value`` overrides.

The YAML is the single source of truth for batch sizes and clipping: the trainer writes
``micro_batch``, ``grad_accum`` and ``optim.grad_clip`` into the DeepSpeed JSON it loads, so the two
files can never disagree. The JSON holds only what is DeepSpeed's own business (ZeRO stage, offload,
precision, communication).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmgen.config import load_config
from mmgen.errors import MMGenError
from mmgen.paths import REPO_ROOT, recipe_path


@dataclass
class DataConfig:
    code_shards: str | list[str] = field(default_factory=list)  # file(s), directories or globs of code shards
    image_tokenizer: str | None = None  # directory of the image tokenizer that made the codes
    codebook_size: int | None = None  # pixel codebook size when no image tokenizer is given
    text_tokenizer: str | None = None  # a saved Hugging Face tokenizer; None: train a BPE on the shards' texts
    text_vocab_size: int = 1000
    max_grid: int = 16  # largest image code-grid side the vocab can express
    seq_len: int = 512  # packed row length
    max_docs: int | None = None
    # Train only on documents whose meta "split" is listed (documents without one are kept): held-out
    # and validation documents of a corpus such as ShapesWorld must never reach training.
    splits: list[str] = field(default_factory=lambda: ["train"])
    loss_targets: list[str] = field(default_factory=lambda: ["text", "structural", "image", "audio"])


@dataclass
class ModelConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    max_len: int | None = None  # RoPE positions; default: data.seq_len
    tie_embeddings: bool = True
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


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
    steps: int = 300  # optimizer steps
    micro_batch: int = 8  # packed rows per rank per forward
    grad_accum: int = 1
    deepspeed: str = "training/ds_zero2_cpu.json"
    seed: int = 0
    out_dir: str = "runs/pretrain"
    log_every: int = 10
    save_every: int = 100  # DeepSpeed checkpoint interval (and always at the last step)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from out_dir/checkpoints/latest when it exists
    threads: int | None = None  # torch CPU threads per rank (None: torch's default)
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
    for name in ("steps", "micro_batch", "grad_accum", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise MMGenError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.data.seq_len < 16:
        raise MMGenError(f"data.seq_len {cfg.data.seq_len} is too short (use at least 16)")
    if not cfg.data.code_shards:
        raise MMGenError("no training data: set data.code_shards=DIR (code shards from `mmgen tokenize`)")
    if cfg.model.max_len is not None and cfg.model.max_len < cfg.data.seq_len:
        raise MMGenError(f"model.max_len {cfg.model.max_len} is shorter than data.seq_len {cfg.data.seq_len}")


def resolve_deepspeed_config(path: str) -> Path:
    """A DeepSpeed JSON by path (relative to the cwd) or by its place in the repository."""
    p = Path(path)
    for candidate in (p, REPO_ROOT / p, REPO_ROOT / "training" / p.name):
        if candidate.is_file():
            return candidate
    raise MMGenError(f"DeepSpeed config not found: {path} (give a path, e.g. deepspeed=training/ds_zero2_cpu.json)")
