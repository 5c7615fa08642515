"""Using a backbone or a trained run on new cells: predict labels, compute embeddings, write a new h5ad.

The user's input file is never modified: results go into a copy (obs["scpeft_*"], obsm["X_scpeft"],
uns["scpeft"]), written under a temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from torch import nn

from scpeft_cli import artifacts
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.peft.persistence import TRAINING_GENES_FILE
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.runtime import Runtime


def check_output_path(*, input_path: str | Path, output: str | Path, overwrite: bool) -> Path:
    output = Path(output).expanduser()
    if output.suffix != ".h5ad":
        raise UserError(f"output={output} must end in .h5ad")
    if output.resolve() == Path(input_path).expanduser().resolve():
        raise UserError("output must be a new file: the input h5ad is never modified")
    if output.exists() and not overwrite:
        raise UserError(f"{output} already exists; choose another output or set overwrite=true")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def restrict_to_training_genes(cells: anndata.AnnData, adapter_dir: Path) -> anndata.AnnData:
    """A run trained on selected genes (HVGs) must see the same genes: binning is relative within a cell."""
    path = adapter_dir / TRAINING_GENES_FILE
    if not path.is_file():
        return cells
    genes = set(path.read_text().split())
    info(f"restricting to the run's {len(genes)} training genes")
    return cells[:, cells.var_names.isin(genes)].copy()


def cell_loader(tokens: TokenizedCells, collate, *, batch_size: int, inputs: dict[str, np.ndarray] | None = None):
    """All cells in file order, with the per-cell `inputs` a trained head reads (`Task.inputs`)."""
    return make_loader(
        CellTokens(tokens, inputs or {}, np.arange(len(tokens))),
        collate, batch_size=batch_size, shuffle=False, seed=0,
    )


def run_model(module: nn.Module, forward, tokens: TokenizedCells, collate, *, cfg: DictConfig, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`forward(batch)` over every cell with `module` in eval mode on the configured device."""
    runtime = Runtime.create(device=cfg.device, precision=cfg.precision)
    module.to(runtime.device).eval()
    return runtime.collect(forward, cell_loader(tokens, collate, batch_size=cfg.batch_size, inputs=inputs))


def overlap_summary(tokens: TokenizedCells) -> dict[str, Any]:
    return {"n_genes": tokens.genes_total, "n_matched": tokens.genes_matched, "fraction": tokens.genes_matched / max(tokens.genes_total, 1)}


def write_annotated_copy(
    *, input_path: str | Path, output: Path, cells: anndata.AnnData, obs: dict[str, np.ndarray], embeddings: np.ndarray, uns: dict[str, Any]
) -> anndata.AnnData:
    """A copy of the input file with our results for the cells we kept (others get missing values)."""
    original = anndata.read_h5ad(input_path)
    if not original.obs_names.is_unique:
        raise UserError("the input file has duplicated cell ids (obs_names); make them unique before predicting")
    rows = original.obs_names.get_indexer(cells.obs_names)
    if (rows < 0).any():
        raise UserError("prepared cells do not match the input file's cell ids")
    for key, values in obs.items():
        column = pd.Series(pd.NA if values.dtype.kind in "OUS" else np.nan, index=original.obs_names, dtype=object if values.dtype.kind in "OUS" else float)
        column.iloc[rows] = values
        original.obs[key] = pd.Categorical(column) if values.dtype.kind in "OUS" else column.astype(float)
    full = np.full((original.n_obs, embeddings.shape[1]), np.nan, dtype=np.float32)
    full[rows] = embeddings
    original.obsm["X_scpeft"] = full
    original.uns["scpeft"] = _h5ad_safe(uns)
    artifacts.write_h5ad(output, original)
    dropped = original.n_obs - len(rows)
    info(f"wrote {output} ({len(rows)} cells{f'; {dropped} empty cells left without results' if dropped else ''})")
    return original


def _h5ad_safe(value: Any) -> Any:
    """uns cannot store None or nested config objects faithfully: nested dicts of plain values, None as 'null'."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if value is None:
        return "null"
    if isinstance(value, list | tuple) and not all(isinstance(v, str | int | float) for v in value):
        return json.dumps(value, default=str)
    return value
