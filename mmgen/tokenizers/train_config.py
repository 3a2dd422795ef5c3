"""The configuration of the image-tokenizer trainers (pixel VQ and DualViTok) and its checks. Both train
with a warmup and a cosine decay to ``min_lr_ratio`` of ``lr`` (:func:`mmgen.utils.schedules.lr_scheduler`).

    cfg = load_config(TokenizerTrainConfig, "tokenizers/tiny_vq.yaml", ["steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmgen.errors import MMGenError
from mmgen.tokenizers.quantizers import QuantizerConfig
from mmgen.utils.precision import check_precision


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
    # fp32, bf16 or auto: bf16 runs each step's forward pass under torch.autocast in bfloat16 (convolutions
    # and matmuls; the losses, the quantizers' code search, weights and Adam stay float32); auto is bf16
    # where the hardware computes it natively (a GPU with bf16, a CPU whose oneDNN has bf16 kernels), fp32
    # elsewhere. The demo's DualViTok trains 1.27-1.42x the steps/s in bf16 on 2 AVX512-BF16 cores
    # (benchmarks/tokenizer_precision.py), but an LM drew worse from its codes: tiny_dualvitok.yaml keeps fp32.
    precision: str = "fp32"
    # bookkeeping
    out_dir: str = "runs/tokenizer"
    log_every: int = 20
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    threads: int = 0  # 0: all cores this process may use (at most 8)
    progress: bool = True


def check_train_config(cfg: TokenizerTrainConfig) -> None:
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "resolution"):
        if getattr(cfg, name) <= 0:
            raise MMGenError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise MMGenError(f"lr must be positive, got {cfg.lr}")
    check_precision(cfg.precision)
