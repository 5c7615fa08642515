"""scGPT tokenisation: bins as upstream, <cls> first, non-zero genes only, padding, seeded determinism."""

import numpy as np
import pytest
import scipy.sparse as sp

from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.scgpt import ScGPTTokenizer
from scpeft_cli.tokenizers.vocab import CLS_TOKEN, PAD_TOKEN, GeneVocab

N_BINS = 11


def reference_bins(X: sp.csr_matrix, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Upstream scGPT's per-cell binning (np.quantile + two-sided np.digitize with random ties), cell by cell."""
    out = []
    for i in range(X.shape[0]):
        x = X.data[X.indptr[i] : X.indptr[i + 1]]
        if len(x) == 0:
            continue
        edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
        left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
        out.append(np.ceil(rng.random(len(x)) * (right - left) + left).astype(np.int64))
    return np.concatenate(out)


def random_counts(n_cells=60, n_genes=40, density=0.4, seed=0, with_ties=True) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.5, size=(n_cells, n_genes)).astype(np.float64) * (rng.random((n_cells, n_genes)) < density)
    if not with_ties:
        dense = dense * rng.uniform(0.5, 1.5, size=dense.shape)
    X = sp.csr_matrix(np.log1p(dense))
    X.eliminate_zeros()
    X.sort_indices()
    return X


def make_tokenizer(genes, **kwargs) -> ScGPTTokenizer:
    return ScGPTTokenizer(vocab=GeneVocab.from_genes(genes), n_bins=N_BINS, **kwargs)


def tokenized_bins(X: sp.csr_matrix, seed: int) -> np.ndarray:
    """The bins `tokenize` gives every stored value of X (all genes known, none subsampled), aligned with `X.data`."""
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokens = make_tokenizer(genes).tokenize(X, genes, seed=seed)
    return np.concatenate([tokens.cell(i)[1][1:] for i in range(len(tokens))]).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_ties", [True, False])
def test_bins_equal_upstream_per_cell_reference(with_ties, dtype):
    X = random_counts(with_ties=with_ties).astype(dtype)
    ours = tokenized_bins(X, seed=7)
    reference = reference_bins(X, N_BINS, np.random.default_rng(7))
    np.testing.assert_array_equal(ours, reference)
    assert ours.min() >= 1 and ours.max() <= N_BINS - 1


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda X: X.multiply(-1).tocsr(), id="negative values sort as floats"),
        pytest.param(lambda X: sp.csr_matrix(X.expm1().astype(np.int32).toarray()), id="integer counts"),
    ],
)
def test_bins_equal_upstream_for_other_value_kinds(transform):
    X = transform(random_counts(n_cells=30, with_ties=False))
    np.testing.assert_array_equal(
        tokenized_bins(X, seed=3), reference_bins(X, N_BINS, np.random.default_rng(3))
    )


def test_bins_are_monotone_in_expression_within_a_cell():
    X = random_counts(with_ties=False)
    codes = tokenized_bins(X, seed=0)
    for i in range(X.shape[0]):
        values, cell_codes = X.data[X.indptr[i] : X.indptr[i + 1]], codes[X.indptr[i] : X.indptr[i + 1]]
        order = np.argsort(values)
        assert np.all(np.diff(cell_codes[order]) >= 0)
        if len(values) > 1:
            assert cell_codes[order[-1]] == N_BINS - 1


def test_cells_start_with_cls_and_hold_exactly_their_nonzero_genes():
    X = random_counts()
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    vocab = tokenizer.vocab.token_to_id
    assert len(tokens) == X.shape[0]
    for i in range(X.shape[0]):
        ids, values = tokens.cell(i)
        assert ids[0] == vocab[CLS_TOKEN] and values[0] == 0
        expected = {vocab[genes[j]] for j in X.indices[X.indptr[i] : X.indptr[i + 1]]}
        assert set(ids[1:].tolist()) == expected and len(ids) - 1 == len(expected)
        assert np.all((values[1:] >= 1) & (values[1:] <= N_BINS - 1))


def test_genes_outside_the_vocabulary_are_dropped_and_order_of_columns_does_not_matter():
    X = random_counts()
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes[: len(genes) // 2])
    tokens = tokenizer.tokenize(X, genes, seed=0)
    known = {tokenizer.vocab.token_to_id[g] for g in genes[: len(genes) // 2]}
    assert set(tokens.gene_ids.tolist()) <= known | {tokenizer.vocab.cls_id}


def test_no_overlap_is_a_clear_error():
    X = random_counts()
    tokenizer = make_tokenizer(["ACTB", "CD3E"])
    with pytest.raises(UserError, match="none of the .* genes are in the model vocabulary"):
        tokenizer.tokenize(X, [f"ENSG{i:011d}" for i in range(X.shape[1])], seed=0)


def test_long_cells_are_subsampled_keeping_cls_and_seeded():
    X = random_counts(density=0.9)
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes, max_seq_len=10)
    a, b, c = (tokenizer.tokenize(X, genes, seed=s) for s in (1, 1, 2))
    assert a.lengths.max() == 10
    assert all(a.cell(i)[0][0] == tokenizer.vocab.cls_id for i in range(len(a)))
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.gene_ids, c.gene_ids)
    # every kept gene carries the bin it had before subsampling
    full = make_tokenizer(genes).tokenize(X, genes, seed=1)
    for i in range(len(a)):
        full_bins = dict(zip(*map(np.ndarray.tolist, full.cell(i)), strict=True))
        ids, values = a.cell(i)
        assert all(full_bins[g] == v for g, v in zip(ids.tolist(), values.tolist(), strict=True))


def test_subsampling_keeps_each_gene_with_equal_probability():
    n_cells, n_genes, keep_per_cell = 20_000, 10, 3
    X = sp.csr_matrix(np.ones((n_cells, n_genes)))
    genes = [f"G{i}" for i in range(n_genes)]
    tokenizer = make_tokenizer(genes, max_seq_len=keep_per_cell + 1)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    assert np.all(tokens.lengths == keep_per_cell + 1)
    per_cell = tokens.gene_ids.reshape(n_cells, keep_per_cell + 1)[:, 1:]
    assert all(len(set(row)) == keep_per_cell for row in per_cell[:100].tolist())  # without replacement
    share = np.bincount(per_cell.ravel(), minlength=tokenizer.vocab.cls_id + n_genes + 5) / n_cells
    gene_share = share[[tokenizer.vocab.token_to_id[g] for g in genes]]
    # each gene is kept with probability 3/10; 4 standard errors is 0.013
    np.testing.assert_allclose(gene_share, keep_per_cell / n_genes, atol=0.013)


def test_explicit_zeros_unsorted_indices_and_integer_counts_tokenize_like_a_clean_matrix():
    clean = random_counts()
    genes = [f"G{i}" for i in range(clean.shape[1])]
    tokenizer = make_tokenizer(genes)
    messy = clean.copy()
    messy.data[::7] = 0  # explicit zeros
    expected = sp.csr_matrix(messy.toarray())
    shuffled = sp.csr_matrix(  # the same matrix with each row's entries stored in reverse column order
        (np.concatenate([messy.data[a:b][::-1] for a, b in zip(messy.indptr[:-1], messy.indptr[1:], strict=True)]),
         np.concatenate([messy.indices[a:b][::-1] for a, b in zip(messy.indptr[:-1], messy.indptr[1:], strict=True)]),
         messy.indptr),
        shape=messy.shape,
    )
    shuffled.has_sorted_indices = False
    stored_order = shuffled.indices.copy()
    a, b = tokenizer.tokenize(shuffled, genes, seed=4), tokenizer.tokenize(expected, genes, seed=4)
    for field in ("indptr", "gene_ids", "values"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    counts = sp.csr_matrix(np.round(np.expm1(clean.toarray())).astype(np.int32))
    c, d = tokenizer.tokenize(counts, genes, seed=4), tokenizer.tokenize(counts.astype(np.float64), genes, seed=4)
    np.testing.assert_array_equal(c.values, d.values)
    assert np.array_equal(shuffled.indices, stored_order)  # the caller's matrix is not modified


def test_collate_pads_right_with_pad_token_and_value():
    X = random_counts()
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes, pad_value=-2.0)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    cells = [tokens.cell(i) for i in range(5)]
    batch = tokenizer.collate(cells)
    width = max(len(ids) for ids, _ in cells)
    assert batch["gene_ids"].shape == (5, width)
    for row, (ids, values) in enumerate(cells):
        n = len(ids)
        assert batch["gene_ids"][row, :n].tolist() == ids.tolist()
        assert batch["values"][row, :n].tolist() == values.tolist()
        assert (batch["gene_ids"][row, n:] == tokenizer.vocab.token_to_id[PAD_TOKEN]).all()
        assert (batch["values"][row, n:] == -2.0).all()
        assert batch["padding_mask"][row].tolist() == [False] * n + [True] * (width - n)


def test_tokenisation_is_deterministic_per_seed():
    X = random_counts()
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes)
    first, second, other = (tokenizer.tokenize(X, genes, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(first.values, second.values)
    assert not np.array_equal(first.values, other.values)  # ties are spread at random


def test_vocab_from_genes_is_alphabetical_then_special_tokens():
    vocab = GeneVocab.from_genes(["B", "A", "C"])
    assert vocab.token_to_id == {"A": 0, "B": 1, "C": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
    assert vocab.size == 6 and vocab.pad_id == 3 and vocab.cls_id == 4


# include_zero_genes: every vocabulary gene of the data is a token of every cell (upstream's include_zero_gene)


def reference_bins_with_zeros(row: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream `scgpt.preprocess.binning` of one dense row: edges from the non-zero values only, zeros bin 0.

    Returns the left digitisation and whether it is upstream's bin for sure: its random tie-breaking picks
    in (right, left], a single value only where a value equals at most one edge.
    """
    bins, certain = np.zeros(len(row), dtype=np.int64), np.ones(len(row), dtype=bool)
    nonzero = row != 0
    if nonzero.any():
        x = row[nonzero]
        edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
        left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
        bins[nonzero], certain[nonzero] = left, left - right <= 1
    return bins, certain


def with_zero_cells(X: sp.csr_matrix) -> sp.csr_matrix:
    """X with explicit stored zeros, a cell whose only value lies outside the vocabulary (column 0) and a
    cell with no values at all."""
    X = X.tolil()
    X[0, :] = 0
    X[0, 0] = 1.0
    X[1, :] = 0
    X = X.tocsr()
    X.data[::5] = 0  # stored, not eliminated
    return X


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_genes_are_all_matched_genes_with_upstream_bins(dtype):
    X = with_zero_cells(random_counts(with_ties=False)).astype(dtype)
    genes = [f"G{i}" for i in range(X.shape[1])]
    known = [g for j, g in enumerate(genes) if j % 3]  # column 0 is not among them
    tokenizer = make_tokenizer(known, include_zero_genes=True)
    tokens = tokenizer.tokenize(X, genes, seed=5)
    columns = [j for j, g in enumerate(genes) if g in known]
    vocab, dense = tokenizer.vocab.token_to_id, X.toarray()
    n_uncertain = 0
    for i in range(X.shape[0]):
        ids, values = tokens.cell(i)
        assert ids[0] == tokenizer.vocab.cls_id and values[0] == 0
        assert ids[1:].tolist() == [vocab[genes[j]] for j in columns]  # every matched gene, in column order
        expected, certain = reference_bins_with_zeros(dense[i, columns], N_BINS)
        np.testing.assert_array_equal(values[1:][certain], expected[certain])
        ties = values[1:][~certain]
        assert np.all((ties <= expected[~certain]) & (ties >= 1))
        n_uncertain += (~certain).sum()
    assert n_uncertain < 0.05 * len(tokens.values)  # the comparison is not vacuous
    # non-zero genes keep the bins (and random tie-breaks) they get without zero genes
    plain = make_tokenizer(known).tokenize(X, genes, seed=5)
    for i in range(X.shape[0]):
        bins = dict(zip(*map(np.ndarray.tolist, tokens.cell(i)), strict=True))
        ids, values = plain.cell(i)
        assert [bins[g] for g in ids.tolist()] == values.tolist()


def test_zero_genes_are_subsampled_to_max_seq_len_uniformly_and_seeded():
    X = random_counts(density=0.3)
    genes = [f"G{i}" for i in range(X.shape[1])]
    tokenizer = make_tokenizer(genes, max_seq_len=10, include_zero_genes=True)
    a, b, c = (tokenizer.tokenize(X, genes, seed=s) for s in (1, 1, 2))
    assert np.all(a.lengths == 10)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.gene_ids, c.gene_ids)
    full = make_tokenizer(genes, include_zero_genes=True).tokenize(X, genes, seed=1)
    for i in range(len(a)):
        full_bins = dict(zip(*map(np.ndarray.tolist, full.cell(i)), strict=True))
        ids, values = a.cell(i)
        assert ids[0] == tokenizer.vocab.cls_id and len(set(ids.tolist())) == 10
        assert all(full_bins[g] == v for g, v in zip(ids.tolist(), values.tolist(), strict=True))
    # zero and non-zero genes are kept alike: genes 0-4 expressed in every cell, genes 5-9 in none
    n_cells, n_genes, keep_per_cell = 20_000, 10, 3
    dense = np.zeros((n_cells, n_genes))
    dense[:, :5] = np.random.default_rng(0).uniform(1, 2, size=(n_cells, 5))
    genes = [f"G{i}" for i in range(n_genes)]
    tokenizer = make_tokenizer(genes, max_seq_len=keep_per_cell + 1, include_zero_genes=True)
    tokens = tokenizer.tokenize(sp.csr_matrix(dense), genes, seed=0)
    per_cell = tokens.gene_ids.reshape(n_cells, keep_per_cell + 1)[:, 1:]
    share = np.bincount(per_cell.ravel(), minlength=tokenizer.vocab.size) / n_cells
    # each gene is kept with probability 3/10; 4 standard errors is 0.013
    np.testing.assert_allclose(share[[tokenizer.vocab.token_to_id[g] for g in genes]], 0.3, atol=0.013)


def test_zero_genes_setting_is_part_of_the_cache_key():
    genes = ["A", "B", "C"]
    plain, with_zeros = make_tokenizer(genes), make_tokenizer(genes, include_zero_genes=True)
    assert plain.cache_settings() != with_zeros.cache_settings()
    assert plain.cache_settings() == make_tokenizer(genes, include_zero_genes=False).cache_settings()


def test_cell_without_values_on_matched_genes_gets_every_gene_at_zero():
    X = sp.csr_matrix(np.array([[0.0, 0.0, 0.0, 2.0], [0.0, 9.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.0]]))
    X.data[1] = 0  # a stored zero
    genes = ["A", "B", "C", "OTHER"]
    tokenizer = make_tokenizer(genes[:3], include_zero_genes=True)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    expected_ids = [tokenizer.vocab.cls_id] + [tokenizer.vocab.token_to_id[g] for g in genes[:3]]
    for i in (0, 1):
        ids, values = tokens.cell(i)
        assert ids.tolist() == expected_ids and values.tolist() == [0.0, 0.0, 0.0, 0.0]
    ids, values = tokens.cell(2)
    assert ids.tolist() == expected_ids and values.tolist() == [0.0, 1.0, 0.0, N_BINS - 1]


@pytest.mark.parametrize("include_zero_genes", [False, True])
def test_unbinned_values_are_the_log_normalised_values(include_zero_genes):
    """value_binning=False (scGPT's perturbation input): each token carries its cell's value itself; with
    every gene and max_seq_len=None, row i is <cls> then every matched gene's value in column order."""
    X = with_zero_cells(random_counts(with_ties=False)).astype(np.float32)
    genes = [f"G{i}" for i in range(X.shape[1])]
    known = [g for j, g in enumerate(genes) if j % 3]
    tokenizer = make_tokenizer(known, include_zero_genes=include_zero_genes, value_binning=False, max_seq_len=None)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    dense, vocab = X.toarray(), tokenizer.vocab.token_to_id
    columns = [j for j, g in enumerate(genes) if g in known]
    for i in range(X.shape[0]):
        ids, values = tokens.cell(i)
        kept = columns if include_zero_genes else [j for j in columns if dense[i, j] != 0]
        assert ids.tolist() == [tokenizer.vocab.cls_id, *(vocab[genes[j]] for j in kept)]
        np.testing.assert_array_equal(values[1:], dense[i, kept])
    assert make_tokenizer(known, value_binning=False).cache_settings() != make_tokenizer(known).cache_settings()
