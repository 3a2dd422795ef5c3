"""DualViTok: ILLUME+'s dual visual tokenizer -- semantic codes plus pixel codes for every image.

    tok = load_image_tokenizer("runs/tokenizer/tiny_dualvitok/tokenizer")
    codes = tok.encode(images)                 # {"sem": (B, h/2, w/2), "pix": (B, h, w)} int64
    feats = tok.encode(images, return_features=True)   # + "sem_features"/"pix_features" (pre-quantization)
    images = tok.decode(codes)                 # PIL images; a bare pixel grid decodes with null semantics

Semantic branch: a frozen teacher vision tower (:class:`~mmgen.tokenizers.teacher.Teacher`: open_clip,
timm or transformers) gives a patch-feature grid; a few transformer blocks, a 2x2 patch merge and a
quantizer make the semantic codes; a mirrored decoder reconstructs the teacher features (cosine loss),
which is what keeps these codes text-aligned.

Pixel branch: diffusers' VAE ``Encoder`` (after a pixel-unshuffle patchify) and its own quantizer make
the pixel codes. The pixel ``Decoder`` sees the pixel codes concatenated with the semantic codes
upsampled to the pixel grid (ILLUME+'s merge), so texture codes only carry what semantics miss.

Branch dropout in training (a learned null vector replaces one branch's quantized map) lets the
decoder run from either code level alone: ``decode({"pix": ...})`` serves callers that only carry
pixel codes, and the benchmark compares full, pixel-only and semantic-only reconstructions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.config import from_dict
from mmgen.errors import MMGenError
from mmgen.tokenizers.base import ImageTokenizer, as_code_grids
from mmgen.tokenizers.quantizers import Quantizer, QuantizerConfig
from mmgen.tokenizers.teacher import Teacher
from mmgen.tokenizers.vq import diffusers_vae_blocks
from mmgen.utils.pixels import pil_to_tensor, tensor_to_pil, uint8_to_unit

# -- small blocks -------------------------------------------------------------------------------------


def _blocks(width: int, depth: int, heads: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=width * 2, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else nn.Identity()


def _grid_tf(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return blocks(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class PatchGAN(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): a conv stack giving a real/fake logit per patch."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


# -- the tokenizer --------------------------------------------------------------------------------------

PIX_ENCODERS = ("conv", "patch")


class PatchEncoder(nn.Module):
    """A pixel encoder whose every code sees only its own pixels: an MLP per ``patch x patch`` cell of
    its input, which is the image already pixel-unshuffled by ``pix_patch_size`` (``in_channels`` wide).

    diffusers' conv ``Encoder`` gives each code a receptive field far beyond its patch and GroupNorm
    statistics of the whole image, so the same pixels get different codes in different scenes: on
    ShapesWorld its codes keep 4.2 nats of entropy given their exact 4x4 patch. That is noise for a
    language model that has to draw the code grid from a caption. Here identical patches always get
    identical codes, which makes the code grid a local function of the picture; the decoder still
    sees every code's neighbours."""

    def __init__(self, in_channels: int, patch: int, code_dim: int, width: int = 256, layers: int = 3):
        super().__init__()
        self.patch = patch
        dims = [in_channels * patch * patch] + [width] * (layers - 1)
        mods: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            mods += [nn.Conv2d(a, b, 1), nn.SiLU()]
        self.net = nn.Sequential(*mods, nn.Conv2d(dims[-1], code_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.pixel_unshuffle(x, self.patch))


def _qcfg(d) -> QuantizerConfig:
    if isinstance(d, QuantizerConfig):
        return d

    return from_dict(QuantizerConfig, dict(d or {}), prefix="quantizer.")


class DualViTok(ImageTokenizer):
    """Semantic + pixel image tokenizer (ILLUME+). ``downsample`` is the pixel branch's factor;
    ``sem_downsample = teacher patch * sem_merge`` must be ``sem_ratio`` times it (Vocab's sem_ratio)."""

    mmgen_type = "dualvitok"

    def __init__(
        self,
        resolution=(64, 64),
        teacher: dict | None = None,
        sem_width: int = 128,
        sem_heads: int = 4,
        sem_encoder_layers: int = 2,
        sem_decoder_layers: int = 2,
        sem_merge: int = 2,
        sem_code_dim: int = 32,
        sem_quantizer: dict | None = None,
        pix_channels=(32, 64, 128),
        pix_layers_per_block: int = 1,
        pix_patch_size: int = 2,
        pix_code_dim: int = 8,
        pix_quantizer: dict | None = None,
        sem_cond_dim: int = 16,
        norm_groups: int = 8,
        branch_dropout: float = 0.1,
        pix_encoder: str = "conv",
        pix_encoder_width: int = 256,
        sem_swap: float = 0.0,
        sem_pixel_grad: bool = True,
    ):
        super().__init__()
        if pix_encoder not in PIX_ENCODERS:
            raise MMGenError(f"unknown pix_encoder '{pix_encoder}' (use one of {', '.join(PIX_ENCODERS)})")
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.teacher_spec = dict(teacher or {})
        if "kind" not in self.teacher_spec or "model_cfg" not in self.teacher_spec:
            raise MMGenError(
                "teacher needs kind (open_clip|timm|transformers) and model_cfg "
                "(e.g. teacher: {kind: open_clip, model_cfg: {...}, name: runs/clip/tiny/clip})"
            )
        self.hp = dict(
            sem_width=sem_width,
            sem_heads=sem_heads,
            sem_encoder_layers=sem_encoder_layers,
            sem_decoder_layers=sem_decoder_layers,
            sem_merge=sem_merge,
            sem_code_dim=sem_code_dim,
            pix_channels=[int(c) for c in pix_channels],
            pix_layers_per_block=pix_layers_per_block,
            pix_patch_size=pix_patch_size,
            pix_code_dim=pix_code_dim,
            sem_cond_dim=sem_cond_dim,
            norm_groups=norm_groups,
            branch_dropout=branch_dropout,
            pix_encoder=pix_encoder,
            pix_encoder_width=pix_encoder_width,
            sem_swap=sem_swap,
            sem_pixel_grad=sem_pixel_grad,
        )  # configs saved before pix_encoder load as "conv"
        self.teacher = Teacher(
            self.teacher_spec["kind"],
            self.teacher_spec["model_cfg"],
            self.teacher_spec.get("mean", (0.5,) * 3),
            self.teacher_spec.get("std", (0.5,) * 3),
            self.teacher_spec.get("input_downsample", 1),
        )
        td = self.teacher.dim
        # semantic branch
        self.sem_in = nn.Linear(td, sem_width)
        self.sem_encoder = _blocks(sem_width, sem_encoder_layers, sem_heads)
        self.sem_to_code = nn.Linear(sem_width * sem_merge**2, sem_code_dim)
        self.sem_quantizer = Quantizer(_qcfg(sem_quantizer), sem_code_dim)
        self.sem_from_code = nn.Linear(sem_code_dim, sem_width * sem_merge**2)
        self.sem_decoder = _blocks(sem_width, sem_decoder_layers, sem_heads)
        self.sem_out = nn.Linear(sem_width, td)
        # pixel branch
        Encoder, Decoder = diffusers_vae_blocks()
        levels = len(self.hp["pix_channels"])
        pix = 3 * pix_patch_size**2
        if any(c % norm_groups for c in self.hp["pix_channels"]):
            raise MMGenError(
                f"every pixel channel count in {self.hp['pix_channels']} must be divisible by norm_groups={norm_groups}"
            )
        self.downsample = pix_patch_size * 2 ** (levels - 1)
        if pix_encoder == "patch":
            self.pix_encoder = PatchEncoder(pix, 2 ** (levels - 1), pix_code_dim, pix_encoder_width)
        else:
            self.pix_encoder = Encoder(
                in_channels=pix,
                out_channels=pix_code_dim,
                down_block_types=("DownEncoderBlock2D",) * levels,
                block_out_channels=self.hp["pix_channels"],
                layers_per_block=pix_layers_per_block,
                norm_num_groups=norm_groups,
                double_z=False,
                mid_block_add_attention=False,
            )
        self.pix_quantizer = Quantizer(_qcfg(pix_quantizer), pix_code_dim)
        self.sem_cond = nn.Conv2d(sem_code_dim, sem_cond_dim, 1)
        self.pix_decoder = Decoder(
            in_channels=pix_code_dim + sem_cond_dim,
            out_channels=pix,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=self.hp["pix_channels"],
            layers_per_block=pix_layers_per_block,
            norm_num_groups=norm_groups,
            mid_block_add_attention=False,
        )
        self.null_sem = nn.Parameter(torch.zeros(sem_code_dim))
        self.null_pix = nn.Parameter(torch.zeros(pix_code_dim))

        self.sem_downsample = self.teacher.patch * sem_merge
        if self.sem_downsample % self.downsample:
            raise MMGenError(
                f"semantic downsampling {self.sem_downsample} (teacher patch {self.teacher.patch} x "
                f"sem_merge "
                f"{sem_merge}) must be a multiple of the pixel downsampling {self.downsample}"
            )
        self.sem_ratio = self.sem_downsample // self.downsample

    @property
    def codebook_sizes(self) -> dict:
        """Entries per code level, read from the quantizers (pruning shrinks them)."""
        return {"sem": self.sem_quantizer.codebook_size, "pix": self.pix_quantizer.codebook_size}

    @property
    def codebook_size(self) -> int:  # what callers that know one codebook mean
        return self.pix_quantizer.codebook_size

    def get_config(self) -> dict:
        return {
            "resolution": list(self.resolution),
            "teacher": {k: v for k, v in self.teacher_spec.items() if k != "name"},
            **self.hp,
            "sem_quantizer": _asdict(self.sem_quantizer.cfg),
            "pix_quantizer": _asdict(self.pix_quantizer.cfg),
        }

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- geometry ---------------------------------------------------------------------------------
    def code_shape(self, width: int, height: int) -> tuple[int, int]:
        """Pixel-code grid (h, w); sizes snap to the semantic factor so both grids tile the image."""
        s, r = self.sem_downsample, self.sem_ratio
        return max(1, round(height / s)) * r, max(1, round(width / s)) * r

    def code_shapes(self, width: int, height: int) -> dict:
        h, w = self.code_shape(width, height)
        return {"sem": (h // self.sem_ratio, w // self.sem_ratio), "pix": (h, w)}

    def tokens_per_image(self, width: int, height: int) -> int:
        return sum(a * b for a, b in self.code_shapes(width, height).values())

    def _check_pixels(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise MMGenError(f"expected images as a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.sem_downsample or w % self.sem_downsample:
            raise MMGenError(
                f"image size {w}x{h} is not a multiple of {self.sem_downsample} (DualViTok's semantic "
                f"downsampling); resize it (encode() does this for PIL images)"
            )

    # -- semantic branch --------------------------------------------------------------------------
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    def sem_encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Teacher grid -> pre-quantization semantic features ``(B, sem_code_dim, h/m, w/m)``."""
        z = self.sem_in(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = _grid_tf(self.sem_encoder, z)
        z = F.pixel_unshuffle(z, self.hp["sem_merge"])
        return self.sem_to_code(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def sem_decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized semantic map -> reconstructed teacher features."""
        z = self.sem_from_code(zq.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = _grid_tf(self.sem_decoder, F.pixel_shuffle(z, self.hp["sem_merge"]))
        return self.sem_out(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # -- pixel branch -----------------------------------------------------------------------------
    def pix_encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pix_encoder(F.pixel_unshuffle(x, self.hp["pix_patch_size"]) if self.hp["pix_patch_size"] > 1 else x)

    def pix_decode(
        self, pix_q: torch.Tensor | None, sem_q: torch.Tensor | None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Pixels from the quantized maps; a missing map (None) is replaced by its learned null vector."""
        if pix_q is None and sem_q is None:
            raise MMGenError("decode needs semantic codes, pixel codes or both")
        if grid is None:
            grid = pix_q.shape[-2:] if pix_q is not None else tuple(s * self.sem_ratio for s in sem_q.shape[-2:])
        b = (pix_q if pix_q is not None else sem_q).shape[0]
        if pix_q is None:
            pix_q = self.null_pix.view(1, -1, 1, 1).expand(b, -1, *grid)
        sem_grid = (grid[0] // self.sem_ratio, grid[1] // self.sem_ratio)
        if sem_q is None:
            sem_q = self.null_sem.view(1, -1, 1, 1).expand(b, -1, *sem_grid)
        cond = self.sem_cond(F.interpolate(sem_q, size=tuple(grid), mode="nearest"))
        out = self.pix_decoder(torch.cat([pix_q, cond], dim=1))
        return F.pixel_shuffle(out, self.hp["pix_patch_size"]) if self.hp["pix_patch_size"] > 1 else out

    # -- training forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One training pass: reconstructions, teacher features and the quantizers' aux losses."""
        self._check_pixels(x)
        feats = self.teacher_features(x)
        sem_z = self.sem_encode(feats)
        sem_q, sem_codes, sem_loss = self.sem_quantizer(sem_z)
        pix_q, pix_codes, pix_loss = self.pix_quantizer(self.pix_encode(x))
        feat_rec = self.sem_decode(sem_q)
        out_sem_q = sem_q  # before sem_swap and branch dropout: what region-text alignment reads
        if not self.hp["sem_pixel_grad"]:
            # the semantic codes answer to the teacher (and the text) only; the pixel decoder adapts to them
            sem_q = sem_q.detach()
        if self.training and self.hp["sem_swap"] > 0:
            sem_q = self._swap_sem_codes(sem_q, generator)
        p = self.hp["branch_dropout"]
        if self.training and p > 0:
            # One draw per image: drop semantics (p), drop pixels (p), or keep both.
            u = torch.rand(x.shape[0], 1, 1, 1, generator=generator)
            sem_q = torch.where(u < p, self.null_sem.view(1, -1, 1, 1), sem_q)
            pix_q = torch.where((u >= p) & (u < 2 * p), self.null_pix.view(1, -1, 1, 1), pix_q)
        recon = self.pix_decode(pix_q, sem_q)
        return {
            "recon": recon,
            "teacher": feats,
            "feat_rec": feat_rec,
            "sem_codes": sem_codes,
            "pix_codes": pix_codes,
            "sem_q": out_sem_q,
            "sem_z": sem_z,
            "quant_loss": sem_loss + pix_loss,
        }

    def _swap_sem_codes(self, sem_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Replace a ``sem_swap`` share of the semantic cells by random codes' vectors, for the pixel
        decoder only. A semantic code names what a cell holds among what training showed; an unseen
        object (a held-out colour-shape pair) gets the nearest seen one, and a decoder that trusts
        it draws that instead. Taught that a semantic code may disagree with its pixels, the decoder
        takes the pixel codes' word for the details and the semantic codes' for the rest."""
        b, _, h, w = sem_q.shape
        swap = torch.rand(b, 1, h, w, generator=generator) < self.hp["sem_swap"]
        other = self.sem_quantizer.embed(torch.randint(0, self.codebook_sizes["sem"], (b, h, w), generator=generator))
        return torch.where(swap.to(sem_q.device), other.to(sem_q.dtype), sem_q)

    @torch.no_grad()
    def prune_codes(self, level: str, images: torch.Tensor, min_share: float = 0.0, batch: int = 256) -> dict:
        """Drop the ``level`` ("sem" or "pix") codebook entries that no image of ``images`` (uint8
        ``(N, 3, H, W)``, the training set) is encoded to, or that encode less than ``min_share`` of a
        uniform share (1 / codebook size) of its vectors; returns the sizes before and after. A dropped
        entry's vectors go to their next-nearest kept entry."""
        was = self.training
        self.eval()
        counts = torch.zeros(self.codebook_sizes[level])
        for i in range(0, len(images), batch):
            codes = self.encode_tensor(uint8_to_unit(images[i : i + batch].to(self.device)))[level].flatten()
            counts += torch.bincount(codes.cpu(), minlength=len(counts)).float()
        q = getattr(self, f"{level}_quantizer")
        before = q.codebook_size
        keep = (counts > 0) & (counts / counts.sum() >= min_share / before)
        q.keep_codes(torch.nonzero(keep).flatten())
        self.train(was)
        return {"codebook_size_before": before, "codebook_size": q.codebook_size}

    # -- the tokenizer API ------------------------------------------------------------------------
    def encode_tensor(self, x: torch.Tensor, return_features: bool = False) -> dict:
        self._check_pixels(x)
        sem_z = self.sem_encode(self.teacher_features(x))
        pix_z = self.pix_encode(x)
        _, sem, _ = self.sem_quantizer(sem_z)
        _, pix, _ = self.pix_quantizer(pix_z)
        out = {"sem": sem, "pix": pix}
        if return_features:
            out.update(sem_features=sem_z, pix_features=pix_z)
        return out

    def decode_tensor(self, codes) -> torch.Tensor:
        codes = self._as_codes(codes)
        sem_q = self.sem_quantizer.embed(codes["sem"]) if codes.get("sem") is not None else None
        pix_q = self.pix_quantizer.embed(codes["pix"]) if codes.get("pix") is not None else None
        return self.pix_decode(pix_q, sem_q)

    @torch.no_grad()
    def encode(self, images: Sequence, size: tuple[int, int] | None = None, return_features: bool = False) -> dict:
        """PIL images -> ``{"sem": (B, h/r, w/r), "pix": (B, h, w)}`` (+ pre-quantization features)."""
        size = self.image_size_for(*(size or self.resolution))
        return self.encode_tensor(pil_to_tensor(images, size).to(self.device), return_features=return_features)

    @torch.no_grad()
    def decode(self, codes) -> list:
        """``{"sem", "pix"}`` codes (either may be missing) or a bare pixel grid -> PIL images."""
        return tensor_to_pil(self.decode_tensor(codes))

    def _as_codes(self, codes) -> dict:
        out = as_code_grids(codes, {n: self.codebook_sizes[n] for n in ("sem", "pix")}, self.device)
        if "sem" in out and "pix" in out:
            want = tuple(s // self.sem_ratio for s in out["pix"].shape[-2:])
            if tuple(out["sem"].shape[-2:]) != want or out["sem"].shape[0] != out["pix"].shape[0]:
                raise MMGenError(
                    f"semantic grid {tuple(out['sem'].shape)} does not match pixel grid "
                    f"{tuple(out['pix'].shape)} (expected sem {want}, sem_ratio {self.sem_ratio})"
                )
        if "pix" in out and any(s % self.sem_ratio for s in out["pix"].shape[-2:]):
            raise MMGenError(
                f"pixel grid {tuple(out['pix'].shape[-2:])} must be a multiple of sem_ratio {self.sem_ratio}"
            )
        if not out:
            raise MMGenError("decode needs 'sem' and/or 'pix' codes")
        return out


def _asdict(cfg: QuantizerConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def build_dualvitok(cfg: dict, load_teacher: bool = True) -> DualViTok:
    """A DualViTok from a config mapping; with ``load_teacher`` the teacher's pretrained weights are
    loaded from ``teacher.name`` (an mmgen CLIP dir, a timm or transformers name/path)."""
    model = DualViTok(**cfg)
    name = model.teacher_spec.get("name")
    if load_teacher and name:
        model.teacher.load_weights(name)
    return model


__all__ = ["DualViTok", "PatchEncoder", "PatchGAN", "build_dualvitok"]
