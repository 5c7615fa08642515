"""Batch integration (scPEFT's batch correction, scGPT's integration tutorial): the backbone is adapted with
masked expression objectives (GEP, MVC), elastic cell similarity (ECS), an adversarial batch classifier (DAB)
and domain-specific batch norm (DSBN), and its cell embeddings are scored with scib's metrics on all cells,
next to unintegrated PCA, Harmony and the frozen backbone's zero-shot embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import normalize

from scpeft_cli.console import console, info, warn
from scpeft_cli.data.loading import BATCH_COLUMN
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.base import RunContext, Task, TaskData
from scpeft_cli.tasks.integration.baselines import harmony_embedding, missing_harmony, pca_embedding
from scpeft_cli.tasks.integration.heads import BATCH_IDS, IntegrationHead
from scpeft_cli.tasks.integration.metrics import integration_scores, pc_regression
from scpeft_cli.tasks.integration.objectives import (
    ObjectiveWeights,
    dab_loss,
    ecs_loss,
    gep_loss,
    integration_loss,
    mask_values,
    mvc_loss,
    zero_prob_nll,
)
from scpeft_cli.tasks.integration.outputs import plot_integration_umap, write_embeddings
from scpeft_cli.tasks.pretrained_heads import load_pretrained_heads

HEADLINE = ("avg_bio", "avg_batch", "overall")
EMBEDDINGS = {"scpeft": "X_scpeft", "pca": "X_pca", "harmony": "X_harmony", "zero_shot": "X_zero_shot"}


@dataclass
class IntegrationTask(Task):
    """Integrate the batches named by `data.batch_key`; labels (`data.label_key`, optional) only score bio
    conservation. `val_fraction` of the cells (stratified by batch) picks the best epoch by their masked
    expression loss; the metrics are computed on all cells."""

    objectives: dict[str, Any] = field(default_factory=dict)  # `ObjectiveWeights` switches and weights
    val_fraction: float = 0.1
    include_zero_genes: bool = True
    max_seq_len: int = 1201
    head: str = "integration"
    n_batches: int | None = None  # taken from the data; set it for `scpeft describe` without data

    @dataclass
    class Evaluation:
        baselines: bool
        umap: bool
        n_neighbors: int

    sweep_metric = "best_val_gep"
    backbone_features = ("expression_values",)

    def __post_init__(self) -> None:
        known = {f.name for f in fields(ObjectiveWeights)}
        unknown = sorted(set(self.objectives) - known)
        if unknown:
            raise UserError(f"unknown setting task.objectives.{unknown[0]}; task.objectives accepts: {', '.join(sorted(known))}")
        try:
            self.weights = ObjectiveWeights(**self.objectives)
        except ValueError as err:
            raise UserError(f"task.objectives: {err}") from None
        if not self.weights.enabled():
            raise UserError("task.objectives: every objective is off; switch on at least one of gep, mvc, ecs, dab")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"task.val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def monitors(self) -> dict[str, int]:
        return {"val_loss": -1, **({"val_gep": -1} if self.weights.gep else {})}

    @property
    def tokenizer_options(self) -> dict[str, Any]:
        return {"include_zero_genes": self.include_zero_genes, "max_seq_len": self.max_seq_len}

    # ------------------------------------------------------------------------------ the contract
    def load(self, cfg: DictConfig) -> TaskData:
        if not cfg.data.get("batch_key"):
            raise UserError("task=integration needs data.batch_key=COL, the obs column naming each cell's batch")
        adata = instantiate(cfg.data)
        batches = adata.obs[BATCH_COLUMN]
        names = [str(name) for name in batches.cat.categories]
        if len(names) < 2:
            raise UserError(f"the batch column '{cfg.data.batch_key}' has a single value ({names[0]}); integration needs at least two batches")
        sizes = batches.value_counts()
        lonely = sorted(str(name) for name in sizes.index[sizes < 2])
        if lonely:
            raise UserError(f"batch(es) {', '.join(lonely[:5])} of '{cfg.data.batch_key}' hold a single cell; every batch needs at least 2 cells (drop or merge them)")
        codes = batches.cat.codes.to_numpy().astype(np.int64)
        train, val = train_test_split(np.arange(adata.n_obs), test_size=self.val_fraction, stratify=codes, random_state=cfg.seed)
        index = {"train": np.sort(train), "val": np.sort(val), "all": np.arange(adata.n_obs)}
        labelled = "label" in adata.obs
        console.print(
            f"integration: {adata.n_obs} cells in {len(names)} batches; {len(index['train'])} train, "
            f"{len(index['val'])} held out to pick the best epoch; labels: {cfg.data.label_key if labelled else 'none (batch metrics only)'}"
        )
        return TaskData(adata=adata, index=index, targets={BATCH_IDS: codes}, head_settings={"batches": names})

    def build_head(self, kind: str, backbone, settings: dict[str, Any]) -> IntegrationHead:
        if kind != self.head:
            raise UserError(f"task={self.name} has no '{kind}' head (its head is '{self.head}': scGPT's expression decoders); choose another strategy")
        return IntegrationHead(backbone.model.d_model, len(settings["batches"]), self.weights)

    def initialise_head(self, head: IntegrationHead, backbone) -> None:
        load_pretrained_heads(head, backbone.heads, source=backbone.checkpoint)

    def head_settings_from_config(self) -> dict[str, Any] | None:
        return {"batches": [f"batch{i}" for i in range(self.n_batches)]} if self.n_batches else None

    def describe_head(self, settings: dict[str, Any]) -> str:
        return f"{len(settings['batches'])} batches"

    def inputs(self, adata, settings: dict[str, Any]) -> dict[str, np.ndarray]:
        """The training batch codes of new cells, which DSBN needs (its statistics are per batch)."""
        if not self.weights.dsbn:
            return {}
        known = list(settings["batches"])
        if BATCH_COLUMN not in adata.obs:
            raise UserError(f"this run normalises each batch with its own statistics (DSBN): give data.batch_key=COL naming the cells' batches, among {', '.join(known[:5])}")
        batches = adata.obs[BATCH_COLUMN].astype(str)
        unknown = sorted(set(batches) - set(known))
        if unknown:
            raise UserError(f"batch(es) {', '.join(unknown[:5])} were not in training; DSBN has statistics only for {', '.join(known[:5])} (train with task.objectives.dsbn=false to embed new batches)")
        return {BATCH_IDS: np.asarray([known.index(b) for b in batches], dtype=np.int64)}

    def objective(self, data: TaskData, trainer):
        def loss(model, batch):
            masked, mask = self._mask(batch, generator=None, ratio=self.training_mask_ratio(trainer))
            parts = self._parts(model({**batch, "values": masked}), batch, mask)
            total, _ = integration_loss(parts, self.weights)
            return total, {name: value.detach() for name, value in parts.items()}  # unweighted, as validation logs them

        return loss

    def validate(self, data: TaskData, trainer, loader):
        def scores(model) -> dict[str, float]:
            losses = self._losses(model, loader, trainer, generator=torch.Generator().manual_seed(0))
            return {"val_loss": sum(self.weights.enabled()[name] * value for name, value in losses.items()),
                    **{f"val_{name}": value for name, value in losses.items()}}  # fmt: skip

        return scores

    def before_training(self, cfg: DictConfig, data: TaskData, backbone, trainer, loader) -> dict[str, Any]:
        if not cfg.evaluation.baselines:
            return {}
        info("embedding all cells with the frozen backbone (zero-shot baseline)")
        embedding = trainer.embed(backbone.model, loader("all"))
        return {"zero_shot": normalize(embedding) if backbone.model.zero_shot_l2_normalized else embedding}

    def finish(self, run: RunContext) -> dict[str, Any]:
        cfg, data, model = run.cfg, run.data, run.parts.model
        model.eval()
        embedding = run.trainer.runtime.collect(lambda batch: {"x": model.embed(batch)}, run.loader("all"))["x"]
        cells = data.adata.copy()
        cells.obsm["X_scpeft"] = normalize(embedding) if run.backbone.model.zero_shot_l2_normalized else embedding
        cells.obsm["X_pca"] = pca_embedding(cells.X, seed=cfg.seed)
        if cfg.evaluation.baselines:
            cells.obsm["X_zero_shot"] = run.before["zero_shot"]
            hint = missing_harmony()
            if hint:
                warn(hint)
            else:
                cells.obsm["X_harmony"] = harmony_embedding(cells.obsm["X_pca"], cells.obs[BATCH_COLUMN], seed=cfg.seed)
        label_key = "label" if "label" in cells.obs else None
        unintegrated = pc_regression(cells.X, cells.obs[BATCH_COLUMN])  # shared by every embedding's PCR batch
        scores = {
            name: integration_scores(cells, embedding_key=key, batch_key=BATCH_COLUMN, label_key=label_key,
                                     n_neighbors=cfg.evaluation.n_neighbors, random_state=cfg.seed,
                                     unintegrated_pcr=unintegrated)
            for name, key in EMBEDDINGS.items() if key in cells.obsm
        }  # fmt: skip
        last = run.fit.history[-1]
        best = run.fit.history[run.fit.best_epoch - 1]
        results = {
            **{key: scores["scpeft"][key] for key in HEADLINE if key in scores["scpeft"]},  # what `report` shows first
            **scores["scpeft"],
            **{f"final_{key}": value for key, value in last.items() if key.startswith("train_")},
            "n_cells": cells.n_obs, "n_batches": len(data.head_settings["batches"]), "n_genes": cells.n_vars,
        }  # fmt: skip
        write_embeddings(run.run_dir / "embeddings.h5ad", cells, metrics=scores, title=run.title)
        if cfg.evaluation.umap:
            plot_integration_umap(run.run_dir / "umap.png", cells, label_key=label_key, seed=cfg.seed, title=run.title)
        self._print_baselines(scores)
        baselines = {name: values for name, values in scores.items() if name != "scpeft"}
        return {"results": results, "best": {f"best_{key}": best[key] for key in self.monitors},
                "baselines": baselines or None}  # fmt: skip

    def summary(self, metrics: dict[str, Any]) -> str:
        bio = f"avg_bio {metrics['avg_bio']:.3f}  " if "avg_bio" in metrics else ""
        return f"[bold]all cells[/] {bio}avg_batch {metrics['avg_batch']:.3f}" + (
            f"  overall {metrics['overall']:.3f}" if "overall" in metrics else ""
        )

    # ------------------------------------------------------------------------------ objectives
    def training_mask_ratio(self, trainer) -> float:
        """The share of values masked in this training step (validation always masks `mask_ratio`)."""
        return self.weights.mask_ratio

    def _mask(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None, ratio: float | None = None):
        ratio = self.weights.mask_ratio if ratio is None else ratio
        return mask_values(batch["values"], batch["padding_mask"], mask_ratio=ratio,
                           mask_value=self.weights.mask_value, generator=generator)  # fmt: skip

    def _parts(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each switched-on objective's unweighted loss for one batch (targets: the unmasked values)."""
        values, parts = batch["values"], {}
        if "gep" in out:
            parts["gep"] = gep_loss(out["gep"], values, mask)
        if "gep_zero" in out:
            parts["gep_zero"] = zero_prob_nll(out["gep_zero"], values, mask)
        if "mvc" in out:
            parts["mvc"] = mvc_loss(out["mvc"], values, mask)
        if "mvc_zero" in out:
            parts["mvc_zero"] = zero_prob_nll(out["mvc_zero"], values, mask)
        if self.weights.ecs:
            parts["ecs"] = ecs_loss(out["embedding"], self.weights.ecs_threshold)
        if "dab" in out:
            parts["dab"] = dab_loss(out["dab"], batch[BATCH_IDS])
        return parts

    def _losses(self, model, loader, trainer, *, generator: torch.Generator) -> dict[str, float]:
        """Each objective's loss over `loader`, the mean over cells of their batch's loss (as upstream's
        evaluation), with masks drawn from `generator` so every epoch scores the same masked values."""
        model.eval()

        def forward(batch):
            masked, mask = self._mask(batch, generator=generator)
            parts = self._parts(model({**batch, "values": masked}), batch, mask)
            return {name: value.float().reshape(1).expand(len(mask)) for name, value in parts.items()}

        return {name: float(values.mean()) for name, values in trainer.runtime.collect(forward, loader).items()}

    @staticmethod
    def _print_baselines(scores: dict[str, dict[str, float]]) -> None:
        keys = [key for key in ("avg_bio", "avg_batch", "overall") if key in scores["scpeft"]]
        for name, values in scores.items():
            console.print(f"  {name:<10} " + "  ".join(f"{key} {values[key]:.3f}" for key in keys))
