"""scBERT: a Performer (FAVOR+ attention, pre-LayerNorm, GELU) over every gene of a fixed panel, from the
official `panglao_pretrain.pth` (+ the panel's `panglao_10000.h5ad`) or at random.

The architecture is not stored; it is read off the tensor shapes. Each layer's random-feature projection
matrix is loaded and never redrawn. Layers are the shared `TransformerLayer` with a FAVOR+ kernel, so every
strategy reaches the same insertion points as on scGPT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scpeft_cli.backbones.base import (
    LAYER_FEATURES,
    Backbone,
    LoadedBackbone,
    load_state_dict_exactly,
    random_backbone,
    random_panel,
    read_torch_weights,
)
from scpeft_cli.backbones.favor import FavorKernel
from scpeft_cli.backbones.layers import TransformerLayer
from scpeft_cli.backbones.official import checked_folder, rename_layer_keys
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.scbert import PANEL_FILE, ScBERTTokenizer, read_panel_h5ad

WEIGHTS_FILE = "panglao_pretrain.pth"
PANEL_FILES = ("panglao_10000.h5ad", "panglao_human.h5ad")
IGNORED = ("to_out.", "performer.calls_since_last_redraw")  # the MLM head; the redraw counter (never redrawn)
_LAYER = re.compile(r"^performer\.net\.layers\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"layers\.(\d+)\.0\.fn\.to_([qkv])\.weight")  # a projection after renaming, fused on load
_LAYER_KEYS = {
    "0.norm.weight": "norm1.weight", "0.norm.bias": "norm1.bias",
    "0.fn.to_out.weight": "self_attn.out_proj.weight", "0.fn.to_out.bias": "self_attn.out_proj.bias",
    "0.fn.fast_attention.projection_matrix": "self_attn.kernel.projection_matrix",
    "1.norm.weight": "norm2.weight", "1.norm.bias": "norm2.bias",
    "1.fn.fn.w1.weight": "linear1.weight", "1.fn.fn.w1.bias": "linear1.bias",
    "1.fn.fn.w2.weight": "linear2.weight", "1.fn.fn.w2.bias": "linear2.bias",
}  # fmt: skip


@dataclass(frozen=True)
class ScBERTArchitecture:
    """Release: 7 tokens, 16,906 genes, dim 200, depth 6, 10 heads of 64, 266 random features, ff 800."""

    n_tokens: int = 7
    n_genes: int = 16906
    d_model: int = 200
    n_layers: int = 6
    n_heads: int = 10
    dim_head: int = 64
    nb_features: int = 266
    d_ff: int = 800


class TokenEmbedding(nn.Embedding):
    """The expression-token embedding (`token_emb`), with the token-prompt slot after it."""

    def __init__(self, n_tokens: int, d_model: int):
        super().__init__(n_tokens, d_model)
        self.scpeft_adapter: nn.Module = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scpeft_adapter(super().forward(tokens))


class FrozenTable(nn.Module):
    """scBERT's gene2vec position table: loaded, never trained (upstream `Embedding.from_pretrained`)."""

    def __init__(self, rows: int, d_model: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(rows, d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class ScBERT(Backbone):
    """Token states of the panel genes plus the appended token; the cell embedding is the mean over genes."""

    family = "scBERT"
    supports = frozenset(LAYER_FEATURES)
    token_adapter_placement = "the expression-token embedding"

    def __init__(self, arch: ScBERTArchitecture):
        super().__init__()
        self.arch = arch
        self.d_model = arch.d_model
        self.token_emb = TokenEmbedding(arch.n_tokens, arch.d_model)
        self.pos_emb = nn.Module()
        self.pos_emb.emb = FrozenTable(arch.n_genes + 1, arch.d_model)
        self.layers = nn.ModuleList(
            TransformerLayer(
                arch.d_model, arch.n_heads, arch.d_ff, dropout=0.0, activation="gelu", norm_first=True, qkv_bias=False,
                attention_dim=arch.n_heads * arch.dim_head, attention_kernel=FavorKernel(arch.nb_features, arch.dim_head),
            )
            for _ in range(arch.n_layers)
        )  # fmt: skip
        self.norm = nn.LayerNorm(arch.d_model)

    @property
    def token_embedding_adapter_owner(self) -> nn.Module:
        return self.token_emb

    @property
    def sequence_length(self) -> int:
        return self.arch.n_genes + 1

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_emb(tokens) + self.pos_emb.emb(positions)

    def forward(self, batch: dict[str, torch.Tensor], **options) -> torch.Tensor:
        """The final LayerNorm's output (what scBERT's heads read)."""
        return self.norm(super().forward(batch, **options))

    def cell_embedding(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the gene positions, the appended token excluded (BioLLM's "mean" mode)."""
        return states[:, :-1].mean(dim=1)


def convert_scbert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> ours (`rename_layer_keys`), then to_q/to_k/to_v fused into qkv rows [q; k; v] and
    float64 tables cast to float32."""
    renamed, ignored = rename_layer_keys(state, layer_key=_LAYER, layer_names=_LAYER_KEYS, ignored_prefixes=IGNORED)
    converted, qkv = {}, {}
    for key, tensor in renamed.items():
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        role = _QKV_KEY.fullmatch(key)
        if role:
            qkv.setdefault(role.group(1), {})[role.group(2)] = tensor
        else:
            converted[key] = tensor
    for index, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"scBERT layer {index} lacks to_{', to_'.join(sorted({'q', 'k', 'v'} - set(parts)))}.weight")
        converted[f"layers.{index}.self_attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted, ignored


def architecture_from_state(state: dict[str, torch.Tensor]) -> ScBERTArchitecture:
    """The shape of the model, read off its tensors (scBERT stores no config)."""
    try:
        n_tokens, d_model = state["token_emb.weight"].shape
        rows = state["pos_emb.emb.weight"].shape[0]
        layers = sorted({int(m.group(1)) for key in state if (m := _LAYER.match(key))})
        projection = state["performer.net.layers.0.0.fn.fast_attention.projection_matrix"]
        inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
        d_ff = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    except KeyError as err:
        hint = " (the random-feature projection matrix is never drawn anew: the checkpoint must hold it)" if "projection" in str(err) else ""
        raise UserError(f"not an scBERT checkpoint: it lacks {err}{hint}") from None
    nb_features, dim_head = projection.shape
    if inner % dim_head:
        raise UserError(f"scBERT checkpoint: attention width {inner} is not a multiple of dim_head {dim_head}")
    return ScBERTArchitecture(
        n_tokens=n_tokens, n_genes=rows - 1, d_model=d_model, n_layers=len(layers), n_heads=inner // dim_head,
        dim_head=dim_head, nb_features=nb_features, d_ff=d_ff,
    )  # fmt: skip


def _panel(folder: Path) -> tuple[str, ...]:
    for name in PANEL_FILES:
        if (folder / name).is_file():
            return read_panel_h5ad(folder / name)
    raise UserError(f"scBERT checkpoint folder {folder} lacks the gene panel ({' or '.join(PANEL_FILES)})")


def build_scbert(
    *,
    name: str,
    checkpoint: str | None,
    d_model: int,
    n_layers: int,
    n_heads: int,
    dim_head: int,
    nb_features: int,
    d_ff: int,
    n_bins: int,
    seed: int,
    n_genes: int | None = None,
    cells=None,
    saved: str | Path | None = None,
    vocab_only: bool = False,
) -> LoadedBackbone | object | None:
    """scBERT from `checkpoint` (DIR with panglao_pretrain.pth and the gene panel) or randomly initialised
    with `seed` over the data's genes (the contract in `backbones/base.py`). `n_genes`: the panel size of a
    random model built without data (`describe` at the release's 16,906 genes; placeholder gene names)."""
    folder = checked_folder(checkpoint, (WEIGHTS_FILE,), family="scBERT") if checkpoint else None
    if vocab_only:
        return ScBERTTokenizer(panel=_panel(folder), n_bins=n_bins).vocab if folder else None
    if folder is not None:
        panel = _panel(folder)
        state = read_torch_weights(folder / WEIGHTS_FILE, entry=("model_state_dict",))
        arch = architecture_from_state(state)
        if arch.n_genes != len(panel):
            raise UserError(f"the gene panel in {folder} has {len(panel):,} genes, the checkpoint {arch.n_genes:,}: not this model's panel")
        if arch.n_tokens != n_bins + 2:
            n_bins = arch.n_tokens - 2
        model = ScBERT(arch)
        converted, ignored = convert_scbert_state_dict(state)
        load_state_dict_exactly(model, converted, source=f"{folder / WEIGHTS_FILE} (performer.net.layers.N.* shown as layers.N.*)")
        info(f"ignored {len(ignored)} tensors: the MLM head (to_out.*) and the redraw counter (never redrawn here)")
        info(f"loaded scBERT checkpoint {folder}: {arch}")
    else:
        panel = random_panel(
            "scBERT", saved=saved, panel_file=PANEL_FILE, load_saved=lambda folder: ScBERTTokenizer.load_saved(folder, n_bins=n_bins),
            cells=cells, n_genes=n_genes,
        )  # fmt: skip
        arch = ScBERTArchitecture(
            n_tokens=n_bins + 2, n_genes=len(panel), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            dim_head=dim_head, nb_features=nb_features, d_ff=d_ff,
        )  # fmt: skip
        model = random_backbone(name, seed, lambda: ScBERT(arch))
    tokenizer = ScBERTTokenizer(panel=panel, n_bins=n_bins)
    source = str(folder.resolve()) if folder else None
    return LoadedBackbone(name=name, model=model, tokenizer=tokenizer, pretrained=folder is not None, checkpoint=source)
