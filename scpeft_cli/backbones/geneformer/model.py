"""Geneformer in plain PyTorch: BERT embeddings + the shared post-norm transformer layers.

Geneformer is a post-LayerNorm BERT (`BertForMaskedLM`): the token embedding is
LayerNorm(word(ids) + position(0..L-1) + token_type[0]) followed by dropout, and each encoder layer is
`x = norm1(x + attn(x)); x = norm2(x + linear2(act(linear1(x))))`, which is the shared
`TransformerLayer` with `norm_first=False`. Module names follow BERT's inside the embeddings
(`embeddings.word_embeddings`, `embeddings.LayerNorm`, ...); the layer stack is the shared `layers.{i}`,
onto which `checkpoint.convert_state_dict` maps the official keys. The MLM head and pooler are not built.

Cell embedding, as Geneformer's `emb_extractor.py` computes it: the mean of the gene-token states
(pads, `<cls>` and `<eos>` left out) of the second-to-last layer by default (`emb_layer=-1` upstream),
or of the last layer; V2 models may instead use the `<cls>` state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scpeft_cli.backbones.base import Backbone, first_position_weights, normalised_weights
from scpeft_cli.backbones.dropout import Dropout
from scpeft_cli.backbones.layers import TransformerLayer
from scpeft_cli.errors import UserError

EMBEDDING_LAYERS = ("second_to_last", "last")
POOLINGS = ("mean", "cls")
# BERT's `hidden_act` names this tool computes exactly ("gelu" is BERT's exact erf GELU).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}


@dataclass(frozen=True)
class GeneformerArchitecture:
    """The shape of a Geneformer model; read from `config.json` when a checkpoint is given."""

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 1024
    n_layers: int = 12
    max_input_size: int = 2048
    vocab_size: int = 25426
    type_vocab_size: int = 2
    pad_id: int = 0
    activation: str = "relu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.02
    attention_dropout: float = 0.02


def activation_name(hidden_act: object, *, source: str) -> str:
    """BERT's `hidden_act` -> the shared layer's activation, or a clear error for one not computed exactly."""
    if isinstance(hidden_act, str) and hidden_act in ACTIVATIONS:
        return ACTIVATIONS[hidden_act]
    raise UserError(
        f"{source}: activation {hidden_act!r} is not supported; Geneformer uses 'relu', and this tool also "
        "computes BERT's exact 'gelu' (tanh approximations such as 'gelu_new' are not offered)"
    )


class GeneformerEmbeddings(nn.Module):
    """LayerNorm(word + position + token_type[0]) -> `scpeft_adapter` -> dropout.

    `scpeft_adapter` (empty by default) sits after the LayerNorm, before dropout: the token-prompt point
    (scPEFT's Geneformer code adapts the summed input embedding after its LayerNorm).
    """

    def __init__(self, arch: GeneformerArchitecture):
        super().__init__()
        self.max_input_size = arch.max_input_size
        self.word_embeddings = nn.Embedding(arch.vocab_size, arch.d_model, padding_idx=arch.pad_id)
        self.position_embeddings = nn.Embedding(arch.max_input_size, arch.d_model)
        self.token_type_embeddings = nn.Embedding(arch.type_vocab_size, arch.d_model)
        self.LayerNorm = nn.LayerNorm(arch.d_model, eps=arch.layer_norm_eps)
        self.scpeft_adapter: nn.Module = nn.Identity()
        self.dropout = Dropout(arch.dropout)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        length = gene_ids.shape[1]
        if length > self.max_input_size:
            raise UserError(
                f"cells of {length} tokens exceed this Geneformer's {self.max_input_size} input positions "
                "(max_position_embeddings); the tokenizer truncates to the model's input size"
            )
        positions = torch.arange(length, device=gene_ids.device)
        x = self.word_embeddings(gene_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.scpeft_adapter(self.LayerNorm(x)))


class Geneformer(Backbone):
    """Token states for a batch of rank-value-encoded cells; the cell embedding pools the gene tokens.

    `embedding_layer`: "second_to_last" (Geneformer's default) runs the first n_layers - 1 layers only
    (`depth`), so the last layer then trains nothing; "last" runs them all.
    `pooling`: "mean" over gene tokens, or "cls" (the `<cls>` state, V2 models only).
    """

    family = "Geneformer"
    token_adapter_placement = "the summed input embedding (gene + position), after its LayerNorm"

    def __init__(
        self,
        arch: GeneformerArchitecture,
        *,
        cls_id: int | None = None,
        eos_id: int | None = None,
        embedding_layer: str = "second_to_last",
        pooling: str = "mean",
    ):
        super().__init__()
        if embedding_layer not in EMBEDDING_LAYERS:
            raise UserError(
                f"backbone.embedding_layer must be one of {', '.join(EMBEDDING_LAYERS)}, got {embedding_layer!r}"
            )
        if pooling not in POOLINGS:
            raise UserError(f"backbone.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if embedding_layer == "second_to_last" and arch.n_layers < 2:
            raise UserError(
                "backbone.embedding_layer=second_to_last needs at least 2 layers, "
                f"this Geneformer has {arch.n_layers}; set backbone.embedding_layer=last"
            )
        if pooling == "cls" and cls_id is None:
            raise UserError(
                "backbone.pooling=cls needs a <cls> token, which only Geneformer V2 dictionaries have; "
                "use backbone.pooling=mean (V1 models are pooled over their gene tokens)"
            )
        if arch.d_model % arch.n_heads:
            raise UserError(
                f"Geneformer: hidden size {arch.d_model} is not divisible by {arch.n_heads} attention heads"
            )
        self.arch = arch
        self.d_model = arch.d_model
        self.pad_id = arch.pad_id
        self.cls_id = cls_id
        self.eos_id = eos_id
        self.embedding_layer = embedding_layer
        self.pooling = pooling
        self.embeddings = GeneformerEmbeddings(arch)
        activation = activation_name(arch.activation, source="Geneformer")
        self.layers = nn.ModuleList(
            TransformerLayer(
                arch.d_model,
                arch.n_heads,
                arch.d_ff,
                dropout=arch.dropout,
                attention_dropout=arch.attention_dropout,
                activation=activation,
                norm_first=False,
                eps=arch.layer_norm_eps,
            )
            for _ in range(arch.n_layers)
        )
        self.depth = arch.n_layers - 1 if embedding_layer == "second_to_last" else None

    @property
    def token_embedding_adapter_owner(self) -> nn.Module:
        """Where the token-prompt adapter goes: the summed input embedding after its LayerNorm."""
        return self.embeddings

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embeddings(batch["gene_ids"])

    def gene_token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """True at gene tokens: not padding, not `<cls>`, not `<eos>`."""
        gene_ids = batch["gene_ids"]
        mask = ~batch["padding_mask"]
        for special in (self.cls_id, self.eos_id):
            if special is not None:
                mask = mask & (gene_ids != special)
        return mask

    def pooling_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`<cls>` with pooling=cls, else every gene token equally."""
        if self.pooling == "cls":
            return first_position_weights(batch)
        return normalised_weights(self.gene_token_mask(batch).float())

    def cell_embedding(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]
        mask = self.gene_token_mask(batch).unsqueeze(-1)
        # masked_fill, not a product: a cell with no gene token (all padding) must not carry NaN states in
        counts = mask.sum(dim=1).clamp(min=1).to(states.dtype)
        return states.masked_fill(~mask, 0.0).sum(dim=1) / counts
