"""The integration head: scGPT's expression (GEP) and MVC decoders, the adversarial batch discriminator (DAB)
and domain-specific batch norm (DSBN) around a backbone, each present only when its objective is on.

Module names are scGPT's (`decoder`, `mvc_decoder`, `grad_reverse_discriminator`, `dsbn`), so a checkpoint's
pretrained decoders load by name; which heads were loaded and which start random is said in one line.
"""

from __future__ import annotations

import torch

from scpeft_cli.backbones.base import check_tensors
from scpeft_cli.console import info, warn
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

    def load_pretrained(self, heads: dict[str, dict[str, torch.Tensor]], *, source: str | None) -> None:
        """Copy the checkpoint's decoders into the matching modules (names and shapes checked: a mismatch is an
        error, never a silent skip) and say which modules were loaded and which start random."""
        loaded, random = [], []
        for name, module in self.named_children():
            tensors = heads.get(name, {})
            expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
            present = {key: shape for key, shape in expected.items() if key in tensors}
            check_tensors(tensors, present, source=f"the checkpoint's {name}.*", against=f"this run's {name}")
            module.load_state_dict(tensors, strict=False)
            if not present:
                random.append(name)
                continue
            loaded.append(name)
            random += sorted({f"{name}.{key.split('.')[0]}" for key in expected if key not in present})
        if loaded:
            info(f"heads loaded from the checkpoint: {', '.join(loaded)}")
        if random:
            pretrained_decoder_missing = source is not None and any(n.split(".")[0] in ("decoder", "mvc_decoder") for n in random)
            (warn if pretrained_decoder_missing else info)(
                f"heads starting random: {', '.join(random)}" + ("" if source else " (randomly initialised backbone)")
            )
