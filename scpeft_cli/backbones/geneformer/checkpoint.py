"""Build Geneformer from an official model folder (`config.json` + `model.safetensors` or `pytorch_model.bin`,
with the four gene dictionaries beside it or in `dictionary_dir`) or at random.

The official weights are BERT's (`bert.embeddings.*`, `bert.encoder.layer.{i}.*`, with or without the
`bert.` prefix); `convert_state_dict` maps them onto this tool's modules, fusing each layer's query, key
and value into one `self_attn.qkv` (rows [q; k; v]). The MLM head (`cls.*`), the pooler and the
`position_ids` buffer are ignored. `training_args.bin` (an arbitrary pickle) is never read.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from scpeft_cli.backbones.base import (
    DataNeeded,
    LoadedBackbone,
    check_tensors,
    load_state_dict_exactly,
    random_backbone,
    read_torch_weights,
)
from scpeft_cli.backbones.geneformer.dictionaries import GeneDictionaries, read_dictionaries
from scpeft_cli.backbones.geneformer.model import Geneformer, GeneformerArchitecture, activation_name
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import tokenizer_input
from scpeft_cli.tokenizers.geneformer import GeneformerVocab, RankValueTokenizer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
GENERATIONS = ("v1", "v2")

# config.json keys read, and the type each must have (BERT's names).
CONFIG_KEYS = {
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "intermediate_size": int,
    "hidden_act": str,
    "max_position_embeddings": int,
    "vocab_size": int,
    "type_vocab_size": int,
    "layer_norm_eps": float,
    "hidden_dropout_prob": float,
    "attention_probs_dropout_prob": float,
    "pad_token_id": int,
}

# Official layer tensor names (after `encoder.layer.{i}.`) -> this tool's (after `layers.{i}.`).
_LAYER_NAMES = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_QKV = ("query", "key", "value")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


# ------------------------------------------------------------------------------------------ config


def read_config(folder: Path) -> dict:
    """config.json of a Geneformer model folder, with every key this loader reads, type-checked."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"Geneformer checkpoint folder {folder} lacks {CONFIG_FILE}; it must hold config.json and "
            "model.safetensors (or pytorch_model.bin)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot parse {path}: {err}") from err
    if not isinstance(config, dict):
        raise UserError(f"{path} must be a JSON object (a BERT config)")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; is this a Geneformer (BERT) model folder?")
    for key, kind in CONFIG_KEYS.items():
        value = config[key]
        valid = isinstance(value, str) if kind is str else _is_number(value, integer=kind is int)
        if not valid:
            wanted = "a string" if kind is str else "an integer" if kind is int else "a number"
            raise UserError(f"{path}: {key} must be {wanted}, got {value!r}")
    embedding_type = config.get("position_embedding_type", "absolute")
    if embedding_type != "absolute":
        raise UserError(
            f"{path}: position_embedding_type {embedding_type!r} is not supported; Geneformer uses absolute positions"
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise UserError(f"{path} describes a BERT decoder; Geneformer is an encoder (is_decoder false)")
    return config


def _is_number(value: object, *, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


def architecture_from_config(config: dict, *, source: str, attention_dropout: float | None) -> GeneformerArchitecture:
    """BERT config names -> our architecture; `attention_dropout` None: the config's own."""
    arch = GeneformerArchitecture(
        d_model=config["hidden_size"],
        n_heads=config["num_attention_heads"],
        d_ff=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        max_input_size=config["max_position_embeddings"],
        vocab_size=config["vocab_size"],
        type_vocab_size=config["type_vocab_size"],
        pad_id=config["pad_token_id"],
        activation=activation_name(config["hidden_act"], source=source),
        layer_norm_eps=float(config["layer_norm_eps"]),
        dropout=float(config["hidden_dropout_prob"]),
        attention_dropout=float(
            config["attention_probs_dropout_prob"] if attention_dropout is None else attention_dropout
        ),
    )
    sizes = {
        k: getattr(arch, k)
        for k in ("d_model", "n_heads", "d_ff", "n_layers", "max_input_size", "vocab_size", "type_vocab_size")
    }
    not_positive = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if not_positive:
        raise UserError(f"{source}: sizes must be positive ({', '.join(not_positive)})")
    if arch.d_model % arch.n_heads:
        raise UserError(f"{source}: hidden_size {arch.d_model} is not divisible by num_attention_heads {arch.n_heads}")
    if not 0 <= arch.pad_id < arch.vocab_size:
        raise UserError(
            f"{source}: pad_token_id {arch.pad_id} is outside the vocabulary (vocab_size {arch.vocab_size})"
        )
    return arch


# ----------------------------------------------------------------------------------------- weights


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The model's tensors: model.safetensors (preferred) or pytorch_model.bin (weights_only)."""
    path = folder / SAFETENSORS_FILE
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu"), path
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"cannot read {path} as safetensors ({type(err).__name__}: {str(err)[:200]})") from None
    path = folder / TORCH_FILE
    if path.is_file():
        return read_torch_weights(path), path
    sharded = [p.name for p in folder.glob("*.index.json")]
    hint = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
    raise UserError(f"Geneformer checkpoint folder {folder} holds neither {SAFETENSORS_FILE} nor {TORCH_FILE}{hint}")


def _is_ignored(key: str, prefix: str) -> bool:
    """The MLM head, the pooler and BERT's position_ids buffer: not used for fine-tuning."""
    return key.startswith("cls.") or key.startswith(f"{prefix}pooler.") or key == f"{prefix}embeddings.position_ids"


def official_shapes(arch: GeneformerArchitecture, prefix: str = "bert.") -> dict[str, tuple[int, ...]]:
    """Every tensor an official checkpoint of this architecture holds (heads excluded), with its shape."""
    d, ff = arch.d_model, arch.d_ff
    shapes = {
        f"{prefix}embeddings.word_embeddings.weight": (arch.vocab_size, d),
        f"{prefix}embeddings.position_embeddings.weight": (arch.max_input_size, d),
        f"{prefix}embeddings.token_type_embeddings.weight": (arch.type_vocab_size, d),
        f"{prefix}embeddings.LayerNorm.weight": (d,),
        f"{prefix}embeddings.LayerNorm.bias": (d,),
    }
    layer = {
        **{f"attention.self.{name}.weight": (d, d) for name in _QKV},
        **{f"attention.self.{name}.bias": (d,) for name in _QKV},
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        "attention.output.LayerNorm.weight": (d,),
        "attention.output.LayerNorm.bias": (d,),
        "intermediate.dense.weight": (ff, d),
        "intermediate.dense.bias": (ff,),
        "output.dense.weight": (d, ff),
        "output.dense.bias": (d,),
        "output.LayerNorm.weight": (d,),
        "output.LayerNorm.bias": (d,),
    }
    for i in range(arch.n_layers):
        shapes.update({f"{prefix}encoder.layer.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def convert_state_dict(
    state: dict[str, torch.Tensor], arch: GeneformerArchitecture, *, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official Geneformer (BERT) keys -> this tool's module names; returns (converted, ignored keys).

    The checkpoint is first checked against what its config implies, so that a missing, unexpected or
    mis-shaped tensor is named as the checkpoint names it.
    """
    prefix = "bert." if any(key.startswith("bert.") for key in state) else ""
    ignored = [key for key in state if _is_ignored(key, prefix)]
    kept = {key: tensor for key, tensor in state.items() if not _is_ignored(key, prefix)}
    check_tensors(kept, official_shapes(arch, prefix), source=f"checkpoint {source}", against="its config.json")

    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in kept.items():
        key = key[len(prefix) :]
        match = _LAYER_KEY.match(key)
        if match is None:  # embeddings.*: the same names
            converted[key] = tensor
            continue
        index, name, kind = match.groups()
        if name.startswith("attention.self."):
            qkv.setdefault((int(index), kind), {})[name.rsplit(".", 1)[1]] = tensor
        else:
            converted[f"layers.{index}.{_LAYER_NAMES[name]}.{kind}"] = tensor
    for (index, kind), parts in qkv.items():
        converted[f"layers.{index}.self_attn.qkv.{kind}"] = torch.cat([parts[name] for name in _QKV], dim=0)
    return converted, ignored


# ---------------------------------------------------------------------------------------- builder


def _checkpoint_folder(checkpoint: str | Path) -> Path:
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"Geneformer checkpoint folder not found: {folder}; set backbone.checkpoint to a model folder "
            "(config.json + model.safetensors or pytorch_model.bin)"
        )
    return folder


def _vocab(dictionaries: GeneDictionaries) -> GeneformerVocab:
    return GeneformerVocab(dictionaries.token_to_id, dictionaries.ensembl_mapping, dictionaries.gene_name_id)


def _checked_dictionaries(folder: Path, config: dict, dictionary_dir: str | Path | None) -> GeneDictionaries:
    """The model's dictionaries, which must agree with its config (vocabulary size, padding id)."""
    vocab_size = config["vocab_size"]
    dictionaries = read_dictionaries(
        folder if dictionary_dir is None else Path(dictionary_dir).expanduser(), vocab_size=vocab_size
    )
    token_file = dictionaries.files["token_dictionary"]
    largest = max(dictionaries.token_to_id.values())
    if dictionaries.size != vocab_size or largest >= vocab_size:
        raise UserError(
            f"{token_file.name} ({dictionaries.size} tokens, ids up to {largest}) does not fit "
            f"{folder / CONFIG_FILE} (vocab_size {vocab_size}): use the dictionaries of the model's own generation "
            "(V1: 25,426 tokens, *_gc30M; V2: 20,275, *_gc104M)"
        )
    pad = dictionaries.token_to_id["<pad>"]
    if pad != config["pad_token_id"]:
        raise UserError(
            f"{token_file.name} gives <pad> id {pad} but {folder / CONFIG_FILE} has "
            f"pad_token_id {config['pad_token_id']}"
        )
    return dictionaries


def _random_tokenizer(
    *, generation: str, max_input_size: int, vocab_size: int | None, cells, saved
) -> RankValueTokenizer:
    """A random model's tokenizer: the one a trained run saved, else built from the training cells."""
    if saved is not None:
        return RankValueTokenizer.load_saved(saved, model_input_size=max_input_size)
    if cells is not None:  # medians from the training cells' raw counts
        counts, totals = tokenizer_input(cells, RankValueTokenizer)
        return RankValueTokenizer.from_data(
            counts, [str(g) for g in cells.var_names], v2=generation == "v2", model_input_size=max_input_size,
            totals=totals,
        )
    if vocab_size:
        return RankValueTokenizer(GeneformerVocab.from_genes([], v2=generation == "v2"), {}, max_input_size)
    raise DataNeeded(
        "a randomly initialised Geneformer needs data (its genes form the token dictionary) or backbone.vocab_size"
    )


def build_geneformer(
    *,
    name: str,
    checkpoint: str | None,
    dictionary_dir: str | None,
    generation: str,
    d_model: int,
    n_heads: int,
    d_ff: int,
    n_layers: int,
    max_input_size: int,
    dropout: float,
    attention_dropout: float | None,
    activation: str,
    layer_norm_eps: float,
    vocab_size: int | None,
    embedding_layer: str,
    pooling: str,
    seed: int,
    cells=None,
    saved: str | Path | None = None,
    vocab_only: bool = False,
) -> LoadedBackbone | GeneformerVocab | None:
    """Geneformer from `checkpoint` (architecture, dropouts and generation from its config.json and
    dictionaries) or randomly initialised with `seed` (the contract in `backbones/base.py`).

    `dictionary_dir` None: the dictionaries lie in the checkpoint folder. `attention_dropout` None: the
    model's own (the config's attention_probs_dropout_prob, or `dropout` for a random model).
    A random model's token dictionary and medians come from `cells` (or the tables a trained run saved
    in `saved`); its embedding table is padded to `vocab_size` rows when given.
    """
    if generation not in GENERATIONS:
        raise UserError(f"backbone.generation must be v1 or v2, got {generation!r}")
    if checkpoint:
        folder = _checkpoint_folder(checkpoint)
        config = read_config(folder)
        dictionaries = _checked_dictionaries(folder, config, dictionary_dir)
        vocab = _vocab(dictionaries)
        if vocab_only:
            return vocab
        source = str(folder)
        arch = architecture_from_config(config, source=str(folder / CONFIG_FILE), attention_dropout=attention_dropout)
        found = "v2" if vocab.is_v2 else "v1"
        if found != generation:
            info(f"backbone.generation={generation} ignored: the model's token dictionary is {found.upper()}'s")
        model = Geneformer(
            arch, cls_id=vocab.cls_id, eos_id=vocab.eos_id, embedding_layer=embedding_layer, pooling=pooling
        )
        state, weights = read_weights(folder)
        converted, ignored = convert_state_dict(state, arch, source=str(weights))
        load_state_dict_exactly(model, converted, source=f"{weights} (converted to this tool's names)")
        if ignored:
            info(f"ignored {len(ignored)} tensors not used for fine-tuning (MLM head cls.*, pooler, position_ids)")
        files = ", ".join(path.name for path in dictionaries.files.values())
        info(
            f"loaded Geneformer {found.upper()} checkpoint {folder}: {arch.n_layers} layers, hidden {arch.d_model}, "
            f"vocab {arch.vocab_size}, input {arch.max_input_size} (dictionaries {files})"
        )
        tokenizer = RankValueTokenizer(vocab, dictionaries.medians, arch.max_input_size)
        source = str(folder.resolve())
    else:
        if vocab_only:
            return None
        tokenizer = _random_tokenizer(
            generation=generation, max_input_size=max_input_size, vocab_size=vocab_size, cells=cells, saved=saved
        )
        vocab = tokenizer.vocab
        arch = GeneformerArchitecture(
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            n_layers=n_layers,
            max_input_size=max_input_size,
            vocab_size=max(vocab.size, vocab_size or 0),
            type_vocab_size=2,
            pad_id=vocab.pad_id,
            activation=activation_name(activation, source="backbone.activation"),
            layer_norm_eps=layer_norm_eps,
            dropout=dropout,
            attention_dropout=dropout if attention_dropout is None else attention_dropout,
        )
        model = random_backbone(
            name, seed,
            lambda: Geneformer(arch, cls_id=vocab.cls_id, eos_id=vocab.eos_id, embedding_layer=embedding_layer, pooling=pooling),
        )  # fmt: skip
        source = None
    return LoadedBackbone(name=name, model=model, tokenizer=tokenizer, pretrained=bool(checkpoint), checkpoint=source)
