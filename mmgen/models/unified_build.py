"""Building a unified LM (:class:`~mmgen.models.unified.MMGenForCausalLM`): around a causal LM already
built or loaded (:func:`wrap_lm`: its vocabulary extended to the mmgen vocab, the heads added), from a
decoder checkpoint, a decoder config or the tiny Llama (:func:`build_unified_lm`), and with the
continuous-input projectors a trained model lacks (:func:`add_feature_inputs`)."""

from __future__ import annotations

from mmgen.errors import MMGenError
from mmgen.models.lm import build_tiny_lm
from mmgen.models.unified import MODALITY_FEATURES, MMGenConfig, MMGenForCausalLM
from mmgen.processing.vocab import Vocab
from mmgen.utils.compat import ensure_torchvision

ensure_torchvision()  # transformers' model modules import torchvision, broken next to CPU torch

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def wrap_lm(
    lm,
    vocab: Vocab,
    code_head: bool = False,
    image_feature_dim: int | None = None,
    audio_feature_dim: int | None = None,
    projector_depth: int = 2,
    input_placement: str = "codes",
    image_input_range: str = "pix",
    image_placeholder_id: int | None = None,
    audio_placeholder_id: int | None = None,
    grid_positions: bool = False,
    grid_target: bool = False,
) -> MMGenForCausalLM:
    """Wrap a built or pretrained causal LM: extend its vocabulary to ``vocab`` and add the heads."""
    n = lm.get_input_embeddings().weight.shape[0]
    if n > vocab.size:
        raise MMGenError(
            f"the decoder has {n} embedding rows, more than the mmgen vocab's {vocab.size}; build "
            "the Vocab with text_size equal to the decoder's vocab_size"
        )
    if n < vocab.size:
        # New rows start at the mean (and covariance) of the trained ones, as transformers documents.
        # (On the meta device there are no values to average: shapes only.)
        meta = lm.get_input_embeddings().weight.device.type == "meta"
        lm.resize_token_embeddings(vocab.size, mean_resizing=not meta)
    if image_input_range not in vocab.ranges and input_placement == "codes" and image_feature_dim:
        raise MMGenError(
            f"image_input_range '{image_input_range}' is not a code range of the vocab (has: {', '.join(vocab.ranges)})"
        )
    config = MMGenConfig(
        text_config=lm.config,
        vocab=vocab.to_dict(),
        code_head=code_head,
        image_feature_dim=image_feature_dim,
        audio_feature_dim=audio_feature_dim,
        projector_depth=projector_depth,
        input_placement=input_placement,
        image_input_range=image_input_range,
        image_placeholder_id=image_placeholder_id,
        audio_placeholder_id=audio_placeholder_id,
        grid_positions=grid_positions,
        grid_target=grid_target,
    )
    config._attn_implementation = lm.config._attn_implementation
    model = MMGenForCausalLM(config, lm=lm)
    model.generation_config = lm.generation_config
    return model


def add_feature_inputs(
    model: MMGenForCausalLM,
    image_feature_dim: int | None = None,
    audio_feature_dim: int | None = None,
    projector_depth: int = 2,
    input_placement: str = "codes",
    image_input_range: str = "pix",
) -> MMGenForCausalLM:
    """``model`` with the continuous-input projectors it lacks (LLaVA's and ILLUME+'s first stage: a trained
    decoder learns to read features through a new projector): a new wrapper around the same decoder that
    keeps every weight ``model`` had, the new projectors freshly initialised. A projector ``model`` already
    has stays; one of another width is a one-line MMGenError."""
    want = {"image": image_feature_dim, "audio": audio_feature_dim}
    have = {m: getattr(model.config, f"{m}_feature_dim") for m in MODALITY_FEATURES}
    for m in MODALITY_FEATURES:
        if want[m] and have[m] and want[m] != have[m]:
            raise MMGenError(
                f"model.{m}_feature_dim={want[m]} but the model being trained reads {have[m]}-dimensional "
                f"{m} features; set model.{m}_feature_dim={have[m]} (or null)"
            )
    new = [m for m in MODALITY_FEATURES if want[m] and not have[m]]
    if not new:
        return model
    if any(have.values()) and (
        model.config.input_placement != input_placement or model.config.image_input_range != image_input_range
    ):
        raise MMGenError(
            "the model already reads features with other model.input_placement / model.image_input_range "
            f"({model.config.input_placement}, {model.config.image_input_range}); keep those"
        )
    config = MMGenConfig.from_dict(model.config.to_dict())
    for m in new:
        setattr(config, f"{m}_feature_dim", int(want[m]))
    if not any(have.values()):
        config.projector_depth, config.input_placement = projector_depth, input_placement
        config.image_input_range = image_input_range
    if "image" in new and input_placement == "codes" and image_input_range not in model._vocab.ranges:
        raise MMGenError(
            f"image_input_range '{image_input_range}' is not a code range of the vocab "
            f"(has: {', '.join(model._vocab.ranges)})"
        )
    config._attn_implementation = model.config._attn_implementation
    grown = MMGenForCausalLM(config, lm=model.lm)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    fresh = tuple(f"{m}_projector." for m in new) + tuple(f"{m}_code_vectors" for m in new)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise MMGenError(f"adding {', '.join(new)} inputs lost weights: missing {missing}, unexpected {unexpected}")
    grown.generation_config = model.generation_config
    return grown


def build_unified_lm(vocab: Vocab, base: str | dict | None = None, **kwargs) -> MMGenForCausalLM:
    """A unified LM over ``vocab`` from a decoder checkpoint path / hub id (``base`` a str), a config
    dict with ``model_type`` (built from config, random weights), or None: the tiny Llama."""
    wrap_keys = {
        "code_head",
        "image_feature_dim",
        "audio_feature_dim",
        "projector_depth",
        "input_placement",
        "image_input_range",
        "image_placeholder_id",
        "audio_placeholder_id",
        "grid_positions",
        "grid_target",
    }
    wrap_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in wrap_keys}
    if base is None:
        lm = build_tiny_lm(vocab, **kwargs)
    elif isinstance(base, dict):
        cfg = dict(base)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise MMGenError("a decoder config dict needs model_type (e.g. qwen2, llama)")
        attn = kwargs.pop("attn_implementation", "sdpa")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), attn_implementation=attn)
    else:
        lm = AutoModelForCausalLM.from_pretrained(base, attn_implementation=kwargs.pop("attn_implementation", "sdpa"))
    return wrap_lm(lm, vocab, **wrap_kw)
