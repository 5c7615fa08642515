"""The integration head: scGPT's expression (GEP) and MVC decoders, the adversarial batch discriminator (DAB)
and domain-specific batch norm (DSBN) around a backbone, each present only when its objective is on.

Module names are scGPT's (`decoder`, `mvc_decoder`, `grad_reverse_discriminator`, `dsbn`), so a checkpoint's
pretrained decoders load by name; which heads were loaded and which start random is said in one line.
"""

from __future__ import annotations

import torch

from scpeft_cli.tasks.base import TaskHead
from scpeft_cli.tasks.integration.objectives import (
    BatchDiscriminator,
    DomainSpecificBatchNorm1d,
    ExpressionDecoder,
    MVCDecoder,
    ObjectiveWeights,
)

BATCH_IDS = "batch_ids"  # the batch tensor of each cell's batch code (DSBN, DAB)


class IntegrationHead(TaskHead):
    """`forward` gives the token states' expression predictions, the cell embedding and, per objective, the MVC
    predictions and batch logits; `embed` the (DSBN-normalised) cell embedding."""

    def __init__(self, d_model: int, n_batches: int, weights: ObjectiveWeights):
        super().__init__()
        zero_prob = weights.explicit_zero_prob
        self.decoder = ExpressionDecoder(d_model, explicit_zero_prob=zero_prob) if weights.gep else None
        self.mvc_decoder = MVCDecoder(d_model, explicit_zero_prob=zero_prob) if weights.mvc else None
        self.grad_reverse_discriminator = BatchDiscriminator(d_model, n_batches) if weights.dab else None
        self.dsbn = (
            DomainSpecificBatchNorm1d(d_model, n_batches, eps=weights.dsbn_eps, affine=weights.dsbn_affine)
            if weights.dsbn else None
        )  # fmt: skip

    def _states(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dsbn is None:
            return backbone(batch)
        return backbone(batch, transform_embeddings=lambda embeddings: self.dsbn(embeddings, batch[BATCH_IDS]))

    def embed(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return backbone.cell_embedding(self._states(backbone, batch), batch)

    def forward(self, backbone, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = self._states(backbone, batch)
        cell = backbone.cell_embedding(states, batch)
        out = {"embedding": cell}
        if self.decoder is not None:
            out["gep"] = self.decoder(states)
            if self.decoder.explicit_zero_prob:
                out["gep_zero"] = self.decoder.zero_probs(states)
        if self.mvc_decoder is not None:
            genes = backbone.gene_embedding(batch)
            out["mvc"] = self.mvc_decoder(cell, genes)
            if self.mvc_decoder.explicit_zero_prob:
                out["mvc_zero"] = self.mvc_decoder.zero_probs(cell, genes)
        if self.grad_reverse_discriminator is not None:
            out["dab"] = self.grad_reverse_discriminator(cell)
        return out
