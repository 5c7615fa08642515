"""`scpeft inspect`: preflight checks on the data, genes, classes and split of a run, before training.

Same composed config as `train`; it loads and prepares the data exactly as a run does, reads only the
gene vocabulary of `backbone.checkpoint` (never the weights, never builds the model), runs the split, prints
what it found and writes `inspect.json` into the run dir. Exit code 2 when a run would fail.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from scpeft_cli import artifacts
from scpeft_cli.assembly import read_vocabulary
from scpeft_cli.commands.guard import guarded
from scpeft_cli.console import console, warn
from scpeft_cli.data import preflight
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.paths import config_dir
from scpeft_cli.tasks.base import Task
from scpeft_cli.tasks.runner import run_options
from scpeft_cli.tokenizers.vocab import GENE_ID_KIND_WORDS, GeneVocab

INPUT_WORDS = {
    "counts": "raw counts (normalised to 1e4 per cell + log1p by the loader)",
    "log_normalized": "log-normalised (used as is)",
}


def inspect_run(cfg: DictConfig, run_dir: Path) -> dict:
    _require_set(cfg.data, "data")
    adata = instantiate(cfg.data)  # a UserError here (bad file, labels, values) ends the run as in `train`
    data = preflight.summarize_data(adata)
    genes = [str(g) for g in adata.var_names]
    ids = preflight.gene_ids(genes)

    problems: list[str] = []
    checkpoint = cfg.backbone.get("checkpoint")
    overlap, candidates = None, []
    if checkpoint:
        try:
            vocab = read_vocabulary(cfg)
        except UserError as err:
            problems.append(str(err))
        else:
            overlap = preflight.vocab_overlap(genes, vocab, source="checkpoint", path=str(Path(checkpoint).expanduser()))
            if overlap.fraction < preflight.WARN_OVERLAP:
                candidates = _gene_key_candidates(cfg, vocab, overlap)
    else:
        overlap = preflight.vocab_overlap(genes, GeneVocab.from_genes(genes), source="data")

    task: Task = instantiate(cfg.task)
    if task.uses_split:
        split = _check_split(cfg, adata)
    else:  # the task holds out cells its own way: its load checks what it needs (e.g. integration's batches)
        split = preflight.SplitCheck(error=None)
        try:
            task.load(cfg)
        except UserError as err:
            problems.append(str(err))
    labelled = "label" in adata.obs
    balance = preflight.class_balance(adata.obs["label"] if labelled else pd.Categorical([]))
    result = preflight.verdict(overlap=overlap, balance=balance, split=split, candidates=candidates, extra_problems=problems)
    report = preflight.report(
        data, ids, overlap, balance, split, result,
        split_name=_choice("split", cfg.split.get("_target_")), pretrained=bool(checkpoint), candidates=candidates,
    )

    _print_data(data)
    _print_genes(ids, overlap, candidates, checkpoint)
    if labelled:
        _print_classes(balance)
    if task.uses_split:
        _print_split(split, report["split"]["name"])
    for message in result.warnings:
        warn(message)
    path = run_dir / "inspect.json"
    artifacts.write_json(path, report)
    console.print(f"wrote {path}")
    if not result.ok:
        console.print(f"[bold red]inspect: {len(result.problems)} problem(s): a run with this configuration would fail[/]")
        for message in result.problems[1:]:
            console.print(f"[bold red]error:[/] {message}")
        raise UserError(result.problems[0])
    console.print(
        f"[bold green]inspect: OK[/] ({len(result.warnings)} warning(s)); `scpeft train` with the same overrides should run"
    )
    return report


def _require_set(section: DictConfig, group: str) -> None:
    """A mandatory value left at ??? (e.g. data.path) is the user's to fill: one line, not a traceback."""
    missing = [key for key in section if OmegaConf.is_missing(section, key)]
    if missing:
        raise UserError(f"{', '.join(f'{group}.{key}' for key in missing)} must be set (e.g. {group}.{missing[0]}=...)")


def _choice(group: str, fallback: str | None) -> str | None:
    try:
        return str(HydraConfig.get().runtime.choices[group])
    except Exception:  # outside a Hydra app, or a group without a choice
        return fallback


def _check_split(cfg: DictConfig, adata: anndata.AnnData) -> preflight.SplitCheck:
    missing = [key for key in cfg.split if OmegaConf.is_missing(cfg.split, key)]
    if missing:
        return preflight.SplitCheck(error=f"{', '.join(f'split.{k}' for k in missing)} must be set (e.g. split.{missing[0]}=...)")
    labels = adata.obs["label"].cat.codes.to_numpy().astype(np.int64)
    classes = [str(c) for c in adata.obs["label"].cat.categories]
    try:
        split_fn = instantiate(cfg.split, _partial_=True)
    except UserError as err:
        return preflight.SplitCheck(error=str(err))
    return preflight.check_split(split_fn, adata.obs, labels, classes, seed=cfg.seed, group_key=cfg.split.get("group_key"))


def _gene_key_candidates(cfg: DictConfig, vocab: GeneVocab, overlap: preflight.VocabOverlap) -> list:
    """var columns of the user's file that would match the vocabulary better (data=h5ad only)."""
    var = _source_var(cfg.data)
    if var is None:
        return []
    current = cfg.data.get("gene_key")
    found = preflight.gene_key_candidates(var, vocab, current=current)
    better = [c for c in found if c.count > overlap.count]
    if better:
        return better
    if overlap.vocab_kind in {"symbol", "ensembl"} and overlap.data_kind != overlap.vocab_kind:
        return preflight.gene_key_candidates(var, vocab, current=current, kind=overlap.vocab_kind)
    return []


def _source_var(data_cfg: DictConfig) -> pd.DataFrame | None:
    """The var table of the .h5ad file (backed: the matrix is not read), or None when there is none."""
    path = data_cfg.get("path")
    if not path:
        return None
    try:
        backed = anndata.read_h5ad(Path(path).expanduser(), backed="r")
    except Exception:  # the loader already read it; a hint is not worth a failure
        return None
    try:
        if data_cfg.get("layer") == "raw" and backed.raw is not None:
            return backed.raw.var.copy()
        return backed.var.copy()
    except Exception:
        return None
    finally:
        if backed.file.is_open:
            backed.file.close()


# ------------------------------------------------------------------------------------------ printing
def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_data(data: preflight.DataSummary) -> None:
    console.print(_key_value_table("Data", [
        ("source", data.path or data.source or "?"),
        ("cells", f"{data.n_cells:,}"),
        ("genes", f"{data.n_genes:,}"),
        ("classes", f"{data.n_classes}"),
        ("input", INPUT_WORDS.get(data.input_kind, data.input_kind)),
    ]))


def _print_genes(ids, overlap, candidates, checkpoint) -> None:
    rows = [
        ("identifiers", f"{GENE_ID_KIND_WORDS[ids.kind]} (Ensembl {_pct(ids.ensembl_fraction)}, symbols {_pct(ids.symbol_fraction)})"),
        ("examples", ", ".join(ids.examples)),
    ]
    if overlap is not None:
        vocab = f"{overlap.path} ({overlap.vocab_size:,} genes, {GENE_ID_KIND_WORDS[overlap.vocab_kind]})" if overlap.path else (
            "built from the data's genes (backbone.checkpoint=null)"
        )
        rows += [("vocabulary", vocab), ("in vocabulary", f"{overlap.count:,} / {overlap.n_genes:,} ({_pct(overlap.fraction)})")]
        if overlap.unmatched_examples:
            rows.append(("not found, e.g.", ", ".join(overlap.unmatched_examples)))
        if overlap.fraction < preflight.WARN_OVERLAP:
            rows.append(("hint", overlap.hint))
        for candidate in candidates[:5]:
            rows.append(("try", f"{candidate.override}: {GENE_ID_KIND_WORDS[candidate.kind]}, {candidate.count:,} genes in the vocabulary"))
    console.print(_key_value_table("Gene identifiers", rows))
    if not checkpoint:
        console.print(
            "no backbone.checkpoint: the vocabulary is the data's own genes, so the overlap is 100% by construction, "
            "and the backbone is RANDOMLY INITIALISED; set backbone.checkpoint=DIR to check a pretrained model's vocabulary"
        )


def _print_classes(balance: preflight.ClassBalance) -> None:
    total = int(balance.counts.sum())
    shown = balance.smallest()
    table = Table(title=f"Class balance ({len(balance.counts)} classes, smallest first)", title_justify="left")
    table.add_column("class")
    table.add_column("cells", justify="right")
    table.add_column("share", justify="right")
    for name, count in shown:
        style = "red" if name in balance.tiny else "yellow" if name in balance.small else None
        table.add_row(name, f"{count:,}", _pct(count / total if total else 0.0), style=style)
    if len(balance.counts) > len(shown):
        table.caption = f"{len(balance.counts) - len(shown)} larger classes not shown"
    console.print(table)


def _print_split(check: preflight.SplitCheck, name: str | None) -> None:
    if check.error is not None:
        console.print(f"[bold red]split ({name}) fails:[/] {check.error}")
        return
    counts = check.counts
    title = f"Split {name}: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " cells (smallest classes first)"
    rows = _rows_to_show(check)
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for column in ("train", "val", "test", "total"):
        table.add_column(column, justify="right")
    for name_ in rows:
        row = check.table.loc[name_]
        style = "red" if name_ in check.absent_from_train else None
        table.add_row(name_, *(f"{int(row[s]):,}" for s in ("train", "val", "test")), f"{int(row.sum()):,}", style=style)
    if len(rows) < len(check.table):
        table.caption = f"{len(check.table) - len(rows)} larger classes not shown"
    console.print(table)
    if check.groups is not None:
        groups = Table(title="Groups (donors) per class", title_justify="left")
        groups.add_column("class")
        for column in ("groups", "train groups", "val groups", "test groups", "train cells", "val cells", "test cells"):
            groups.add_column(column, justify="right")
        for name_ in rows:
            row = check.groups.loc[name_]
            style = "red" if name_ in check.absent_from_train else None
            groups.add_row(
                name_, str(int(row["groups"])), *(str(int(row[f"{s}_groups"])) for s in ("train", "val", "test")),
                *(f"{int(row[s]):,}" for s in ("train", "val", "test")), style=style,
            )
        console.print(groups)


def _rows_to_show(check: preflight.SplitCheck) -> list[str]:
    """The smallest classes, plus every class absent from train wherever it ranks."""
    first = list(check.table.index[: preflight.MAX_CLASS_ROWS])
    return first + [c for c in check.absent_from_train if c not in first]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    guarded(inspect_run, options=run_options)(cfg)
