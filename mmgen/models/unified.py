"""``MMGenForCausalLM``: any Hugging Face causal LM turned into a unified multimodal model.

The wrapper holds the decoder as ``self.lm`` (built by ``AutoModelForCausalLM`` from a config or a
checkpoint) and adds what the ILLUME+/Janus line needs on top of a text LLM:

- **vocabulary extension** from :class:`~mmgen.processing.vocab.Vocab`: the decoder's embeddings grow to
  ``vocab.size`` with ``resize_token_embeddings(mean_resizing=True)``, so new rows start at the mean
  of the pretrained ones (a random row would dwarf or vanish next to trained ones);
- an optional **separate output head for the code ranges** (Janus' generation head): text logits come
  from the decoder's own head, code logits from ``code_head``; without it one head covers everything
  (Emu3 / Lumina-mGPT);
- **continuous-input projectors** (an MLP each) for image and audio features, written over the input
  embeddings at the positions of the corresponding code tokens (``input_placement="codes"``, ILLUME+:
  the model reads pre-quantization features where it would otherwise read codes) or of a placeholder
  id (``"placeholder"``, LLaVA style);
- optional **2-D grid position embeddings** for image codes (``grid_positions``): each semantic or
  pixel code's input embedding gets a learned vector for its (branch, row, column) in the code grid.
  RoPE alone tells a code only its distance from ``<pix>``; a small decoder trained for minutes does
  not learn to turn that into a row and column, so it smears objects across the grid (the tiny
  recipe's generations before this was added). LlamaGen-style 2-D positions, added at the input.
  With ``grid_target`` the vector names the cell of the code the token *predicts* instead of its own
  (RandAR's position instructions; :meth:`Vocab.grid_position_ids`). On the tiny recipe it bound
  objects no sooner than own cells (``benchmarks/binding_probe.py --cells own,target``, BENCHMARKS.md),
  so it is off there;
- discrete output: the logits always span the whole vocab, so everything the model writes is a code.

``import mmgen.models`` registers the class with ``AutoConfig`` / ``AutoModelForCausalLM``, so a
saved directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and no ``trust_remote_code``.
Building one (around a decoder, from a checkpoint or config, with new feature inputs) is
:mod:`mmgen.models.unified_build`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal

import torch
from torch import nn

from mmgen.data.packing import causal_lm_loss
from mmgen.errors import MMGenError
from mmgen.models.block_factors import BlockFactors
from mmgen.processing.vocab import Vocab
from mmgen.utils.compat import ensure_torchvision, register_auto_model

ensure_torchvision()  # transformers' model modules import torchvision, broken next to CPU torch

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

IGNORE_INDEX = -100
MODALITY_FEATURES = ("image", "audio")


def feature_range(modality: str, image_input_range: str = "pix") -> str:
    """The code range whose positions ``modality`` features stand for (input_placement=codes)."""
    return image_input_range if modality == "image" else "audio"


class MMGenConfig(PreTrainedConfig):
    """Config of :class:`MMGenForCausalLM`: the decoder's own config plus the multimodal parts."""

    model_type = "mmgen"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vocab: dict | None = None  # Vocab.to_dict(): the id layout the embeddings were extended to
    code_head: bool = False  # a separate output head for the code ranges (Janus)
    image_feature_dim: int | None = None  # width of the image tokenizer's pre-quantization features
    audio_feature_dim: int | None = None
    projector_depth: int = 2  # Linear layers in each MLP projector
    input_placement: Literal["codes", "placeholder"] = "codes"
    image_input_range: str = "pix"  # the code range whose positions image features overwrite
    image_placeholder_id: int | None = None
    audio_placeholder_id: int | None = None
    grid_positions: bool = False  # learned (branch, row, col) embeddings added to image-code inputs
    grid_target: bool = False  # ...naming the cell of the next code (the one predicted) instead of the input's own
    # Modalities whose code vectors the model stores (set_code_vectors): their features come from the ids.
    code_vectors: list | None = None
    # Labelled code blocks whose rows are attribute sums (mmgen.models.block_factors): {"rows", "attributes",
    # "names"}, set by add_block_factors; the factors and their table are saved with the weights.
    block_factors: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config is not None:
            # Generation reads these from the top-level config.
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(self, k, None) is None:
                    setattr(self, k, getattr(self.text_config, k, None))

    def __getattr__(self, name):
        # Sizes (vocab_size, num_hidden_layers, hidden_size, ...) are the decoder's: read them there, so
        # code written for a plain causal LM's config keeps working on the wrapper's.
        if name.startswith("_") or name == "text_config":
            raise AttributeError(name)
        text = self.__dict__.get("text_config")
        if text is not None and not isinstance(text, dict) and hasattr(text, name):
            return getattr(text, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def get_vocab(self) -> Vocab:
        if not self.vocab:
            raise MMGenError("this MMGenConfig has no vocab; build the model with build_unified_lm(vocab, ...)")
        return Vocab.from_dict(self.vocab)


def cache_keyword(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by: transformers 5 calls it ``cache`` (with
    ``past_key_values`` a deprecated alias); earlier releases only know ``past_key_values``."""
    return _cache_keyword(type(module))


@functools.cache
def _cache_keyword(cls: type) -> str:  # once per class: forward runs at every step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def mlp_projector(in_dim: int, hidden: int, depth: int) -> nn.Sequential:
    """LLaVA-1.5's MLP projector: Linear, then (GELU, Linear) ``depth - 1`` times."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    for _ in range(max(0, depth - 1)):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


class MMGenForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MMGenConfig
    base_model_prefix = "lm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules: list[str] = []

    def __init__(self, config: MMGenConfig, lm=None):
        super().__init__(config)
        text_config = config.text_config
        if lm is None:
            text_config._attn_implementation = config._attn_implementation
            lm = AutoModelForCausalLM.from_config(text_config)
        self.lm = lm
        # One attention implementation for both configs: a decoder left at None would build no causal mask.
        impl = getattr(config, "_attn_implementation", None) or lm.config._attn_implementation or "sdpa"
        lm.config._attn_implementation = impl
        config.text_config = lm.config
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        hidden = text_config.hidden_size
        vocab = config.get_vocab() if config.vocab else None
        self._vocab = vocab
        self.code_start = min((a for a, _ in vocab.ranges.values()), default=None) if vocab else None
        self.code_head = None
        if config.code_head:
            if self.code_start is None:
                raise MMGenError("code_head=True needs a vocab with at least one code range")
            self.code_head = nn.Linear(hidden, vocab.size - self.code_start, bias=False)
        self.image_projector = (
            mlp_projector(config.image_feature_dim, hidden, config.projector_depth)
            if config.image_feature_dim
            else None
        )
        self.audio_projector = (
            mlp_projector(config.audio_feature_dim, hidden, config.projector_depth)
            if config.audio_feature_dim
            else None
        )
        # Frozen code-vector tables (saved with the weights): with input_placement=codes a code's
        # continuous input is its tokenizer vector, so the model looks it up itself and training,
        # generation and evaluation all read the same input without passing features around.
        for modality in MODALITY_FEATURES:
            dim = getattr(config, f"{modality}_feature_dim")
            if (
                dim
                and vocab is not None
                and config.input_placement == "codes"
                and self.input_range(modality) in vocab.ranges
            ):
                a, b = vocab.code_range(self.input_range(modality))
                self.register_buffer(f"{modality}_code_vectors", torch.zeros(b - a, dim))
        self.block_factors = None
        if config.block_factors:
            bf = config.block_factors
            self.block_factors = BlockFactors(vocab.size, bf["rows"], bf["attributes"], hidden)
        self.grid_position_embedding = None
        if config.grid_positions:
            if vocab is None:
                raise MMGenError("grid_positions=True needs a vocab")
            # Row 0 (not an image code) stays zero; the rest start at zero too, so switching the table on
            # changes nothing until training moves it.
            self.grid_position_embedding = nn.Embedding(
                vocab.grid_table_size(config.grid_target), hidden, padding_idx=0
            )
        self.post_init()

    def _init_weights(self, module):
        # The wrapped decoder initialised itself; only our own layers need it here.
        if isinstance(module, nn.Linear) and not _is_inside(module, self.lm):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if module is getattr(self, "grid_position_embedding", None):
            nn.init.zeros_(module.weight)

    # -- the embedding API the ecosystem expects (resize, PEFT, generate) -----------------------
    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.lm.set_output_embeddings(value)

    def get_decoder(self):
        return self.lm.base_model

    # -- continuous inputs --------------------------------------------------------------------
    def input_range(self, modality: str) -> str:
        """The code range whose positions ``modality`` features overwrite (input_placement=codes)."""
        return feature_range(modality, self.config.image_input_range)

    def feature_positions(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """Boolean mask of the positions that ``modality`` features overwrite, in reading order."""
        cfg = self.config
        if cfg.input_placement == "placeholder":
            pid = cfg.image_placeholder_id if modality == "image" else cfg.audio_placeholder_id
            if pid is None:
                raise MMGenError(f"input_placement=placeholder needs {modality}_placeholder_id in the model config")
            return input_ids == pid
        a, b = self._vocab.code_range(self.input_range(modality))
        return (input_ids >= a) & (input_ids < b)

    def set_code_vectors(self, modality: str, table: torch.Tensor) -> None:
        """Store ``table`` (one row per id of the modality's input code range) as the continuous input
        of those codes; from then on :meth:`embed` projects it wherever no features are passed."""
        buf = getattr(self, f"{modality}_code_vectors", None)
        if buf is None:
            raise MMGenError(
                f"this model stores no {modality} code vectors (needs {modality}_feature_dim and input_placement=codes)"
            )
        if tuple(table.shape) != tuple(buf.shape):
            raise MMGenError(
                f"{modality} code vectors of shape {tuple(table.shape)}, the model expects {tuple(buf.shape)}"
            )
        buf.copy_(table.to(buf.device, buf.dtype))
        self.config.code_vectors = sorted({*(self.config.code_vectors or []), modality})

    def stored_features(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor | None:
        """The stored code vectors at the ``modality`` positions of ``input_ids`` (None when none stored)."""
        if modality not in (self.config.code_vectors or []):
            return None
        a, _ = self._vocab.code_range(self.input_range(modality))
        return getattr(self, f"{modality}_code_vectors")[input_ids[self.feature_positions(input_ids, modality)] - a]

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        grid_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings: token rows, projected features where given (else the stored code vectors, if
        any), grid positions where enabled.
        ``grid_positions`` (from :meth:`Vocab.grid_position_ids`) is needed only when ``input_ids`` is not the
        whole sequence (cached decoding); otherwise it is computed here."""
        embeds = self.get_input_embeddings()(input_ids)
        if self.block_factors is not None:
            embeds = self.block_factors.embed(embeds, input_ids)
        if self.grid_position_embedding is not None:
            if grid_positions is None:
                grid_positions = self.grid_cells(input_ids)
            embeds = embeds + self.grid_position_embedding(grid_positions.to(input_ids.device)).to(embeds.dtype)
        for modality, feats in (("image", image_features), ("audio", audio_features)):
            if feats is None:
                feats = self.stored_features(input_ids, modality)
            if feats is None:
                continue
            proj = self.image_projector if modality == "image" else self.audio_projector
            if proj is None:
                raise MMGenError(
                    f"{modality} features given but the model has no {modality} projector "
                    f"(set {modality}_feature_dim in the model config)"
                )
            where = self.feature_positions(input_ids, modality)
            n = int(where.sum())
            if feats.shape[0] != n:
                raise MMGenError(
                    f"{feats.shape[0]} {modality} feature vectors for {n} {modality} positions in the "
                    "input; give one vector per code (or placeholder) token, in reading order"
                )
            embeds = embeds.masked_scatter(where[..., None], proj(feats.to(embeds.dtype)))
        return embeds

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # transformers' generate() hands the model only the uncached tail of input_ids; the grid
        # cells of that tail are read here, from the whole sequence, while it is still at hand.
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        tail = inputs.get("input_ids")
        if self.grid_position_embedding is not None and tail is not None:
            inputs["grid_positions"] = self.grid_cells(input_ids, tail.shape[-1])
        return inputs

    def grid_cells(self, input_ids: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        """Rows of the grid-position table for ``input_ids`` (own or target cells, as configured); with
        ``tail``, those of its last ``tail`` tokens only (cached decoding)."""
        target = bool(getattr(self.config, "grid_target", False))
        if tail is None:
            return self._vocab.grid_position_ids(input_ids, target)
        return self._vocab.grid_position_ids_tail(input_ids, tail, target)

    # -- forward ------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.get_output_embeddings()
        if self.code_head is None:
            logits = head(hidden)
        else:
            text = nn.functional.linear(
                hidden, head.weight[: self.code_start], None if head.bias is None else head.bias[: self.code_start]
            )
            logits = torch.cat([text, self.code_head(hidden)], dim=-1)
        return logits if self.block_factors is None else self.block_factors.logits(logits, hidden)

    def add_block_factors(self, ids: torch.Tensor, features: torch.Tensor, fitted: torch.Tensor, names: list[str]):
        """Make the rows of ``ids`` attribute sums (:mod:`mmgen.models.block_factors`), the factors starting
        at the least-squares fit of the current input rows over the ``fitted`` ids."""
        weight = self.get_input_embeddings().weight.detach()
        factors = BlockFactors(self._vocab.size, len(ids), features.shape[1], weight.shape[1])
        factors.set_table(ids, features)
        factors.fit_rows(weight[ids], fitted)
        self.block_factors = factors.to(weight.device)
        self.config.block_factors = {"rows": len(ids), "attributes": features.shape[1], "names": list(names)}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features=None,
        audio_features=None,
        grid_positions=None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image_features, audio_features, grid_positions)
        cache = cache if cache is not None else past_key_values  # the older name, as transformers keeps it
        base = self.lm.base_model
        out = base(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_keyword(base): cache},
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )


def _is_inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(module is m for m in parent.modules())


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="mmgen"`` (idempotent)."""
    register_auto_model(MMGenConfig, MMGenForCausalLM, AutoModelForCausalLM)


register_auto_classes()
