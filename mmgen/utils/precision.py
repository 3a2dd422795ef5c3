"""Mixed precision for the trainers: ``precision: fp32 | bf16 | auto`` in a recipe means the forward
pass runs under ``torch.autocast`` in bfloat16 while weights, optimizer state and losses stay float32.

``auto`` is bf16 where the hardware computes it natively (a GPU with bf16, a CPU whose oneDNN has bf16
kernels, e.g. AVX512-BF16 or AMX) and fp32 elsewhere. The tokenizer trainers and the LM trainer share
these helpers, so a recipe's key means the same everywhere."""

from __future__ import annotations

import functools

import torch

from mmgen.errors import MMGenError

PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MMGenError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@functools.lru_cache(maxsize=8)  # asked every step: decide once per device
def resolved_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` with ``auto`` decided for ``device``: bf16 where it runs natively, else fp32."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(precision: str, device: str | torch.device = "cpu"):
    """The training step's autocast context for ``precision`` (a disabled context for fp32)."""
    device = torch.device(device)
    bf16 = resolved_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def float32_outputs(out: dict) -> dict:
    """A model pass's outputs with every floating tensor in float32, for losses computed outside autocast."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
