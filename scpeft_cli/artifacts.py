"""Run outputs written so that a reader never sees half a file: temporary name, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: str | Path, table: pd.DataFrame, *, index: bool = False) -> None:
    _atomic_write(Path(path), lambda tmp: table.to_csv(tmp, index=index))


def write_h5ad(path: str | Path, adata) -> None:
    _atomic_write(Path(path), lambda tmp: adata.write_h5ad(tmp))


def plot_confusion(path: str | Path, confusion: pd.DataFrame, *, title: str) -> None:
    """Row-normalised confusion heatmap (recall on the diagonal) with the raw counts written in."""
    counts = confusion.to_numpy()
    share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    size = max(4.0, 0.45 * len(confusion) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(confusion.columns)), confusion.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(confusion.index)), confusion.index, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for (row, col), value in pd.DataFrame(counts).stack().items():
        if value:
            ax.text(col, row, str(value), ha="center", va="center", fontsize=6, color="white" if share[row, col] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    save_figure(path, fig)


def save_figure(path: str | Path, fig) -> None:
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)
