"""Factorised code blocks: the LM's rows for labelled code blocks are sums of one vector per attribute.

A code-block tokenizer whose blocks carry labels (:func:`mmgen.tokenizers.blocks.compose_blocks`: "an
object, red, triangle, large, on black", or "an empty cell on navy") lets the LM share what it learns
about "red" or "triangle" across every block that shows them. With :class:`BlockFactors` on the model,
the input embedding and the output logit of each labelled block use the row ``features @ factors``:
its attribute indicators (fixed) times one trained vector per attribute value. Every labelled row, the
composed ones included (blocks no training picture shows, such as a held-out colour-shape pair), is thus
the sum of what was learnt about its attributes from the blocks that were shown, and the model can write
a pair it never saw. The decoder's own rows for those ids are not used. Rows without a label stay free.

The factors are trained like any weight (a parameter of the model, saved in its safetensors); one set
serves the input and the output side.
"""

from __future__ import annotations

import torch
from torch import nn

from mmgen.errors import MMGenError


def block_attributes(tokenizer, vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]] | None:
    """(vocab ids, 0/1 features, fitted mask, feature names) of the labelled blocks of ``tokenizer``'s
    pixel-code range in ``vocab``; None when no block has a label."""
    labels = getattr(tokenizer, "labels", None) or []
    rows = [i for i, lab in enumerate(labels) if lab]
    if not rows:
        return None
    start, end = vocab.code_range("pix")
    if end - start != len(labels):
        raise MMGenError(f"the vocab has {end - start} pixel codes but the image tokenizer {len(labels)} blocks")
    names = sorted({f"{k}={v}" for i in rows for k, v in labels[i].items()})
    col = {n: j for j, n in enumerate(names)}
    features = torch.zeros(len(rows), len(names))
    for r, i in enumerate(rows):
        for k, v in labels[i].items():
            features[r, col[f"{k}={v}"]] = 1.0
    fitted = torch.tensor([i < tokenizer.fitted_rows for i in rows])
    if not fitted.any():
        raise MMGenError("no labelled block was fitted on data: nothing to learn the attributes from")
    return torch.tensor(rows) + start, features, fitted, names


class BlockFactors(nn.Module):
    """``factors`` (attributes x hidden), trained; ``ids`` and ``features`` (rows x attributes), fixed."""

    def __init__(self, vocab_size: int, rows: int, attributes: int, hidden: int):
        super().__init__()
        self.factors = nn.Parameter(torch.zeros(attributes, hidden))
        self.register_buffer("ids", torch.zeros(rows, dtype=torch.long))
        self.register_buffer("features", torch.zeros(rows, attributes))
        self.vocab_size = vocab_size
        self._row_of = None  # vocab id -> labelled row (-1 elsewhere): derived from ids on first use

    def set_table(self, ids: torch.Tensor, features: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.features.copy_(features)
        self._row_of = None

    def fit_rows(self, rows: torch.Tensor, fitted: torch.Tensor) -> None:
        """Start the factors at the least-squares fit of ``rows`` (the current embedding rows of ``ids``)
        over the ``fitted`` ones: a model that already has rows starts where it was."""
        with torch.no_grad():
            solve = torch.linalg.pinv(self.features[fitted].float())
            self.factors.copy_((solve @ rows[fitted].float()).to(self.factors.dtype))

    def row_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._row_of is None or self._row_of.device != self.ids.device:
            self._row_of = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.ids.device)
            self._row_of[self.ids] = torch.arange(len(self.ids), device=self.ids.device)
        return self._row_of[input_ids]

    def rows(self, dtype: torch.dtype) -> torch.Tensor:
        return self.features.to(dtype) @ self.factors.to(dtype)  # (rows, hidden)

    def embed(self, embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``embeds`` with the labelled ids' rows replaced by their attribute sums."""
        row = self.row_of(input_ids)
        hit = row >= 0
        if not bool(hit.any()):
            return embeds
        gathered = self.rows(embeds.dtype)[row.clamp(min=0)]
        return torch.where(hit[..., None], gathered, embeds)

    def logits(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``logits`` with the labelled ids' columns computed from their attribute sums."""
        cols = hidden @ self.rows(hidden.dtype).T
        return logits.index_copy(-1, self.ids, cols.to(logits.dtype))
