"""Pretraining the unified LM on code shards with DeepSpeed (ZeRO, any number of ranks and nodes).

One rank's path through :func:`pretrain`:

1. distributed setup: under the ``deepspeed`` launcher the env (RANK, WORLD_SIZE, ...) is given;
   run in-process it becomes a single-rank job (gloo on CPU), so debugging needs no launcher;
2. data: get the text tokenizer (trained on a sample of the shards' texts by rank 0 and saved in the
   run directory, so a resumed run and every rank use the very same ids), build the
   :class:`~mmgen.models.vocab.Vocab`; then either read the code shards, turn documents into
   sequences and pack them into rows in memory (``data.source=memory``), or open the packed shards
   ``mmgen pack`` wrote, which each rank streams (``data.source=packed``, :mod:`mmgen.training.streaming`);
3. model and engine: the tiny Llama from config, torch AdamW with a warmup + decay schedule, all
   handed to ``deepspeed.initialize``;
4. loop: each rank reads its own rows (in memory: a seeded permutation per epoch; streamed: its own
   shards, the streams' positions saved in the checkpoint; either way a resumed run reads exactly
   what an uninterrupted one would), ``engine.backward`` / ``engine.step``, metrics to JSONL
   and TensorBoard, a DeepSpeed checkpoint every ``save_every`` steps, a bundle snapshot every
   ``snapshot_every`` steps (``out_dir/snapshots/step-NNNNNN``);
5. rank 0 writes the mmgen bundle ``out_dir/final`` (model, text tokenizer, vocab, image tokenizer, audio codec).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mmgen.config import to_dict
from mmgen.data.doc import BadRecord
from mmgen.errors import MMGenError
from mmgen.training.config import TrainConfig, check_global_batch, load_train_config, read_deepspeed_config


# -- distributed ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed through DeepSpeed once per process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mmgen.utils.compat import clear_stale_extension_locks

    clear_stale_extension_locks()  # DeepSpeed JIT-builds an op below; a killed earlier build would hang it
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # not under a launcher: a single-rank job in this process
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = "gloo" if get_accelerator().device_name() == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _barrier():
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# -- data ----------------------------------------------------------------------------------------
def _inherit_tokenizers(cfg: TrainConfig) -> None:
    """A stage started from a bundle (``init_from``) reuses the bundle's image tokenizer and audio codec
    (its ``image_tokenizer/`` and ``audio_tokenizer/``) unless the recipe names its own."""
    for name in ("image_tokenizer", "audio_tokenizer"):
        if cfg.init_from and not getattr(cfg.data, name) and (Path(cfg.init_from) / name).is_dir():
            setattr(cfg.data, name, str(Path(cfg.init_from) / name))


def text_tokenizer_for(cfg: TrainConfig, tok_dir: Path, rank: int, records=None):
    """The run's text tokenizer, saved at ``tok_dir`` once (by rank 0) and loaded from there on every
    rank: the bundle's (``init_from``), ``data.text_tokenizer``, or a byte-level BPE trained on the texts
    of the first ``data.text_sample_docs`` documents (``records``, else read from the code shards)."""
    from itertools import islice

    from transformers import AutoTokenizer

    from mmgen.data.code_shards import read_code_shards_of_splits
    from mmgen.data.sequence import doc_texts
    from mmgen.models.text_tokenizer import train_text_tokenizer

    if rank == 0 and not (tok_dir / "tokenizer_config.json").is_file():
        if cfg.init_from:  # continue with the ids the starting bundle was trained on
            tok = AutoTokenizer.from_pretrained(cfg.init_from)
        elif cfg.data.text_tokenizer:
            tok = AutoTokenizer.from_pretrained(cfg.data.text_tokenizer)
        else:
            if records is None:
                records = read_code_shards_of_splits(cfg.data.code_shards, cfg.data.splits)
            sample = islice((r for r in records if not isinstance(r, BadRecord)), cfg.data.text_sample_docs)
            tok = train_text_tokenizer(doc_texts(sample), vocab_size=cfg.data.text_vocab_size)
        tok.save_pretrained(tok_dir)
    _barrier()
    return AutoTokenizer.from_pretrained(tok_dir)


def media_tokenizers_and_vocab(cfg: TrainConfig, tok):
    """(vocab, image tokenizer or None, audio codec or None) of a run with text tokenizer ``tok``."""
    from mmgen.models.vocab import Vocab

    image_tokenizer = None
    _inherit_tokenizers(cfg)
    if cfg.data.image_tokenizer:
        from mmgen.tokenizers import load_image_tokenizer

        if not Path(cfg.data.image_tokenizer).is_dir():
            raise MMGenError(f"data.image_tokenizer: no tokenizer directory at {cfg.data.image_tokenizer} (train one with "
                             "`mmgen train-tokenizer`, or set data.image_tokenizer=null data.codebook_size=N)")
        image_tokenizer = load_image_tokenizer(cfg.data.image_tokenizer)
        books = image_codebooks(image_tokenizer)
    elif cfg.data.codebook_size:
        books = {"pix": int(cfg.data.codebook_size)}
    elif cfg.init_from or cfg.data.codebooks:
        books = None  # the bundle's vocab, or data.codebooks, says
    else:
        raise MMGenError("the vocab needs the pixel codebook size: set data.image_tokenizer=DIR "
                         "(the tokenizer that made the code shards) or data.codebook_size=N")
    audio_codec = None
    if cfg.data.audio_tokenizer:
        from mmgen.tokenizers.audio import AudioCodec

        audio_codec = AudioCodec.from_pretrained(cfg.data.audio_tokenizer)
    vocab = (Vocab.load(Path(cfg.init_from) / "vocab.json") if cfg.init_from
             else run_vocab(cfg, len(tok), books, audio_codec, getattr(image_tokenizer, "sem_ratio", 2)))
    return vocab, image_tokenizer, audio_codec


def _check_saved_vocab(saved: Path, vocab, hint: str) -> None:
    from mmgen.models.vocab import Vocab

    if saved.is_file() and Vocab.load(saved) != vocab:
        raise MMGenError(f"{saved} was written by a run with another vocab ({Vocab.load(saved)} vs {vocab}); {hint}")


def sequence_settings(cfg: TrainConfig) -> dict:
    """What the rows depend on besides the tokenizers: kept in packed shards' index and checked at training."""
    from mmgen.data.sequence import chat_layout

    # SFT learns to answer; pretraining on conversations still learns everything the user shows
    return {"seq_len": cfg.data.seq_len, "packing": cfg.data.packing, "splits": list(cfg.data.splits or []),
            "targets": list(cfg.data.loss_targets), "chat": chat_layout(cfg.stage, cfg.data.chat),
            "user_targets": cfg.stage != "sft"}


def image_grid_counts(records) -> Counter:
    grids = Counter()
    for r in records:
        for i, codes in getattr(r, "codes", {}).items():
            if getattr(r.doc.items[i], "kind", None) == "image":  # audio and video codes are no image grids
                grids[tuple(int(x) for x in np.shape(codes)[-2:])] += 1
    return grids


def prepare_data(cfg: TrainConfig, out_dir: Path, rank: int):
    """Text tokenizer, vocab, image and audio tokenizers and the rows of this run: every packed row in
    memory (``data.source=memory``, identical on every rank) or the index of the packed shards the
    ranks stream (``data.source=packed``, ``rows`` None)."""
    if cfg.data.source == "packed":
        return prepare_packed(cfg, out_dir, rank)
    from mmgen.data.code_shards import read_code_shards_of_splits
    from mmgen.data.packing import pack_sequences
    from mmgen.data.sequence import build_sequences

    records = list(read_code_shards_of_splits(cfg.data.code_shards, cfg.data.splits))
    if cfg.data.max_docs is not None:
        records = records[: cfg.data.max_docs]
    tok = text_tokenizer_for(cfg, out_dir / "text_tokenizer", rank, records)
    vocab, image_tokenizer, audio_codec = media_tokenizers_and_vocab(cfg, tok)
    _check_saved_vocab(out_dir / "vocab.json", vocab, "use a fresh out_dir or the same data settings")

    # SFT learns to answer; pretraining on conversations still learns everything the user shows
    seq = sequence_settings(cfg)
    seqs, seq_stats = build_sequences(records, tok, vocab, targets=seq["targets"], chat=seq["chat"],
                                      user_targets=seq["user_targets"])
    if not seqs:
        raise MMGenError(f"no trainable documents in {cfg.data.code_shards} ({seq_stats.to_dict()})")
    rows, pack_stats = pack_sequences(seqs, cfg.data.seq_len, pad_id=tok.pad_token_id or 0, algorithm=cfg.data.packing)
    grids = image_grid_counts(records)
    return {"text_tokenizer": tok, "vocab": vocab, "image_tokenizer": image_tokenizer, "audio_tokenizer": audio_codec,
            "rows": rows, "n_rows": int(rows["input_ids"].shape[0]), "seq_stats": seq_stats.to_dict(),
            "pack_stats": pack_stats.to_dict(), "image_grids": {f"{h}x{w}": n for (h, w), n in grids.most_common()}}


def prepare_packed(cfg: TrainConfig, out_dir: Path, rank: int) -> dict:
    """The tokenizers and vocab of packed shards (checked against this run's settings) and their index."""
    from mmgen.data.packed_shards import read_index

    packed = Path(cfg.data.packed_shards)
    index = read_index(packed)
    want = sequence_settings(cfg)
    diff = {k: (index["settings"].get(k), v) for k, v in want.items() if index["settings"].get(k) != v}
    if diff:
        k, (got, need) = next(iter(diff.items()))
        raise MMGenError(f"packed shards {packed} were built with {k}={got!r}, this run needs {need!r}; "
                         f"rerun `mmgen pack` with this run's config")
    tok_dir = out_dir / "text_tokenizer"
    if rank == 0 and not (tok_dir / "tokenizer_config.json").is_file():
        shutil.copytree(packed / "text_tokenizer", tok_dir, dirs_exist_ok=True)
    _barrier()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab, image_tokenizer, audio_codec = media_tokenizers_and_vocab(cfg, tok)
    _check_saved_vocab(packed / "vocab.json", vocab, "rerun `mmgen pack` with this run's data settings")
    _check_saved_vocab(out_dir / "vocab.json", vocab, "use a fresh out_dir or the same data settings")
    return {"text_tokenizer": tok, "vocab": vocab, "image_tokenizer": image_tokenizer, "audio_tokenizer": audio_codec,
            "rows": None, "index": index, "n_rows": int(index["totals"]["packing"]["rows"]),
            "seq_stats": index["totals"]["sequences"], "pack_stats": index["totals"]["packing"],
            "image_grids": index["totals"]["image_grids"]}


def image_codebooks(image_tokenizer) -> dict[str, int]:
    """The code ranges an image tokenizer writes, in id order: DualViTok's {sem, pix} (the LM reads and
    writes both levels, coarse to fine, as ILLUME+ does), a pixel VQ's {pix}."""
    sizes = getattr(image_tokenizer, "codebook_sizes", None)
    return {k: int(v) for k, v in sizes.items()} if sizes else {"pix": int(image_tokenizer.codebook_size)}


def run_vocab(cfg: TrainConfig, n_text: int, image_books: dict[str, int] | None, audio_codec=None, sem_ratio: int = 2):
    """The Vocab of a fresh run: text ids, then data.codebooks (default: the image tokenizer's code
    ranges), the audio codec's levels x codebook range when there is one, and the video layout when
    data.video_times > 0. ``data.image_levels: [pix]`` keeps a DualViTok run to its pixel codes."""
    from mmgen.models.vocab import Vocab

    text_size = cfg.data.text_size or n_text
    if text_size < n_text:
        raise MMGenError(f"data.text_size {text_size} is smaller than the text tokenizer ({n_text} tokens)")
    image_books = dict(image_books or {})
    if cfg.data.image_levels is not None and image_books:
        unknown = [k for k in cfg.data.image_levels if k not in image_books]
        if unknown or not cfg.data.image_levels:
            raise MMGenError(f"data.image_levels={list(cfg.data.image_levels)}: the image tokenizer writes "
                             f"{', '.join(image_books)}; name one or more of those")
        image_books = {k: n for k, n in image_books.items() if k in cfg.data.image_levels}
    books = dict(cfg.data.codebooks) if cfg.data.codebooks else image_books
    for name, n in image_books.items():  # a range the tokenizer also writes must have its size
        if name in books and int(books[name]) != n:
            raise MMGenError(f"data.codebooks.{name}={books[name]} but the image tokenizer's {name} codebook has {n} "
                             f"codes; set data.codebooks.{name}={n}")
    levels = 1
    if audio_codec is not None:
        levels, n = audio_codec.n_q, audio_codec.n_q * audio_codec.codebook_size
        if books.setdefault("audio", n) != n:
            raise MMGenError(f"data.codebooks.audio={books['audio']} but the audio codec has {levels} levels x "
                             f"{audio_codec.codebook_size} codes = {n}; set data.codebooks.audio={n} or leave it out")
    return Vocab(text_size, books, max_grid=cfg.data.max_grid, sem_ratio=sem_ratio, audio_levels=levels,
                 video_times=cfg.data.video_times, video_time_step=cfg.data.video_time_step)


class RowSampler:
    """Which packed rows a rank reads at (step, micro step): a seeded permutation per epoch.

    Position in the global stream is a function of the step alone, so resuming at step s reads the
    same rows an uninterrupted run would, on any number of ranks."""

    def __init__(self, n_rows: int, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int):
        self.n, self.mb, self.ga, self.rank, self.world, self.seed = n_rows, micro_batch, grad_accum, rank, world, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.ga + micro) * self.world + self.rank) * self.mb
        return np.array([self._perm(k // self.n)[k % self.n] for k in range(first, first + self.mb)])


# -- optimisation --------------------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - o.warmup_steps)
        t = min(1.0, (step - o.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if o.schedule == "cosine" else 1 - t
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return f


def build_optimizer(model, cfg: TrainConfig):
    # No weight decay on norms and biases (1-D tensors): decaying them only fights the normalisation.
    frozen_rows = getattr(model, "_mmgen_frozen_rows", None)
    emb = model.get_input_embeddings().weight if frozen_rows else None
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p is not emb]
    no_decay = [p for p in model.parameters() if p.requires_grad and (p.ndim < 2 or p is emb)]
    # Empty groups are left out: ZeRO drops them, and the scheduler must see the same groups.
    groups = [g for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
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


# -- checkpoints ---------------------------------------------------------------------------------
def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


# -- the model ------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, vocab, tok):
    """The unified LM of this run: from ``init_from`` (a bundle), a real decoder (``model.base`` /
    ``model.base_config``) or the tiny Llama; then the stage's trainable set, LoRA and checkpointing."""
    from mmgen.models.unified import MMGenForCausalLM, build_unified_lm, wrap_lm

    m = cfg.model
    wrap = {"code_head": m.code_head, "image_feature_dim": m.image_feature_dim, "audio_feature_dim": m.audio_feature_dim,
            "projector_depth": m.projector_depth, "input_placement": m.input_placement, "grid_positions": m.grid_positions,
            "grid_target": m.grid_target,
            "image_input_range": m.image_input_range}
    qlora = cfg.lora.quantize != "none"
    if cfg.init_from:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(cfg.seed)
        # QLoRA from a bundle quantizes while loading: the full-precision weights never sit in memory whole.
        model = load_quantized(cfg.init_from, cfg) if qlora else AutoModelForCausalLM.from_pretrained(cfg.init_from)
        if not isinstance(model, MMGenForCausalLM):
            model = wrap_lm(model, vocab, **wrap)
    elif m.base or m.base_config:
        torch.manual_seed(cfg.seed)
        model = build_unified_lm(vocab, base=m.base or m.base_config, attn_implementation=m.attn_implementation, **wrap)
    else:
        model = build_unified_lm(vocab, hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                                 intermediate=m.intermediate, max_len=m.max_len or cfg.data.seq_len,
                                 tie_embeddings=m.tie_embeddings, text_tokenizer=tok,
                                 attn_implementation=m.attn_implementation, seed=cfg.seed, **wrap)
    if qlora and not cfg.init_from:
        model = quantize_for_qlora(model, cfg)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.stage == "align":
        freeze_for_align(model, vocab)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (transformers 5 renamed the method)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def freeze_for_align(model, vocab) -> None:
    """Align stage (LLaVA's stage 1): only the projectors, the code head and the embedding rows of the
    new (non-text) tokens learn. A gradient hook zeroes the text rows: with Adam's zero moments and
    no weight decay on the embeddings (see :func:`build_optimizer`) they then stay exactly as they were."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("image_projector", "audio_projector", "code_head"))
    emb = model.get_input_embeddings().weight
    emb.requires_grad = True
    text = vocab.text_size

    def keep_text_rows(grad):
        grad = grad.clone()
        grad[:text] = 0
        return grad

    emb.register_hook(keep_text_rows)
    model._mmgen_frozen_rows = text  # read by build_optimizer: no decay on the embeddings


def apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lc = cfg.lora
    if lc.quantize != "none":
        # Freezes the base and upcasts its 16-bit non-quantized weights (norms, embeddings) to fp32 for
        # stable adapter training; checkpointing was already set up by build_model (non-reentrant).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        modules_to_save=list(lc.modules_to_save) or None, bias="none")
    return get_peft_model(model, config)


def unwrap_for_saving(model, adapter_dir: Path | None = None):
    """The plain MMGenForCausalLM to put in the bundle (LoRA weights merged in).

    QLoRA: the adapters learnt on top of the *dequantized* 4/8-bit base, so they are merged into that
    (dequantize, then load the saved adapter and merge) rather than re-quantized with the sum, which
    would add a second rounding, or merged into the original full-precision weights, which the adapters
    never saw. The bundle is then a plain full-precision checkpoint that loads without bitsandbytes."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    if not is_quantized(model):
        return copy.deepcopy(model).merge_and_unload()
    from peft import PeftModel

    base = copy.deepcopy(model).unload().dequantize().to("cpu")  # unload: adapters out, not merged
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


# -- QLoRA ---------------------------------------------------------------------------------------
# Never quantized: the output heads over the extended vocab (lm_head is tied to the embeddings in the tiny
# preset; its code rows are new and small), the code head and the projectors, which SFT may train in full
# (modules_to_save). Embeddings are nn.Embedding, which bitsandbytes' Linear replacement never touches.
QLORA_KEEP = ("lm_head", "code_head", "image_projector", "audio_projector")


def is_quantized(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def bitsandbytes_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    lc = cfg.lora
    keep = [*QLORA_KEEP, *lc.modules_to_save]
    if lc.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lc.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=lc.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, lc.compute_dtype), llm_int8_skip_modules=keep)


def qlora_device() -> str:
    """This rank's device: bitsandbytes quantizes where the weights are placed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return "cpu" if acc.device_name() == "cpu" else acc.device_name(int(os.environ.get("LOCAL_RANK", "0")))


def check_bitsandbytes(cfg: TrainConfig, device: str) -> None:
    """Run one quantized Linear forward and backward on ``device``: a missing package or a backend that
    cannot run here (an old bitsandbytes without the CPU backend, an unsupported GPU) stops with one line
    before any model is loaded."""
    lc = cfg.lora
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise MMGenError(f"lora.quantize={lc.quantize} needs bitsandbytes ({e}); "
                         "pip install 'bitsandbytes>=0.50', or set lora.quantize=none for plain LoRA") from None
    try:
        dense = torch.nn.Linear(64, 64)
        if lc.quantize == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            layer.load_state_dict(dense.state_dict())
        else:
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=getattr(torch, lc.compute_dtype),
                                      compress_statistics=lc.double_quant, quant_type=lc.bnb_4bit_quant_type)
            layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type=lc.bnb_4bit_quant_type,
                                             compress_statistics=lc.double_quant)
            layer.bias = dense.bias
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer.to(device)(x).float().sum().backward()
    except Exception as e:  # noqa: BLE001 -- any backend failure, reported in one line with its cause
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise MMGenError(f"bitsandbytes {bnb.__version__} cannot run lora.quantize={lc.quantize} on {device}: "
                         f"{type(e).__name__}: {why}; upgrade bitsandbytes or set lora.quantize=none") from None


def load_quantized(source: str | Path, cfg: TrainConfig):
    """``from_pretrained`` with a ``BitsAndBytesConfig``: the decoder's Linear layers become bitsandbytes
    4-bit/8-bit layers as the weights load, on this rank's device."""
    from transformers import AutoModelForCausalLM

    device = qlora_device()
    check_bitsandbytes(cfg, device)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bitsandbytes_config(cfg),
                                                 device_map={"": device})
    if not is_quantized(model):
        raise MMGenError(f"lora.quantize={cfg.lora.quantize}: no Linear layer of {source} was quantized "
                         "(the decoder has none outside the kept heads and projectors)")
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every 4-bit layer.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode on an input without grad repacks its
    weight in place for a bf16 kernel, and from then on computes in bf16 (whatever the recipe's
    ``compute_dtype``) through an op without autograd. A QLoRA model evaluates between steps and is
    merged and saved from those weights, so mmgen keeps the one layout and dtype on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_for_qlora(model, cfg: TrainConfig):
    """A model built in memory (from config, or a base decoder wrapped here) quantized by the same
    transformers loader as a checkpoint, through a temporary save."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmgen_qlora_") as tmp:
        model.save_pretrained(tmp)
        quantized = load_quantized(tmp, cfg)
    quantized.generation_config = model.generation_config
    return quantized


# What bitsandbytes layers add to state_dict beside the weight (4-bit quant state, 8-bit row scales).
_QUANT_STATE_KEYS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                     ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")


def load_quantized_module(src: dict, dst) -> None:
    """Load a DeepSpeed checkpoint's module state into a QLoRA model (resume).

    bitsandbytes writes each quantized weight's quantization state into ``state_dict`` but its layers
    do not read those entries back; they describe the frozen base, which ``build_model`` has already
    quantized identically from the same source. Anything else missing or unexpected is an error."""
    result = dst.load_state_dict(src, strict=False)
    extra = [k for k in result.unexpected_keys if not k.endswith(_QUANT_STATE_KEYS)]
    if result.missing_keys or extra:
        raise MMGenError(f"the checkpoint does not match this QLoRA model (missing {result.missing_keys[:3]}, "
                         f"unexpected {extra[:3]}); resume with the same lora.* settings or set resume=false")


def parameter_bytes(model) -> int:
    """Bytes held by the weights: parameters and buffers plus bitsandbytes' quantization constants
    (4-bit absmax blocks and their nested quantization, 8-bit row scales)."""
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        n += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            n += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                     if isinstance(v, torch.Tensor))
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            n += scb.numel() * scb.element_size()
    return n


# -- continuous input ---------------------------------------------------------------------------
FEATURE_SOURCES = {"image": ("image_tokenizer", "data.image_tokenizer"), "audio": ("audio_tokenizer", "data.audio_tokenizer")}


def code_vectors(tokenizer, range_name: str) -> torch.Tensor | None:
    """Row k: the tokenizer's vector for id k of the ``range_name`` code range (None when it has no
    codebook). An image tokenizer's quantizer gives them for ``arange`` codes (pixel VQ, and DualViTok's
    sem/pix quantizers); the audio codec's are each level's codebook vectors through its out-projection."""
    if range_name == "audio":
        return tokenizer.code_vectors() if hasattr(tokenizer, "code_vectors") else None
    q = getattr(tokenizer, f"{range_name}_quantizer", None) or getattr(tokenizer, "quantizer", None)
    if q is None or not hasattr(q, "embed"):
        return None
    n = getattr(tokenizer, "codebook_sizes", {}).get(range_name, tokenizer.codebook_size)
    with torch.no_grad():
        return q.embed(torch.arange(n, device=tokenizer.device).view(1, 1, n))[0, :, 0].t().float().cpu()


def continuous_input_table(cfg: TrainConfig, data: dict, modality: str) -> torch.Tensor | None:
    """The vectors the ``modality`` projector reads: one row per id of its input code range, None
    when ``model.{modality}_feature_dim`` is unset.

    Code shards hold codes, not pixels or waveforms, so the continuous input is each code's vector in
    the tokenizer (its quantized latent) rather than the pre-quantization feature; a tokenizer that
    stores its pre-quantization features next to the codes can feed those through the same path."""
    from mmgen.models.unified import feature_range

    dim = getattr(cfg.model, f"{modality}_feature_dim")
    if not dim:
        return None
    if cfg.model.input_placement != "codes":
        raise MMGenError(f"model.{modality}_feature_dim with input_placement={cfg.model.input_placement}: code shards "
                         "carry codes, whose vectors stand in for features only at the code positions; "
                         "set model.input_placement=codes")
    key, option = FEATURE_SOURCES[modality]
    range_name = feature_range(modality, cfg.model.image_input_range)
    table = code_vectors(data[key], range_name) if data.get(key) is not None else None
    if table is None:
        raise MMGenError(f"model.{modality}_feature_dim needs {option} with a codebook to turn codes into continuous "
                         f"input; set {option}=DIR or model.{modality}_feature_dim=null")
    if table.shape[1] != dim:
        raise MMGenError(f"model.{modality}_feature_dim={dim} but the {modality} tokenizer's code vectors are "
                         f"{table.shape[1]}-dimensional; set model.{modality}_feature_dim={table.shape[1]}")
    a, b = data["vocab"].code_range(range_name)
    if table.shape[0] != b - a:
        raise MMGenError(f"{option} has {table.shape[0]} {range_name} codes but the vocab's {range_name} range has "
                         f"{b - a}; use the tokenizer that made the code shards")
    return table


# -- the loop ------------------------------------------------------------------------------------
def step_denominator(rows: dict, sampler: "RowSampler", step: int, grad_accum: int, world: int) -> float:
    """Target tokens of one optimizer step over all ranks and micro-batches (every rank holds all rows)."""
    n = 0
    for r in range(world):
        sub = RowSampler(sampler.n, sampler.mb, sampler.ga, r, world, sampler.seed)
        for micro in range(grad_accum):
            lab = rows["labels"][sub.indices(step, micro)]
            n += int((lab[:, 1:] != -100).sum())
    return float(n)


def _targets(labels: np.ndarray) -> int:
    return int((labels[:, 1:] != -100).sum())


class MemoryBatches:
    """Micro-batches from rows held in memory (every rank holds all of them): :class:`RowSampler`.

    Prompt dropout draws from a generator keyed by (seed, step, micro, rank): a resumed run drops
    exactly the captions an uninterrupted one would."""

    def __init__(self, rows: dict, cfg: TrainConfig, rank: int, world: int):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.sampler = RowSampler(rows["input_ids"].shape[0], cfg.micro_batch, cfg.grad_accum, rank, world, cfg.seed)

    def step(self, step: int, dtype, attention: str) -> tuple[list[dict], float]:
        from mmgen.data.packing import packed_batch

        cfg = self.cfg
        denom = step_denominator(self.rows, self.sampler, step, cfg.grad_accum, self.world)
        batches = [packed_batch(self.rows, self.sampler.indices(step, micro), dtype=dtype,
                                prompt_dropout=cfg.loss.prompt_dropout,
                                rng=np.random.default_rng([cfg.seed, step, micro, self.rank, 17]), attention=attention)
                   for micro in range(cfg.grad_accum)]
        return batches, denom

    def state(self) -> dict:
        return {}


class StreamedBatches:
    """Micro-batches streamed from packed shards (:mod:`mmgen.training.streaming`); the step's target
    count is summed over ranks. Prompt dropout is keyed by (seed, step, micro, stream), so it follows
    the rows whatever rank reads them."""

    def __init__(self, index: dict, cfg: TrainConfig, rank: int, world: int, state: dict | None):
        from mmgen.training.streaming import StreamBatches

        self.cfg, self.world = cfg, world
        state = state or {}
        if state and state.get("streams") != (cfg.data.streams or world):
            raise MMGenError(f"the checkpoint's data position is for data.streams={state.get('streams')}, this run has "
                             f"{cfg.data.streams or world}; resume with data.streams={state.get('streams')}")
        self.reader = StreamBatches(index, cfg.micro_batch, rank, world, cfg.seed, cfg.data.shuffle_buffer,
                                    cfg.data.streams, state.get("positions"))

    def step(self, step: int, dtype, attention: str) -> tuple[list[dict], float]:
        from mmgen.data.packing import packed_batch
        from mmgen.models.lm import packed_attention_mask

        cfg = self.cfg
        parts = [self.reader.next() for _ in range(cfg.grad_accum)]
        n = torch.tensor([float(sum(_targets(rows["labels"]) for micro in parts for _, rows in micro))],
                         dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(n)
        batches = []
        for micro, streams in enumerate(parts):
            pieces = [packed_batch(rows, np.arange(rows["input_ids"].shape[0]), dtype=dtype,
                                   prompt_dropout=cfg.loss.prompt_dropout,
                                   rng=np.random.default_rng([cfg.seed, step, micro, s, 17]), attention="varlen")
                      for s, rows in streams]
            batch = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
            if attention == "mask":
                batch["attention_mask"] = packed_attention_mask(batch["segment_ids"], dtype=dtype)
            batches.append(batch)
        return batches, float(n.item())

    def shards_per_rank(self) -> list[list[str]]:
        """The packed shards each rank reads (a collective)."""
        mine = sorted(Path(p).name for p in self.reader.shard_paths())
        everyone = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return everyone

    def state(self) -> dict:
        """Every rank's stream positions (a collective: all ranks call it)."""
        mine = self.reader.positions()
        everyone = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return {"streams": self.reader.n_streams, "positions": {k: v for d in everyone for k, v in d.items()}}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict | None) -> None:
    if state:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])


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


def _peak_rss_mib() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_training(cfg: TrainConfig) -> Path:
    t_start = time.perf_counter()
    first_step_s = None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = init_distributed()
    check_global_batch(cfg, world)
    import deepspeed

    from mmgen.models.lm import count_parameters
    from mmgen.training.losses import lm_loss, modality_names, modality_weights

    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        from mmgen.config import save_config

        save_config(cfg, out_dir / "config.yaml")
    _barrier()

    data = prepare_data(cfg, out_dir, rank)
    tok, vocab = data["text_tokenizer"], data["vocab"]
    if rank == 0:
        vocab.save(out_dir / "vocab.json")
    n_rows = data["n_rows"]
    # Before the model is built: a tokenizer that does not fit the feature dims stops the run at once.
    tables = {m: t for m in FEATURE_SOURCES if (t := continuous_input_table(cfg, data, m)) is not None}
    model = build_model(cfg, vocab, tok)
    for modality, table in tables.items():  # the model keeps them: inference then reads the same input
        getattr(model, "get_base_model", lambda: model)().set_code_vectors(modality, table)
    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg))

    start, train_s0, data_state = 0, 0.0, None
    if cfg.resume and (ckpt_dir / "latest").is_file():
        custom = load_quantized_module if cfg.lora.quantize != "none" else None
        load_path, client = engine.load_checkpoint(str(ckpt_dir), custom_load_fn=custom)
        if load_path is None:
            raise MMGenError(f"could not resume from {ckpt_dir} (remove it or set resume=false)")
        start = int(client.get("step", engine.global_steps))
        train_s0 = float(client.get("train_s", 0.0))  # training seconds before the checkpoint
        _set_rng_state(client.get("rng", {}).get(str(rank)))
        data_state = client.get("data")

    batches = (MemoryBatches(data["rows"], cfg, rank, world) if data["rows"] is not None
               else StreamedBatches(data["index"], cfg, rank, world, data_state))
    dtype = _model_dtype(engine.module)
    # Flash-attention kernels take packed rows as variable-length sequences found from the restarting
    # position ids (no mask); every other kernel gets the block-diagonal 4-D mask.
    attention = "varlen" if cfg.model.attn_implementation.startswith("flash") else "mask"
    weights = modality_weights(vocab, cfg.loss.weights)
    names = modality_names(vocab)
    writer = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)

    fill = data["pack_stats"]["fill_rate"]
    t_run = time.perf_counter()
    snap_s = 0.0  # seconds spent writing snapshots: not training time

    def train_seconds() -> float:
        return train_s0 + time.perf_counter() - t_run - snap_s

    window = _Window(len(names))
    run_tokens, last = 0, {}
    metrics_path = out_dir / "metrics.jsonl"
    engine.train()
    for step in range(start, cfg.steps):
        step_batches, denom = batches.step(step, dtype, attention)
        for batch in step_batches:
            mask = {"attention_mask": batch["attention_mask"].to(engine.device)} if "attention_mask" in batch else {}
            out = engine(input_ids=batch["input_ids"].to(engine.device),
                         position_ids=batch["position_ids"].to(engine.device), use_cache=False, **mask)
            # DeepSpeed averages gradients over ranks and divides the loss by grad_accum: scale back so
            # the step's gradient is that of the token mean over the whole global batch.
            loss, stats = lm_loss(out.logits, batch["labels"].to(engine.device), vocab, weights,
                                  denom / (world * cfg.grad_accum), z_loss=cfg.loss.z_loss)
            engine.backward(loss)
            engine.step()
            window.add(loss.item() / (world * cfg.grad_accum), stats, int((batch["segment_ids"] >= 0).sum()))
        done = step + 1
        if first_step_s is None:  # start-up included: what a larger corpus would slow down
            first_step_s = time.perf_counter() - t_start
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = window.flush(world, done, n_rows, cfg, fill, scheduler.get_last_lr()[0], names, t_run)
            run_tokens += last.pop("_tokens")
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                if writer is not None:
                    for k, v in last.items():
                        if k not in ("step", "epoch", "elapsed_s"):
                            writer.add_scalar(f"train/{k}", v, done)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % cfg.save_every == 0 or done == cfg.steps:
            rng_all = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rng_all, _rng_state())
            else:
                rng_all = [_rng_state()]
            engine.save_checkpoint(str(ckpt_dir), tag=f"step_{done}",
                                   client_state={"step": done, "rng": {str(r): s for r, s in enumerate(rng_all)},
                                                 "train_s": train_seconds(), "data": batches.state()})
            if rank == 0:
                _prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.steps:
            t_snap = time.perf_counter()
            write_snapshot(engine, data, cfg, out_dir, done, train_seconds(), last, rank)
            snap_s += time.perf_counter() - t_snap
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    run_s = time.perf_counter() - t_run - snap_s
    streamed = {"shards_per_rank": batches.shards_per_rank()} if isinstance(batches, StreamedBatches) else {}
    rss = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rss, _peak_rss_mib())
    else:
        rss = [_peak_rss_mib()]
    summary = {"stage": cfg.stage, "steps": cfg.steps, "resumed_from": start, "final_loss": last.get("loss"),
               "train_seconds": train_seconds(),
               "tokens_per_s": run_tokens / run_s if run_tokens else None, "world_size": world,
               "first_step_s": first_step_s, "peak_rss_mib_per_rank": rss, "data_source": cfg.data.source,
               "parameters": count_parameters(engine.module),
               "trainable_parameters": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
               "parameter_bytes": parameter_bytes(engine.module),
               "vocab_size": vocab.size,
               "data": {"sequences": data["seq_stats"], "packing": data["pack_stats"],
                        "image_grids": data["image_grids"], **streamed}}
    final = out_dir / "final"
    save_run_bundle(engine, data, cfg, summary, final, out_dir / "lora_adapter", rank)
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_losses(metrics_path, out_dir / "loss.png")
    _barrier()
    return final


def save_run_bundle(engine, data: dict, cfg: TrainConfig, summary: dict, dest: Path, adapter_dir: Path, rank: int,
                    extra_meta: dict | None = None) -> None:
    """Rank 0 writes the engine's model as a bundle at ``dest`` (LoRA merged); every rank must call it."""
    import deepspeed

    # ZeRO 3 partitions the weights themselves: gather them (on every rank) before rank 0 saves.
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
              if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            if cfg.lora.enabled:
                engine.module.save_pretrained(adapter_dir)
            _save_bundle(unwrap_for_saving(engine.module, adapter_dir), data, cfg, summary, dest, extra_meta)


def write_snapshot(engine, data: dict, cfg: TrainConfig, out_dir: Path, step: int, train_s: float, logged: dict,
                   rank: int) -> Path:
    """The bundle the run would write if it ended now, at ``out_dir/snapshots/step-NNNNNN``.

    Written under a ``.partial`` name and renamed, so a run killed mid-write leaves no half bundle for an
    evaluator to load; a resumed run that passes the step again replaces it with the same weights."""
    dest = out_dir / "snapshots" / f"step-{step:06d}"
    part = dest.with_name(dest.name + ".partial")
    if rank == 0:
        shutil.rmtree(part, ignore_errors=True)
    facts = {"step": step, "train_seconds": train_s}
    summary = {"stage": cfg.stage, "steps": step, "of_steps": cfg.steps, "train_seconds": train_s, "last_logged": logged}
    # Saving must leave the training stream untouched, so that a run with snapshots trains the same weights.
    rng = _rng_state()
    save_run_bundle(engine, data, cfg, summary, part, part / "lora_adapter", rank, {"snapshot": facts})
    _set_rng_state(rng)
    if rank == 0:
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
    return dest


class _Window:
    """Sums between two log lines, all-reduced over ranks when flushed."""

    def __init__(self, n_mod: int):
        self.n_mod = n_mod
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.v = torch.zeros(3 + 2 * self.n_mod, dtype=torch.float64)  # loss, micro, tokens, (ce, n) per modality

    def add(self, loss: float, stats: dict, tokens: int):
        self.v[0] += loss
        self.v[1] += 1
        self.v[2] += tokens
        for k, (ce, n) in stats.items():
            self.v[3 + 2 * k] += ce
            self.v[4 + 2 * k] += n

    def flush(self, world, done, n_rows, cfg, fill, lr, names, t_run) -> dict:
        v = self.v.clone()
        if world > 1:
            torch.distributed.all_reduce(v)
        elapsed = time.perf_counter() - self.t0
        steps = v[1].item() / (cfg.grad_accum * world)
        row = {"step": done, "loss": v[0].item() / max(steps, 1e-9), "lr": lr,
               "tokens_per_s": v[2].item() / max(elapsed, 1e-9), "fill_rate": fill,
               "epoch": done * cfg.grad_accum * world * cfg.micro_batch / n_rows,
               "elapsed_s": time.perf_counter() - t_run}
        for k, name in enumerate(names):
            n = v[4 + 2 * k].item()
            if n:
                row[f"loss_{name}"] = v[3 + 2 * k].item() / n
        row["_tokens"] = int(v[2].item())
        self.reset()
        return row


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """The loss curves (total and per modality) of a run's metrics.jsonl as a PNG."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _save_bundle(model, data: dict, cfg: TrainConfig, summary: dict, final: Path, extra_meta: dict | None = None) -> None:
    from mmgen.models.bundle import Bundle

    image_tok = data["image_tokenizer"]
    meta = {"preset": cfg.preset, "stage": cfg.stage, "train": summary, "config": to_dict(cfg),
            "image_grids": data["image_grids"], **(extra_meta or {})}
    if image_tok is not None:
        meta["image_resolution"] = list(image_tok.resolution)
    audio_tok = data.get("audio_tokenizer")
    if audio_tok is not None:
        meta["audio_sample_rate"] = audio_tok.sample_rate
    # The audio codec goes in too: without it a model that writes audio codes could not be heard.
    Bundle(model, data["text_tokenizer"], data["vocab"], image_tok, meta, audio_tok).save(final)
