"""The model a run trains: the unified LM from config or a bundle, activation checkpointing, the
align stage's freezing, LoRA, and the code-vector tables of continuous input."""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen.errors import MMGenError
from mmgen.tokenizers.base import code_vectors
from mmgen.training.config import TrainConfig
from mmgen.training.qlora import is_quantized, load_quantized, quantize_for_qlora


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def build_model(cfg: TrainConfig, vocab, tok, image_tokenizer=None):
    """The unified LM of this run: from ``init_from`` (a bundle), a real decoder (``model.base`` /
    ``model.base_config``) or the tiny Llama; then factorised code blocks (``model.block_factors``, when
    ``image_tokenizer`` labels its blocks), the stage's trainable set, LoRA and checkpointing."""
    from mmgen.models.unified import MMGenForCausalLM
    from mmgen.models.unified_build import add_feature_inputs, build_unified_lm, wrap_lm

    m = cfg.model
    wrap = {
        "code_head": m.code_head,
        "image_feature_dim": m.image_feature_dim,
        "audio_feature_dim": m.audio_feature_dim,
        "projector_depth": m.projector_depth,
        "input_placement": m.input_placement,
        "grid_positions": m.grid_positions,
        "grid_target": m.grid_target,
        "image_input_range": m.image_input_range,
    }
    qlora = cfg.lora.quantize != "none"
    if cfg.init_from:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(cfg.seed)
        # QLoRA from a bundle quantizes while loading: the full-precision weights never sit in memory whole.
        model = load_quantized(cfg.init_from, cfg) if qlora else AutoModelForCausalLM.from_pretrained(cfg.init_from)
        if not isinstance(model, MMGenForCausalLM):
            model = wrap_lm(model, vocab, **wrap)
        elif not qlora:
            # A bundle that reads no features yet gets the projectors this run's config asks for (the
            # align stage then trains them on the frozen decoder); its own settings win otherwise.
            model = add_feature_inputs(
                model,
                m.image_feature_dim,
                m.audio_feature_dim,
                m.projector_depth,
                m.input_placement,
                m.image_input_range,
            )
    elif m.base or m.base_config:
        torch.manual_seed(cfg.seed)
        model = build_unified_lm(vocab, base=m.base or m.base_config, attn_implementation=m.attn_implementation, **wrap)
    else:
        model = build_unified_lm(
            vocab,
            hidden=m.hidden,
            layers=m.layers,
            heads=m.heads,
            kv_heads=m.kv_heads,
            intermediate=m.intermediate,
            max_len=m.max_len or cfg.data.seq_len,
            tie_embeddings=m.tie_embeddings,
            text_tokenizer=tok,
            attn_implementation=m.attn_implementation,
            seed=cfg.seed,
            **wrap,
        )
    if m.block_factors and image_tokenizer is not None and not qlora:
        add_block_factors(model, image_tokenizer, vocab)
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


def add_block_factors(model, image_tokenizer, vocab) -> None:
    """Labelled code-block rows as attribute sums (:mod:`mmgen.models.block_factors`); a model that has
    them already (a bundle of an earlier stage) keeps its own."""
    from mmgen.models.block_factors import block_attributes

    table = block_attributes(image_tokenizer, vocab)
    if table is not None and getattr(model, "block_factors", None) is None:
        model.add_block_factors(*table)


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
    config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        modules_to_save=list(lc.modules_to_save) or None,
        bias="none",
    )
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


FEATURE_SOURCES = {
    "image": ("image_tokenizer", "data.image_tokenizer"),
    "audio": ("audio_tokenizer", "data.audio_tokenizer"),
}


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
        raise MMGenError(
            f"model.{modality}_feature_dim with input_placement={cfg.model.input_placement}: code shards "
            "carry codes, whose vectors stand in for features only at the code positions; "
            "set model.input_placement=codes"
        )
    key, option = FEATURE_SOURCES[modality]
    range_name = feature_range(modality, cfg.model.image_input_range)
    table = code_vectors(data[key], range_name) if data.get(key) is not None else None
    if table is None:
        raise MMGenError(
            f"model.{modality}_feature_dim needs {option} with a codebook to turn codes into continuous "
            f"input; set {option}=DIR or model.{modality}_feature_dim=null"
        )
    if table.shape[1] != dim:
        raise MMGenError(
            f"model.{modality}_feature_dim={dim} but the {modality} tokenizer's code vectors are "
            f"{table.shape[1]}-dimensional; set model.{modality}_feature_dim={table.shape[1]}"
        )
    a, b = data["vocab"].code_range(range_name)
    if table.shape[0] != b - a:
        raise MMGenError(
            f"{option} has {table.shape[0]} {range_name} codes but the vocab's {range_name} range has "
            f"{b - a}; use the tokenizer that made the code shards"
        )
    return table
