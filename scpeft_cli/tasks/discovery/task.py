"""Cell population discovery (scPEFT's tutorial): the backbone is adapted without labels, by masked expression
prediction (GEP), expression from the cell embedding (MVC) and elastic cell similarity (ECS), with the mask
ratio drawn per epoch; the adapted embedding is then clustered (Leiden) and the clusters scored against the
labels when there are any, next to the frozen backbone and PCA.

It is integration's adaptation without batches, so it reuses that task's objectives, head and validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import normalize

from scpeft_cli import artifacts
from scpeft_cli.console import console
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.base import RunContext, TaskData
from scpeft_cli.tasks.discovery.clustering import cluster_embedding
from scpeft_cli.tasks.discovery.outputs import CLUSTER_COLUMN, cluster_markers, plot_clusters_umap
from scpeft_cli.tasks.integration.baselines import pca_embedding
from scpeft_cli.tasks.integration.outputs import write_embeddings
from scpeft_cli.tasks.integration.task import IntegrationTask

EMBEDDINGS = {"scpeft": "X_scpeft", "zero_shot": "X_zero_shot", "pca": "X_pca"}


@dataclass
class DiscoveryTask(IntegrationTask):
    """Adapt on all cells without labels; `val_fraction` of them (at random) pick the best epoch by their
    masked expression loss (always at `objectives.mask_ratio`, so epochs compare); labels
    (`data.label_key`, optional) only score the clusters."""

    mask_ratios: list[float] = field(default_factory=lambda: [0.15, 0.25, 0.4])
    head: str = "discovery"
    include_zero_genes: bool = False
    max_seq_len: int = 3001

    @dataclass
    class Evaluation:
        baselines: bool
        umap: bool
        n_neighbors: int
        resolution: float
        n_marker_genes: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights.dab or self.weights.dsbn:
            raise UserError("task=discovery has no batches: set task.objectives.dab=false and task.objectives.dsbn=false")
        self.mask_ratios = [float(r) for r in self.mask_ratios]
        if not self.mask_ratios or not all(0 < r <= 1 for r in self.mask_ratios):
            raise UserError(f"task.mask_ratios must be a non-empty list of ratios in (0, 1], got {self.mask_ratios}")
        self._seed = 0

    # ------------------------------------------------------------------------------ the contract
    def load(self, cfg: DictConfig) -> TaskData:
        adata = instantiate(cfg.data)
        self._seed = int(cfg.seed)
        train, val = train_test_split(np.arange(adata.n_obs), test_size=self.val_fraction, random_state=cfg.seed)
        index = {"train": np.sort(train), "val": np.sort(val), "all": np.arange(adata.n_obs)}
        labelled = "label" in adata.obs
        console.print(
            f"discovery: {adata.n_obs} cells, {adata.n_vars} genes; {len(index['train'])} train, {len(index['val'])} "
            f"held out to pick the best epoch; labels: {cfg.data.label_key if labelled else 'none (clusters only)'}"
        )
        return TaskData(adata=adata, index=index, head_settings={"batches": []})

    def head_settings_from_config(self) -> dict[str, Any] | None:
        return {"batches": []}

    def describe_head(self, settings: dict[str, Any]) -> str:
        return "expression decoders (GEP, MVC)"

    def training_mask_ratio(self, trainer) -> float:
        """One of `mask_ratios` per epoch, drawn from (seed, epoch): the same on a resumed run."""
        epoch = getattr(trainer, "epoch", 0)
        return float(self.mask_ratios[np.random.default_rng([self._seed, epoch]).integers(len(self.mask_ratios))])

    def finish(self, run: RunContext) -> dict[str, Any]:
        cfg, data, model = run.cfg, run.data, run.parts.model
        model.eval()
        embedding = run.trainer.runtime.collect(lambda batch: {"x": model.embed(batch)}, run.loader("all"))["x"]
        cells = data.adata.copy()
        normalised = run.backbone.model.zero_shot_l2_normalized
        cells.obsm["X_scpeft"] = normalize(embedding) if normalised else embedding
        if cfg.evaluation.baselines:
            cells.obsm["X_zero_shot"] = run.before["zero_shot"]
            cells.obsm["X_pca"] = pca_embedding(cells.X, seed=cfg.seed)
        labels = cells.obs["label"].to_numpy() if "label" in cells.obs else None
        scores = {}
        for name, key in EMBEDDINGS.items():
            if key not in cells.obsm:
                continue
            found = cluster_embedding(cells.obsm[key], labels, resolution=cfg.evaluation.resolution,
                                      n_neighbors=cfg.evaluation.n_neighbors, seed=cfg.seed)  # fmt: skip
            scores[name] = found.scores
            column = CLUSTER_COLUMN if name == "scpeft" else f"{name}_cluster"
            cells.obs[column] = pd.Categorical(found.clusters, categories=sorted(set(found.clusters), key=int))
        self._write(run, cells, scores, label_key="label" if labels is not None else None)
        last = run.fit.history[-1]
        results = {**scores["scpeft"], **{f"final_{key}": value for key, value in last.items() if key.startswith("train_")},
                   "n_cells": cells.n_obs, "n_genes": cells.n_vars}  # fmt: skip
        for name, values in scores.items():
            console.print(f"  {name:<10} " + "  ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()))
        baselines = {name: values for name, values in scores.items() if name != "scpeft"}
        return {"results": results, "best": {f"best_{key}": run.fit.history[run.fit.best_epoch - 1][key] for key in self.monitors},
                "baselines": baselines or None}  # fmt: skip

    def summary(self, metrics: dict[str, Any]) -> str:
        scored = "  ".join(f"{key} {metrics[key]:.3f}" for key in ("nmi", "ari") if key in metrics)
        return f"[bold]all cells[/] {metrics['n_clusters']} clusters  {scored}".rstrip()

    # ------------------------------------------------------------------------------ outputs
    def _write(self, run: RunContext, cells, scores: dict[str, dict[str, float]], *, label_key: str | None) -> None:
        cfg = run.cfg
        columns = [c for c in (CLUSTER_COLUMN, "zero_shot_cluster", "pca_cluster") if c in cells.obs]
        table = cells.obs[columns].copy()
        if label_key:
            table["label"] = cells.obs[label_key]
        artifacts.write_csv(run.run_dir / "clusters.csv", table.rename_axis("cell_id").reset_index())
        artifacts.write_csv(run.run_dir / "cluster_markers.csv", cluster_markers(cells, n_genes=cfg.evaluation.n_marker_genes))
        write_embeddings(run.run_dir / "embeddings.h5ad", cells, metrics=scores, title=run.title, task=self.name)
        if cfg.evaluation.umap:
            plot_clusters_umap(run.run_dir / "umap.png", cells, label_key=label_key, seed=cfg.seed, title=run.title)
