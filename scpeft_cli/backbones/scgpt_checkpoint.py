"""Build scGPT from an official checkpoint folder (`best_model.pt`, `vocab.json`, `args.json`) or at random."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from scpeft_cli.backbones.base import (
    DataNeeded,
    LoadedBackbone,
    load_state_dict_exactly,
    random_backbone,
    read_torch_weights,
)
from scpeft_cli.backbones.official import checked_folder, rename_layer_keys
from scpeft_cli.backbones.scgpt import ScGPT, ScGPTArchitecture
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.scgpt import VOCAB_FILE, ScGPTTokenizer
from scpeft_cli.tokenizers.vocab import CLS_TOKEN, PAD_TOKEN, GeneVocab

CHECKPOINT_FILES = ("best_model.pt", "vocab.json", "args.json")

# Pretraining heads a task may reuse (`LoadedBackbone.heads`): expression (GEP) and MVC decoders.
REUSABLE_HEADS = ("decoder", "mvc_decoder")
# Pretraining-only or task-specific heads that the backbone does not hold (the reusable ones among them).
IGNORED_PREFIXES = (
    "decoder.",
    "mvc_decoder.",
    "flag_encoder.",
    "cls_decoder.",
    "bn.",
    "dsbn.",
    "batch_encoder.",
    "grad_reverse_discriminator.",
)

_LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
# Three published spellings of the same fused attention tensors (identical [q; k; v] packing).
_ATTENTION_KEYS = {
    "self_attn.Wqkv.weight": "self_attn.qkv.weight",
    "self_attn.Wqkv.bias": "self_attn.qkv.bias",
    "self_attn.in_proj_weight": "self_attn.qkv.weight",
    "self_attn.in_proj_bias": "self_attn.qkv.bias",
    "self_attn._impl.Wqkv.weight": "self_attn.qkv.weight",
    "self_attn._impl.Wqkv.bias": "self_attn.qkv.bias",
    "self_attn._impl.out_proj.weight": "self_attn.out_proj.weight",
    "self_attn._impl.out_proj.bias": "self_attn.out_proj.bias",
}


def convert_scgpt_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official scGPT keys -> this tool's module names; returns (converted, ignored keys)."""
    return rename_layer_keys(state, layer_key=_LAYER_KEY, layer_names=_ATTENTION_KEYS, ignored_prefixes=IGNORED_PREFIXES)


def _checked_folder(folder: str | Path) -> Path:
    return checked_folder(folder, CHECKPOINT_FILES, family="scGPT")


def read_vocab(folder: Path) -> GeneVocab:
    return GeneVocab.from_json(folder / VOCAB_FILE, required=(PAD_TOKEN, CLS_TOKEN))


def read_checkpoint_folder(folder: str | Path) -> tuple[dict, GeneVocab, dict[str, torch.Tensor]]:
    """args.json, vocab.json and the weights of an official scGPT folder, with a clear error per defect."""
    folder = _checked_folder(folder)
    try:
        args = json.loads((folder / "args.json").read_text())
    except ValueError as err:
        raise UserError(f"cannot parse {folder / 'args.json'}: {err}") from err
    return args, read_vocab(folder), read_torch_weights(folder / "best_model.pt")


def architecture_from_args(args: dict, vocab: GeneVocab, *, attention_dropout: float | None) -> ScGPTArchitecture:
    """scGPT's args.json names (embsize, nheads, d_hid, nlayers, dropout) -> our architecture.

    `attention_dropout` None: the checkpoint's own `dropout`, with which upstream trained attention too.
    """
    if not isinstance(args, dict):
        raise UserError("args.json must be a JSON object of scGPT training arguments")
    try:
        dropout = float(args.get("dropout", 0.2))
        arch = ScGPTArchitecture(
            d_model=int(args["embsize"]),
            n_heads=int(args["nheads"]),
            d_hid=int(args["d_hid"]),
            n_layers=int(args["nlayers"]),
            dropout=dropout,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
            n_tokens=vocab.size,
            pad_id=vocab.pad_id,
        )
    except KeyError as err:
        raise UserError(f"args.json lacks {err}; is this an scGPT checkpoint folder?") from err
    except (TypeError, ValueError) as err:
        raise UserError(f"args.json has an invalid architecture value ({err})") from err
    if arch.d_model % arch.n_heads:
        raise UserError(f"args.json: embsize {arch.d_model} is not divisible by nheads {arch.n_heads}")
    return arch


def _tokenizer_args(args: dict, *, n_bins: int, pad_value: float) -> tuple[int, float]:
    try:
        return int(args.get("n_bins", n_bins)), float(args.get("pad_value", pad_value))
    except (TypeError, ValueError) as err:
        raise UserError(f"args.json has an invalid n_bins or pad_value ({err})") from err


def build_scgpt(
    *,
    name: str,
    checkpoint: str | None,
    d_model: int,
    n_heads: int,
    d_hid: int,
    n_layers: int,
    dropout: float,
    attention_dropout: float | None,
    vocab_size: int | None,
    n_bins: int,
    max_seq_len: int,
    pad_value: float,
    seed: int,
    cells=None,
    saved: str | Path | None = None,
    vocab_only: bool = False,
) -> LoadedBackbone | GeneVocab | None:
    """scGPT from `checkpoint` (architecture from its args.json) or randomly initialised with `seed`
    (the contract in `backbones/base.py`).

    A random model's vocabulary is the data's genes (`cells`, or the `vocab.json` a trained run saved in
    `saved`); its embedding table is padded to `vocab_size` rows when given, so parameter counts match
    the preset. `attention_dropout` None: the model's own dropout (the checkpoint's, or `dropout`).
    """
    if vocab_only:
        return read_vocab(_checked_folder(checkpoint)) if checkpoint else None
    if checkpoint:
        args, vocab, state = read_checkpoint_folder(checkpoint)
        arch = architecture_from_args(args, vocab, attention_dropout=attention_dropout)
        n_bins, pad_value = _tokenizer_args(args, n_bins=n_bins, pad_value=pad_value)
        model = ScGPT(arch)
        converted, ignored = convert_scgpt_state_dict(state)
        load_state_dict_exactly(
            model,
            converted,
            source=f"{checkpoint} (keys transformer_encoder.layers.N.* are shown as layers.N.*, self_attn.Wqkv/in_proj as self_attn.qkv)",
        )
        heads = pretraining_heads(state)
        unused = [key for key in ignored if key.split(".")[0] not in heads]
        if heads:
            info(f"kept the pretrained {', '.join(sorted(heads))} tensors for tasks that reuse them")
        if unused:
            info(f"ignored {len(unused)} pretraining-only tensors ({', '.join(sorted({key.split('.')[0] for key in unused}))})")
        info(f"loaded scGPT checkpoint {checkpoint}: {arch.n_layers} layers, d_model {arch.d_model}, vocab {vocab.size}")
    else:
        heads = {}
        if saved is not None and (Path(saved) / VOCAB_FILE).is_file():
            vocab = read_vocab(Path(saved))
        elif cells is not None:
            vocab = GeneVocab.from_genes(list(cells.var_names))
        elif vocab_size:
            vocab = GeneVocab.from_genes([])
        else:
            raise DataNeeded("a randomly initialised backbone needs data (its genes form the vocabulary) or backbone.vocab_size")
        n_tokens = max(vocab.size, vocab_size or 0)
        arch = ScGPTArchitecture(
            d_model=d_model,
            n_heads=n_heads,
            d_hid=d_hid,
            n_layers=n_layers,
            dropout=dropout,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
            n_tokens=n_tokens,
            pad_id=vocab.pad_id,
        )
        model = random_backbone(name, seed, lambda: ScGPT(arch))
    tokenizer = ScGPTTokenizer(vocab=vocab, n_bins=n_bins, max_seq_len=max_seq_len, pad_value=pad_value)
    source = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    return LoadedBackbone(
        name=name, model=model, tokenizer=tokenizer, pretrained=bool(checkpoint), checkpoint=source,
        heads=heads,
    )


def pretraining_heads(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's reusable heads (`REUSABLE_HEADS`) present in `state`, each with its prefix stripped."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head in REUSABLE_HEADS:
            heads.setdefault(head, {})[rest] = tensor
    return heads
