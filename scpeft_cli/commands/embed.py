"""`scpeft embed`: cell embeddings from a backbone (zero-shot) or a trained run into obsm["X_scpeft"]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig
from sklearn.preprocessing import normalize

from scpeft_cli.apply import (
    check_output_path,
    overlap_summary,
    run_model,
    write_annotated_copy,
)
from scpeft_cli.assembly import build_backbone, load_trained
from scpeft_cli.commands.guard import guarded
from scpeft_cli.commands.predict import cells_for_run, finished_run
from scpeft_cli.console import console, warn
from scpeft_cli.instantiate import instantiate
from scpeft_cli.paths import config_dir
from scpeft_cli.tokenizers.cache import tokenize_cells


@dataclass
class EmbedOptions:
    run: str | None
    output: str
    overwrite: bool
    normalize: bool | None
    seed: int
    batch_size: int
    device: str
    precision: str


def embed(cfg: DictConfig, _run_dir: Path) -> None:
    output = check_output_path(input_path=cfg.data.path, output=cfg.output, overwrite=cfg.overwrite)
    if cfg.run:
        run_dir = finished_run(cfg.run)
        cells = cells_for_run(cfg.data, run_dir)
        parts, saved = load_trained(run_dir / "adapter")
        backbone, module, seed, source = parts.backbone, parts.model, saved["seed"], f"run {cfg.run} ({saved.get('peft_option', parts.strategy.name)})"
        inputs = parts.task.inputs(cells, saved)  # e.g. the batches of an integration run's DSBN
        forward = lambda batch: {"x": module.embed(batch)}  # noqa: E731
    else:
        cells = instantiate(cfg.data)
        backbone = build_backbone(cfg, cells=cells)
        module, seed, source, inputs = backbone.model, cfg.seed, f"backbone {cfg.backbone.name}", {}
        forward = lambda batch: {"x": module.cell_embedding(module(batch), batch)}  # noqa: E731
    if not backbone.pretrained:
        warn("the backbone is RANDOMLY INITIALISED: these embeddings carry no pretrained knowledge")
    tokens = tokenize_cells(backbone.tokenizer, cells, seed=seed)
    embeddings = run_model(module, forward, tokens, backbone.tokenizer.collate, cfg=cfg, inputs=inputs)["x"]
    normalized = backbone.model.zero_shot_l2_normalized if cfg.normalize is None else bool(cfg.normalize)
    if normalized:
        embeddings = normalize(embeddings)
    uns = {
        "source": source,
        "pretrained": backbone.pretrained,
        "checkpoint": backbone.checkpoint,
        "gene_overlap": overlap_summary(tokens),
        "gene_mapping": cells.uns["scpeft_input"].get("gene_mapping"),
        "params": {"normalize": normalized, "seed": seed},
    }
    write_annotated_copy(input_path=cfg.data.path, output=output, cells=cells, obs={}, embeddings=embeddings, uns=uns)
    console.print(f"embedded {cells.n_obs} cells ({embeddings.shape[1]} dimensions) from {source}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="embed")
def main(cfg: DictConfig) -> None:
    guarded(embed, options={"": EmbedOptions})(cfg)
