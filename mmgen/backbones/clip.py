"""CLIP models behind one small interface: L2-normalised image and text embeddings.

    clip = load_clip("runs/clip/tiny/clip")                 # a directory saved by mmgen (open_clip format)
    clip = load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")   # an open_clip name + pretrained tag/file
    clip = load_clip("path/to/hf_clip_dir")                 # a transformers CLIP directory
    img = clip.encode_image([pil, ...])                     # (N, D), unit norm
    txt = clip.encode_text(["a red circle", ...])           # (N, D), unit norm

A directory saved by :func:`save_clip` is open_clip's own local format (``open_clip_config.json`` with
``model_cfg`` + ``preprocess_cfg``, and ``open_clip_model.safetensors``), so ``open_clip.create_model(
"local-dir:DIR")`` loads it too. Tiny models are built from a custom model-config dict with open_clip's
own classes (:func:`build_open_clip`) and trained contrastively by :mod:`mmgen.models.clip_train`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.errors import MMGenError
from mmgen.utils.compat import ensure_torchvision
from mmgen.utils.pixels import pil_to_tensor

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"

# The tiny teacher: a 64x64 ViT with 8x8 patches (an 8x8 feature grid) and a 1-layer text tower.
TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "layers": 1, "heads": 4, "mlp_ratio": 2.0},
}


def open_clip_module():
    # open_clip imports torchvision, which is broken next to CPU torch without mmgen's shim.

    ensure_torchvision()
    import open_clip

    return open_clip


def build_open_clip(model_cfg: dict, device: str | torch.device = "cpu"):
    """An untrained ``open_clip.CLIP`` from a model-config dict (the layout of open_clip's JSON configs)."""
    open_clip = open_clip_module()

    cfg = dict(model_cfg)
    try:
        return open_clip.CLIP(**cfg).to(device)
    except TypeError as e:
        raise MMGenError(
            f"invalid open_clip model config ({e}); expected keys embed_dim, vision_cfg, text_cfg"
        ) from None


class ClipEncoder:
    """Wraps an open_clip or transformers CLIP model: ``encode_image`` / ``encode_text`` -> unit vectors."""

    def __init__(
        self, model, tokenize, image_size: tuple[int, int], mean, std, kind: str, model_cfg: dict | None = None
    ):
        self.model = model.eval()
        self.tokenize = tokenize
        self.image_size = image_size  # (height, width)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.kind = kind
        self.model_cfg = model_cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: Sequence) -> torch.Tensor:
        """PIL images -> normalised ``(N, 3, H, W)`` at the model's input size (bicubic resize)."""
        h, w = self.image_size
        x = (pil_to_tensor(images, (w, h)) + 1) / 2
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: Sequence) -> torch.Tensor:
        if not len(images):
            raise MMGenError("encode_image needs at least one image")
        x = self.pixels(images)
        feats = (
            self.model.encode_image(x) if self.kind == "open_clip" else self.model.get_image_features(pixel_values=x)
        )
        return F.normalize(_as_tensor(feats).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if not len(texts):
            raise MMGenError("encode_text needs at least one text")
        if self.kind == "open_clip":
            feats = self.model.encode_text(self.tokenize(list(texts)).to(self.device))
        else:
            enc = self.tokenize(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(**enc)
        return F.normalize(_as_tensor(feats).float(), dim=-1)


def _as_tensor(feats):
    # transformers 5 may return a model output object instead of a bare tensor
    return feats if torch.is_tensor(feats) else feats.pooler_output


def save_clip(model, path: str | Path, model_cfg: dict, preprocess_cfg: dict | None = None) -> Path:
    """Save an open_clip model in open_clip's local-dir format (config JSON + safetensors)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    vision = model_cfg["vision_cfg"]
    size = vision.get("image_size", 224)
    pre = {
        "size": size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "squash",
        **(preprocess_cfg or {}),
    }
    (p / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=1))
    model = getattr(model, "model", model)  # a ClipEncoder or a bare open_clip model
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(p / OPEN_CLIP_WEIGHTS))
    return p


def _size_pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _load_open_clip(name: str, pretrained: str | None, device) -> ClipEncoder:
    open_clip = open_clip_module()

    local = Path(name)
    if local.is_dir():
        name = f"local-dir:{local}"
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
        tokenize = open_clip.get_tokenizer(name)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise MMGenError(f"cannot load open_clip model '{name}' (pretrained={pretrained}): {e}") from None
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    cfg = None
    if name.startswith("local-dir:"):
        cfg = json.loads((local / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    size = _size_pair(pre.get("size", model.visual.image_size))
    return ClipEncoder(model, tokenize, size, pre.get("mean", (0.5,) * 3), pre.get("std", (0.5,) * 3), "open_clip", cfg)


def _load_hf_clip(path: Path, device) -> ClipEncoder:
    ensure_torchvision()
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    model = AutoModel.from_pretrained(path).to(device)
    tok = AutoTokenizer.from_pretrained(path)
    try:
        ip = AutoProcessor.from_pretrained(path).image_processor
        mean, std = ip.image_mean, ip.image_std
    except (OSError, ValueError, AttributeError):
        mean, std = (0.5,) * 3, (0.5,) * 3
    size = _size_pair(model.config.vision_config.image_size)
    return ClipEncoder(model, tok, size, mean, std, "transformers")


def load_clip(name_or_path: str | Path, device: str = "cpu", pretrained: str | None = None) -> ClipEncoder:
    """Load a CLIP model: an mmgen/open_clip local directory, a transformers CLIP directory, or an
    open_clip model name with a ``pretrained`` tag or checkpoint file (tags download from their hub)."""
    p = Path(name_or_path)
    if p.is_dir():
        if (p / OPEN_CLIP_CONFIG).is_file():
            return _load_open_clip(str(p), None, device)
        if (p / "config.json").is_file():
            return _load_hf_clip(p, device)
        raise MMGenError(f"{p} is not a CLIP directory (needs {OPEN_CLIP_CONFIG} or a transformers config.json)")
    if p.suffix in (".safetensors", ".pt", ".bin") or str(name_or_path).startswith(("/", ".")):
        raise MMGenError(
            f"no CLIP model directory at {p}; pass a directory saved by `mmgen train-clip`, "
            "or an open_clip model name with pretrained=TAG_OR_FILE"
        )
    return _load_open_clip(str(name_or_path), pretrained, device)


def cell_regions(grid: torch.Tensor, cells: int) -> torch.Tensor:
    """A ``(B, D, h, w)`` feature map average-pooled to the square phrase grid of ``cells`` cells:
    ``(B * cells, D)``, cells row-major as :func:`mmgen.world.text.cell_phrases` lists them."""
    side = int(round(cells**0.5))
    return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2).reshape(-1, grid.shape[1])


def region_text_logits(regions: torch.Tensor, texts: torch.Tensor, scale) -> torch.Tensor:
    """Scaled cosine similarity of region embeddings ``(N, D)`` to text embeddings ``(V, D)``: CLIP's
    zero-shot classifier, here trained with cross-entropy (CLIP's cell loss, DualViTok's region-text head)."""
    return scale * F.normalize(regions, dim=-1) @ F.normalize(texts, dim=-1).T
