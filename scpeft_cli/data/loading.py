"""Load single-cell data into one "prepared" AnnData shape the rest of the CLI can rely on.

Prepared means: ``X`` is CSR float32 log-normalised expression (normalize_total 1e4 + log1p),
``layers["counts"]`` the raw counts where they are known (given, or recovered from log-normalised
values with the cells' totals in ``obs["n_counts"]``), ``obs["scpeft_total_counts"]`` each cell's
total counts over all of the file's genes, ``var_names`` are unique gene identifiers, ``obs_names``
are unique cell ids, ``obs["label"]`` is a string Categorical copied from the user's label column
(``obs["scpeft_batch"]`` likewise from the batch column, when one is named), and ``uns["scpeft_input"]`` records where the data came from.
Another species' genes are first mapped onto human genes (``data.species`` / ``data.ortholog_table``,
``data/orthologs.py``); ``uns["scpeft_input"]["gene_mapping"]`` then records how. This layer knows nothing about models:
each tokenizer takes the matrix it needs (``tokenizers.base.tokenizer_input``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from scpeft_cli.console import info, warn
from scpeft_cli.data import orthologs
from scpeft_cli.data.conditions import check_conditions
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import COUNTS_LAYER, TOTALS_COLUMN

TARGET_SUM = 1e4
BATCH_COLUMN = "scpeft_batch"  # the prepared copy of data.batch_key
CONDITION_COLUMN = "scpeft_condition"  # the prepared copy of data.condition_key (GEARS notation)
TOTALS_KEY = "n_counts"  # obs column of per-cell total counts (Geneformer's convention, scanpy's older one)
# Recovered counts farther than this from an integer mean the totals do not belong to these values.
RECOVERY_TOLERANCE = 0.25
FILE_TOTALS = "scpeft_file_totals"  # transient obs column: count totals over the file's genes, before mapping


def load_pbmc68k_reduced(
    *, label_key: str = "bulk_labels", min_cells_per_class: int = 0, n_top_genes: int | None = None,
    batch_key: str | None = None, species: str | None = None, ortholog_table: str | None = None, one_to_many: str = "drop",
    extra_genes: str | None = None,
) -> anndata.AnnData:
    """The small PBMC dataset shipped inside scanpy: a demo that needs no download.

    Its ``.X`` is scaled, so the log-normalised ``.raw`` is used (700 cells x 765 genes).
    """
    full = sc.datasets.pbmc68k_reduced()
    return prepare(
        full.raw.X,
        obs=full.obs,
        genes=full.raw.var_names,
        source="pbmc68k_reduced",
        path=None,
        label_key=label_key,
        gene_key=None,
        layer="raw",
        min_cells_per_class=min_cells_per_class,
        drop_unlabeled=False,
        n_top_genes=n_top_genes,
        batch_key=batch_key,
        species=species,
        ortholog_table=ortholog_table,
        one_to_many=one_to_many,
        extra_genes=extra_genes,
    )


def read_h5ad(
    *,
    path: str,
    label_key: str | None,
    gene_key: str | None = None,
    layer: str | None = None,
    min_cells_per_class: int = 0,
    drop_unlabeled: bool = False,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    condition_key: str | None = None,
    unknown_perturbations: str = "error",
    species: str | None = None,
    ortholog_table: str | None = None,
    one_to_many: str = "drop",
    extra_genes: str | None = None,
) -> anndata.AnnData:
    """Read a user's .h5ad (never modified) and prepare it.

    ``gene_key`` names a ``var`` column with the gene identifiers (default: var_names);
    ``layer`` takes the matrix from ``layers[layer]``, or from ``.raw`` when it is "raw".
    """
    orthologs.resolve(species=species, ortholog_table=ortholog_table, one_to_many=one_to_many)  # bad options fail before a large file is read
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data file not found: {file}; check data.path")
    try:
        source = anndata.read_h5ad(file)
    except Exception as exc:  # anndata/h5py raise many types for a bad file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UserError(f"cannot read {file} as an .h5ad file ({reason}); give a valid AnnData .h5ad in data.path") from exc

    matrix, var = _select_matrix(source, layer)
    if gene_key is None:
        genes = var.index
    elif gene_key in var.columns:
        genes = var[gene_key]
    else:
        raise UserError(
            f"gene column '{gene_key}' not in var; available: {_names(var.columns)}; "
            "set data.gene_key to one of them, or null to use var_names"
        )
    return prepare(
        matrix,
        obs=source.obs,
        genes=genes,
        source="h5ad",
        path=str(file.resolve()),
        label_key=label_key,
        gene_key=gene_key,
        layer=layer,
        min_cells_per_class=min_cells_per_class,
        drop_unlabeled=drop_unlabeled,
        n_top_genes=n_top_genes,
        batch_key=batch_key,
        condition_key=condition_key,
        unknown_perturbations=unknown_perturbations,
        species=species,
        ortholog_table=ortholog_table,
        one_to_many=one_to_many,
        extra_genes=extra_genes,
    )


def _select_matrix(adata: anndata.AnnData, layer: str | None) -> tuple[object, pd.DataFrame]:
    """The expression matrix and its matching var table, as chosen by ``data.layer``."""
    available = list(adata.layers.keys()) + (["raw"] if adata.raw is not None else [])
    if layer is None:
        if adata.X is None:
            raise UserError(f"the file has no X matrix; set data.layer to one of: {_names(available)}")
        return adata.X, adata.var
    if layer == "raw" and adata.raw is not None:
        return adata.raw.X, adata.raw.var
    if layer in adata.layers:
        return adata.layers[layer], adata.var
    raise UserError(
        f"layer '{layer}' not in the file; available: {_names(available)}; set data.layer to one of them, or null to use X"
    )


def prepare(
    matrix: object,
    *,
    obs: pd.DataFrame,
    genes: object,
    source: str,
    path: str | None,
    label_key: str | None,
    gene_key: str | None,
    layer: str | None,
    min_cells_per_class: int,
    drop_unlabeled: bool,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    condition_key: str | None = None,
    unknown_perturbations: str = "error",
    species: str | None = None,
    ortholog_table: str | None = None,
    one_to_many: str = "drop",
    extra_genes: str | None = None,
) -> anndata.AnnData:
    """Validate, clean and log-normalise a matrix (cells x genes) into a new prepared AnnData.

    ``genes`` holds one identifier per column; ``obs`` (one row per cell) is copied, not modified.
    ``label_key=None`` (predict, embed) prepares unlabelled cells: no ``obs["label"]``.
    ``condition_key`` names perturbation conditions in GEARS notation, copied to ``obs["scpeft_condition"]``
    after gene selection; cells perturbing a gene outside the kept genes stop the run or are dropped
    (``unknown_perturbations``), since the model could not see such a perturbation.
    ``species`` / ``ortholog_table`` / ``one_to_many`` map another species' genes onto human genes first
    (``data/orthologs.py``), and the genes named in the conditions with them.
    """
    table = orthologs.resolve(species=species, ortholog_table=ortholog_table, one_to_many=one_to_many)
    if label_key is not None and label_key not in obs.columns:
        raise UserError(
            f"label column '{label_key}' not in obs; available: {_names(obs.columns)}; set data.label_key to one of them"
        )
    if batch_key is not None:
        _check_batch_column(obs, batch_key)
    if condition_key is not None and condition_key not in obs.columns:
        raise UserError(f"condition column '{condition_key}' not in obs; available: {_names(obs.columns)}; set data.condition_key to one of them")
    if min_cells_per_class < 0:
        raise UserError(f"data.min_cells_per_class must be >= 0, got {min_cells_per_class}")
    matrix = _to_csr_float32(matrix)
    _check_values(matrix)
    genes = pd.Index(np.asarray(genes).astype(str))
    _check_genes(genes)
    obs = obs.copy()
    mapped = None
    if table is not None:
        mapped = _map_genes(matrix, genes, table, obs)
        matrix, genes = _to_csr_float32(mapped.matrix), mapped.genes
    adata = anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))
    if not adata.obs_names.is_unique:
        warn(f"{int(adata.obs_names.duplicated().sum())} duplicated cell ids; making them unique")
        adata.obs_names_make_unique()

    adata = _drop_empty_cells(adata)
    if label_key is not None:
        adata = _drop_unlabeled(adata, label_key, drop_unlabeled)
        adata.obs["label"] = pd.Categorical(adata.obs[label_key].astype(str))
        adata = _drop_small_classes(adata, min_cells_per_class)
    if batch_key is not None:
        adata.obs[BATCH_COLUMN] = pd.Categorical(adata.obs[batch_key].astype(str))

    input_kind = "counts" if _is_counts(adata.X) else "log_normalized"
    counts_kept = _keep_counts(adata, input_kind)
    if input_kind == "counts":
        sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
        sc.pp.log1p(adata)
        adata.X = _to_csr_float32(adata.X)
    if n_top_genes is not None:
        adata = _select_highly_variable(adata, n_top_genes, extra=_read_gene_list(extra_genes) if extra_genes else ())
    if condition_key is not None:
        conditions = adata.obs[condition_key].to_numpy(dtype=object)
        if mapped is not None:
            conditions = np.array([_rename_perturbed(c, mapped.renamed) for c in conditions], dtype=object)
        keep = check_conditions(conditions, adata.var_names, unknown=unknown_perturbations, key=condition_key)
        adata = adata if keep.all() else adata[keep].copy()
        adata.obs[CONDITION_COLUMN] = pd.Series(conditions[keep]).astype(str).str.strip().to_numpy()

    adata.uns["scpeft_input"] = {
        "source": source,
        "path": path,
        "label_key": label_key,
        "gene_key": gene_key,
        "layer": layer,
        "input_kind": input_kind,
        "counts": counts_kept or "unknown",
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
    }
    if mapped is not None:
        adata.uns["scpeft_input"]["gene_mapping"] = mapped.record
    classes = f", {len(adata.obs['label'].cat.categories)} classes" if label_key is not None else ""
    info(f"Data ({path or source}): {adata.n_obs} cells, {adata.n_vars} genes{classes}, input: {input_kind}")
    return adata


def _keep_counts(adata: anndata.AnnData, input_kind: str) -> str | None:
    """Raw counts into ``layers["counts"]`` and per-cell totals into ``obs["scpeft_total_counts"]``, before
    any gene selection; returns how the counts were obtained ("given" | "recovered"), None if unknown."""
    given_totals = None
    file_totals = adata.obs.pop(FILE_TOTALS).to_numpy(dtype=np.float64) if FILE_TOTALS in adata.obs.columns else None
    if TOTALS_KEY in adata.obs.columns:
        given_totals = pd.to_numeric(adata.obs[TOTALS_KEY], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(given_totals) & (given_totals > 0)):
            warn(f"obs['{TOTALS_KEY}'] holds missing or non-positive totals; it is not used")
            given_totals = None
    if input_kind == "counts":
        counts = adata.X.copy()
        own = file_totals if file_totals is not None else np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        totals = given_totals if given_totals is not None else own
        how = "given"
    elif given_totals is not None:
        counts = adata.X.copy()
        counts.data = np.expm1(counts.data.astype(np.float64))
        counts = sp.csr_matrix(sp.diags(given_totals / TARGET_SUM) @ counts)
        if np.abs(counts.data - np.round(counts.data)).max(initial=0) > RECOVERY_TOLERANCE:
            warn(f"obs['{TOTALS_KEY}'] does not turn these log-normalised values back into counts; counts are unknown")
            return None
        counts.data = np.round(counts.data)
        counts = _to_csr_float32(counts)
        totals, how = given_totals, "recovered"
    else:
        return None
    adata.layers[COUNTS_LAYER] = counts
    adata.obs[TOTALS_COLUMN] = totals
    return how


def _map_genes(matrix: sp.csr_matrix, genes: pd.Index, table: orthologs.OrthologTable, obs: pd.DataFrame) -> orthologs.MappedGenes:
    """Genes onto human genes; count data keeps its totals over all of the file's genes (the cell's depth) in
    ``obs[FILE_TOTALS]``, for ``_keep_counts``."""
    counts = _is_counts(matrix)
    mapped = orthologs.map_genes(matrix, genes, table, log_normalized=not counts)
    info(orthologs.describe(mapped.record))
    if counts:
        obs[FILE_TOTALS] = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    return mapped


def _rename_perturbed(condition: object, renamed: dict[str, str]) -> object:
    """A condition in the data's own gene names, in the mapped ones (mouse ``Cd3e+ctrl`` -> ``CD3E+ctrl``)."""
    if not isinstance(condition, str):
        return condition
    return "+".join(renamed.get(part.strip(), part.strip()) for part in condition.split("+"))


def _is_counts(matrix: sp.csr_matrix) -> bool:
    return bool(np.all(matrix.data == np.round(matrix.data)))


def _check_batch_column(obs: pd.DataFrame, batch_key: str) -> None:
    if batch_key not in obs.columns:
        raise UserError(f"batch column '{batch_key}' not in obs; available: {_names(obs.columns)}; set data.batch_key to one of them")
    missing = int(obs[batch_key].isna().sum())
    if missing:
        raise UserError(f"{missing} cells have no value in the batch column '{batch_key}'; give every cell a batch")


def _select_highly_variable(adata: anndata.AnnData, n_top_genes: int, *, extra: Sequence[str] = ()) -> anndata.AnnData:
    """Keep the most variable genes of the log-normalised data (scanpy's seurat flavour), as the paper did,
    and the data's genes among `extra` (scPEFT's discovery tutorial appends transcription factors)."""
    if n_top_genes < 1:
        raise UserError(f"data.n_top_genes must be >= 1 (or null for all genes), got {n_top_genes}")
    if n_top_genes >= adata.n_vars:
        return adata
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
    keep = adata.var["highly_variable"].to_numpy()
    message = f"keeping the {n_top_genes} most variable of {adata.n_vars} genes"
    if len(extra):
        listed = adata.var_names.isin(list(extra))
        message += f", plus {int((listed & ~keep).sum())} more of the {len(extra)} genes of data.extra_genes ({int(listed.sum())} in the data)"
        keep = keep | listed
    info(message)
    return adata[:, keep].copy()


def _read_gene_list(path: str) -> list[str]:
    """Gene names, one per line (a CSV's first column; a header line that is no gene is harmless)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"gene list not found: {file}; set data.extra_genes to a text file with one gene per line")
    genes = [line.split(",")[0].strip() for line in file.read_text().splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise UserError(f"the gene list {file} is empty; give one gene per line")
    return genes


def _to_csr_float32(matrix: object) -> sp.csr_matrix:
    """Everything downstream assumes CSR float32 with no stored zeros."""
    try:
        csr = sp.csr_matrix(matrix, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UserError(f"the expression matrix is not numeric ({exc}); set data.layer to a numeric matrix") from exc
    csr.sum_duplicates()
    csr.eliminate_zeros()
    return csr


def _check_values(matrix: sp.csr_matrix) -> None:
    """Negative or non-finite values mean scaled (z-scored) data, which the models cannot use."""
    hint = "scaled data was probably given; point data.layer at counts or log-normalised values (data.layer=raw uses .raw)"
    n_bad = int((~np.isfinite(matrix.data)).sum())
    if n_bad:
        raise UserError(f"the expression matrix has {n_bad} NaN or infinite values; {hint}")
    n_negative = int((matrix.data < 0).sum())
    if n_negative:
        raise UserError(f"the expression matrix has {n_negative} negative values; {hint}")


def _check_genes(genes: pd.Index) -> None:
    """Duplicated gene identifiers would map two columns to one vocabulary token."""
    duplicated = genes[genes.duplicated()].unique()
    if len(duplicated):
        raise UserError(
            f"{len(duplicated)} duplicated gene identifiers (e.g. {_names(duplicated[:5])}); "
            "set data.gene_key to a column with unique identifiers or make them unique"
        )


def _drop_unlabeled(adata: anndata.AnnData, label_key: str, drop: bool) -> anndata.AnnData:
    missing = adata.obs[label_key].isna().to_numpy()
    n_missing = int(missing.sum())
    if not n_missing:
        return adata
    if not drop:
        raise UserError(
            f"{n_missing} cells have no label in obs['{label_key}']; fix the labels or set data.drop_unlabeled=true to drop them"
        )
    if n_missing == adata.n_obs:
        raise UserError(f"all {n_missing} cells have no label in obs['{label_key}']; choose another data.label_key")
    warn(f"dropping {n_missing} cells with no label in obs['{label_key}']")
    return adata[~missing].copy()


def _drop_empty_cells(adata: anndata.AnnData) -> anndata.AnnData:
    """A cell without any expressed gene carries no signal and breaks normalisation."""
    empty = adata.X.getnnz(axis=1) == 0
    n_empty = int(empty.sum())
    if n_empty == adata.n_obs:
        raise UserError("every cell has all-zero expression; check data.layer points at the expression matrix")
    if n_empty:
        warn(f"dropping {n_empty} cells whose expression is all zero")
        return adata[~empty].copy()
    return adata


def _drop_small_classes(adata: anndata.AnnData, min_cells: int) -> anndata.AnnData:
    """Tiny classes cannot be split into train/val/test, so the user may ask to drop them."""
    counts = adata.obs["label"].value_counts()
    small = counts[counts < min_cells]
    if small.empty:
        return adata
    if len(small) == len(counts):
        raise UserError(f"every class has fewer than {min_cells} cells; lower data.min_cells_per_class")
    listed = ", ".join(f"{name} ({count})" for name, count in small.items())
    warn(f"dropping {len(small)} classes with fewer than {min_cells} cells: {listed}")
    adata = adata[~adata.obs["label"].isin(small.index)].copy()
    adata.obs["label"] = adata.obs["label"].cat.remove_unused_categories()
    return adata


def _names(values: object) -> str:
    return ", ".join(str(v) for v in values) or "(none)"
