"""Batches of tokenised cells for training and evaluation, with seeded order and optional balancing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import TokenizedCells


class CellTokens(Dataset):
    """The cells at `indices` of a tokenised dataset, with the per-cell arrays a task's batches carry
    (`targets`, e.g. {"labels": ...}: each becomes a batch tensor of that name)."""

    def __init__(self, tokens: TokenizedCells, targets: dict[str, np.ndarray], indices: np.ndarray):
        self.tokens = tokens
        self.targets = targets
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
        cell = int(self.indices[i])
        gene_ids, values = self.tokens.cell(cell)
        return gene_ids, values, {name: array[cell] for name, array in self.targets.items()}


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of `batch_size` cells has similar token counts, so padding stays small.

    The cells are shuffled, cut into windows of `window` batches, sorted by length inside each window,
    batched, and the batches shuffled: still random, but a batch rarely mixes 50- and 1,000-token cells.
    """

    def __init__(self, lengths: np.ndarray, *, batch_size: int, generator: torch.Generator, window: int = 50):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.window = window * batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches = []
        for start in range(0, len(order), self.window):
            chunk = order[start : start + self.window]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(torch.split(chunk, self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield from batches[i].tolist()


class LengthSortedSampler(Sampler[int]):
    """Fixed longest-first order for inference; `order` lets the caller put results back in dataset order."""

    def __init__(self, lengths: np.ndarray):
        self.order = np.argsort(-np.asarray(lengths), kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order.tolist())


def make_loader(
    dataset: CellTokens,
    collate_cells: Callable,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    balanced: bool = False,
    group_by_length: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader whose order depends only on `seed`; `balanced` samples classes by 1/count.

    Evaluation runs longest-first (results are put back in dataset order by `Runtime.collect`); with
    `group_by_length`, training batches hold cells of similar length.
    """

    def collate(items):
        batch = collate_cells([(ids, vals) for ids, vals, _ in items])
        for name in dataset.targets:
            values = np.asarray([targets[name] for _, _, targets in items])
            batch[name] = torch.as_tensor(values.astype(np.int64) if values.dtype.kind in "iub" else values)
        return batch

    generator = torch.Generator().manual_seed(seed)
    sampler = None
    lengths = dataset.tokens.lengths[dataset.indices]
    if balanced:
        if "labels" not in dataset.targets:
            raise UserError("trainer.balanced_sampler=true needs cell labels, which this task has none of")
        labels = dataset.targets["labels"][dataset.indices]
        weights = 1.0 / np.bincount(labels)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), generator=generator)
    elif shuffle and group_by_length:
        sampler = LengthGroupedSampler(lengths, batch_size=batch_size, generator=generator)
    elif not shuffle:
        sampler = LengthSortedSampler(lengths)
    if sampler is not None:
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collate,
        num_workers=num_workers,
    )
