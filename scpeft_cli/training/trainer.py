"""One training loop for every task: optimiser, schedule, AMP, clipping, early stopping, best-val selection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from scpeft_cli.console import console, info
from scpeft_cli.errors import UserError
from scpeft_cli.peft.model import PeftModel
from scpeft_cli.training.runtime import Runtime

# Which validation score picks the best epoch, and whether lower (-1) or higher (+1) is better.
MONITORS = {"val_loss": -1, "val_macro_f1": 1, "val_accuracy": 1}


@dataclass
class Evaluation:
    """Model outputs over one loader, in loader order."""

    loss: float
    logits: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class."""
        shifted = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = math.nan
    train_seconds: float = 0.0
    step_seconds: float = 0.0  # time inside training steps only (no validation)
    steps: int = 0
    cells_seen: int = 0

    @property
    def cells_per_second(self) -> float:
        return self.cells_seen / self.step_seconds if self.step_seconds else 0.0


class Trainer:
    """Trains the strategy's parameters and keeps the best validation state (trainable tensors only)."""

    def __init__(
        self,
        *,
        optimizer: Callable,
        scheduler: Callable | None,
        lr: float,
        max_epochs: int,
        max_steps: int | None,
        batch_size: int,
        eval_batch_size: int,
        grad_clip: float | None,
        patience: int | None,
        monitor: str,
        precision: str,
        device: str,
        class_weighted_loss: bool,
        balanced_sampler: bool,
        num_workers: int,
    ):
        if monitor not in MONITORS:
            raise UserError(f"trainer.monitor={monitor} is not one of {', '.join(MONITORS)}")
        if lr <= 0:
            raise UserError(f"trainer.lr must be positive, got {lr}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = lr
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.grad_clip = grad_clip
        self.patience = patience
        self.monitor = monitor
        self.runtime = Runtime.create(device=device, precision=precision)
        self.class_weighted_loss = class_weighted_loss
        self.balanced_sampler = balanced_sampler
        self.num_workers = num_workers

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def evaluate(self, model: PeftModel, loader: DataLoader, loss_fn: Callable) -> Evaluation:
        model.eval()

        def forward(batch):
            logits, embeddings = model(batch)
            summed_loss = loss_fn(logits, batch["labels"]).reshape(1) * len(batch["labels"])
            return {"logits": logits, "embeddings": embeddings, "labels": batch["labels"], "loss": summed_loss}

        out = self.runtime.collect(forward, loader)
        return Evaluation(
            loss=float(out["loss"].sum()) / max(len(out["labels"]), 1),
            logits=out["logits"],
            embeddings=out["embeddings"],
            labels=out["labels"],
        )

    def embed(self, backbone: nn.Module, loader: DataLoader) -> np.ndarray:
        """Cell embeddings of a bare backbone (no strategy, no head), in loader order."""
        backbone.to(self.device).eval()
        return self.runtime.collect(lambda batch: {"x": backbone.cell_embedding(backbone(batch), batch)}, loader)["x"]

    def fit(
        self,
        model: PeftModel,
        *,
        train_loader: DataLoader,
        val_loader: DataLoader,
        loss_fn: Callable,
        metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    ) -> FitResult:
        """Train; afterwards `model` holds the best validation state."""
        model.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable, lr=self.lr)
        scheduler = self.scheduler_factory(optimizer) if self.scheduler_factory else None
        direction = MONITORS[self.monitor]
        result, best_state, stale = FitResult(), None, 0
        start = time.perf_counter()
        with Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            for epoch in range(1, self.max_epochs + 1):
                epoch_start = time.perf_counter()
                task = progress.add_task("train", total=len(train_loader), epoch=epoch, loss=float("nan"))
                train_loss = self._train_epoch(model, train_loader, optimizer, loss_fn, trainable, result, progress, task)
                progress.remove_task(task)
                evaluation = self.evaluate(model, val_loader, loss_fn)
                scores = {"val_loss": evaluation.loss, **{f"val_{k}": v for k, v in metrics_fn(evaluation.labels, evaluation.predictions).items()}}
                record = {
                    "epoch": epoch,
                    "step": result.steps,
                    "train_loss": train_loss,
                    **scores,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - epoch_start,
                }
                score = scores[self.monitor]
                improved = best_state is None or direction * (score - result.best_score) > 0
                if improved:
                    result.best_epoch, result.best_score, stale = epoch, score, 0
                    best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                else:
                    stale += 1
                result.history.append(record)
                self._log_epoch(record, improved)
                if scheduler is not None:
                    scheduler.step()
                if self.max_steps is not None and result.steps >= self.max_steps:
                    info(f"reached trainer.max_steps={self.max_steps}")
                    break
                if self.patience is not None and stale >= self.patience:
                    info(f"early stopping: {self.monitor} did not improve for {self.patience} epochs")
                    break
        result.train_seconds = time.perf_counter() - start
        model.load_trainable_state_dict(best_state)
        return result

    def _train_epoch(self, model, loader, optimizer, loss_fn, trainable, result, progress, task) -> float:
        model.train()
        total, n = 0.0, 0
        started = time.perf_counter()
        for batch in loader:
            batch = self.runtime.to_device(batch)
            with self.runtime.autocast():
                logits, _ = model(batch)
            loss = loss_fn(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
            optimizer.step()
            result.steps += 1
            total += loss.item() * len(batch["labels"])
            n += len(batch["labels"])
            progress.update(task, advance=1, loss=loss.item())
            if self.max_steps is not None and result.steps >= self.max_steps:
                break
        result.cells_seen += n
        result.step_seconds += time.perf_counter() - started
        return total / max(n, 1)

    def _log_epoch(self, record: dict, improved: bool) -> None:
        marker = " [green]*best[/]" if improved else ""
        console.print(
            f"epoch {record['epoch']:>3}  train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_acc {record['val_accuracy']:.3f}  val_macro_f1 {record['val_macro_f1']:.3f}  "
            f"lr {record['lr']:.2e}  {record['seconds']:.1f}s{marker}"
        )
