"""The frozen teacher of DualViTok's semantic branch: a vision tower (open_clip, timm or transformers)
that turns pixels into the patch-feature grid the semantic codes are trained to reconstruct."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.backbones.clip import build_open_clip, load_clip
from mmgen.errors import MMGenError
from mmgen.utils.compat import ensure_torchvision

TEACHER_KINDS = ("open_clip", "timm", "transformers")


class Teacher(nn.Module):
    """A frozen vision tower returning a patch-feature grid ``(B, D, H/p, W/p)`` for pixels in [-1, 1].

    Built from config alone (``model_cfg``), so a saved tokenizer reloads without the teacher's hub
    weights; :meth:`load_weights` fills it from a name or local path when a tokenizer is first built.

    ``input_downsample`` average-pools the pixels by that factor before the tower: a tokenizer may work
    at a higher resolution than its teacher was trained at (the tiny one draws 64 px images from a
    CLIP trained at 32 px). ``patch`` is then the tower's patch times the factor, in input pixels."""

    def __init__(
        self, kind: str, model_cfg: dict, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_downsample: int = 1
    ):
        super().__init__()
        if kind not in TEACHER_KINDS:
            raise MMGenError(f"unknown teacher kind '{kind}' (use one of {', '.join(TEACHER_KINDS)})")
        if int(input_downsample) < 1:
            raise MMGenError(f"teacher input_downsample must be a positive integer, got {input_downsample}")
        self.kind = kind
        self.input_downsample = int(input_downsample)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if kind == "open_clip":
            self.tower = build_open_clip(model_cfg).visual
            self.patch = int(self.tower.patch_size[0])
            self.dim = int(self.tower.transformer.width)
            self.grid0 = tuple(int(g) for g in self.tower.grid_size)
        elif kind == "timm":
            import timm

            cfg = dict(model_cfg)
            self.tower = timm.create_model(
                cfg.pop("model_name"), pretrained=False, num_classes=0, dynamic_img_size=True, **cfg
            )
            self.patch = int(self.tower.patch_embed.patch_size[0])
            self.dim = int(self.tower.num_features)
        else:
            ensure_torchvision()
            from transformers import AutoConfig, AutoModel

            cfg = dict(model_cfg)
            self.tower = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
            self.patch = int(self.tower.config.patch_size)
            self.dim = int(self.tower.config.hidden_size)
        self.patch *= self.input_downsample
        self.requires_grad_(False)

    def load_weights(self, name_or_path: str) -> None:
        """Copy a pretrained tower's weights in (an mmgen CLIP dir, a timm/transformers name or path)."""
        if self.kind == "open_clip":
            src = load_clip(name_or_path).model.visual.state_dict()
        elif self.kind == "timm":
            import timm

            src = timm.create_model(name_or_path, pretrained=True, num_classes=0).state_dict()
        else:
            from transformers import AutoModel

            src = AutoModel.from_pretrained(name_or_path).state_dict()
        missing, unexpected = self.tower.load_state_dict(src, strict=False)
        if missing:
            raise MMGenError(
                f"teacher weights from {name_or_path} do not fit the teacher config "
                f"({len(missing)} missing, e.g. {missing[0]}); make teacher.model_cfg match the "
                f"checkpoint"
            )

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout, fixed norms)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        if self.input_downsample > 1:
            x = F.avg_pool2d(x, self.input_downsample)  # box filter: an anti-aliased downscale
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.kind == "open_clip":
            return self._open_clip(x, (gh, gw))
        if self.kind == "timm":
            return self.tower.forward_intermediates(x, indices=1, intermediates_only=True, norm=True)[-1]
        hidden = self.tower(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        hidden = hidden[:, hidden.shape[1] - gh * gw :]  # drop prefix (class) tokens, if any
        return hidden.transpose(1, 2).reshape(b, -1, gh, gw)

    def _open_clip(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        def run(mod, inp):
            out = mod.forward_intermediates(inp, indices=1, intermediates_only=True, normalize_intermediates=True)
            return out["image_intermediates"][-1]

        if grid == self.grid0:
            return run(self.tower, x)
        # Another image size: interpolate the position table (bicubic over the grid, class slot kept).
        pos = self.tower.positional_embedding
        cls, table = pos[:1], pos[1:].reshape(1, *self.grid0, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        pos2 = torch.cat([cls, table.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])
        return torch.func.functional_call(_Runner(self.tower, run), {"tower.positional_embedding": pos2}, (x,))


class _Runner(nn.Module):
    def __init__(self, tower, fn):
        super().__init__()
        self.tower, self.fn = tower, fn

    def forward(self, x):
        return self.fn(self.tower, x)
