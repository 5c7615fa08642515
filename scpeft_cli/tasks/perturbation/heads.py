"""scGPT's perturbation model as a task head: a perturbation-flag embedding added to the token embeddings and
the expression decoder on every token's state (scGPT `TransformerGenerator`: `pert_encoder`, `decoder`).

The head knows which data gene each token is (`token_columns`, from the tokenizer's vocabulary) and which
genes each condition perturbs (`perturbed_columns`), so a batch needs only its cells' condition codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from scpeft_cli.data.conditions import perturbed_genes
from scpeft_cli.tasks.base import TaskHead
from scpeft_cli.tasks.integration.objectives import ExpressionDecoder

CONDITION_IDS = "condition_ids"  # the batch tensor of each example's condition code
TARGET_CELLS = "target_cells"  # the batch tensor of each example's perturbed (target) cell
FLAG_NONE, FLAG_PERTURBED, FLAG_PAD = 0, 1, 2  # scGPT's pert_flags values (pad: pert_pad_id)


def token_columns(vocab, genes: Sequence[str]) -> np.ndarray:
    """The data column of every token id of `vocab` (-1 for tokens that are no data gene, e.g. `<cls>`)."""
    ids = np.asarray(vocab.lookup(list(genes)), dtype=np.int64)
    columns = np.full(vocab.size, -1, dtype=np.int64)
    known = np.flatnonzero(ids >= 0)
    columns[ids[known]] = known
    return columns


def perturbed_columns(conditions: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """(n_conditions, 2) the data columns each condition perturbs, -1 padded (control: none)."""
    column = {gene: i for i, gene in enumerate(genes)}
    table = np.full((len(conditions), 2), -1, dtype=np.int64)
    for row, condition in enumerate(conditions):
        for slot, gene in enumerate(perturbed_genes(condition)):
            table[row, slot] = column[gene]
    return table


class PerturbationHead(TaskHead):
    """`forward` gives each token's predicted expression (`values`) and its data column (`columns`, -1 where
    the token is no data gene or padding); the flag embedding marks the condition's perturbed genes."""

    def __init__(self, d_model: int, token_columns: np.ndarray, perturbed_columns: np.ndarray):
        super().__init__()
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=FLAG_PAD)
        self.decoder = ExpressionDecoder(d_model)
        # rebuilt from the run's settings on reload, so not part of the saved state
        self.register_buffer("token_columns", torch.as_tensor(token_columns), persistent=False)
        self.register_buffer("perturbed_columns", torch.as_tensor(perturbed_columns), persistent=False)

    def columns(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each position's data column; -1 for padding and for ids beyond the vocabulary (scFoundation's T, S)."""
        ids = batch["gene_ids"]
        beyond = ids >= len(self.token_columns)
        columns = self.token_columns[ids.masked_fill(beyond, 0)]
        return columns.masked_fill(beyond | batch["padding_mask"], -1)

    def flags(self, batch: dict[str, torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
        perturbed = self.perturbed_columns[batch[CONDITION_IDS]]  # (batch, 2)
        hit = (columns[:, :, None] == perturbed[:, None, :]) & (columns[:, :, None] >= 0)
        flags = torch.where(hit.any(-1), FLAG_PERTURBED, FLAG_NONE)
        return flags.masked_fill(batch["padding_mask"], FLAG_PAD)

    def forward(self, backbone, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        columns = self.columns(batch)
        flag_embedding = self.pert_encoder(self.flags(batch, columns))
        states = backbone(batch, transform_embeddings=lambda embeddings: embeddings + flag_embedding)
        return {"values": self.decoder(states), "columns": columns}
