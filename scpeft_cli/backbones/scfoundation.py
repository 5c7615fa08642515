"""scFoundation (biomap-research, the 'cell' encoder of `models.ckpt`) in plain PyTorch, and its builder.

Model: value embedding ("auto-discretisation", `token_emb.*`) + gene-position embedding (`pos_emb`,
seq_len + 1 rows) -> the shared post-norm ReLU layers (`layers.{i}`, PyTorch's default
`nn.TransformerEncoderLayer` upstream) -> the final LayerNorm (`encoder.norm`). The Performer decoder
of the MAE is pretraining-only and not built.

Checkpoint (`models.ckpt` in a folder with `OS_scRNA_gene_index.19264.tsv`): a nested dict
{'gene'|'cell'|'rde': {'config': {...}, 'state_dict': {...}}}; the 'cell' entry is used. Its keys carry a
`model.` prefix, stripped; `encoder.transformer_encoder.{i}.*` become `layers.{i}.*` with
`self_attn.in_proj_weight/bias` -> `self_attn.qkv.weight/bias` (same [q; k; v] packing); every other
encoder key keeps its name (`token_emb.*`, `pos_emb.weight`, `encoder.norm.*`). Decoder keys
(`decoder.*`, `decoder_embed.*`, `norm.*`, `to_final.*`) are ignored with one log line.

Cell embedding (upstream `get_embedding.py`, pool 'all'): concat(S state, T state, max over genes, mean
over genes) = 4 x d_model, from the final-norm output. T and S are found by their position ids
(len(panel), len(panel) + 1), not by being last, and are excluded from the gene max/mean; padding is
masked. A cell without S (raw total <= 1, see the tokenizer) gets zeros in the S slot (upstream would
read a gene there); a cell without genes gets zeros in the max and mean slots.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scpeft_cli.backbones.base import (
    LAYER_FEATURES,
    Backbone,
    LoadedBackbone,
    load_state_dict_exactly,
    load_torch_file,
    normalised_weights,
    random_backbone,
    random_panel,
)
from scpeft_cli.backbones.layers import TransformerLayer
from scpeft_cli.backbones.official import checked_folder, rename_layer_keys
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.scbert import PanelVocab
from scpeft_cli.tokenizers.scfoundation import PANEL_FILE, ScFoundationTokenizer, read_panel_tsv

CHECKPOINT_FILE = "models.ckpt"
PANEL_TSV = "OS_scRNA_gene_index.19264.tsv"
ENTRY = "cell"  # the checkpoint entry whose weights give cell embeddings
MASK_VALUE, PAD_VALUE = 102.0, 103.0
EPS = 1e-5

IGNORED_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
_LAYER_KEY = re.compile(r"^encoder\.transformer_encoder\.(\d+)\.(.+)$")
_ATTENTION_KEYS = {"self_attn.in_proj_weight": "self_attn.qkv.weight", "self_attn.in_proj_bias": "self_attn.qkv.bias"}


@dataclass(frozen=True)
class ScFoundationArchitecture:
    """The shape of the scFoundation encoder; read from the checkpoint's config when one is given."""

    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    n_layers: int = 12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    bin_num: int = 100
    bin_alpha: float = 1.0
    seq_len: int = 19266  # panel genes + T + S; the position table has seq_len + 1 rows
    mask_value: float = MASK_VALUE
    pad_value: float = PAD_VALUE

    @property
    def panel_size(self) -> int:
        return self.seq_len - 2


class AutoDiscretizationEmbedding(nn.Module):
    """Scalar value -> d_model by soft binning: h = LeakyReLU_0.1(mlp(x)); h = alpha * h + mlp2(h);
    e = softmax(h) @ emb.weight. Values exactly `mask_value` / `pad_value` get `emb_mask` / `emb_pad`.

    `scpeft_adapter` (empty by default) sits on the output, after the mask / pad replacement: the
    token-prompt point.
    """

    def __init__(
        self, d_model: int, bin_num: int, bin_alpha: float, *, mask_value: float = MASK_VALUE, pad_value: float = PAD_VALUE
    ):
        super().__init__()
        self.bin_alpha = float(bin_alpha)
        self.mask_value, self.pad_value = float(mask_value), float(pad_value)
        self.mlp = nn.Linear(1, bin_num)
        self.activation = nn.LeakyReLU(0.1)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, d_model)
        self.emb_mask = nn.Embedding(1, d_model)
        self.emb_pad = nn.Embedding(1, d_model)
        self.scpeft_adapter: nn.Module = nn.Identity()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.mlp(values.unsqueeze(-1).to(self.mlp.weight.dtype)))
        h = self.bin_alpha * h + self.mlp2(h)
        out = torch.softmax(h, dim=-1) @ self.emb.weight
        out = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0].to(out.dtype), out)
        out = torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0].to(out.dtype), out)
        return self.scpeft_adapter(out)


class _EncoderNorm(nn.Module):
    """Holds the final LayerNorm under the checkpoint's name (`encoder.norm`)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=EPS)


class ScFoundation(Backbone):
    """Token states (final-norm output) for tokenised cells; the cell embedding is 4 x d_model."""

    family = "scFoundation"
    supports = frozenset((*LAYER_FEATURES, "gene_values"))
    # every panel gene the data has, zeros included; no length limit (T and S stay as they are)
    feature_tokenizer_options = {"gene_values": {"include_zero_genes": True, "max_seq_len": None}}
    token_adapter_placement = "the expression-value (auto-discretisation) embedding output"

    def __init__(self, arch: ScFoundationArchitecture):
        super().__init__()
        self.arch = arch
        self.d_model = arch.d_model
        self.token_emb = AutoDiscretizationEmbedding(
            arch.d_model, arch.bin_num, arch.bin_alpha, mask_value=arch.mask_value, pad_value=arch.pad_value
        )
        self.pos_emb = nn.Embedding(arch.seq_len + 1, arch.d_model)
        self.layers = nn.ModuleList(
            TransformerLayer(
                arch.d_model, arch.n_heads, arch.d_ff, dropout=arch.dropout, attention_dropout=arch.attention_dropout,
                activation="relu", norm_first=False, eps=EPS,
            )
            for _ in range(arch.n_layers)
        )  # fmt: skip
        self.encoder = _EncoderNorm(arch.d_model)

    @property
    def cell_embedding_dim(self) -> int:
        return 4 * self.d_model

    def unused_parameter_names(self) -> set[str]:
        """Also the mask and pad embeddings: fine-tuning data holds no mask value, and padding is masked out of
        attention and pooling, so they would get no gradient."""
        return super().unused_parameter_names() | {"token_emb.emb_mask.weight", "token_emb.emb_pad.weight"}

    @property
    def t_position(self) -> int:
        return self.arch.panel_size

    @property
    def s_position(self) -> int:
        return self.arch.panel_size + 1

    @property
    def token_embedding_adapter_owner(self) -> nn.Module:
        return self.token_emb

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.token_emb(batch["values"]) + self.pos_emb(batch["gene_ids"])

    def forward(
        self, batch: dict[str, torch.Tensor], *, transform_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The layers' output through the final LayerNorm (`encoder.norm`), as upstream's encoder returns."""
        return self.encoder.norm(super().forward(batch, transform_embeddings=transform_embeddings))

    def _token_kinds(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(is_s, is_t, is_gene) over the cell's positions, False at padding; T and S found by position id."""
        gene_ids, real = batch["gene_ids"], ~batch["padding_mask"]
        is_t = real & (gene_ids == self.t_position)
        is_s = real & (gene_ids == self.s_position)
        return is_s, is_t, real & ~is_t & ~is_s

    def pooling_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """S and T a quarter each, the genes half (the max slot counted as a mean: no single query gives a
        maximum); a cell without S shares its quarter."""
        is_s, is_t, is_gene = self._token_kinds(batch)
        return normalised_weights(0.25 * is_t + 0.25 * is_s + 0.5 * normalised_weights(is_gene.float()))

    def cell_embedding(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """concat(S, T, max over genes, mean over genes); zeros where a cell lacks S or genes."""
        states = states[:, -batch["gene_ids"].shape[1] :]  # any leading prompt positions are not tokens of the cell
        is_s, is_t, is_gene = self._token_kinds(batch)
        is_gene = is_gene.unsqueeze(-1)
        s_state = (states * is_s.unsqueeze(-1)).sum(1)
        t_state = (states * is_t.unsqueeze(-1)).sum(1)
        n_genes = is_gene.sum(1)
        gene_max = states.masked_fill(~is_gene, float("-inf")).amax(1)
        gene_max = torch.where(n_genes > 0, gene_max, torch.zeros_like(gene_max))
        gene_mean = (states * is_gene).sum(1) / n_genes.clamp(min=1)
        return torch.cat([s_state, t_state, gene_max, gene_mean], dim=-1)


# ------------------------------------------------------------------------------------------ checkpoint
def convert_scfoundation_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys (with `model.`) -> this tool's module names; returns (converted, ignored keys)."""
    return rename_layer_keys(
        state, layer_key=_LAYER_KEY, layer_names=_ATTENTION_KEYS, ignored_prefixes=IGNORED_PREFIXES, strip="model."
    )


def _checked_folder(folder: str | Path) -> Path:
    return checked_folder(folder, (CHECKPOINT_FILE, PANEL_TSV), family="scFoundation")


def _entry(checkpoint: Any, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The 'cell' entry's model config (the `mae_autobin` dict) and state dict."""
    if not isinstance(checkpoint, dict) or ENTRY not in checkpoint:
        keys = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path} is not an scFoundation models.ckpt: it has no '{ENTRY}' entry (found: {keys})")
    entry = checkpoint[ENTRY]
    if not (isinstance(entry, dict) and isinstance(entry.get("state_dict"), dict) and isinstance(entry.get("config"), dict)):
        raise UserError(f"{path}: the '{ENTRY}' entry must be a dict with 'config' and 'state_dict'")
    config = entry["config"]
    if "model_config" in config:
        model = config.get("model", "mae_autobin")
        if model != "mae_autobin":
            raise UserError(f"{path}: config model is {model!r}; only 'mae_autobin' is supported")
        config = config["model_config"].get(model) if isinstance(config["model_config"], dict) else None
        if not isinstance(config, dict):
            raise UserError(f"{path}: config.model_config has no 'mae_autobin' dict")
    state = entry["state_dict"]
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: the '{ENTRY}' state_dict holds non-tensors ({', '.join(not_tensors[:5])})")
    return config, state


def architecture_from_config(
    config: dict, path: Path, *, dropout: float, attention_dropout: float | None
) -> ScFoundationArchitecture:
    """The `mae_autobin` config (encoder hidden_dim / depth / heads, bin_num, bin_alpha, seq_len,
    mask_token_id, pad_token_id) -> our architecture; ff is 4 x hidden_dim (upstream's encoder)."""
    try:
        encoder = config["encoder"]
        module = encoder.get("module_type", "transformer")
        if module != "transformer":
            raise UserError(f"{path}: the encoder is a {module!r} module; only 'transformer' is supported")
        d = int(encoder["hidden_dim"])
        arch = ScFoundationArchitecture(
            d_model=d,
            n_heads=int(encoder["heads"]),
            d_ff=4 * d,
            n_layers=int(encoder["depth"]),
            dropout=dropout,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
            bin_num=int(config["bin_num"]),
            bin_alpha=float(config["bin_alpha"]),
            seq_len=int(config["seq_len"]),
            mask_value=float(config.get("mask_token_id", MASK_VALUE)),
            pad_value=float(config.get("pad_token_id", PAD_VALUE)),
        )
    except KeyError as err:
        raise UserError(f"{path}: the '{ENTRY}' config lacks {err}; is this an scFoundation models.ckpt?") from None
    except (AttributeError, TypeError, ValueError) as err:
        raise UserError(f"{path}: the '{ENTRY}' config has an invalid architecture value ({err})") from None
    if arch.d_model % arch.n_heads:
        raise UserError(f"{path}: hidden_dim {arch.d_model} is not divisible by heads {arch.n_heads}")
    return arch


def build_scfoundation(
    *,
    name: str,
    checkpoint: str | None,
    d_model: int,
    n_heads: int,
    d_ff: int,
    n_layers: int,
    dropout: float,
    bin_num: int,
    bin_alpha: float,
    target_depth: float,
    max_seq_len: int | None,
    seed: int,
    attention_dropout: float | None = None,
    trust_checkpoint: bool = False,
    n_genes: int | None = None,
    cells=None,
    saved: str | Path | None = None,
    vocab_only: bool = False,
) -> LoadedBackbone | PanelVocab | None:
    """scFoundation from a checkpoint folder (architecture from its 'cell' config) or randomly initialised
    with `seed` (the contract in `backbones/base.py`); a random model's panel is the data's genes
    (`cells`), the panel a trained run saved in `saved`, or `n_genes` placeholders (`describe` without data).
    `attention_dropout` None: `dropout`."""
    if vocab_only:
        return PanelVocab(read_panel_tsv(_checked_folder(checkpoint) / PANEL_TSV)) if checkpoint else None
    if checkpoint:
        folder = _checked_folder(checkpoint)
        panel = read_panel_tsv(folder / PANEL_TSV)
        path = folder / CHECKPOINT_FILE
        config, state = _entry(load_torch_file(path, what="checkpoint", trust_setting="backbone.trust_checkpoint", trust=trust_checkpoint), path)
        arch = architecture_from_config(config, path, dropout=dropout, attention_dropout=attention_dropout)
        if len(panel) != arch.panel_size:
            raise UserError(
                f"gene panel {folder / PANEL_TSV} has {len(panel)} genes, but the checkpoint's seq_len {arch.seq_len} "
                f"expects {arch.panel_size} (seq_len - 2)"
            )
        info(
            f"scFoundation architecture: d_model {arch.d_model}, {arch.n_layers} layers, {arch.n_heads} heads, "
            f"ff {arch.d_ff}, bin_num {arch.bin_num}, bin_alpha {arch.bin_alpha}, seq_len {arch.seq_len}"
        )
        model = ScFoundation(arch)
        converted, ignored = convert_scfoundation_state_dict(state)
        load_state_dict_exactly(
            model, converted,
            source=f"{path} ['{ENTRY}'] (keys shown without 'model.', encoder.transformer_encoder.N.* as layers.N.*, in_proj as qkv)",
        )  # fmt: skip
        if ignored:
            groups = ", ".join(sorted({key.split(".")[0] for key in ignored}))
            info(f"ignored {len(ignored)} decoder tensors ({groups}): not needed for embeddings")
        info(
            f"loaded scFoundation checkpoint {path} ['{ENTRY}']: "
            f"{arch.n_layers} layers, d_model {arch.d_model}, panel {len(panel)}"
        )
        pad_value = arch.pad_value
    else:
        panel = random_panel(
            "scFoundation", saved=saved, panel_file=PANEL_FILE, load_saved=ScFoundationTokenizer.load_saved, cells=cells, n_genes=n_genes
        )
        arch = ScFoundationArchitecture(
            d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=n_layers, dropout=dropout,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
            bin_num=bin_num, bin_alpha=bin_alpha, seq_len=len(panel) + 2,
        )  # fmt: skip
        if arch.d_model % arch.n_heads:
            raise UserError(f"backbone.d_model {d_model} is not divisible by backbone.n_heads {n_heads}")
        model = random_backbone(name, seed, lambda: ScFoundation(arch))
        pad_value = PAD_VALUE
    tokenizer = ScFoundationTokenizer(
        panel=panel, target_depth=target_depth, max_seq_len=max_seq_len, pad_value=pad_value
    )
    source = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    return LoadedBackbone(name=name, model=model, tokenizer=tokenizer, pretrained=bool(checkpoint), checkpoint=source)
