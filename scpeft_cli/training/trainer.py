"""One training loop for every task: optimiser, schedule, AMP, clipping, early stopping, best-val selection.

The task supplies what differs (`scpeft_cli.tasks.base.Task`): the training objective of a batch and the
validation scores of an epoch, one of which (`trainer.monitor`) picks the best epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from scpeft_cli.console import console, info
from scpeft_cli.errors import UserError
from scpeft_cli.peft.model import PeftModel
from scpeft_cli.training.checkpoint import (
    TrainingState,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from scpeft_cli.training.distributed import process_group
from scpeft_cli.training.interrupt import TrainingInterrupted, stop_on_signals
from scpeft_cli.training.runtime import Runtime

# A training objective: (model, batch) -> (loss to minimise, {objective name: its value}); the named parts
# (several weighted objectives) are averaged per epoch into the history as train_<name>.
Objective = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# Validation scores of the current model, e.g. {"val_loss": ..., "val_macro_f1": ...}.
Validate = Callable[[nn.Module], dict[str, float]]


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
        group_by_length: bool = False,
        grad_checkpointing: bool | int = False,
        recompute_frozen_qkv: bool = True,
    ):
        if lr <= 0:
            raise UserError(f"trainer.lr must be positive, got {lr}")
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise UserError(f"trainer.max_epochs must be a whole number >= 1, got {max_epochs!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise UserError(f"trainer.max_steps must be a whole number >= 1 or null, got {max_steps!r}")
        if not isinstance(grad_checkpointing, bool | int) or grad_checkpointing < 0:
            raise UserError(
                f"trainer.grad_checkpointing={grad_checkpointing!r}: use true (every layer), false, or a number of layers"
            )
        if not isinstance(recompute_frozen_qkv, bool):
            raise UserError(f"trainer.recompute_frozen_qkv={recompute_frozen_qkv!r}: use true or false")
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
        self.group = process_group(self.runtime.device.type)
        self.class_weighted_loss = class_weighted_loss
        self.balanced_sampler = balanced_sampler
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.grad_checkpointing = grad_checkpointing
        self.recompute_frozen_qkv = recompute_frozen_qkv
        self.epoch = 0  # during `fit`, the epochs completed before the one training now (resumes included)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def embed(self, backbone: nn.Module, loader: DataLoader) -> np.ndarray:
        """Cell embeddings of a bare backbone (no strategy, no head), in loader order."""
        backbone.to(self.device).eval()
        return self.runtime.collect(lambda batch: {"x": backbone.cell_embedding(backbone(batch), batch)}, loader)["x"]

    def fit(
        self,
        model: PeftModel,
        *,
        train_loader: DataLoader,
        objective: Objective,
        validate: Validate,
        monitors: dict[str, int],
        checkpoint: Path | None = None,
    ) -> TrainingState:
        """Train; afterwards `model` holds the best validation state.

        `monitors`: the validation scores that may pick the best epoch, +1 where higher is better, -1 lower.
        With `checkpoint`, the state is saved there after every epoch, and an existing checkpoint is
        resumed from: the result is the same as that of an uninterrupted run.
        """
        check_monitor(self.monitor, monitors)
        model.to(self.device)
        model.backbone.set_memory_options(grad_checkpointing=self.grad_checkpointing, recompute_frozen_qkv=self.recompute_frozen_qkv)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step_model = model
        if self.group.enabled:  # only parameters that require grad are registered, so only they sync
            step_model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optimizer = self.optimizer_factory(trainable, lr=self.lr)
        scheduler = self.scheduler_factory(optimizer) if self.scheduler_factory else None
        state, best = TrainingState(), None
        if checkpoint is not None and checkpoint.is_file():
            state, saved = load_checkpoint(checkpoint)
            model.load_trainable_state_dict(saved["model"])
            best = saved["best"]
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            train_loader.generator.set_state(saved["data_order"])
            restore_rng_states(saved["rng"])
            info(f"resuming from {checkpoint} after epoch {state.epoch}" + (" (training had finished)" if state.done else ""))

        def save():
            if checkpoint is not None and self.group.is_main:
                save_checkpoint(checkpoint, state=state, tensors={
                    "model": model.trainable_state_dict(), "best": best, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "data_order": train_loader.generator.get_state(), "rng": rng_states(),
                })

        with self._progress() as progress, stop_on_signals() as stop:
            while not state.done and state.epoch < self.max_epochs:
                started = time.perf_counter()
                self.epoch = state.epoch
                task = progress.add_task("train", total=len(train_loader), epoch=state.epoch + 1, loss=float("nan"))
                train_loss = self._train_epoch(step_model, train_loader, optimizer, objective, trainable, state, progress, task, stop)
                progress.remove_task(task)
                if stop:
                    raise TrainingInterrupted(stop.signum, f"interrupted during epoch {state.epoch + 1}; the last checkpoint (epoch {state.epoch}) is kept: run the same command again, or `scpeft train resume=RUN_DIR`, to continue")
                state.epoch += 1
                improved = self._validate(model, validate, monitors, state, optimizer, train_loss, started)
                if improved:
                    best = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                if scheduler is not None:
                    scheduler.step()
                state.done = self._should_stop(state)
                state.train_seconds += time.perf_counter() - started
                save()
        state.done = True
        model.load_trainable_state_dict(best)
        return state

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console, transient=True,
        )

    def _validate(self, model, validate: Validate, monitors, state: TrainingState, optimizer, train_loss, started) -> bool:
        """Score the epoch, append it to the history; True if it is the best so far."""
        model.eval()
        scores = validate(model)
        record = {
            "epoch": state.epoch, "step": state.steps, **train_loss, **scores,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
        }
        score = scores[self.monitor]
        improved = state.best_epoch == 0 or monitors[self.monitor] * (score - state.best_score) > 0
        if improved:
            state.best_epoch, state.best_score, state.stale = state.epoch, score, 0
        else:
            state.stale += 1
        state.history.append(record)
        self._log_epoch(record, improved, monitors)
        return improved

    def _should_stop(self, state: TrainingState) -> bool:
        if self.max_steps is not None and state.steps >= self.max_steps:
            info(f"reached trainer.max_steps={self.max_steps}")
            return True
        if self.patience is not None and state.stale >= self.patience:
            info(f"early stopping: {self.monitor} did not improve for {self.patience} epochs")
            return True
        return False

    def _train_epoch(self, model, loader, optimizer, objective: Objective, trainable, state: TrainingState, progress, task, stop) -> dict[str, float]:
        """One pass over the training cells; returns this process's mean training loss and objective parts."""
        model.train()
        total, n_local, n_global = 0.0, 0, 0
        parts_total: dict[str, float] = {}
        started = time.perf_counter()
        for global_batch in loader:
            batch, weight = self.group.shard(global_batch)
            batch = self.runtime.to_device(batch)
            n_cells = len(batch["gene_ids"])
            with self.runtime.autocast():
                loss, parts = objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
            optimizer.step()
            state.steps += 1
            total += loss.item() * n_cells
            for name, value in parts.items():
                parts_total[name] = parts_total.get(name, 0.0) + float(value) * n_cells
            n_local += n_cells
            n_global += len(global_batch["gene_ids"])
            progress.update(task, advance=1, loss=loss.item())
            if stop or (self.max_steps is not None and state.steps >= self.max_steps):
                break
        state.cells_seen += n_global
        state.step_seconds += time.perf_counter() - started
        return {"train_loss": total / max(n_local, 1), **{f"train_{k}": v / max(n_local, 1) for k, v in parts_total.items()}}

    def _log_epoch(self, record: dict, improved: bool, monitors: dict[str, int]) -> None:
        """Every loss and every score that may pick the best epoch."""
        marker = " [green]*best[/]" if improved else ""
        scores = "  ".join(
            f"{key} {value:.4f}" if "loss" in key else f"{key} {value:.3f}"
            for key, value in record.items()
            if key in monitors or key.endswith("_loss")
        )
        console.print(f"epoch {record['epoch']:>3}  {scores}  lr {record['lr']:.2e}  {record['seconds']:.1f}s{marker}")


def check_monitor(monitor: str, monitors: dict[str, int]) -> None:
    """`trainer.monitor` must be one of the task's validation scores."""
    if monitor not in monitors:
        raise UserError(f"trainer.monitor={monitor} is not one of this task's validation scores: {', '.join(monitors)}")
