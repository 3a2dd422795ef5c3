"""The training loss: next-token cross-entropy weighted per modality, plus an optional z-loss.

The loss of one optimizer step is the weighted mean over **all** target tokens of the step, on all
ranks and micro-batches (``denominator``), not a mean of per-micro-batch means: then one rank with
a doubled batch and two ranks with a batch each compute the same gradient, whatever the number of
targets in each row.
"""

from __future__ import annotations

import torch

from mmgen.data.packing import IGNORE_INDEX
from mmgen.errors import MMGenError
from mmgen.processing.vocab import Vocab

IMAGE_RANGES = ("sem", "pix")


def modality_names(vocab: Vocab) -> list[str]:
    """Index -> name of :meth:`Vocab.modality_of`: text, structural, then the code ranges."""
    return ["text", "structural", *vocab.ranges]


def modality_weights(vocab: Vocab, weights: dict) -> torch.Tensor:
    names = modality_names(vocab)
    known = set(names) | {"image"}
    bad = sorted(set(weights) - known)
    if bad:
        raise MMGenError(f"loss.weights: unknown modality {bad} (known: {', '.join(sorted(known))})")
    out = torch.ones(len(names), dtype=torch.float32)
    for i, name in enumerate(names):
        if name in IMAGE_RANGES and "image" in weights:
            out[i] = float(weights["image"])
        if name in weights:
            out[i] = float(weights[name])
    return out


def target_modality(labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Modality index of each label (0 where the label is ignored)."""
    ids = labels.clamp(min=0)
    out = torch.where(ids < vocab.text_size, 0, 1)
    for k, (a, b) in enumerate(vocab.ranges.values()):
        out = torch.where((ids >= a) & (ids < b), 2 + k, out)
    return out


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab: Vocab,
    weights: torch.Tensor,
    denominator: float,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """``sum_t w(t) * CE_t / denominator`` (+ z-loss), with position t predicting ``labels[t + 1]``.

    Returns the loss and per-modality sums of unweighted cross-entropy and token counts (for logging)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(target)
    mod = target_modality(target, vocab)
    w = weights.to(logits.device)[mod] * valid
    loss = (ce * w).sum()
    if z_loss:
        # Keeps log Z near 0 so logits cannot drift (PaLM); counted on target positions only.
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse.pow(2) * valid).sum()
    stats = {}
    with torch.no_grad():
        for k in range(len(weights)):
            sel = valid & (mod == k)
            stats[k] = (float(ce[sel].sum()), int(sel.sum()))
    return loss / max(denominator, 1.0), stats
