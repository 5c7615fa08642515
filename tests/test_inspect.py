"""`scpeft inspect`: preflight checks (data, gene identifiers, vocabulary overlap, classes, split) and its verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpeft_cli.data import preflight
from scpeft_cli.tokenizers.vocab import SPECIAL_TOKENS, GeneVocab, ensembl_fraction, gene_id_hint, gene_id_kind

N_GENES = 30
ENSEMBL = [f"ENSG{i:011d}" for i in range(1, N_GENES + 1)]
SYMBOLS = [f"GENE{i}" for i in range(1, N_GENES + 1)]


def run_inspect(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`scpeft inspect ARGS` in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "scpeft_cli", "inspect", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_h5ad(path, *, class_sizes=None, donors=("d1", "d2", "d3", "d4"), genes=ENSEMBL, seed=0):
    """Raw counts; var_names `genes`, var['symbol'] the matching symbols; obs cell_type and donor (round robin)."""
    class_sizes = class_sizes or {"A": 24, "B": 24}
    rng = np.random.default_rng(seed)
    labels = [name for name, n in class_sizes.items() for _ in range(n)]
    counts = rng.poisson(2.0, size=(len(labels), len(genes))).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    obs = pd.DataFrame(
        {"cell_type": labels, "donor": [donors[i % len(donors)] for i in range(len(labels))]},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    var = pd.DataFrame(
        {"symbol": SYMBOLS[: len(genes)], "feature_type": "Gene Expression", "length": np.arange(len(genes))},
        index=list(genes),
    )
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path


def write_checkpoint(folder, genes=SYMBOLS):
    """An scGPT folder whose vocab.json uses `genes`; the weights are a placeholder inspect must never read."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = list(genes) + list(SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "args.json").write_text(json.dumps({"embsize": 8, "nheads": 2, "d_hid": 8, "nlayers": 1}))
    (folder / "best_model.pt").write_bytes(b"not a checkpoint: inspect never reads the weights")
    return folder


def h5ad_args(path, *extra):
    return ["data=h5ad", f"data.path={path}", "data.label_key=cell_type", *extra]


def read_report(run_dir) -> dict:
    return json.loads((run_dir / "inspect.json").read_text())


# ------------------------------------------------------------------------------------------ gene ids
def test_gene_id_kind_by_ninety_percent_majority():
    assert gene_id_kind(["ENSG00000141510", "ENSMUSG00000059552.3", "ENSDARG00000000001"]) == "ensembl"
    assert gene_id_kind(["ACTB", "CD3E", "MT-CO1", "HLA-DRA"]) == "symbol"
    assert gene_id_kind(ENSEMBL[:5] + SYMBOLS[:5]) == "mixed"
    assert gene_id_kind(ENSEMBL[:9] + ["ACTB"]) == "ensembl"  # 90%
    assert gene_id_kind(ENSEMBL[:8] + ["ACTB", "CD3E"]) == "mixed"  # 80%
    assert gene_id_kind(SYMBOLS[:9] + ENSEMBL[:1]) == "symbol"
    # special tokens of a vocabulary are not genes; too few digits or a lower-case prefix are not Ensembl ids
    assert gene_id_kind(ENSEMBL[:3] + ["<pad>", "<cls>", "<eoc>"]) == "ensembl"
    assert ensembl_fraction(["ENSG123", "ensg00000141510", "ENSG00000141510.12"]) == pytest.approx(1 / 3)


def test_gene_id_hint_names_both_kinds_and_the_fix():
    hint = gene_id_hint("ensembl", "symbol")
    assert "Ensembl" in hint and "symbols" in hint and "data.gene_key" in hint
    assert "Ensembl ids" in gene_id_hint("symbol", "ensembl").split(":")[-1]


def test_map_genes_messages_name_the_identifier_kinds():
    from scpeft_cli.errors import UserError

    vocab = GeneVocab.from_genes(SYMBOLS)
    with pytest.raises(UserError, match="none of the .* genes are in the model vocabulary") as err:
        vocab.map_genes(ENSEMBL)
    assert "Ensembl ids" in str(err.value) and "gene symbols" in str(err.value) and "data.gene_key" in str(err.value)


# ---------------------------------------------------------------------------------- preflight units
def test_vocab_overlap_counts_like_map_genes():
    vocab = GeneVocab.from_genes(SYMBOLS[:10])
    genes = SYMBOLS[:10] + ENSEMBL[:10] + ["<pad>"]
    overlap = preflight.vocab_overlap(genes, vocab, source="checkpoint")
    columns, _ = vocab.map_genes(genes)
    assert overlap.count == len(columns) == 10 and overlap.n_genes == 21
    assert overlap.fraction == pytest.approx(10 / 21)
    assert overlap.unmatched_examples[0] == ENSEMBL[0] and overlap.n_unmatched == 11
    assert overlap.vocab_kind == "symbol" and overlap.vocab_size == 10


def test_overlap_thresholds():
    vocab = GeneVocab.from_genes(SYMBOLS)
    none = preflight.vocab_overlap(ENSEMBL, vocab, source="checkpoint")
    problems, _ = preflight.overlap_messages(none)
    assert problems and "none of the 30 genes" in problems[0] and "Ensembl" in problems[0]
    low = preflight.vocab_overlap(SYMBOLS[:2] + ENSEMBL[:28], vocab, source="checkpoint")  # 6.7% < MIN_OVERLAP
    problems, warnings = preflight.overlap_messages(low)
    assert problems and "MIN_OVERLAP" in problems[0] and not warnings
    half = preflight.vocab_overlap(SYMBOLS[:10] + ENSEMBL[:20], vocab, source="checkpoint")  # 33%: warning only
    problems, warnings = preflight.overlap_messages(half)
    assert not problems and warnings and "33.3%" in warnings[0]
    full = preflight.vocab_overlap(SYMBOLS, vocab, source="checkpoint")
    assert preflight.overlap_messages(full) == ([], [])


def test_gene_key_candidates_prefer_the_column_the_vocabulary_knows():
    var = pd.DataFrame(
        {"symbol": SYMBOLS, "feature_type": "Gene Expression", "length": range(N_GENES), "ids": [str(i) for i in range(N_GENES)]},
        index=ENSEMBL,
    )
    vocab = GeneVocab.from_genes(SYMBOLS)
    found = preflight.gene_key_candidates(var, vocab)
    assert [c.column for c in found] == ["symbol"] and found[0].count == N_GENES
    assert found[0].override == "data.gene_key=symbol"
    # with the symbols already in use, var_names (Ensembl ids) are proposed for an Ensembl vocabulary
    ensembl_vocab = GeneVocab.from_genes(ENSEMBL)
    back = preflight.gene_key_candidates(var, ensembl_vocab, current="symbol")
    assert back[0].column is None and back[0].override == "data.gene_key=null"


def test_class_balance_sorted_smallest_first_with_tiny_and_small():
    labels = pd.Categorical(["a"] * 2 + ["b"] * 5 + ["c"] * 30 + ["d"] * 12)
    balance = preflight.class_balance(labels)
    assert list(balance.counts.index) == ["a", "b", "d", "c"]
    assert balance.tiny == ["a"] and balance.small == ["b"]
    warnings = preflight.class_messages(balance)
    assert "data.min_cells_per_class=3" in warnings[0] and "a (2)" in warnings[0]
    assert "fewer than 10 cells" in warnings[1] and "b (5)" in warnings[1]
    assert preflight.class_balance(pd.Categorical(["x"] * 40)).smallest() == [("x", 40)]


def test_check_split_flags_classes_tested_but_never_trained():
    classes = ["big", "rare"]
    labels = np.array([0] * 10 + [1] * 4)
    obs = pd.DataFrame({"donor": ["d1"] * 5 + ["d2"] * 5 + ["d3"] * 4})
    fixed = np.array(["train"] * 5 + ["val"] * 5 + ["test"] * 4)

    def split_fn(*, obs, labels, seed):
        return fixed

    check = preflight.check_split(split_fn, obs, labels, classes, seed=0, group_key="donor")
    assert check.error is None and check.counts == {"train": 5, "val": 5, "test": 4}
    assert list(check.table.index) == ["rare", "big"]  # smallest first
    assert check.table.loc["rare"].to_dict() == {"train": 0, "val": 0, "test": 4}
    assert check.absent_from_train == ["rare"] and check.in_test_not_train == ["rare"]
    assert check.groups.loc["big", "groups"] == 2 and check.groups.loc["rare", "test_groups"] == 1
    problems, warnings = preflight.split_messages(check)
    assert not problems and "absent from train" in warnings[0] and "rare (test 4)" in warnings[0]


def test_check_split_turns_the_split_error_into_a_problem():
    from scpeft_cli.data.splits import group_split

    obs = pd.DataFrame({"donor": ["d1", "d2"] * 5})
    check = preflight.check_split(
        lambda **kw: group_split(**kw, group_key="donor"), obs, np.zeros(10, dtype=int), ["a"], seed=0
    )
    assert check.error and "at least 3 groups" in check.error and check.counts == {}
    result = preflight.verdict(overlap=None, balance=preflight.class_balance(pd.Categorical(["a"] * 10)), split=check)
    assert not result.ok and result.problems[0].startswith("split: ")


def test_the_checkpoint_vocabulary_is_read_without_weights_and_names_what_is_missing(tmp_path, compose_config):
    from scpeft_cli.assembly import read_vocabulary
    from scpeft_cli.errors import UserError

    def vocabulary(folder):
        return read_vocabulary(compose_config(["backbone=scgpt", f"backbone.checkpoint={folder}"]))

    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(UserError, match="lacks best_model.pt, vocab.json, args.json"):
        vocabulary(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        vocabulary(tmp_path / "absent")
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "best_model.pt").write_bytes(b"never read")  # inspect reads no weights
    assert vocabulary(folder).token_to_id["GENE1"] == 0
    assert read_vocabulary(compose_config(["backbone=scgpt"])) is None  # random: the data's genes


# ------------------------------------------------------------------------------------------ the CLI
def test_default_pbmc68k_reduced_passes(tmp_path):
    result = run_inspect(f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(tmp_path)
    assert report["ok"] is True and report["problems"] == []
    assert (report["n_cells"], report["n_genes"], report["n_classes"]) == (700, 765, 10)
    assert report["input_kind"] == "log_normalized" and report["gene_id_kind"] == "symbol"
    assert report["vocab_overlap"]["count"] == 765 and report["vocab_overlap"]["fraction"] == 1.0
    assert report["vocab_overlap"]["source"] == "data" and report["pretrained"] is False
    assert sum(report["split_counts"].values()) == 700
    assert report["smallest_classes"][0]["cells"] == min(c["cells"] for c in report["smallest_classes"])
    assert "RANDOMLY INITIALISED" in result.stdout and "100% by construction" in result.stdout


def test_ensembl_data_against_a_symbol_vocabulary_fails_and_points_at_gene_key(tmp_path):
    data = write_h5ad(tmp_path / "ens.h5ad")
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    result = run_inspect(*h5ad_args(data, "backbone=scgpt", f"backbone.checkpoint={checkpoint}", f"hydra.run.dir={run_dir}"))
    assert result.returncode == 2, result.stdout + result.stderr
    report = read_report(run_dir)  # written before exiting
    assert report["ok"] is False and report["gene_id_kind"] == "ensembl" and report["input_kind"] == "counts"
    assert report["vocab_overlap"]["count"] == 0 and report["vocab_overlap"]["vocab_id_kind"] == "symbol"
    assert [c["column"] for c in report["gene_key_candidates"]] == ["symbol"]
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(error_lines) == len(report["problems"]) == 1
    assert "Ensembl" in error_lines[0] and "data.gene_key=symbol" in error_lines[0]
    assert "Traceback" not in result.stderr

    # the suggested fix passes
    fixed_dir = tmp_path / "fixed"
    fixed = run_inspect(*h5ad_args(data, "data.gene_key=symbol", "backbone=scgpt", f"backbone.checkpoint={checkpoint}",
                                   f"hydra.run.dir={fixed_dir}"))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert read_report(fixed_dir)["vocab_overlap"]["fraction"] == 1.0 and read_report(fixed_dir)["pretrained"] is True


def test_checkpoint_without_vocab_is_a_problem_naming_the_file(tmp_path):
    data = write_h5ad(tmp_path / "ens.h5ad")
    (tmp_path / "ckpt").mkdir()
    result = run_inspect(*h5ad_args(data, f"backbone.checkpoint={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert result.returncode == 2
    assert "vocab.json" in read_report(tmp_path / "run")["problems"][0]


def test_group_split_with_two_donors_fails(tmp_path):
    data = write_h5ad(tmp_path / "two.h5ad", donors=("d1", "d2"))
    result = run_inspect(*h5ad_args(data, "split=group", "split.group_key=donor", f"hydra.run.dir={tmp_path}"))
    assert result.returncode == 2, result.stdout + result.stderr
    report = read_report(tmp_path)
    assert report["ok"] is False and "at least 3 groups" in report["problems"][0]
    assert report["split"]["error"] and report["split"]["name"] == "group"
    assert any(line.startswith("error:") and "at least 3 groups" in line for line in result.stdout.splitlines())


def test_group_split_reports_donors_per_class(tmp_path):
    data = write_h5ad(tmp_path / "four.h5ad", genes=SYMBOLS)
    result = run_inspect(*h5ad_args(data, "split=group", "split.group_key=donor", f"hydra.run.dir={tmp_path}"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(tmp_path)
    groups = report["split"]["groups_per_class"]
    assert set(groups) == {"A", "B"} and groups["A"]["groups"] == 4
    assert sum(groups["A"][s] for s in ("train", "val", "test")) == 24
    assert "Groups (donors) per class" in result.stdout


def test_a_tiny_class_is_a_warning(tmp_path):
    data = write_h5ad(tmp_path / "tiny.h5ad", class_sizes={"A": 30, "B": 30, "C": 5}, genes=SYMBOLS)
    result = run_inspect(*h5ad_args(data, f"hydra.run.dir={tmp_path}"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(tmp_path)
    assert report["ok"] is True and report["n_classes"] == 3
    assert any("C (5)" in w and "fewer than 10 cells" in w for w in report["warnings"])
    assert report["smallest_classes"][0] == {"class": "C", "cells": 5}
    assert "WARNING" in result.stdout
