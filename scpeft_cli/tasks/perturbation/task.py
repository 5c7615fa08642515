"""Perturbation response prediction (scPEFT's perturbation task, scGPT's perturbation tutorial, GEARS-style):
from a control cell and the flags of a condition's perturbed genes, predict the cell's expression after the
perturbation. A condition's prediction is the mean over the control cells fed with its flags; it is scored
against the mean of the condition's real cells (scGPT's metrics, GEARS' DE genes), on conditions never seen
in training, next to the control-mean, perturbed-mean and additive baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from scpeft_cli import artifacts
from scpeft_cli.console import console, info
from scpeft_cli.data.conditions import CONTROL, NOTATION, perturbed_genes
from scpeft_cli.data.loading import CONDITION_COLUMN
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.base import RunContext, Task, TaskData
from scpeft_cli.tasks.perturbation.baselines import baseline_predictions
from scpeft_cli.tasks.perturbation.heads import (
    CONDITION_IDS,
    TARGET_CELLS,
    PerturbationHead,
    perturbed_columns,
    token_columns,
)
from scpeft_cli.tasks.perturbation.metrics import METRICS, per_condition_table, summarise, top_de_genes
from scpeft_cli.tasks.perturbation.outputs import plot_de_deltas, write_predictions
from scpeft_cli.tasks.perturbation.pairs import pair_with_controls
from scpeft_cli.tasks.perturbation.splits import perturbation_split, split_summary
from scpeft_cli.tasks.pretrained_heads import load_pretrained_heads

PREDICTOR = "scpeft"  # the model's rows in per_condition.csv, beside the baselines'


@dataclass
class _Screen:
    """The perturbation data behind the examples: every cell (targets are rows of its matrix), the split,
    each condition's true mean (what its prediction is scored against, computed once) and top DE genes."""

    cells: Any
    split: Any
    means: dict[str, np.ndarray]
    de: dict[str, np.ndarray]

    @property
    def control_mean(self) -> np.ndarray:
        return self.means[CONTROL]

    def truth(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.cells.X[rows].todense(), dtype=np.float32)

    def condition_means(self, names) -> dict[str, np.ndarray]:
        return {c: self.means[c] for c in names}


@dataclass
class PerturbationTask(Task):
    """Predict perturbed expression from control cells and perturbation flags (`data.condition_key`, GEARS
    notation). The best epoch is picked on the validation conditions (`trainer.monitor=val_pearson`, upstream;
    or val_pearson_delta); test conditions are scored with their subgroup (unseen single, combo seen 0/1/2)."""

    head: str = "perturbation"
    n_de_genes: int = 20

    @dataclass
    class Evaluation:
        baselines: bool
        plot: bool
        n_plot_conditions: int

    monitors = {"val_loss": -1, "val_pearson": 1, "val_pearson_delta": 1}
    sweep_metric = "best_val_pearson"
    backbone_features = ("gene_values",)

    def __post_init__(self) -> None:
        if self.n_de_genes < 1:
            raise UserError(f"task.n_de_genes must be >= 1, got {self.n_de_genes}")
        self._screen: _Screen | None = None

    # ------------------------------------------------------------------------------ the contract
    def load(self, cfg: DictConfig) -> TaskData:
        if not cfg.data.get("condition_key"):
            raise UserError(f"task=perturbation needs data.condition_key=COL, the obs column of each cell's perturbation ({NOTATION})")
        target = str(cfg.split.get("_target_", ""))
        if not target.endswith(perturbation_split.__name__):
            raise UserError(f"task=perturbation splits conditions, not cells: use split=perturbation (this run has split {target.rsplit('.', 1)[-1]})")
        cells = instantiate(cfg.data)
        split = instantiate(cfg.split, _partial_=True)(conditions=cells.obs[CONDITION_COLUMN].to_numpy(), seed=cfg.seed)
        console.print(split_summary(split))
        examples, target_cells, index = pair_with_controls(cells, split, seed=cfg.seed)
        conditions = sorted(set(cells.obs[CONDITION_COLUMN]))
        code = {name: i for i, name in enumerate(conditions)}
        info(f"finding the top {self.n_de_genes} DE genes of each condition vs control (scanpy rank_genes_groups, as GEARS)")
        labels = cells.obs[CONDITION_COLUMN].to_numpy()
        is_control = labels == CONTROL
        self._screen = _Screen(
            cells=cells, split=split,
            means={c: np.asarray(cells.X[labels == c].mean(axis=0)).ravel() for c in conditions},
            de=top_de_genes(cells, condition_column=CONDITION_COLUMN, control=CONTROL, n_genes=self.n_de_genes),
        )  # fmt: skip
        targets = {
            CONDITION_IDS: examples.obs[CONDITION_COLUMN].map(code).to_numpy(dtype=np.int64),
            TARGET_CELLS: target_cells.astype(np.int64),
        }
        console.print(
            f"perturbation: {cells.n_obs} cells, {int(is_control.sum())} control, {len(conditions) - 1} perturbations "
            f"over {cells.n_vars} genes; examples " + ", ".join(f"{s} {len(index[s])}" for s in index)
        )
        return TaskData(adata=examples, index=index, targets=targets,
                        head_settings={"genes": list(map(str, cells.var_names)), "conditions": conditions})  # fmt: skip

    def build_head(self, kind: str, backbone, settings: dict[str, Any]) -> PerturbationHead:
        if kind != self.head:
            raise UserError(f"task=perturbation has no '{kind}' head (its head is '{self.head}': flag embedding + expression decoder); choose another strategy")
        genes, conditions = settings["genes"], settings["conditions"]
        columns, perturbed = token_columns(backbone.tokenizer.vocab, genes), perturbed_columns(conditions, genes)
        unseen = sorted({genes[c] for c in perturbed[perturbed >= 0]} - {genes[c] for c in columns[columns >= 0]})
        if unseen:
            raise UserError(
                f"{len(unseen)} perturbed gene(s) are not in the model's vocabulary, so no token could carry their flag: "
                f"{', '.join(unseen[:5])}; remove those conditions from the data"
            )
        return PerturbationHead(backbone.model.d_model, columns, perturbed)

    def initialise_head(self, head: PerturbationHead, backbone) -> None:
        load_pretrained_heads(head, backbone.heads, source=backbone.checkpoint)

    def head_settings_from_config(self) -> dict[str, Any] | None:
        return {"genes": [], "conditions": [CONTROL]}  # the head's size does not depend on the data

    def describe_head(self, settings: dict[str, Any]) -> str:
        return "perturbation flags + expression decoder"

    def objective(self, data: TaskData, trainer):
        def loss(model, batch):
            mse = self._mse(model(batch), batch)
            return mse, {"mse": mse.detach()}

        return loss

    def validate(self, data: TaskData, trainer, loader):
        def scores(model) -> dict[str, float]:
            predicted, mse = self._predict(model, loader, trainer)
            rows = data.index["val"]
            table = self._table("val", data, rows, predicted)
            summary = summarise(table)
            return {"val_loss": mse, "val_pearson": summary["pearson"], "val_pearson_delta": summary["pearson_delta"],
                    "val_pearson_de_delta": summary["pearson_de_delta"]}  # fmt: skip

        return scores

    def finish(self, run: RunContext) -> dict[str, Any]:
        cfg, data, screen = run.cfg, run.data, self._require_screen()
        predicted, _ = self._predict(run.parts.model, run.loader("test"), run.trainer)
        rows = data.index["test"]
        tables = {PREDICTOR: self._table("test", data, rows, predicted)}
        test = list(screen.split.conditions["test"])
        if cfg.evaluation.baselines:
            train_cells = np.flatnonzero(np.isin(screen.cells.obs[CONDITION_COLUMN], screen.split.conditions["train"]))
            guesses = baseline_predictions(screen.cells.X[train_cells], screen.cells.obs[CONDITION_COLUMN].to_numpy()[train_cells], test)
            for name, guess in guesses.items():
                tables[name] = self._score("test", dict(zip(test, guess, strict=True)))
        per_condition = pd.concat([table.assign(predictor=name) for name, table in tables.items()], ignore_index=True)
        artifacts.write_csv(run.run_dir / "per_condition.csv", per_condition[["predictor", "condition", "subgroup", *METRICS]])

        means = self._example_means(data, rows, predicted)
        truth = screen.condition_means(test)
        stacked = {"predicted": np.stack([means[c] for c in test]), "truth": np.stack([truth[c] for c in test])}
        genes = screen.cells.var_names
        write_predictions(run.run_dir / "predictions.h5ad", conditions=test, **stacked, control=screen.control_mean,
                          genes=genes, table=tables[PREDICTOR], de=screen.de, title=run.title)  # fmt: skip
        if cfg.evaluation.plot:
            shown = _plot_choice(tables[PREDICTOR], cfg.evaluation.n_plot_conditions)
            at = [test.index(c) for c in shown]
            plot_de_deltas(run.run_dir / "de_deltas.png", conditions=shown, predicted=stacked["predicted"][at],
                           truth=stacked["truth"][at], control=screen.control_mean, genes=genes, de=screen.de,
                           title=run.title)  # fmt: skip

        last, best = run.fit.history[-1], run.fit.history[run.fit.best_epoch - 1]
        results = {
            **summarise(tables[PREDICTOR]),
            "final_train_mse": last.get("train_mse"),
            "n_test_conditions": len(test),
            "n_train_conditions": len(screen.split.conditions["train"]),
            "n_val_conditions": len(screen.split.conditions["val"]),
            "seconds_per_epoch": run.fit.train_seconds / max(len(run.fit.history), 1),
        }
        baselines = {name: summarise(table) for name, table in tables.items() if name != PREDICTOR}
        for name, table in tables.items():
            console.print(f"  {name:<15} pearson {table['pearson'].mean():.3f}  pearson_delta {table['pearson_delta'].mean():.3f}  "
                          f"pearson_de_delta {table['pearson_de_delta'].mean():.3f}")  # fmt: skip
        return {"results": results, "best": {f"best_{key}": best[key] for key in self.monitors},
                "baselines": baselines or None}  # fmt: skip

    def summary(self, metrics: dict[str, Any]) -> str:
        return (f"[bold]test conditions[/] pearson {metrics['pearson']:.3f}  pearson_delta {metrics['pearson_delta']:.3f}  "
                f"pearson_de_delta {metrics['pearson_de_delta']:.3f}")  # fmt: skip

    # ------------------------------------------------------------------------------ internals
    def _require_screen(self) -> _Screen:
        if self._screen is None:
            raise RuntimeError("PerturbationTask.load must run before training or evaluation")
        return self._screen

    def _mse(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error over every gene token of the batch (scGPT's masked MSE with all genes unmasked)."""
        truth = torch.as_tensor(self._require_screen().truth(batch[TARGET_CELLS].cpu().numpy()), device=out["values"].device)
        columns = out["columns"]
        known = columns >= 0
        target = truth.gather(1, columns.clamp(min=0))
        return (out["values"].float() - target)[known].pow(2).mean()

    def _predict(self, model, loader, trainer) -> tuple[np.ndarray, float]:
        """Each example's predicted expression of every data gene (examples x genes) and the MSE over them."""
        n_genes = self._require_screen().cells.n_vars
        model.eval()

        def forward(batch):
            with torch.no_grad():
                out = model(batch)
                columns = out["columns"]
                dense = torch.zeros(len(columns), n_genes + 1, device=columns.device)  # the last column takes non-genes
                dense.scatter_(1, torch.where(columns >= 0, columns, n_genes), out["values"].float())
                mse = self._mse(out, batch).reshape(1).expand(len(columns))
            return {"predicted": dense[:, :n_genes], "mse": mse}

        collected = trainer.runtime.collect(forward, loader)
        return collected["predicted"], float(collected["mse"].mean())

    def _example_means(self, data: TaskData, rows: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
        """A condition's prediction: the mean over its examples (control cells fed with its flags)."""
        conditions = data.adata.obs[CONDITION_COLUMN].to_numpy()[rows]
        return {c: predicted[conditions == c].mean(axis=0) for c in pd.unique(conditions)}

    def _table(self, split: str, data: TaskData, rows: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
        return self._score(split, self._example_means(data, rows, predicted))

    def _score(self, split: str, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
        screen = self._require_screen()
        names = [c for c in screen.split.conditions[split] if c in predictions]
        return per_condition_table(predictions, screen.condition_means(names), screen.control_mean, screen.de,
                                   screen.split.subgroups.get(split, {}))  # fmt: skip


def _plot_choice(table: pd.DataFrame, n: int) -> list[str]:
    """Up to `n` test conditions to plot, one of each subgroup first, so singles and combinations both show."""
    first = table.groupby("subgroup", dropna=False).head(1)["condition"].tolist()
    rest = [c for c in table["condition"] if c not in first]
    chosen = (first + rest)[: max(n, 1)]
    return sorted(chosen, key=lambda c: (len(perturbed_genes(c)), c))
