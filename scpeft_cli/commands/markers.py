"""`scpeft markers run=RUN_DIR`: marker genes per cell state from the adapted model's last-layer attention
(scPEFT's method, `scpeft_cli/markers/scoring.py`), on the run's own cells or on `data.path`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from scpeft_cli import artifacts
from scpeft_cli.apply import overlap_summary
from scpeft_cli.assembly import load_trained
from scpeft_cli.backbones.base import LoadedBackbone
from scpeft_cli.backbones.scgpt import ScGPT
from scpeft_cli.commands.guard import guarded
from scpeft_cli.commands.predict import cells_for_run, finished_run
from scpeft_cli.console import console, info, warn
from scpeft_cli.errors import UserError
from scpeft_cli.markers import outputs
from scpeft_cli.markers.capture import attention_of
from scpeft_cli.markers.scoring import check_background, contrast, state_sums, top_genes
from scpeft_cli.paths import config_dir
from scpeft_cli.tokenizers.cache import tokenize_cells
from scpeft_cli.training.runtime import Runtime

NEW_DATA_TARGET = "scpeft_cli.data.loading.read_h5ad"  # conf/data/h5ad.yaml, the group markers.yaml starts from


@dataclass
class MarkersOptions:
    run: str
    batch_size: int
    device: str
    precision: str


@dataclass
class MarkerSettings:
    background: str
    top_k: int
    plot_genes: int
    include_zero_genes: bool | None


def cells_config(data: DictConfig, run_dir: Path) -> DictConfig:
    """The run's own data (its config.yaml) unless data.path or another data group is given; the states are
    data.label_key when given, else the run's labels. (`cells_for_run` then maps genes as the run did.)"""
    saved = run_dir / "config.yaml"
    trained = OmegaConf.load(saved).get("data") if saved.is_file() else None
    own = data.get("_target_") == NEW_DATA_TARGET and data.get("path") is None
    if own and trained is None:
        raise UserError(f"{run_dir} has no config.yaml recording its data; give the cells with data.path=IN.h5ad data.label_key=COLUMN")
    chosen = trained if own else data
    label_key = data.get("label_key") or (trained or {}).get("label_key")
    return OmegaConf.merge(chosen, {"label_key": label_key})


def marker_tokenizer(loaded: LoadedBackbone, include_zero_genes: bool | None):
    """The run's tokenizer, with every gene a token of every cell where asked; by default for scGPT, as
    scPEFT's marker notebook tokenises (`include_zero_gene=True`, no length limit)."""
    if include_zero_genes is None:
        if not isinstance(loaded.model, ScGPT):
            return loaded.tokenizer
        include_zero_genes = True
    if not hasattr(loaded.tokenizer, "include_zero_genes"):
        raise UserError(
            f"markers.include_zero_genes: {loaded.model.family}'s tokenizer has no tokens for unexpressed genes "
            "(they score 0); leave markers.include_zero_genes unset"
        )
    changes = {"include_zero_genes": include_zero_genes} | ({"max_seq_len": None} if include_zero_genes else {})
    return dataclasses.replace(loaded.tokenizer, **changes)


def gene_columns(tokenizer, genes: pd.Index, token_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The data genes that are tokens of some cell (the first gene of a token several genes map to), and
    the output column of each token id (-1: not a gene)."""
    ids = np.asarray(tokenizer.vocab.lookup([str(g) for g in genes]), dtype=np.int64)
    present = np.flatnonzero(np.isin(ids, token_ids))
    _, first = np.unique(ids[present], return_index=True)
    kept = np.sort(present[first])
    token_column = np.full(max(int(token_ids.max(initial=0)), int(ids.max(initial=0))) + 1, -1, dtype=np.int64)
    token_column[ids[kept]] = np.arange(len(kept))
    return [str(genes[i]) for i in kept], token_column


def markers(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    settings = cfg.markers
    if settings.top_k < 1 or settings.plot_genes < 1:
        raise UserError(f"markers.top_k ({settings.top_k}) and markers.plot_genes ({settings.plot_genes}) must be at least 1")
    source = finished_run(cfg.run)
    parts, saved = load_trained(source / "adapter")
    attention_of(parts.backbone.model)  # refuse a backbone without attention scores before reading data
    if not saved["pretrained"]:
        warn("this run's backbone was RANDOMLY INITIALISED: its attention carries no pretrained knowledge")
    data = cells_config(cfg.data, source)
    if data.get("label_key") is None:
        raise UserError("no cell states: neither the run's data nor data.label_key names a label column; set data.label_key=COLUMN")
    cells = cells_for_run(data, source)
    labels = cells.obs["label"].cat.remove_unused_categories()
    states = [str(s) for s in labels.cat.categories]
    check_background(settings.background, states)

    tokenizer = marker_tokenizer(parts.backbone, settings.include_zero_genes)
    tokens = tokenize_cells(tokenizer, cells, seed=saved["seed"])
    genes, token_column = gene_columns(tokenizer, cells.var_names, tokens.gene_ids)
    info(f"scoring {len(genes)} genes in {len(tokens)} cells (median {int(np.median(tokens.lengths))} tokens a cell), {len(states)} states")
    sums = state_sums(
        parts, tokens, collate=tokenizer.collate, token_column=token_column, n_genes=len(genes), states=labels.cat.codes.to_numpy(), n_states=len(states),
        inputs=parts.task.inputs(cells, saved), runtime=Runtime.create(device=cfg.device, precision=cfg.precision), batch_size=cfg.batch_size,
    )  # fmt: skip
    n_cells = labels.value_counts().reindex(states)
    means = pd.DataFrame(sums / n_cells.to_numpy()[:, None], index=states, columns=genes)
    scores, background = contrast(means, n_cells, settings.background)
    top = top_genes(scores, settings.top_k)

    params = {
        "run": str(source.resolve()),
        "backbone": saved["backbone"]["name"],
        "strategy": saved.get("peft_option", parts.strategy.name),
        "pretrained": saved["pretrained"],
        "label_key": str(data.label_key),
        "background": settings.background,
        "top_k": settings.top_k,
        "include_zero_genes": bool(getattr(tokenizer, "include_zero_genes", False)),
        "n_cells": len(tokens),
        "gene_overlap": overlap_summary(tokens),
        "score": "mean over the state's cells of the last layer's rank-normalised (rows, then columns) q.k^T of "
                 "the <cls> / pooled query, averaged over heads, minus the background's mean",
    }  # fmt: skip
    outputs.write_table(run_dir / "markers.csv", top, means, background)
    artifacts.write_h5ad(run_dir / "markers.h5ad", outputs.states_by_genes(scores, means, background, n_cells, params))
    versus = {"rest": "rest", "none": "no background"}.get(settings.background, settings.background)
    outputs.plot_heatmap(
        run_dir / "markers.png", scores, top, per_state=min(settings.plot_genes, settings.top_k),
        title=f"attention markers of obs['{data.label_key}'] vs {versus} ({params['backbone']} + {params['strategy']})",
        label="attention score" if settings.background == "none" else "attention score, state - background",
    )  # fmt: skip
    for state, group in top.groupby("state", sort=False):
        console.print(f"[bold]{state}[/]: {', '.join(group['gene'].head(5))}{', ...' if len(group) > 5 else ''}")
    console.print(f"wrote {run_dir / 'markers.csv'}, markers.h5ad and markers.png")
    return top


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="markers")
def main(cfg: DictConfig) -> None:
    guarded(markers, options={"": MarkersOptions, "markers": MarkerSettings})(cfg)
