"""The image-tokenizer API every stage uses, and loading any saved tokenizer by directory.

A tokenizer directory holds ``config.json`` (with ``"mmgen_type"`` naming the class) and
``model.safetensors``. :func:`load_image_tokenizer` dispatches on that name, so the LM bundle, the
``tokenize`` stage and the chat app load whatever tokenizer a checkpoint was trained with.

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

from mmgen.errors import MMGenError
from mmgen.utils.pixels import pil_to_tensor, tensor_to_pil

_REGISTRY: dict[str, type] = {}


def register_tokenizer(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.mmgen_type = name
        return cls

    return deco


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


class ImageTokenizer(torch.nn.Module):
    """Base class: subclasses implement ``encode_tensor``/``decode_tensor`` and set ``downsample``,
    ``codebook_size`` and ``resolution`` (the default (width, height) images are resized to)."""

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

            facts = {"mmgen_type": self.mmgen_type, "resolution": list(self.resolution),
                     "downsample": int(self.downsample), "codebook_size": int(self.codebook_size)}
            h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            cached = self._fingerprint = h.hexdigest()
        return cached

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps({"mmgen_type": self.mmgen_type, **self.get_config()}, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(p / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        p = Path(path)
        cfg = _read_config(p)
        cfg.pop("mmgen_type", None)
        model = cls(**cfg)
        model.load_state_dict(load_file(str(p / "model.safetensors"), device=device))
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


def _read_config(p: Path) -> dict:
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise MMGenError(f"{p} is not a tokenizer directory (needs config.json and model.safetensors)")
    return json.loads((p / "config.json").read_text())


def load_image_tokenizer(path: str | Path, device: str = "cpu") -> ImageTokenizer:
    """Load any saved mmgen image tokenizer from its directory."""
    p = Path(path)
    kind = _read_config(p).get("mmgen_type")
    if kind not in _REGISTRY:
        import mmgen.tokenizers.blocks  # noqa: F401 - registers the built-in tokenizers
        import mmgen.tokenizers.dualvitok  # noqa: F401
        import mmgen.tokenizers.vq  # noqa: F401
    if kind not in _REGISTRY:
        raise MMGenError(
            f"unknown tokenizer type '{kind}' in {p / 'config.json'} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind].from_pretrained(p, device=device)
