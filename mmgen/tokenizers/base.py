"""The image-tokenizer API every stage uses, and loading any saved tokenizer by directory.

Tokenizers save and load like other Hugging Face models: each is a ``torch.nn.Module`` with
``huggingface_hub``'s ``PyTorchModelHubMixin``, so ``save_pretrained(dir)`` writes ``config.json`` (the
``__init__`` arguments that rebuild the model as it is now, and ``"mmgen_type"``), ``model.safetensors``
and a model card, and ``Class.from_pretrained(dir)`` reads them back (or ``push_to_hub`` shares them).
:func:`load_image_tokenizer` picks the class from ``mmgen_type`` (as transformers' auto classes pick one
from a config's ``model_type``), so the LM bundle, the ``tokenize`` stage and the chat app load
whatever tokenizer a checkpoint was trained with.

Pixel conventions (:mod:`mmgen.utils.pixels`): images go in as PIL images (any size: they are resized
to a multiple of the downsampling factor) or float tensors ``(B, 3, H, W)`` in ``[-1, 1]``; codes are
int64 ``(B, h, w)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin

from mmgen.errors import MMGenError
from mmgen.utils.pixels import pil_to_tensor, tensor_to_pil

# The built-in tokenizers by the ``mmgen_type`` their config.json records: (module, class), imported
# when first loaded. register_tokenizer adds others.
TOKENIZER_TYPES: dict[str, tuple[str, str] | type] = {
    "pixel_vq": ("mmgen.tokenizers.vq", "PixelVQ"),
    "dualvitok": ("mmgen.tokenizers.dualvitok", "DualViTok"),
    "code_blocks": ("mmgen.tokenizers.blocks", "CodeBlockTokenizer"),
}


def register_tokenizer(cls: type) -> type:
    """Make :func:`load_image_tokenizer` load a tokenizer class of your own (a subclass of
    :class:`ImageTokenizer` with its own ``mmgen_type``); usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, ImageTokenizer)) or cls.mmgen_type == ImageTokenizer.mmgen_type:
        raise MMGenError(f"{cls!r} is not an ImageTokenizer subclass with a mmgen_type of its own")
    TOKENIZER_TYPES[cls.mmgen_type] = cls
    return cls


def tokenizer_class(kind: str | None) -> type:
    """The class of a saved tokenizer's ``mmgen_type``."""
    entry = TOKENIZER_TYPES.get(kind or "")
    if entry is None:
        raise MMGenError(f"unknown tokenizer type '{kind}' (known: {', '.join(sorted(TOKENIZER_TYPES))})")
    if isinstance(entry, tuple):
        import importlib

        entry = getattr(importlib.import_module(entry[0]), entry[1])
    return entry


def as_code_grids(codes, sizes: dict[str, int], device=None) -> dict[str, torch.Tensor]:
    """Codes as a multi-level tokenizer's decode takes them: a ``{name: grid}`` dict or a bare pixel grid,
    each ``(B, h, w)`` or ``(h, w)`` -> ``{name: (B, h, w) long}`` for the names in ``sizes``, every code
    checked against its codebook size (meta tensors skip the value check)."""
    if not isinstance(codes, dict):
        codes = {"pix": codes}
    out = {}
    for name, n in sizes.items():
        c = codes.get(name)
        if c is None:
            continue
        c = torch.as_tensor(np.asarray(c) if not torch.is_tensor(c) else c, dtype=torch.long)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3:
            raise MMGenError(f"{name} codes must be (B, h, w) or (h, w), got shape {tuple(c.shape)}")
        if c.numel() and c.device.type != "meta" and (c.min() < 0 or c.max() >= n):
            raise MMGenError(f"{name} code out of range 0..{n - 1}")
        out[name] = c if device is None else c.to(device)
    return out


# The model card save_pretrained writes beside the weights (the mixin fills in the YAML header).
MODEL_CARD = """---
# For reference on model card metadata, see the spec: https://github.com/huggingface/hub-docs/blob/main/modelcard.md?plain=1
{{ card_data }}
---

An mmgen image tokenizer (images <-> discrete codes). Load it with
`mmgen.tokenizers.load_image_tokenizer(path)`; `config.json` holds its type (`mmgen_type`) and the arguments
that rebuild it, `model.safetensors` its weights.
"""


class ImageTokenizer(
    torch.nn.Module,
    PyTorchModelHubMixin,
    library_name="mmgen",
    tags=["image-tokenizer"],
    model_card_template=MODEL_CARD,
):
    """Base class: subclasses implement ``encode_tensor``/``decode_tensor`` and ``get_config``, name
    themselves with ``mmgen_type`` and set ``downsample``, ``codebook_size`` and ``resolution`` (the
    default (width, height) images are resized to)."""

    mmgen_type = "base"
    downsample: int = 8
    codebook_size: int = 0
    resolution: tuple[int, int] = (64, 64)

    # -- to implement -------------------------------------------------------------------------
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) in [-1,1] -> (B,h,w) int64
        raise NotImplementedError

    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:  # (B,h,w) -> (B,3,H,W) in [-1,1]
        raise NotImplementedError

    def get_config(self) -> dict:
        """The ``__init__`` arguments that rebuild this model as it is now (pruning a codebook after
        construction changes them), JSON-serialisable."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def code_shape(self, width: int, height: int) -> tuple[int, int]:
        """Code grid (h, w) for an image of the given size (rounded to the downsampling factor)."""
        d = self.downsample
        return max(1, round(height / d)), max(1, round(width / d))

    def tokens_per_image(self, width: int, height: int) -> int:
        """Codes one image of this size becomes (every level; DualViTok adds its semantic grid)."""
        h, w = self.code_shape(width, height)
        return h * w

    def image_size_for(self, width: int, height: int) -> tuple[int, int]:
        h, w = self.code_shape(width, height)
        return w * self.downsample, h * self.downsample

    @torch.no_grad()
    def encode(self, images: Sequence, size: tuple[int, int] | None = None) -> torch.Tensor:
        """PIL images -> codes ``(B, h, w)``; all images are resized to ``size`` (default: resolution)."""
        size = self.image_size_for(*(size or self.resolution))
        x = pil_to_tensor(images, size).to(self.device)
        return self.encode_tensor(x)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> list:
        """Codes ``(B, h, w)`` (or one ``(h, w)`` grid) -> PIL images."""
        codes = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes, dtype=torch.long)
        if codes.ndim == 2:
            codes = codes[None]
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise MMGenError(f"code out of range 0..{self.codebook_size - 1}")
        return tensor_to_pil(self.decode_tensor(codes.to(self.device)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """sha256 of what gives a code its meaning: the tokenizer's type, geometry (resolution,
        downsampling, codebook size) and every weight and buffer (names, dtypes, shapes, bytes). Two
        tokenizers with the same fingerprint turn the same pictures into the same codes and back; a model
        trained on one tokenizer's codes (an LM, a detokenizer) records it to refuse another's.
        Computed once per object."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            import hashlib

            facts = {
                "mmgen_type": self.mmgen_type,
                "resolution": list(self.resolution),
                "downsample": int(self.downsample),
                "codebook_size": int(self.codebook_size),
            }
            h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            cached = self._fingerprint = h.hexdigest()
        return cached

    # -- saving and loading: PyTorchModelHubMixin ------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs):
        """``config.json`` (``mmgen_type`` and :meth:`get_config`), ``model.safetensors`` and a model card.

        The mixin would save the arguments the model was built with; the live config is saved instead."""
        kwargs["config"] = {"mmgen_type": self.mmgen_type, **self.get_config()}
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision=None,
        cache_dir=None,
        force_download=False,
        local_files_only=False,
        token=None,
        map_location: str = "cpu",
        strict: bool = True,
        device: str | None = None,
        **model_kwargs,
    ):
        """The mixin's loading step for a local directory (mmgen downloads nothing at run time; a hub
        repository is fetched first with ``huggingface_hub.snapshot_download``): every weight must match."""
        from safetensors.torch import load_model

        p = Path(model_id)
        _check_tokenizer_dir(p)
        device = device or map_location
        model = cls(**model_kwargs)
        load_model(model, str(p / "model.safetensors"), strict=strict, device=str(device))
        return model.to(device).eval()


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


def _check_tokenizer_dir(p: Path) -> None:
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise MMGenError(f"{p} is not a tokenizer directory (needs config.json and model.safetensors)")


def load_image_tokenizer(path: str | Path, device: str = "cpu") -> ImageTokenizer:
    """Load any saved mmgen image tokenizer from its directory."""
    p = Path(path)
    _check_tokenizer_dir(p)
    kind = json.loads((p / "config.json").read_text()).get("mmgen_type")
    try:
        cls = tokenizer_class(kind)
    except MMGenError as e:
        raise MMGenError(f"{e} in {p / 'config.json'}") from None
    return cls.from_pretrained(p, device=device)
