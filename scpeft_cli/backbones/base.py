"""The backbone contract: what every backbone family hands to strategies, tasks and the trainer.

A backbone family is one module (or folder) with
- a module class deriving from `Backbone` (below): `d_model`, the layer stack, `embed(batch)`,
  `forward(batch) -> token states`, `cell_embedding(states, batch)`, the insertion points it offers;
- a builder function named by its YAML's `_target_`, called as
  `builder(**yaml_settings, seed=, cells=, saved=, vocab_only=False)`:
  `cells` (an AnnData of training cells, or None) is what a random backbone builds its gene tables
  from; `saved` is a trained run's `adapter/` folder holding the tables its tokenizer saved
  (`tokenizer.save`); `vocab_only=True` returns only the checkpoint's gene vocabulary (None for a
  random backbone), reading no weights. Otherwise it returns a `LoadedBackbone`.
"""

from __future__ import annotations

import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scpeft_cli.backbones.layers import PromptHook, run_layers
from scpeft_cli.console import warn
from scpeft_cli.errors import UserError

# What a backbone may offer beyond the layer stack (the shared TransformerLayer's adapter slots and
# Linear layers, which every backbone has):
#   token_adapter       an `scpeft_adapter` slot on the token embedding (`token_embedding_adapter_owner`)
#   prompts             the `scpeft_prompts` deep-prompt hook around each layer
#   grad_checkpointing  recomputing layer activations in backward (trainer.grad_checkpointing)
#   recompute_frozen_qkv  recomputing q/k/v behind a frozen projection (trainer.recompute_frozen_qkv)
# and what tasks may need (`Task.backbone_features`), offered only where a family declares it:
#   expression_values   per-gene expression values in `batch["values"]` that a decoder can predict (masked
#                       expression objectives), and `gene_embedding(batch)`: each token's gene-identity embedding
#   gene_values         every data gene a token carrying its log-normalised value, zeros included, under the
#                       tokenizer options the family declares in `feature_tokenizer_options["gene_values"]`;
#                       a token's gene is `batch["gene_ids"]`, mapped to data genes by `tokenizer.vocab.lookup`
LAYER_FEATURES = ("token_adapter", "prompts", "grad_checkpointing", "recompute_frozen_qkv")
FEATURES = (*LAYER_FEATURES, "expression_values", "gene_values")


class DataNeeded(UserError):
    """A random backbone whose size depends on the data's genes was built without data."""


class Backbone(nn.Module, ABC):
    """Base of every backbone module: token states through the shared layer stack, insertion points.

    Subclasses set `d_model` and `layers` (every layer of the checkpoint) and implement `embed` and
    `cell_embedding`; `depth` < len(layers) runs only the first `depth` layers (the embedding reads an
    earlier layer), and the later ones then train nothing.
    """

    family = "backbone"
    supports: frozenset[str] = frozenset(LAYER_FEATURES)
    token_adapter_placement = "the token embedding"  # where the token-prompt adapter sits, in words
    zero_shot_l2_normalized = False  # whether the family's own zero-shot embeddings are L2-normalised (`scpeft embed`)
    # The tokenizer settings that give a feature's inputs, by feature: a task needing the feature gets them
    # (`assembly.fit_to_task`), so the backbone, not the task, says how its inputs are made.
    feature_tokenizer_options: dict[str, dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.scpeft_prompts: PromptHook | None = None
        self.gradient_checkpointing: bool | int = False
        self.recompute_frozen_qkv = True
        self.depth: int | None = None

    # ------------------------------------------------------------------------------- computation
    @abstractmethod
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings (batch, length, d_model) entering the first layer."""

    def forward(self, batch: dict[str, torch.Tensor], *, transform_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Token states of the last layer run (`active_layers`), padding included.

        `transform_embeddings` maps the token embeddings before the first layer: a task's change of the input
        where scGPT makes it (integration's domain-specific batch norm, perturbation's flag embedding).
        """
        embeddings = self.embed(batch)
        if transform_embeddings is not None:
            embeddings = transform_embeddings(embeddings)
        return run_layers(
            self.active_layers, embeddings, batch["padding_mask"], self.scpeft_prompts,
            checkpointing=self.gradient_checkpointing if self.training else False,
            recompute_frozen_qkv=self.recompute_frozen_qkv,
        )

    @abstractmethod
    def cell_embedding(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One vector per cell (batch, cell_embedding_dim) from `forward`'s token states."""

    def pooling_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, length) weights, summing to 1 per cell and 0 at padding, of the positions whose states
        `cell_embedding` reads: the query `scpeft markers` reads attention from (q.k is linear in q, so a
        pooled query's scores are the same weighted mean of those rows' scores)."""
        raise UserError(f"{self.family} does not say which positions its cell embedding reads (Backbone.pooling_weights)")

    @property
    def sequence_length(self) -> int | None:
        """The number of positions of every cell when it is fixed (scBERT: panel + 1); None when it varies."""
        return None

    @property
    def cell_embedding_dim(self) -> int:
        """The width of `cell_embedding` (what a head on it reads): d_model unless the family pools wider."""
        return self.d_model

    def gene_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each token's gene-identity embedding (batch, length, d_model); offered with "expression_values"."""
        self.require("expression_values", by="gene_embedding")
        raise AssertionError("a backbone declaring expression_values must define gene_embedding")

    # ---------------------------------------------------------------------------- insertion points
    @property
    def active_layers(self) -> nn.ModuleList:
        """The layers `forward` runs: the ones strategies may adapt."""
        return self.layers if self.depth is None else self.layers[: self.depth]

    @property
    def token_embedding_adapter_owner(self) -> nn.Module | None:
        """The module whose `scpeft_adapter` slot adapts the token embedding (token prompts); None where the
        backbone offers none (then "token_adapter" is not in `supports`)."""
        return None

    def unused_parameter_names(self) -> set[str]:
        """Parameters `forward` never reads (layers after `depth`): frozen whatever the strategy."""
        if self.depth is None:
            return set()
        return {f"layers.{i}.{name}" for i in range(self.depth, len(self.layers)) for name, _ in self.layers[i].named_parameters()}

    def require(self, feature: str, *, by: str) -> None:
        """Stop with one line when `by` (a strategy or setting) needs a feature this backbone lacks."""
        if feature not in self.supports:
            offered = ", ".join(sorted(self.supports)) or "none"
            raise UserError(f"{by} needs the backbone's {feature}, which {self.family} does not offer (it offers: {offered})")

    def set_memory_options(self, *, grad_checkpointing: bool | int, recompute_frozen_qkv: bool) -> None:
        """The trainer's memory switches; one the backbone cannot honour is an error, never ignored."""
        if grad_checkpointing:
            self.require("grad_checkpointing", by="trainer.grad_checkpointing")
        if recompute_frozen_qkv and "recompute_frozen_qkv" not in self.supports:
            recompute_frozen_qkv = False  # the default asks for it where offered; nothing is promised otherwise
        self.gradient_checkpointing = grad_checkpointing
        self.recompute_frozen_qkv = recompute_frozen_qkv


def first_position_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`pooling_weights` of a family whose cell embedding is the first (`<cls>`) state."""
    weights = torch.zeros(batch["padding_mask"].shape, dtype=torch.float32, device=batch["padding_mask"].device)
    weights[:, 0] = 1.0
    return weights


def normalised_weights(weights: torch.Tensor) -> torch.Tensor:
    """Each row of (batch, length) weights divided by its sum (rows of zeros stay zeros)."""
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)


def random_backbone(name: str, seed: int, build: Callable[[], Backbone]) -> Backbone:
    """`build()` under `seed` (the global RNG left as it was), announced loudly: a random model is no pretrained one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    warn(
        f"backbone '{name}' is RANDOMLY INITIALISED (backbone.checkpoint=null): results are not those of a "
        "pretrained model; set backbone.checkpoint=DIR to load real weights"
    )
    return model


def random_panel(
    family: str, *, saved: str | Path | None, panel_file: str, load_saved: Callable[[str | Path], Any], cells, n_genes: int | None
) -> tuple[str, ...]:
    """The gene panel of a randomly initialised model: the one a trained run saved (`load_saved(saved)`,
    a tokenizer with `.panel`), else the data's genes, else `n_genes` placeholder names (`describe` at
    release size without data)."""
    if saved is not None and (Path(saved) / panel_file).is_file():
        return load_saved(saved).panel
    if cells is not None:
        return tuple(str(g) for g in cells.var_names)
    if n_genes:
        return tuple(f"placeholder_gene_{i}" for i in range(n_genes))
    raise DataNeeded(f"a randomly initialised {family} needs data (its genes form the panel) or backbone.n_genes")


@dataclass
class LoadedBackbone:
    """A built backbone module with the tokenizer that feeds it and where its weights came from."""

    name: str
    model: Backbone
    tokenizer: Any
    pretrained: bool
    checkpoint: str | None
    # Pretraining heads of the checkpoint that tasks may reuse, by module name (scGPT: "decoder",
    # "mvc_decoder"), each a state dict with that prefix stripped; empty for a random backbone.
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_file(path: Path, *, what: str = "state dict", trust_setting: str | None = None, trust: bool = False) -> Any:
    """A `torch.save` file read with `weights_only=True` (no code runs on load).

    A file that would run code is refused in one line naming what it references; with `trust_setting` (the
    option that allows it) the line names that option, and with `trust` the file is fully unpickled.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _BLOCKED_GLOBAL.search(str(err))
        if found is None:  # not a pickle at all
            raise UserError(f"cannot load {path} as a PyTorch {what} (it is not a torch.save file)") from None
        if not trust and trust_setting is None:
            raise UserError(
                f"refused {path}: loading it could run code (it references {found.group(1)}); only plain state dicts of tensors are read"
            ) from None
        if not trust:
            raise UserError(
                f"refused {path}: it does not load with weights_only=True (it references {found.group(1)}), so loading it "
                f"could run code; set {trust_setting}=true to unpickle it fully if you trust its source"
            ) from None
    except Exception as err:  # truncated files, non-torch files
        raise UserError(f"cannot load {path} as a PyTorch {what} ({type(err).__name__}: {str(err)[:200]})") from None
    warn(f"{trust_setting}=true: fully unpickling {path} (this can run code stored in the file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"cannot load {path} ({type(err).__name__}: {str(err)[:200]})") from None


def read_torch_weights(path: Path, *, entry: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A state dict saved with `torch.save`, read with `weights_only=True` (`load_torch_file`).

    `entry`: the keys leading to the state dict inside a saved dict (scBERT: ("model_state_dict",)).
    """
    state = load_torch_file(path)
    for key in entry:
        if not isinstance(state, dict) or key not in state:
            found = ", ".join(map(str, list(state)[:8])) if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{path} has no '{key}' entry (it holds: {found})")
        state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UserError(
            f"{path} is not a plain state dict: {', '.join(not_tensors[:5])} are not tensors "
            "(a training checkpoint? save model.state_dict())"
        )
    return state


def load_state_dict_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load every tensor of `model` from `state`; any missing, unexpected or mis-shaped key is an error.

    Silently skipped weights are the classic fine-tuning bug: a model that looks pretrained but is not.
    """
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    check_tensors(state, expected, source=f"checkpoint {source}", against="the model")
    model.load_state_dict(state, strict=True)


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *, source: str, against: str) -> None:
    """One UserError naming every missing, unexpected and mis-shaped tensor of `state` against `expected` shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} ({against.split()[-1]} expects {tuple(expected[key])})"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_some(misshaped)}")
    if problems:
        raise UserError(f"{source} does not match {against}: " + "; ".join(problems))


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)} tensor(s): {shown}" + (", ..." if len(items) > limit else "")
