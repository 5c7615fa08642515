"""The query whose attention gives marker scores: the position(s) each family's cell embedding reads.

scPEFT reads the `<cls>` row (scGPT's cell embedding is the `<cls>` state). A backbone that pools instead
gets one pooled query: the weighted mean of the q vectors its pooling reads, so that its scores over the
keys are the same weighted mean of those rows' raw q·k (q·k is linear in q). Weights per cell, summing to 1:
- scGPT, Geneformer with `pooling=cls`: the `<cls>` position (first);
- Geneformer (mean pooling): every gene token equally (`<cls>`, `<eos>`, padding left out);
- scFoundation (concat of S, T, max and mean over genes): S and T a quarter each, the genes half (the max
  slot is counted as a mean, as no single query gives a maximum); a cell without S shares its quarter.
"""

from __future__ import annotations

import torch

from scpeft_cli.backbones.base import Backbone
from scpeft_cli.backbones.geneformer.model import Geneformer
from scpeft_cli.backbones.scfoundation import ScFoundation
from scpeft_cli.backbones.scgpt import ScGPT
from scpeft_cli.errors import UserError


def reader_weights(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, length) weights of the cell's positions in the pooled query; 0 at padding."""
    real = ~batch["padding_mask"]
    if isinstance(backbone, ScGPT) or (isinstance(backbone, Geneformer) and backbone.pooling == "cls"):
        weights = torch.zeros_like(real, dtype=torch.float32)
        weights[:, 0] = 1.0
        return weights
    if isinstance(backbone, Geneformer):
        return _normalised(backbone.gene_token_mask(batch).float())
    if isinstance(backbone, ScFoundation):
        ids = batch["gene_ids"]
        is_t, is_s = real & (ids == backbone.t_position), real & (ids == backbone.s_position)
        genes = (real & ~is_t & ~is_s).float()
        return _normalised(0.25 * is_t + 0.25 * is_s + 0.5 * _normalised(genes))
    raise UserError(f"scpeft markers does not know which positions {backbone.family}'s cell embedding reads")


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
