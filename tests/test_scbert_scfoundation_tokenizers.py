"""scBERT and scFoundation tokenisation: equal to per-cell references written as upstream's steps read."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.tokenizers.scbert import ScBERTTokenizer, read_panel_h5ad
from scpeft_cli.tokenizers.scfoundation import ScFoundationTokenizer, read_panel_tsv

PANEL = tuple(f"G{i:02d}" for i in range(24))  # G20..G23 are never in the data


def toy_data(seed=0, n_cells=40):
    """Counts over data genes in a shuffled order: most panel genes, a duplicate of one (the second column
    must be ignored), genes outside the panel; cell 0 has counts only outside the panel (panel total 0),
    cell 1 is all zero, cell 2 has a panel total of exactly 1, cell 3 a panel total of 0.5."""
    rng = np.random.default_rng(seed)
    genes = [*PANEL[:20], "G05", "OUT1", "OUT2", "OUT3"]
    order = rng.permutation(len(genes))
    genes = [genes[i] for i in order]
    dense = rng.poisson(1.5, size=(n_cells, len(genes))) * (rng.random((n_cells, len(genes))) < 0.5)
    dense = dense.astype(np.float64)
    outside = np.array([g.startswith("OUT") for g in genes])
    in_panel = np.array([g in PANEL for g in genes])
    dense[0] = 0
    dense[0, outside] = 3
    dense[1] = 0
    dense[2] = 0
    dense[2, genes.index("G07")] = 1
    dense[2, outside] = 5
    dense[3] = 0
    dense[3, np.flatnonzero(in_panel)[0]] = 0.5
    return sp.csr_matrix(dense), genes


def reordered(dense, genes, panel):
    """preprocess.py / main_gene_selection: each panel gene takes its (first) data column, else zeros."""
    out = np.zeros((dense.shape[0], len(panel)))
    for position, gene in enumerate(panel):
        if gene in genes:
            out[:, position] = dense[:, genes.index(gene)]
    return out


def scbert_reference(X, genes, panel, n_bins):
    panel_x = reordered(np.asarray(X.todense(), dtype=np.float64), genes, panel)
    cells = []
    for row in panel_x:
        total = row.sum()
        normalised = row / (total / 1e4) if total > 0 else row  # normalize_total(target_sum=1e4)
        full_seq = np.log2(1 + normalised)  # log1p(base=2)
        full_seq[full_seq > n_bins] = n_bins
        cells.append(np.concatenate([full_seq.astype(np.int64), [0]]))
    return cells


def scfoundation_reference(X, genes, panel, target_depth):
    """get_embedding.py, single cell, pre_normalized F, tgthighres t<T>: (positions, values) per cell."""
    panel_x = reordered(np.asarray(X.todense(), dtype=np.float64), genes, panel)
    cells = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for row in panel_x:
            total = row.sum()
            tmpdata = np.log1p(row / total * 1e4).tolist()
            x = torch.tensor(tmpdata + [float(target_depth), np.log10(total)])
            keep = x > 0
            cells.append((torch.arange(len(panel) + 2)[keep].numpy(), x[keep].float().numpy()))
    return cells


# scBERT -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [5, 2])
def test_scbert_matches_reference(n_bins):
    X, genes = toy_data()
    tokenizer = ScBERTTokenizer(PANEL, n_bins=n_bins)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    expected = scbert_reference(X, genes, PANEL, n_bins)
    assert len(tokens) == X.shape[0]
    assert set(tokens.lengths.tolist()) == {len(PANEL) + 1}
    assert tokens.values is None
    for i, reference in enumerate(expected):
        np.testing.assert_array_equal(tokens.cell(i)[0].astype(np.int64), reference, err_msg=f"cell {i}")
    assert tokens.gene_ids.max() <= n_bins and tokens.gene_ids.min() >= 0
    assert tokens.genes_matched == 20 and tokens.genes_total == len(genes)  # G05's second column not counted
    assert not tokens.cell(0)[0].any() and not tokens.cell(1)[0].any()  # panel total 0: all zeros
    assert np.all(tokens.gene_ids.reshape(len(tokens), -1)[:, 20:] == 0)  # panel genes absent, and the appended 0


def test_scbert_drops_outside_genes_and_takes_first_duplicate():
    genes = ["B", "OUT", "A", "B"]
    X = sp.csr_matrix(np.array([[10.0, 1000.0, 0.0, 99.0]]))
    ids = ScBERTTokenizer(("A", "B", "C")).tokenize(X, genes, seed=0).cell(0)[0]
    # B is the whole panel total (the OUT column is ignored): 10 / 10 * 1e4 -> log2(10001) -> capped at 5
    np.testing.assert_array_equal(ids, [0, 5, 0, 0])


def test_scbert_bin_edges_are_exact():
    """A normalised count of exactly 2**k - 1 gives log2(1 + x) = k: token k, not k - 1."""
    counts = np.array([1.0, 3.0, 7.0, 15.0, 31.0, 0.0])
    counts[5] = 1e4 - counts.sum()  # total 1e4: normalised = counts
    panel = tuple("ABCDEF")
    X = sp.csr_matrix(counts[None, :])
    ids = ScBERTTokenizer(panel, n_bins=5).tokenize(X, list(panel), seed=0).cell(0)[0]
    np.testing.assert_array_equal(ids, [1, 2, 3, 4, 5, 5, 0])


def test_scbert_integer_counts_and_unsorted_csr():
    X, genes = toy_data(seed=1)
    coo = X.tocoo()
    order = np.random.default_rng(0).permutation(coo.nnz)
    shuffled = sp.csr_matrix((coo.data[order], (coo.row[order], coo.col[order])), shape=X.shape)
    shuffled.has_sorted_indices = False
    tokenizer = ScBERTTokenizer(PANEL)
    a = tokenizer.tokenize(X.astype(np.int64).astype(np.float64), genes, seed=0)
    b = tokenizer.tokenize(sp.csr_matrix(X.toarray().round().astype(np.int32)), genes, seed=0)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(tokenizer.tokenize(shuffled, genes, seed=0).gene_ids, tokenizer.tokenize(X, genes, seed=0).gene_ids)


def test_scbert_collate_vocab_settings_and_save(tmp_path):
    X, genes = toy_data()
    tokenizer = ScBERTTokenizer(PANEL)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    batch = tokenizer.collate([tokens.cell(i) for i in (4, 5, 6)])
    assert batch["tokens"].shape == (3, len(PANEL) + 1) and batch["tokens"].dtype == torch.long
    assert batch["gene_ids"] is batch["tokens"]
    assert batch["padding_mask"].shape == (3, len(PANEL) + 1) and not batch["padding_mask"].any()
    np.testing.assert_array_equal(batch["tokens"][1].numpy(), tokens.cell(5)[0])
    with pytest.raises(ValueError):
        tokenizer.collate([(np.zeros(3, dtype=np.int8), None)])

    assert tokenizer.vocab.genes == list(PANEL)
    assert tokenizer.vocab.lookup(["G03", "nope"]).tolist() == [3, -1]
    assert tokenizer.num_tokens == 7

    settings = tokenizer.cache_settings()
    assert ScBERTTokenizer(PANEL).cache_settings() == settings
    assert ScBERTTokenizer(PANEL, n_bins=4).cache_settings() != settings
    assert ScBERTTokenizer(PANEL[::-1]).cache_settings() != settings

    tokenizer.save(tmp_path)
    assert (tmp_path / "scbert_panel.txt").read_text().splitlines() == list(PANEL)
    assert ScBERTTokenizer.load_saved(tmp_path) == tokenizer

    restored = TokenizedCells.from_arrays(tokens.arrays())
    np.testing.assert_array_equal(restored.gene_ids, tokens.gene_ids)


def test_scbert_refuses_bad_input():
    with pytest.raises(UserError, match="none of the"):
        ScBERTTokenizer(PANEL).tokenize(sp.csr_matrix(np.ones((2, 2))), ["x", "y"], seed=0)
    with pytest.raises(UserError, match="negative"):
        ScBERTTokenizer(PANEL).tokenize(sp.csr_matrix(-np.ones((2, 2))), ["G00", "G01"], seed=0)
    with pytest.raises(UserError, match="empty"):
        ScBERTTokenizer(())
    with pytest.raises(UserError, match="n_bins"):
        ScBERTTokenizer(PANEL, n_bins=0)


# scFoundation -------------------------------------------------------------------------------------------


def assert_cells_match(tokens, expected):
    assert len(tokens) == len(expected)
    for i, (positions, values) in enumerate(expected):
        ids, vals = tokens.cell(i)
        np.testing.assert_array_equal(ids, positions, err_msg=f"cell {i}")
        np.testing.assert_array_equal(vals, values, err_msg=f"cell {i}")


@pytest.mark.parametrize("target_depth", [4.0, 2.5])
def test_scfoundation_matches_reference(target_depth):
    X, genes = toy_data()
    tokenizer = ScFoundationTokenizer(PANEL, target_depth=target_depth)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    assert tokens.gene_ids.dtype == np.int32 and tokens.values.dtype == np.float32
    assert_cells_match(tokens, scfoundation_reference(X, genes, PANEL, target_depth))
    t, s = len(PANEL), len(PANEL) + 1
    # panel total 0 (cells 0 and 1): T alone; total 1 (cell 2): its gene and T, S = log10(1) = 0 dropped;
    # total 0.5 (cell 3): S < 0 dropped
    for cell in (0, 1):
        np.testing.assert_array_equal(tokens.cell(cell)[0], [t])
        np.testing.assert_array_equal(tokens.cell(cell)[1], np.float32([target_depth]))
    np.testing.assert_array_equal(tokens.cell(2)[0], [7, t])
    assert s not in tokens.cell(3)[0]
    for i in range(4, len(tokens)):
        ids = tokens.cell(i)[0]
        assert ids[-2:].tolist() == [t, s] and np.all(np.diff(ids) > 0) and ids.max() <= s
        assert not np.isin(np.arange(20, 24), ids).any()  # panel genes absent from the data never appear
    assert tokens.genes_matched == 20


def test_scfoundation_first_duplicate_and_outside_genes():
    genes = ["B", "OUT", "A", "B"]
    X = sp.csr_matrix(np.array([[10.0, 1000.0, 30.0, 99.0]]))
    ids, values = ScFoundationTokenizer(("A", "B", "C")).tokenize(X, genes, seed=0).cell(0)
    np.testing.assert_array_equal(ids, [0, 1, 3, 4])  # A, B, T, S; C absent
    expected = np.float32([np.log1p(30 / 40 * 1e4), np.log1p(10 / 40 * 1e4), 4.0, np.log10(40.0)])
    np.testing.assert_array_equal(values, expected)


def test_scfoundation_subsampling_keeps_t_and_s_and_is_seeded():
    X, genes = toy_data(seed=2, n_cells=60)
    full = ScFoundationTokenizer(PANEL).tokenize(X, genes, seed=0)
    limit = 6
    tokenizer = ScFoundationTokenizer(PANEL, max_seq_len=limit)
    tokens = tokenizer.tokenize(X, genes, seed=3)
    t, s = len(PANEL), len(PANEL) + 1
    assert np.any(full.lengths > limit)
    for i in range(len(tokens)):
        ids, values = tokens.cell(i)
        full_ids, full_values = full.cell(i)
        if len(full_ids) <= limit:
            np.testing.assert_array_equal(ids, full_ids)
            np.testing.assert_array_equal(values, full_values)
            continue
        assert len(ids) == limit
        assert ids[-2:].tolist() == [t, s]  # T and S always kept, last
        assert np.all(np.diff(ids) > 0)  # still in panel order
        at = np.searchsorted(full_ids, ids)
        np.testing.assert_array_equal(full_ids[at], ids)  # a subset of the cell's own tokens ...
        np.testing.assert_array_equal(full_values[at], values)  # ... with their values
    again = tokenizer.tokenize(X, genes, seed=3)
    np.testing.assert_array_equal(again.gene_ids, tokens.gene_ids)
    np.testing.assert_array_equal(again.values, tokens.values)
    other = tokenizer.tokenize(X, genes, seed=4)
    np.testing.assert_array_equal(other.indptr, tokens.indptr)
    assert not np.array_equal(other.gene_ids, tokens.gene_ids)


def test_scfoundation_subsampling_is_uniform():
    """Identical cells of 20 genes cut to 5 (+ T, S): each gene kept in about a quarter of them."""
    panel = tuple(f"g{i}" for i in range(20))
    X = sp.csr_matrix(np.tile(np.arange(1.0, 21.0), (4000, 1)))
    tokens = ScFoundationTokenizer(panel, max_seq_len=7).tokenize(X, list(panel), seed=0)
    assert set(tokens.lengths.tolist()) == {7}
    kept = np.bincount(tokens.gene_ids.reshape(4000, 7)[:, :5].ravel(), minlength=20) / 4000
    assert np.all(np.abs(kept - 0.25) < 0.04)


def test_scfoundation_collate_pads():
    X, genes = toy_data()
    tokenizer = ScFoundationTokenizer(PANEL)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    cells = [tokens.cell(i) for i in (0, 4, 5)]
    batch = tokenizer.collate(cells)
    width = max(len(ids) for ids, _ in cells)
    assert batch["gene_ids"].shape == batch["values"].shape == batch["padding_mask"].shape == (3, width)
    assert batch["gene_ids"].dtype == torch.long and batch["values"].dtype == torch.float32
    assert batch["padding_mask"].dtype == torch.bool
    for row, (ids, values) in enumerate(cells):
        n = len(ids)
        assert not batch["padding_mask"][row, :n].any() and batch["padding_mask"][row, n:].all()
        np.testing.assert_array_equal(batch["gene_ids"][row, :n].numpy(), ids)
        np.testing.assert_array_equal(batch["values"][row, :n].numpy(), values)
        assert (batch["gene_ids"][row, n:] == 0).all() and (batch["values"][row, n:] == 103.0).all()


def test_scfoundation_settings_vocab_and_save(tmp_path):
    tokenizer = ScFoundationTokenizer(PANEL)
    settings = tokenizer.cache_settings()
    assert ScFoundationTokenizer(PANEL).cache_settings() == settings
    for changed in (
        ScFoundationTokenizer(PANEL, target_depth=5.0), ScFoundationTokenizer(PANEL, max_seq_len=10),
        ScFoundationTokenizer(PANEL, pad_value=-1.0), ScFoundationTokenizer(PANEL[:-1]),
    ):  # fmt: skip
        assert changed.cache_settings() != settings
    assert tokenizer.vocab.lookup(["G23", "x"]).tolist() == [23, -1]
    tokenizer.save(tmp_path)
    text = (tmp_path / "scfoundation_panel.tsv").read_text().splitlines()
    assert text[0] == "gene_name\tindex" and text[1] == "G00\t0" and len(text) == len(PANEL) + 1
    assert read_panel_tsv(tmp_path / "scfoundation_panel.tsv") == PANEL
    assert ScFoundationTokenizer.load_saved(tmp_path, max_seq_len=10) == ScFoundationTokenizer(PANEL, max_seq_len=10)


def test_scfoundation_refuses_bad_settings():
    for settings in ({"max_seq_len": 2}, {"target_depth": 0.0}, {"target_depth": 103.0}, {"target_depth": float("nan")}):
        with pytest.raises(UserError):
            ScFoundationTokenizer(PANEL, **settings)


# panel readers ------------------------------------------------------------------------------------------


def test_read_panel_tsv(tmp_path):
    path = tmp_path / "OS_scRNA_gene_index.tsv"
    path.write_text("gene_name\tindex\nA1BG\t1\nA1CF\t2\nA2M\t3\n")
    assert read_panel_tsv(path) == ("A1BG", "A1CF", "A2M")
    path.write_text("index\tgene_name\textra\n0\tX\ta\n1\tY\tb\n")  # columns by name, in any order
    assert read_panel_tsv(path) == ("X", "Y")


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "empty"),
        ("gene\tid\nA\t0\n", "header"),
        ("gene_name\tindex\n", "no genes"),
        ("gene_name\tindex\nA\t0\nB\n", "fields"),
        ("gene_name\tindex\nA\tzero\n", "not an integer"),
        ("gene_name\tindex\nA\t0\nB\t2\nC\t1\n", "index order"),
        ("gene_name\tindex\nA\t0\n\t1\n", "empty gene name"),
    ],
)
def test_read_panel_tsv_refuses_malformed(tmp_path, text, what):
    path = tmp_path / "panel.tsv"
    path.write_text(text)
    with pytest.raises(UserError, match=what) as err:
        read_panel_tsv(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_panel_tsv_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_panel_tsv(tmp_path / "missing.tsv")


def test_read_panel_h5ad(tmp_path):
    path = tmp_path / "panglao.h5ad"
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((3, 4), dtype=np.float32)))
    adata.var_names = ["MT-A", "B", "C", "A"]
    adata.write_h5ad(path)
    assert read_panel_h5ad(path) == ("MT-A", "B", "C", "A")
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    for wrong in (bad, tmp_path / "missing.h5ad"):
        with pytest.raises(UserError, match="cannot read the gene panel") as err:
            read_panel_h5ad(wrong)
        assert str(wrong) in str(err.value) and "\n" not in str(err.value)


def test_scfoundation_with_zero_genes_gives_every_filled_panel_gene():
    """include_zero_genes (task=perturbation's input): every panel gene the data has, in panel order, 0 where
    the cell has no count, the others as upstream; then T and S as without zero genes."""
    X, genes = toy_data()
    tokens = ScFoundationTokenizer(PANEL, include_zero_genes=True).tokenize(X, genes, seed=0)
    plain = ScFoundationTokenizer(PANEL).tokenize(X, genes, seed=0)
    panel_x = reordered(np.asarray(X.todense(), dtype=np.float64), genes, PANEL)[:, :20]  # G20..G23: not in the data
    for i, row in enumerate(panel_x):
        ids, values = tokens.cell(i)
        total = row.sum()
        expected = np.log1p(row / total * 1e4) if total > 0 else np.zeros(20)
        np.testing.assert_array_equal(ids[:20], np.arange(20))
        np.testing.assert_array_equal(values[:20], expected.astype(np.float32))
        plain_ids, plain_values = plain.cell(i)
        special = plain_ids >= len(PANEL)
        np.testing.assert_array_equal(ids[20:], plain_ids[special])  # T, and S where the total is > 1
        np.testing.assert_array_equal(values[20:], plain_values[special])
    settings = ScFoundationTokenizer(PANEL).cache_settings()
    assert ScFoundationTokenizer(PANEL, include_zero_genes=True).cache_settings() != settings
