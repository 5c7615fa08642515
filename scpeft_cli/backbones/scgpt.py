"""scGPT in plain PyTorch: gene embedding + continuous value encoder + the shared transformer layers.

Module names follow the official checkpoint (`encoder.*`, `value_encoder.*`) except the layer stack,
which is the shared `layers.{i}` implementation; `checkpoints.scgpt` maps the official keys onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scpeft_cli.backbones.base import LAYER_FEATURES, Backbone, first_position_weights
from scpeft_cli.backbones.dropout import Dropout
from scpeft_cli.backbones.layers import TransformerLayer


@dataclass(frozen=True)
class ScGPTArchitecture:
    """The shape of an scGPT model; read from `args.json` when a checkpoint is given."""

    d_model: int = 512
    n_heads: int = 8
    d_hid: int = 512
    n_layers: int = 12
    dropout: float = 0.2
    attention_dropout: float = 0.0
    n_tokens: int = 60697
    pad_id: int = 60694


class GeneEncoder(nn.Module):
    """Gene-id embedding followed by LayerNorm (`encoder.embedding`, `encoder.enc_norm`)."""

    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> d_model: clamp(max 512) -> Linear -> ReLU -> Linear -> LayerNorm -> dropout.

`scpeft_adapter` (empty by default) sits after the LayerNorm, before dropout: the token-prompt point.
"""

    max_value = 512.0

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.scpeft_adapter: nn.Module = nn.Identity()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.scpeft_adapter(self.norm(x)))


class ScGPT(Backbone):
    """Token states for a batch of tokenised cells; the cell embedding is the `<cls>` state."""

    family = "scGPT"
    supports = frozenset((*LAYER_FEATURES, "expression_values", "gene_values"))
    # scGPT's perturbation model: every gene, log-normalised values unbinned
    feature_tokenizer_options = {"gene_values": {"include_zero_genes": True, "value_binning": False, "max_seq_len": None}}
    token_adapter_placement = "the expression-value embedding, after its LayerNorm"
    zero_shot_l2_normalized = True  # scGPT's embed_data normalises the <cls> embeddings

    def __init__(self, arch: ScGPTArchitecture):
        super().__init__()
        self.arch = arch
        self.d_model = arch.d_model
        self.encoder = GeneEncoder(arch.n_tokens, arch.d_model, arch.pad_id)
        self.value_encoder = ContinuousValueEncoder(arch.d_model, arch.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                arch.d_model,
                arch.n_heads,
                arch.d_hid,
                dropout=arch.dropout,
                attention_dropout=arch.attention_dropout,
                activation="relu",
                norm_first=False,
                eps=1e-5,
            )
            for _ in range(arch.n_layers)
        )

    @property
    def token_embedding_adapter_owner(self) -> nn.Module:
        """Where the token-prompt adapter goes: scGPT adapts the expression-value embedding."""
        return self.value_encoder

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(batch["gene_ids"]) + self.value_encoder(batch["values"])

    def cell_embedding(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return states[:, 0]

    def pooling_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return first_position_weights(batch)

    def gene_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The gene-id embedding after its LayerNorm: what scGPT's MVC decoder queries."""
        return self.encoder(batch["gene_ids"])
