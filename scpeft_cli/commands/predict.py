"""`scpeft predict run=RUN_DIR data.path=IN.h5ad output=OUT.h5ad`: annotate new cells with a trained run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from scpeft_cli import artifacts
from scpeft_cli.apply import (
    check_output_path,
    overlap_summary,
    restrict_to_training_genes,
    run_model,
    write_annotated_copy,
)
from scpeft_cli.assembly import load_trained
from scpeft_cli.commands.guard import guarded
from scpeft_cli.console import console, info, warn
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.paths import config_dir
from scpeft_cli.tokenizers.cache import tokenize_cells

GENE_MAPPING_KEYS = ("species", "ortholog_table", "one_to_many")


@dataclass
class PredictOptions:
    run: str
    output: str
    overwrite: bool
    batch_size: int
    device: str
    precision: str


def finished_run(run: str) -> Path:
    run_dir = Path(run).expanduser()
    if not (run_dir / "adapter").is_dir():
        raise UserError(f"{run_dir} is not a run dir: it has no adapter/ folder (give a `scpeft train` output dir)")
    if not (run_dir / "metrics.json").is_file():
        raise UserError(f"{run_dir} did not finish (no metrics.json); its adapter may not be the best model")
    return run_dir


def data_config_of_run(data: DictConfig, run_dir: Path) -> DictConfig:
    """New cells have their genes mapped as the run's own data had (its config.yaml: data.species,
    data.ortholog_table, data.one_to_many), unless data.species or data.ortholog_table is given."""
    saved = run_dir / "config.yaml"
    if data.get("species") or data.get("ortholog_table") or not saved.is_file():
        return data
    trained = OmegaConf.load(saved).get("data") or {}
    if not (trained.get("species") or trained.get("ortholog_table")):
        return data
    mapping = {key: trained.get(key) for key in GENE_MAPPING_KEYS if key in trained}
    info(f"mapping genes as the run did: {', '.join(f'data.{k}={v}' for k, v in mapping.items() if v is not None)}")
    return OmegaConf.merge(data, mapping)


def cells_for_run(data: DictConfig, run_dir: Path):
    """New cells read as the run read its own: genes mapped as it mapped them (`data_config_of_run`),
    then restricted to its training genes."""
    return restrict_to_training_genes(instantiate(data_config_of_run(data, run_dir)), run_dir / "adapter")


def predict(cfg: DictConfig, _run_dir: Path) -> None:
    run_dir = finished_run(cfg.run)
    output = check_output_path(input_path=cfg.data.path, output=cfg.output, overwrite=cfg.overwrite)
    parts, saved = load_trained(run_dir / "adapter")
    if "classes" not in saved:
        raise UserError(f"{run_dir} is a {parts.task.name} run, which predicts no labels; `scpeft embed run={run_dir}` gives its cell embeddings")
    if not saved["pretrained"]:
        warn("this run's backbone was RANDOMLY INITIALISED: its predictions are not those of a pretrained model")
    cells = cells_for_run(cfg.data, run_dir)
    tokens = tokenize_cells(parts.backbone.tokenizer, cells, seed=saved["seed"])
    model = parts.model
    out = run_model(model, lambda batch: dict(zip(("logits", "embeddings"), model(batch), strict=True)), tokens, parts.backbone.tokenizer.collate, cfg=cfg)
    logits = out["logits"]
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    classes = np.asarray(saved["classes"])
    labels, confidence = classes[probabilities.argmax(axis=1)], probabilities.max(axis=1)
    uns = {
        "run": str(run_dir.resolve()),
        "backbone": saved["backbone"]["name"],
        "strategy": saved.get("peft_option", parts.strategy.name),
        "pretrained": saved["pretrained"],
        "classes": list(classes),
        "gene_overlap": overlap_summary(tokens),
        "gene_mapping": cells.uns["scpeft_input"].get("gene_mapping"),
        "params": {"seed": saved["seed"], "peft": saved["peft"], "backbone": saved["backbone"]},
    }
    write_annotated_copy(
        input_path=cfg.data.path, output=output, cells=cells,
        obs={"scpeft_label": labels, "scpeft_confidence": confidence}, embeddings=out["embeddings"], uns=uns,
    )
    table = pd.DataFrame({"cell_id": cells.obs_names, "scpeft_label": labels, "scpeft_confidence": confidence})
    if "label" in cells.obs:
        table.insert(1, "label", cells.obs["label"].astype(str).to_numpy())
        console.print(f"agreement with obs['{cfg.data.label_key}']: {np.mean(table['label'] == table['scpeft_label']):.3f}")
    artifacts.write_csv(output.with_suffix(".csv"), table)
    console.print(f"predicted {len(table)} cells; wrote {output} and {output.with_suffix('.csv')}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    guarded(predict, options={"": PredictOptions})(cfg)
