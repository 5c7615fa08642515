"""Tests for the data loaders: what a prepared AnnData looks like and every user-fixable error."""

import hashlib

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpeft_cli.data.loading import load_pbmc68k_reduced, read_h5ad
from scpeft_cli.errors import UserError


def make_counts(n_cells=30, n_genes=12, seed=0, labels=("A", "B", "C")):
    """A tiny counts AnnData: every cell has expression, labels cycle through ``labels``."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no all-zero cells
    obs = pd.DataFrame(
        {
            "celltype": [labels[i % len(labels)] for i in range(n_cells)],
            "donor": [f"d{i % 5}" for i in range(n_cells)],
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{j}" for j in range(n_genes)]}, index=[f"ENSG{j:05d}" for j in range(n_genes)])
    return anndata.AnnData(X=counts, obs=obs, var=var)


def write(adata, tmp_path, name="data.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return str(path)


def assert_prepared(adata):
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert isinstance(adata.obs["label"].dtype, pd.CategoricalDtype)
    assert all(isinstance(c, str) for c in adata.obs["label"].cat.categories)


def test_pbmc68k_reduced_is_prepared_from_raw():
    adata = load_pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert_prepared(adata)
    assert adata.uns["scpeft_input"]["input_kind"] == "log_normalized"
    assert adata.uns["scpeft_input"]["source"] == "pbmc68k_reduced"
    assert adata.uns["scpeft_input"]["path"] is None
    assert set(adata.obs["label"].cat.categories) == set(adata.obs["bulk_labels"].astype(str).unique())
    assert (adata.obs["label"].astype(str) == adata.obs["bulk_labels"].astype(str)).all()
    assert adata.X.data.min() >= 0


def test_pbmc68k_reduced_counts_are_recovered_with_its_totals():
    """Its .raw holds log-normalised values; obs['n_counts'] (over all genes of the original file) turns them back."""
    adata = load_pbmc68k_reduced()
    counts = adata.layers["counts"]
    assert adata.uns["scpeft_input"]["counts"] == "recovered"
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() >= 1
    np.testing.assert_array_equal(adata.obs["scpeft_total_counts"], adata.obs["n_counts"])
    recomputed = np.log1p(counts.multiply(1e4 / adata.obs["n_counts"].to_numpy()[:, None]).toarray())
    np.testing.assert_allclose(recomputed, adata.X.toarray(), atol=2e-3)
    assert (np.asarray(counts.sum(axis=1)).ravel() < adata.obs["n_counts"].to_numpy()).all()  # 765 of all genes


def test_counts_are_kept_with_totals_over_all_genes_before_gene_selection(tmp_path):
    source = make_counts(n_genes=40)
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype", n_top_genes=10)
    assert adata.n_vars == 10 and adata.uns["scpeft_input"]["counts"] == "given"
    np.testing.assert_array_equal(adata.obs["scpeft_total_counts"], source.X.sum(axis=1))
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), source[:, adata.var_names].X)


def test_log_normalised_input_without_totals_has_no_counts_and_a_counts_tokenizer_says_so(tmp_path):
    from scpeft_cli.tokenizers.base import tokenizer_input

    source = make_counts()
    source.X = np.log1p(source.X / source.X.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype")
    assert "counts" not in adata.layers and adata.uns["scpeft_input"]["counts"] == "unknown"

    class CountsTokenizer:
        input_kind = "counts"

    with pytest.raises(UserError, match="this backbone tokenises raw counts.*obs\\['n_counts'\\]"):
        tokenizer_input(adata, CountsTokenizer())


def test_pbmc68k_reduced_min_cells_per_class_drops_small_classes():
    adata = load_pbmc68k_reduced(min_cells_per_class=10)
    assert "CD4+/CD45RA+/CD25- Naive T" not in adata.obs["label"].cat.categories  # 8 cells
    assert adata.n_obs == 700 - 8


def test_counts_are_detected_and_normalised(tmp_path):
    source = make_counts()
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype")
    assert_prepared(adata)
    info = adata.uns["scpeft_input"]
    assert info["input_kind"] == "counts"
    assert info["n_cells"] == 30 and info["n_genes"] == 12
    assert info["label_key"] == "celltype" and info["gene_key"] is None and info["layer"] is None
    assert info["path"].endswith("data.h5ad")
    np.testing.assert_allclose(np.expm1(adata.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)
    assert list(adata.obs["label"].cat.categories) == ["A", "B", "C"]
    assert "donor" in adata.obs.columns


def test_log_normalised_input_is_kept(tmp_path):
    source = make_counts()
    source.X = np.log1p(source.X / source.X.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype")
    assert adata.uns["scpeft_input"]["input_kind"] == "log_normalized"
    np.testing.assert_array_equal(adata.X.toarray(), source.X)


def test_gene_key_uses_var_column(tmp_path):
    adata = read_h5ad(path=write(make_counts(), tmp_path), label_key="celltype", gene_key="symbol")
    assert adata.var_names[0] == "SYM0"


def test_layer_and_raw(tmp_path):
    source = make_counts()
    source.layers["counts"] = source.X.copy()
    source.raw = source.copy()
    source.X = np.full(source.shape, -1.0, dtype=np.float32)  # scaled-looking X must be ignored
    path = write(source, tmp_path)
    from_layer = read_h5ad(path=path, label_key="celltype", layer="counts")
    from_raw = read_h5ad(path=path, label_key="celltype", layer="raw")
    for adata in (from_layer, from_raw):
        assert adata.uns["scpeft_input"]["input_kind"] == "counts"
        np.testing.assert_allclose(np.expm1(adata.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)
    assert from_raw.uns["scpeft_input"]["layer"] == "raw"


def test_input_file_is_unchanged(tmp_path):
    path = write(make_counts(), tmp_path)
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    read_h5ad(path=path, label_key="celltype")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_h5ad(path=str(tmp_path / "nope.h5ad"), label_key="celltype")


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.h5ad"
    path.write_text("not an h5ad file")
    with pytest.raises(UserError, match="cannot read .* as an .h5ad file"):
        read_h5ad(path=str(path), label_key="celltype")


def test_missing_label_key_lists_columns(tmp_path):
    with pytest.raises(UserError, match="label column 'cell_type' not in obs; available: celltype, donor"):
        read_h5ad(path=write(make_counts(), tmp_path), label_key="cell_type")


def test_missing_gene_key_lists_columns(tmp_path):
    with pytest.raises(UserError, match="gene column 'gene' not in var; available: symbol"):
        read_h5ad(path=write(make_counts(), tmp_path), label_key="celltype", gene_key="gene")


def test_missing_layer_lists_layers(tmp_path):
    source = make_counts()
    source.layers["counts"] = source.X.copy()
    path = write(source, tmp_path)
    with pytest.raises(UserError, match="layer 'spliced' not in the file; available: counts"):
        read_h5ad(path=path, label_key="celltype", layer="spliced")
    with pytest.raises(UserError, match="layer 'raw' not in the file"):
        read_h5ad(path=path, label_key="celltype", layer="raw")


def test_negative_values_suggest_layer(tmp_path):
    source = make_counts()
    source.X[0, 0] = -0.5
    with pytest.raises(UserError, match="negative values; scaled data was probably given.*data.layer"):
        read_h5ad(path=write(source, tmp_path), label_key="celltype")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values(tmp_path, value):
    source = make_counts()
    source.X[1, 2] = value
    with pytest.raises(UserError, match="1 NaN or infinite values; scaled data was probably given"):
        read_h5ad(path=write(source, tmp_path), label_key="celltype")


def test_missing_labels_error_or_drop(tmp_path):
    source = make_counts()
    source.obs["celltype"] = source.obs["celltype"].astype(object)
    source.obs.loc[["cell0", "cell1"], "celltype"] = np.nan
    path = write(source, tmp_path)
    with pytest.raises(UserError, match="2 cells have no label in obs\\['celltype'\\].*data.drop_unlabeled=true"):
        read_h5ad(path=path, label_key="celltype")
    adata = read_h5ad(path=path, label_key="celltype", drop_unlabeled=True)
    assert adata.n_obs == 28
    assert "nan" not in adata.obs["label"].cat.categories


def test_duplicated_genes(tmp_path):
    source = make_counts()
    source.var["symbol"] = ["SYM0", "SYM0"] + [f"SYM{j}" for j in range(2, 12)]
    with pytest.raises(UserError, match="1 duplicated gene identifiers \\(e.g. SYM0\\)"):
        read_h5ad(path=write(source, tmp_path), label_key="celltype", gene_key="symbol")


def test_all_zero_cells_dropped(tmp_path, capsys):
    source = make_counts()
    source.X[:3] = 0
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype")
    assert adata.n_obs == 27
    assert "dropping 3 cells whose expression is all zero" in capsys.readouterr().out


def test_all_cells_zero(tmp_path):
    source = make_counts()
    source.X[:] = 0
    with pytest.raises(UserError, match="every cell has all-zero expression"):
        read_h5ad(path=write(source, tmp_path), label_key="celltype")


def test_min_cells_per_class_warns_with_counts(tmp_path, capsys):
    source = make_counts(labels=("A", "A", "A", "A", "B", "C"))  # 20 A, 5 B, 5 C
    source.obs.loc[source.obs_names[:3], "celltype"] = "D"
    adata = read_h5ad(path=write(source, tmp_path), label_key="celltype", min_cells_per_class=5)
    assert list(adata.obs["label"].cat.categories) == ["A", "B", "C"]
    assert "dropping 1 classes with fewer than 5 cells: D (3)" in capsys.readouterr().out
