"""Batches of tokenised cells for training and evaluation, with seeded order and optional balancing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from scpeft_cli.tokenizers.scgpt import TokenizedCells


class CellTokens(Dataset):
    """The cells at `indices` of a tokenised dataset, with their integer labels."""

    def __init__(self, tokens: TokenizedCells, labels: np.ndarray, indices: np.ndarray):
        self.tokens = tokens
        self.labels = labels
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        cell = int(self.indices[i])
        gene_ids, values = self.tokens.cell(cell)
        return gene_ids, values, int(self.labels[cell])


def make_loader(
    dataset: CellTokens,
    collate_cells: Callable,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    balanced: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader whose order depends only on `seed`; `balanced` samples classes by 1/count."""

    def collate(items):
        batch = collate_cells([(ids, vals) for ids, vals, _ in items])
        batch["labels"] = torch.tensor([label for _, _, label in items], dtype=torch.long)
        return batch

    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if balanced:
        labels = dataset.labels[dataset.indices]
        weights = 1.0 / np.bincount(labels)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), generator=generator)
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
