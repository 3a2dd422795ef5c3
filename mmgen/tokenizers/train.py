"""Training a :class:`~mmgen.tokenizers.vq.PixelVQ` image tokenizer (plain PyTorch, CPU is fine).

    cfg = load_config(TokenizerTrainConfig, "tokenizers/tiny_vq.yaml", ["steps=50"])
    tokenizer_dir = train_tokenizer(cfg)

Data: every image item of Doc shards (``inputs``), image folders (``image_dirs``) and, optionally,
freshly drawn scenes (``synthetic_images``, :func:`synthetic_scenes`), held in memory as uint8 at
``resolution`` (non-square images are centre-cropped). A slice is held out for the final evaluation.

Loss: L1 + L2 on pixels, an image-gradient (edge) term that keeps shape outlines sharp at almost no
cost, and the quantizer's codebook + commitment losses. Dead codes are restarted every
``restart_every`` steps from the current batch's encoder outputs.

Outputs in ``out_dir``: ``metrics.jsonl`` (loss, recon, commitment, codebook usage, perplexity...),
``checkpoints/step_N/`` (safetensors only), ``tokenizer/`` (``save_pretrained``), ``eval.json`` and
``recon.png`` (held-out inputs above their reconstructions).

Resumable and exact: the batch and the restart draws of step N come from a generator seeded by
(seed, N), so ``resume=true`` replays the same steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmgen.errors import MediaError, MMGenError
from mmgen.utils.pixels import through_uint8, uint8_to_unit
from mmgen.tokenizers.quantizers import QuantizerConfig

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class VQModelConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    patch_size: int = 2
    code_dim: int = 8
    codebook_size: int = 512
    norm_groups: int = 8
    attention: bool = False
    l2_norm: bool = True
    beta: float = 0.25
    usage_decay: float = 0.9


@dataclass
class DualViTokConfig:
    """DualViTok architecture (see mmgen.tokenizers.dualvitok); ``teacher.name`` is where the frozen
    teacher's weights come from (an mmgen CLIP dir, a timm or transformers name or path)."""

    teacher: dict = field(default_factory=lambda: {"kind": "open_clip", "name": "runs/clip/tiny/clip"})
    sem_width: int = 64
    sem_heads: int = 4
    sem_encoder_layers: int = 1
    sem_decoder_layers: int = 1
    sem_merge: int = 2
    sem_code_dim: int = 16
    sem_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    pix_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    pix_layers_per_block: int = 1
    pix_patch_size: int = 2
    pix_code_dim: int = 8
    pix_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    sem_cond_dim: int = 16
    norm_groups: int = 8
    branch_dropout: float = 0.1
    sem_swap: float = 0.0  # share of semantic cells the pixel decoder sees as a random code in training
    sem_pixel_grad: bool = True  # False: the pixel reconstruction loss does not reach the semantic codes
    pix_encoder: str = "conv"  # conv (diffusers Encoder) or patch (each code sees only its own pixels)
    pix_encoder_width: int = 256  # hidden width of the patch encoder's MLP


@dataclass
class TokenizerTrainConfig:
    tokenizer: str = "pixel_vq"  # pixel_vq (model:) or dualvitok (dualvitok:)
    # data
    inputs: list[str] = field(default_factory=list)  # Doc shards: files, directories or globs
    image_dirs: list[str] = field(default_factory=list)  # folders of image files (searched recursively)
    synthetic_images: int = 0  # extra scenes drawn on the fly
    synthetic_source: str = "shapesworld"  # "shapesworld" (mmgen.world, train split) or "shapes" (built-in drawer)
    max_images: int = 50000  # cap on images held in memory
    resolution: int = 64
    eval_images: int = 128  # held out for the final PSNR / usage numbers
    # model
    model: VQModelConfig = field(default_factory=VQModelConfig)
    dualvitok: DualViTokConfig = field(default_factory=DualViTokConfig)
    # optimisation
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.5
    # Extra L1/L2 weight on pixels away from the image's border colour. Flat scenes are ~90%
    # background, so an unweighted loss is met by painting the background first and the objects,
    # the part the scene parser and the LLM care about, come very late (or not within the budget).
    foreground_weight: float = 0.0
    vq_weight: float = 1.0
    restart_every: int = 5
    dead_threshold: float = 0.03  # a code is dead below this fraction of uniform usage
    # DualViTok only
    feature_weight: float = 1.0  # cosine loss: semantic decoder output vs teacher features
    perceptual_weight: float = 0.1  # cosine loss: teacher features of the reconstruction vs of the input
    # Region-text alignment of the semantic codes (the VILA-U / UniTok idea, per ShapesWorld cell): each
    # cell's quantized semantic vector, through a training-only linear head, is classified among all
    # cell phrases ("a large red circle", "an empty cell") embedded by the teacher CLIP's text tower.
    # Only images whose scene is known (synthetic_source: shapesworld) take it. 0: off.
    text_weight: float = 0.0
    # The same region-text loss on the semantic encoder's output before quantization (same head). Through
    # the straight-through codes alone, two phrases that share a code get one averaged gradient and the
    # commitment loss holds them together; scored before quantization, their vectors part, and the code
    # restarts (residual or loss) find the pair. 0: off.
    text_prequant_weight: float = 0.0
    # Staged training (DualViTok): start from a saved tokenizer's weights (each top-level part whose
    # tensors all match this config's shapes; the others start fresh) and keep the named top-level parts
    # fixed, e.g. [pix_encoder, pix_quantizer]: the pixel codes stay exactly the saved tokenizer's.
    # DualViTok: code levels ("sem", "pix") whose entries no training image is encoded to are dropped after
    # training (a SimVQ entry that dead-code restarts keep moving without it ever winning a vector).
    prune_codes: list[str] = field(default_factory=list)
    # ... and the entries that encode under prune_min_share / codebook_size of the training vectors: the
    # measure of SimVQ's dead-code rule (dead_code_threshold), applied once to the whole training set. A
    # larger codebook leaves entries that restarts keep reviving and a handful of vectors keep alive.
    prune_min_share: float = 0.0
    init_from: str = ""
    init_exclude: list[str] = field(default_factory=list)  # top-level parts that start fresh even when they match
    freeze: list[str] = field(default_factory=list)
    gan_weight: float = 0.0  # PatchGAN hinge loss (0: off)
    gan_start: int = 0  # step the adversarial loss starts at
    disc_lr: float = 2e-4
    # bookkeeping
    out_dir: str = "runs/tokenizer"
    log_every: int = 20
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    threads: int = 0  # 0: all cores this process may use (at most 8)
    progress: bool = True


# -- ShapesWorld-style scenes, drawn with PIL ---------------------------------------------------------

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "pink": (240, 130, 190), "cyan": (40, 200, 210),
    "brown": (130, 80, 40), "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if kind == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(kind)


def random_shapes_image(rng: random.Random, width: int = 64, height: int | None = None):
    """A flat background with 1-3 flat-coloured shapes in distinct cells of a 3x3 grid, small or
    large: the look of ShapesWorld renders, for training data and tests without the world module."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    height = height or width
    colors = list(PALETTE)
    bg = rng.choice(colors)
    img = PILImage.new("RGB", (width, height), PALETTE[bg])
    draw = ImageDraw.Draw(img)
    cw, ch = width / 3, height / 3
    for cell in rng.sample(range(9), rng.randint(1, 3)):
        kind = rng.choice(SHAPES)
        color = PALETTE[rng.choice([c for c in colors if c != bg])]
        cx, cy = (cell % 3 + 0.5) * cw, (cell // 3 + 0.5) * ch
        r = min(cw, ch) * (0.42 if rng.random() < 0.5 else 0.26)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=color)
        else:
            draw.polygon(_shape_points(kind, cx, cy, r), fill=color)
    return img


def synthetic_scenes(n: int, size: int, seed: int, source: str = "shapes") -> tuple[list, list]:
    """``n`` scene images and their scenes: ShapesWorld renders (train split, so held-out colour-shape
    pairs stay unseen), or the built-in flat-shapes drawer (scenes ``None``: it keeps no record)."""
    rng = random.Random(seed)
    if source == "shapes":
        return [random_shapes_image(rng, size) for _ in range(n)], [None] * n
    if source == "shapesworld":
        try:
            from mmgen.world import random_scene, render, render_side
        except ImportError as e:
            raise MMGenError(f"synthetic_source=shapesworld needs mmgen.world ({e}); use synthetic_source=shapes") from None
        # Rendered at a whole multiple of the size, at least the world's 64 px, and resized as encode()
        # resizes corpus images: a small tokenizer trains on the soft edges it will be given, not on
        # aliased renders, and every cell keeps the same pixel phase (render_side).
        side = render_side(size)
        scenes = [random_scene(rng, "train") for _ in range(n)]
        return [_square(render(s, side, side), size) for s in scenes], scenes
    raise MMGenError(f"unknown synthetic_source '{source}' (use shapesworld or shapes)")


# -- data --------------------------------------------------------------------------------------------

def _square(img, size: int):
    from PIL import Image as PILImage

    img = img.convert("RGB")
    w, h = img.size
    if w != h:  # centre crop: the tokenizer trains on squares
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_training_images(cfg: TokenizerTrainConfig, with_scenes: bool = False):
    """All training images as a uint8 tensor ``(N, 3, R, R)`` and counts of what was read/skipped;
    ``with_scenes`` adds each image's ShapesWorld scene (``None`` where none is known: shards, folders)."""
    arrays: list[np.ndarray] = []
    stats = {"from_shards": 0, "from_dirs": 0, "synthetic": 0, "bad_records": 0, "undecodable": 0, "not_fetched": 0}
    limit = cfg.max_images

    def full() -> bool:
        return len(arrays) >= limit

    if cfg.inputs:
        from mmgen.data.doc import BadRecord
        from mmgen.data.shards import read_docs

        for doc in read_docs(cfg.inputs):
            if full():
                break
            if isinstance(doc, BadRecord):
                stats["bad_records"] += 1
                continue
            for item in doc.images:
                if not item.fetched:  # a URL reference: `mmgen fetch` downloads it
                    stats["not_fetched"] += 1
                    continue
                try:
                    arrays.append(_square(item.to_pil(), cfg.resolution))
                    stats["from_shards"] += 1
                except MediaError:
                    stats["undecodable"] += 1
    for folder in cfg.image_dirs:
        if not os.path.isdir(folder):
            raise MMGenError(f"image folder not found: {folder} (image_dirs takes directories of image files)")
        from mmgen.data.doc import Image

        for p in sorted(Path(folder).rglob("*")):
            if full():
                break
            if p.suffix.lower() not in _IMAGE_EXTS:
                continue
            try:  # through mmgen's decoder: the pixel limit keeps a decompression bomb out
                arrays.append(_square(Image(path=str(p)).to_pil(mode=None), cfg.resolution))
                stats["from_dirs"] += 1
            except (MediaError, OSError, ValueError, SyntaxError):
                stats["undecodable"] += 1
    if cfg.synthetic_images > 0 and not full():
        n = min(cfg.synthetic_images, limit - len(arrays))
        images, scenes = synthetic_scenes(n, cfg.resolution, cfg.seed, cfg.synthetic_source)
        arrays.extend(np.asarray(im, dtype=np.uint8) for im in images)
        stats["synthetic"] = n
    else:
        scenes = []
    if not arrays:
        raise MMGenError("no training images: set inputs=[shards...], image_dirs=[folders...] or synthetic_images=N")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if with_scenes:  # the synthetic scenes come last
        return x, stats, [None] * (len(arrays) - len(scenes)) + list(scenes)
    return x, stats


# -- losses and schedule -----------------------------------------------------------------------------

def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: a cheap stand-in for a perceptual
    loss that penalises blurred or shifted shape outlines."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(recon) - dx(x)).abs().mean() + (dy(recon) - dy(x)).abs().mean()


def foreground_mask(x: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel of ``x`` (in [-1, 1]) differs by more than ``tol`` in some
    channel from the median colour of its image's border, else 0.0."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    return ((x - bg).abs().amax(dim=1, keepdim=True) > tol).to(x.dtype)


def pixel_losses(recon: torch.Tensor, x: torch.Tensor, cfg: TokenizerTrainConfig) -> dict:
    """The reconstruction terms both image trainers share: (foreground-weighted) L1 and L2, the edge
    loss, and ``rec``, their weighted sum."""
    d = recon - x
    w = 1 + cfg.foreground_weight * foreground_mask(x) if cfg.foreground_weight > 0 else None
    l1 = (d.abs() * w).mean() if w is not None else d.abs().mean()
    l2 = (d.pow(2) * w).mean() if w is not None else d.pow(2).mean()
    edge = edge_loss(recon, x) if cfg.edge_weight > 0 else recon.new_zeros(())
    return {"l1": l1, "l2": l2, "edge": edge, "mse": d.detach().pow(2).mean(),  # unweighted, for PSNR
            "rec": cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.edge_weight * edge}


def lr_at(cfg: TokenizerTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# -- checkpoints (safetensors + json; nothing is unpickled) ------------------------------------------

def _save_checkpoint(ckpt_dir: Path, model, opt, step: int, keep: int, extra_opts: dict | None = None) -> Path:
    """Model, optimizer(s) and RNG state of ``step``; ``extra_opts`` (name -> optimizer) are saved
    beside the main one (e.g. the PatchGAN discriminator's)."""
    from safetensors.torch import save_file

    d = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors, groups = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": groups}
    for name, o in (extra_opts or {}).items():
        t, meta[f"{name}.param_groups"] = _optimizer_tensors(o)
        save_file(t, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    if d.exists():
        import shutil

        shutil.rmtree(d)
    tmp.rename(d)  # a checkpoint appears whole or not at all
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep] if keep > 0 else []:
        import shutil

        shutil.rmtree(old)
    return d


def _optimizer_tensors(opt) -> tuple[dict, list]:
    osd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
               for i, st in osd["state"].items() for k, v in st.items()}
    return tensors, osd["param_groups"]


def _load_optimizer(opt, tensors: dict, param_groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def prepare_run_dir(cfg) -> Path:
    """Set the trainer's thread count, create ``cfg.out_dir`` and save the resolved config into it
    (shared by every trainer with ``threads`` and ``out_dir`` fields). Seeding stays with the caller:
    some trainers must load models before drawing their first random numbers."""
    from mmgen.config import save_config

    torch.set_num_threads(_threads(cfg))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def resume_or_start(out_dir: str | Path, resume: bool, model, opt, extra_opts: dict | None = None) -> int:
    """The step a run starts at: the latest checkpoint's when ``resume`` finds one (model, optimizers
    and RNG restored; metrics logged after it are dropped, as they will be logged again), else 0 with
    a fresh ``metrics.jsonl``. Shared by every trainer that uses :func:`_save_checkpoint`."""
    metrics_path = Path(out_dir) / "metrics.jsonl"
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is None:
        metrics_path.unlink(missing_ok=True)
        return 0
    start = _load_checkpoint(ckpt, model, opt, extra_opts)
    if metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    return start


def _load_checkpoint(d: Path, model, opt, extra_opts: dict | None = None) -> int:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(d / "model.safetensors")))
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    _load_optimizer(opt, tensors, meta["param_groups"])
    for name, o in (extra_opts or {}).items():
        _load_optimizer(o, load_file(str(d / f"{name}.safetensors")), meta[f"{name}.param_groups"])
    return int(meta["step"])


# -- the loop ----------------------------------------------------------------------------------------

def _threads(cfg: TokenizerTrainConfig) -> int:
    if cfg.threads > 0:
        return cfg.threads
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def build_model(cfg: TokenizerTrainConfig):
    from mmgen.tokenizers.vq import PixelVQ

    m = cfg.model
    return PixelVQ(resolution=(cfg.resolution, cfg.resolution), channels=m.channels, layers_per_block=m.layers_per_block,
                   patch_size=m.patch_size, code_dim=m.code_dim, codebook_size=m.codebook_size,
                   norm_groups=m.norm_groups, attention=m.attention, l2_norm=m.l2_norm, beta=m.beta,
                   usage_decay=m.usage_decay)


def _check(cfg: TokenizerTrainConfig) -> None:
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "resolution"):
        if getattr(cfg, name) <= 0:
            raise MMGenError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise MMGenError(f"lr must be positive, got {cfg.lr}")


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train the tokenizer the recipe names (``tokenizer: pixel_vq | dualvitok``); returns the
    directory it was saved to (``out_dir/tokenizer``)."""
    if cfg.tokenizer == "dualvitok":
        from mmgen.tokenizers.dualvitok_train import train_dualvitok

        return train_dualvitok(cfg)
    if cfg.tokenizer != "pixel_vq":
        raise MMGenError(f"unknown tokenizer '{cfg.tokenizer}' (use pixel_vq or dualvitok)")
    if cfg.init_from or cfg.freeze or cfg.prune_codes or cfg.prune_min_share:
        raise MMGenError("init_from, freeze, prune_codes and prune_min_share are DualViTok options (tokenizer: dualvitok)")
    from tqdm import tqdm

    from mmgen.tokenizers.vq import psnr

    _check(cfg)
    out = prepare_run_dir(cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.resolution % model.downsample:
        raise MMGenError(f"resolution {cfg.resolution} is not a multiple of the model's downsampling factor {model.downsample}")
    images, data_stats = load_training_images(cfg)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = min(cfg.eval_images, len(images) // 10)
    eval_x, train_x = images[order[:n_eval]], images[order[n_eval:]]

    params_vq = [model.quantizer.embedding]
    params_rest = [p for n, p in model.named_parameters() if n != "quantizer.embedding"]
    opt = torch.optim.AdamW([{"params": params_rest, "weight_decay": cfg.weight_decay},
                             {"params": params_vq, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))

    metrics_path = out / "metrics.jsonl"
    start = resume_or_start(out, cfg.resume, model, opt)

    model.train()
    window: dict[str, float] = {}
    window_counts = torch.zeros(model.codebook_size)
    window_steps, restarts, t0 = 0, 0, time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train tokenizer",
               disable=not cfg.progress, leave=False)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(train_x), (cfg.batch_size,), generator=g)
        x = uint8_to_unit(train_x[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        recon, _codes, st = model(x)
        px = pixel_losses(recon, x, cfg)
        l1, l2, edge, rec = px["l1"], px["l2"], px["edge"], px["rec"]
        loss = rec + cfg.vq_weight * st["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if cfg.restart_every > 0 and (step + 1) % cfg.restart_every == 0:
            dead = model.quantizer.restart_dead_codes(cfg.dead_threshold, generator=g)
            if dead.numel():
                restarts += dead.numel()
                # A re-seeded code starts afresh: forget Adam's moments from its old life.
                state = opt.state.get(model.quantizer.embedding, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in state:
                        state[k][dead] = 0
        vals = {"loss": loss.item(), "recon": rec.item(), "l1": l1.item(), "l2": l2.item(), "mse": px["mse"].item(),
                "edge": edge.item(),
                "codebook": st["codebook_loss"].item(), "commitment": st["commitment_loss"].item(),
                "perplexity": st["perplexity"].item()}
        for k, v in vals.items():
            window[k] = window.get(k, 0.0) + v
        window_counts += st["counts"]
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec_ = {"step": done, **{k: round(v / window_steps, 6) for k, v in window.items()},
                    "usage": round(float((window_counts > 0).float().mean()), 4),
                    "window_perplexity": round(_perplexity(window_counts), 2),
                    "restarted_codes": restarts, "lr": round(lr_at(cfg, step), 8),
                    "psnr": round(float(10 * math.log10(4.0 / max(window["mse"] / window_steps, 1e-10))), 3),
                    "elapsed_s": round(time.time() - t0, 2)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec_) + "\n")
            bar.set_postfix(loss=f"{rec_['loss']:.4f}", psnr=f"{rec_['psnr']:.1f}", usage=f"{rec_['usage']:.2f}")
            window, window_counts, window_steps, restarts = {}, torch.zeros(model.codebook_size), 0, 0
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save_checkpoint(out / "checkpoints", model, opt, done, cfg.keep_checkpoints)
    bar.close()

    model.eval()
    tok_dir = out / "tokenizer"
    model.save_pretrained(tok_dir)
    report = {"steps": cfg.steps, "train_images": len(train_x), "eval_images": n_eval, "data": data_stats,
              "parameters": model.num_parameters(), "train_seconds": round(time.time() - t0, 1)}
    if n_eval:
        with torch.no_grad():
            xe = uint8_to_unit(eval_x)
            codes = model.encode_tensor(xe)
            recon = model.decode_tensor(codes).clamp(-1, 1)
            recon = through_uint8(recon)
            counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).float()
        report.update({"eval_psnr": round(float(psnr(recon, xe).mean()), 3),
                       "eval_codebook_usage": round(float((counts > 0).float().mean()), 4),
                       "eval_perplexity": round(_perplexity(counts), 2)})
        _save_recon_grid(xe[:8], recon[:8], out / "recon.png")
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return tok_dir


def _perplexity(counts: torch.Tensor) -> float:
    p = counts / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))


def _save_recon_grid(x: torch.Tensor, recon: torch.Tensor, path: Path) -> None:
    from mmgen.utils.pixels import tensor_to_pil

    top = torch.cat(list(x), dim=-1)
    bottom = torch.cat(list(recon), dim=-1)
    tensor_to_pil(torch.cat([top, bottom], dim=-2)[None])[0].save(path)
