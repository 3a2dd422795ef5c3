"""The diffusion detokenizer: image codes -> pixels with a diffusers UNet, ILLUME+ style.

Conditioning is by channel concatenation: each code grid (the pixel VQ's one grid today; DualViTok's
semantic and pixel grids alike) has its own embedding table, its embedding map is upsampled (nearest)
to the output size, and the maps are stacked onto the noisy image as extra input channels of a
:class:`diffusers.UNet2DModel`. Every table has one extra row, the *null code*: training replaces a
random share of conditions by null codes, so sampling can run classifier-free guidance
(``uncond + scale * (cond - uncond)``).

``decoded_channels: 3`` adds a second condition, SR3-style: the image tokenizer's own decode of the same
codes, upsampled (bicubic) to the output size, as three more input channels. It is a function of the
codes alone, so the pipeline is still a decoder of codes; what changes is what the UNet must learn. From
the embeddings alone it has to re-learn the whole VQ decoder (a tiny UNet trained for minutes draws
blotches); with the decode in its input it only has to learn the residual the VQ decoder leaves (at 1x
it redraws the decode within 0.5 dB after 400 steps; in the 2x mode x0 prediction looked no sharper than
bicubic, v-prediction at 2,000 steps does, BENCHMARKS "Diffusion detokenizer"). The null condition zeroes
that image along with the codes. Such a pipeline needs the tokenizer at sampling time:
:func:`load_pipeline` loads the one its conditioner names, or the caller passes ``decoded=``.

The output size is the finest grid's side times ``pixels_per_code``. With ``pixels_per_code`` equal to the tokenizer's
downsampling factor the pipeline re-draws the tokenizer's own resolution; with twice that it is a 2x
super-resolution decoder of the same codes.

:class:`CodeDetokenizerPipeline` is a :class:`diffusers.DiffusionPipeline` whose components are the
UNet, a scheduler and the :class:`CodeConditioner`, so ``save_pretrained`` / ``from_pretrained`` and
scheduler swaps (DDIM, DPM-Solver++) work as for any diffusers pipeline::

    pipe = CodeDetokenizerPipeline.from_pretrained("runs/detok/pipeline")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe([codes], num_inference_steps=8, guidance_scale=2.0).images
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmgen.errors import MMGenError
from mmgen.tokenizers import load_image_tokenizer
from mmgen.utils.compat import ensure_torchvision

ensure_torchvision()  # diffusers imports transformers, whose import touches torchvision: the CPU shim first

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    ModelMixin,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402

SCHEDULERS = ("ddim", "dpm", "ddpm")


def decode_grids(tokenizer, grid_names: Sequence[str], grids: Sequence[torch.Tensor]) -> torch.Tensor:
    """An image tokenizer's own decode of code grids given in conditioner order: ``(B, 3, h, w)`` in
    [-1, 1]. A multi-grid tokenizer (DualViTok) takes them as a dict by name, a lone pixel grid bare
    (which a one-grid tokenizer needs, and a multi-grid one reads as its pixel grid)."""
    codes = grids[0] if list(grid_names) == ["pix"] else dict(zip(grid_names, grids))
    return tokenizer.decode_tensor(codes).clamp(-1, 1)


class CodeConditioner(ModelMixin, ConfigMixin):
    """A list of code grids -> one stack of embedding maps at the output resolution.

    ``grid_names`` say which code grid is which (e.g. ``["pix"]`` or ``["sem", "pix"]``) and
    ``tokenizer`` / ``tokenizer_type`` / ``tokenizer_sha256`` (:meth:`ImageTokenizer.fingerprint
    <mmgen.tokenizers.base.ImageTokenizer.fingerprint>`) which image tokenizer made them, so a
    checkpoint names its codes' origin and generation refuses another tokenizer's codes."""

    @register_to_config
    def __init__(
        self,
        codebook_sizes: Sequence[int] = (512,),
        embed_dims: Sequence[int] = (16,),
        grid_names: Sequence[str] = ("pix",),
        pixels_per_code: int = 8,
        tokenizer: str = "",
        tokenizer_type: str = "pixel_vq",
        tokenizer_resolution: int = 64,
        decoded_channels: int = 0,
        tokenizer_sha256: str = "",
    ):
        super().__init__()
        if int(decoded_channels) not in (0, 3):
            raise MMGenError(
                f"decoded_channels is 0 (codes only) or 3 (codes + the tokenizer's RGB decode), got {decoded_channels}"
            )
        if not (len(codebook_sizes) == len(embed_dims) == len(grid_names)):
            raise MMGenError("codebook_sizes, embed_dims and grid_names need one entry per code grid")
        self.embeds = nn.ModuleList(nn.Embedding(int(n) + 1, int(d)) for n, d in zip(codebook_sizes, embed_dims))

    @property
    def channels(self) -> int:
        return int(sum(self.config.embed_dims)) + int(self.config.decoded_channels)

    @property
    def uses_decoded(self) -> bool:
        return bool(self.config.decoded_channels)

    def null_codes(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.full_like(g, n) for g, n in zip(grids, self.config.codebook_sizes)]

    def output_size(self, grids: Sequence[torch.Tensor]) -> tuple[int, int]:
        """(height, width) of the image: the finest grid (DualViTok's pixel grid) times ``pixels_per_code``."""
        h, w = max((g.shape[-2:] for g in grids), key=lambda hw: hw[0] * hw[1])
        return h * self.config.pixels_per_code, w * self.config.pixels_per_code

    def check(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(grids) != len(self.embeds):
            raise MMGenError(
                f"expected {len(self.embeds)} code grid(s) ({', '.join(self.config.grid_names)}), got {len(grids)}"
            )
        out = []
        for g, n, name in zip(grids, self.config.codebook_sizes, self.config.grid_names):
            g = torch.as_tensor(np.asarray(g) if not torch.is_tensor(g) else g, dtype=torch.long)
            if g.ndim == 2:
                g = g[None]
            if g.ndim != 3:
                raise MMGenError(f"'{name}' codes must be (B, h, w) or (h, w), got shape {tuple(g.shape)}")
            if g.numel() and (int(g.min()) < 0 or int(g.max()) > n):
                raise MMGenError(
                    f"'{name}' code out of range 0..{n - 1}: were these codes made by another tokenizer "
                    f"than {self.config.tokenizer or self.config.tokenizer_type}?"
                )
            out.append(g.to(self.device))
        return out

    def forward(
        self, grids: Sequence[torch.Tensor], size: tuple[int, int], decoded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Condition maps ``(B, channels, *size)``. ``decoded``: the tokenizer's decode of ``grids``
        (``(B, 3, h, w)`` in [-1, 1]), required when :attr:`uses_decoded`; zeros stand for it under null
        codes (pass ``None`` there)."""
        # A grid with embed_dim 0 is named and checked but not drawn: a decode-conditioned model may
        # take the decode alone (nearest-upsampled code maps print cell-sized blocks at 2x).
        maps = [
            F.interpolate(emb(g).permute(0, 3, 1, 2), size=size, mode="nearest")
            for emb, g in zip(self.embeds, grids)
            if emb.embedding_dim
        ]
        if self.uses_decoded:
            if decoded is None:
                decoded = torch.zeros(grids[0].shape[0], 3, *size, device=self.device)
            # bicubic: the residual then starts from the bicubic upscale of the decode, the usual baseline
            maps.append(
                F.interpolate(
                    decoded.to(self.device, self.dtype), size=size, mode="bicubic", align_corners=False
                ).clamp(-1, 1)
            )
        return torch.cat(maps, dim=1)


def build_unet(
    cond_channels: int,
    sample_size: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention: bool = False,
) -> UNet2DModel:
    """A pixel-space UNet2DModel whose input is the noisy RGB image plus the condition maps."""
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:  # attention at the coarsest level only: global layout at little cost
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3 + cond_channels,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
    )


def make_scheduler(name: str, config: dict | None = None, prediction_type: str = "sample"):
    """A diffusers scheduler by short name (ddim, dpm = DPM-Solver++ multistep, ddpm)."""
    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise MMGenError(f"unknown scheduler '{name}' (use one of {', '.join(SCHEDULERS)})")
    if config is not None:
        return classes[name].from_config(config)
    return classes[name](num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


class CodeDetokenizerPipeline(DiffusionPipeline):
    """Codes -> images by conditional diffusion with classifier-free guidance."""

    model_cpu_offload_seq = "conditioner->unet"

    def __init__(self, unet: UNet2DModel, scheduler, conditioner: CodeConditioner):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, conditioner=conditioner)
        # Not a pipeline component (mmgen tokenizers save themselves): set by load_pipeline or the
        # caller, used only by a conditioner with decoded_channels.
        self.image_tokenizer = None

    def decode_codes(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """The image tokenizer's own decode of ``grids`` (B, 3, h, w) in [-1, 1]."""
        if self.image_tokenizer is None:
            raise MMGenError(
                "this detokenizer refines its tokenizer's decode: load it with "
                "load_pipeline(path, tokenizer=DIR) or pass decoded="
            )
        return decode_grids(self.image_tokenizer, self.conditioner.config.grid_names, grids)

    def use_scheduler(self, name: str) -> CodeDetokenizerPipeline:
        """Swap the sampler, keeping the noise schedule it was trained with."""
        self.scheduler = make_scheduler(name, dict(self.scheduler.config))
        return self

    def predict(self, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        out = self.unet(torch.cat([x_t, cond], dim=1), t).sample
        if self.conditioner.uses_decoded and self.scheduler.config.prediction_type == "sample":
            # The UNet writes the residual over the upsampled decode (the last 3 condition channels,
            # zeros under null codes): with its zero-initialised output layer, training starts at the
            # decode's quality rather than at grey.
            out = out + cond[:, -3:]
        return out

    @torch.no_grad()
    def __call__(
        self,
        codes,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        decoded: torch.Tensor | None = None,
    ):
        """``codes``: a list with one code grid per conditioner entry (``(B, h, w)`` or ``(h, w)``), or a
        single grid for a one-grid conditioner. ``output_type``: "pil", "np" (HWC in [0, 1]) or "pt"
        (BCHW in [-1, 1]). ``decoded``: the tokenizer's decode of ``codes``, for a conditioner with
        ``decoded_channels``; computed with :attr:`image_tokenizer` when left out."""
        if torch.is_tensor(codes) or isinstance(codes, np.ndarray):
            codes = [codes]
        grids = self.conditioner.check(list(codes))
        size = self.conditioner.output_size(grids)
        b = grids[0].shape[0]
        if self.conditioner.uses_decoded and decoded is None:
            decoded = self.decode_codes(grids)
        cond = self.conditioner(grids, size, decoded)
        cfg = guidance_scale is not None and guidance_scale != 1.0
        if cfg:
            cond = torch.cat([self.conditioner(self.conditioner.null_codes(grids), size), cond])
        x = torch.randn((b, 3, *size), generator=generator, device="cpu").to(self.unet.device)
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        x = x * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = self.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            out = self.predict(inp, t, cond)
            if cfg:
                uncond, c = out.chunk(2)
                out = uncond + guidance_scale * (c - uncond)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        x = x.clamp(-1, 1)
        if output_type == "pt":
            images = x
        else:
            arr = ((x + 1) / 2).permute(0, 2, 3, 1).cpu().float().numpy()
            images = self.numpy_to_pil(arr) if output_type == "pil" else arr
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def build_pipeline(
    codebook_sizes: Sequence[int],
    grid_names: Sequence[str],
    pixels_per_code: int,
    grid_side: int,
    embed_dims: Sequence[int] | None = None,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention: bool = False,
    scheduler: str = "ddim",
    prediction_type: str = "sample",
    tokenizer: str = "",
    tokenizer_type: str = "pixel_vq",
    tokenizer_resolution: int = 64,
    decoded_channels: int = 0,
    tokenizer_sha256: str = "",
) -> CodeDetokenizerPipeline:
    embed_dims = list(embed_dims or [16] * len(codebook_sizes))
    cond = CodeConditioner(
        codebook_sizes=list(codebook_sizes),
        embed_dims=embed_dims,
        grid_names=list(grid_names),
        pixels_per_code=pixels_per_code,
        tokenizer=tokenizer,
        tokenizer_type=tokenizer_type,
        tokenizer_resolution=tokenizer_resolution,
        decoded_channels=decoded_channels,
        tokenizer_sha256=tokenizer_sha256,
    )
    unet = build_unet(
        cond.channels, grid_side * pixels_per_code, block_out_channels, layers_per_block, norm_num_groups, attention
    )
    if decoded_channels and prediction_type == "sample":  # a residual over the decode starts at zero
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    with torch.device("cpu"):  # the noise schedule is data even when the networks are built on meta
        sched = make_scheduler(scheduler, prediction_type=prediction_type)
    return CodeDetokenizerPipeline(unet=unet, scheduler=sched, conditioner=cond)


def load_pipeline(path: str | Path, device: str = "cpu", tokenizer=None) -> CodeDetokenizerPipeline:
    """A saved pipeline. ``tokenizer`` (a loaded image tokenizer or its directory) serves a conditioner
    with ``decoded_channels``; left out, the directory the conditioner names is loaded if it exists."""
    p = Path(path)
    if p.exists() and not (p / "model_index.json").is_file():
        raise MMGenError(f"{p} is not a detokenizer pipeline directory (needs model_index.json)")
    try:
        pipe = CodeDetokenizerPipeline.from_pretrained(str(path), use_safetensors=True)
    except OSError as e:
        raise MMGenError(f"cannot load detokenizer '{path}': {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    if pipe.conditioner.uses_decoded:
        tokenizer = tokenizer if tokenizer is not None else pipe.conditioner.config.tokenizer
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_image_tokenizer(tokenizer) if tokenizer and Path(tokenizer).is_dir() else None
        pipe.image_tokenizer = tokenizer.eval().to(device) if tokenizer is not None else None
    return pipe.to(device)


__all__ = [
    "CodeConditioner",
    "CodeDetokenizerPipeline",
    "build_pipeline",
    "build_unet",
    "decode_grids",
    "load_pipeline",
    "make_scheduler",
]
