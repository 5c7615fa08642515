"""Geneformer rank-value tokenisation: equal to a per-cell reference written as upstream's code does it."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers import geneformer
from scpeft_cli.tokenizers.geneformer import GeneformerVocab, RankValueTokenizer, gene_medians

SPECIALS_V2 = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def reference(X, column_ids, token_to_id, medians, model_input_size, totals=None):
    """Upstream's steps, cell by cell: columns renamed to their Ensembl id (None: unmatched) and the
    duplicates summed (at the first one's place), dense rows / n_counts * 10,000 / medians, non-zero genes
    by np.argsort(-v) (stable: ties in column order), truncated; V2 <cls> ... <eos>."""
    dense = np.asarray(sp.csr_matrix(X).todense(), dtype=np.float64)
    n_counts = dense.sum(axis=1) if totals is None else np.asarray(totals, dtype=np.float64)
    ids = []
    for gene in column_ids:
        if gene is not None and gene in token_to_id and gene in medians and gene not in ids:
            ids.append(gene)
    summed = np.zeros((dense.shape[0], len(ids)))
    for column, gene in enumerate(column_ids):
        if gene in ids:
            summed[:, ids.index(gene)] += dense[:, column]
    tokens = np.array([token_to_id[g] for g in ids], dtype=np.int64)
    norm_factor_vector = np.array([medians[g] for g in ids])
    v2 = "<cls>" in token_to_id and "<eos>" in token_to_id
    cells = []
    for i in range(dense.shape[0]):
        vector = summed[i] / n_counts[i] * 10_000 / norm_factor_vector
        nonzero = np.nonzero(vector)[0]
        ranked = tokens[nonzero][np.argsort(-vector[nonzero], kind="stable")]
        if v2:
            ranked = np.concatenate([[token_to_id["<cls>"]], ranked[: model_input_size - 2], [token_to_id["<eos>"]]])
        else:
            ranked = ranked[:model_input_size]
        cells.append(ranked.astype(np.int64))
    return cells


def cells_of(tokens):
    return [tokens.cell(i)[0] for i in range(len(tokens))]


def assert_cells_equal(ours, expected):
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"cell {i}")


def ensembl(i: int) -> str:
    return f"ENSG{i:011d}"


def random_counts(n_cells=50, n_genes=30, density=0.4, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    dense[:, 0] += 1  # no empty cell
    return sp.csr_matrix(dense.astype(np.float64))


def pretrained(n_genes, *, v2=True, tied_medians=True, seed=0):
    """A token dictionary of n_genes Ensembl ids (ids not in data order) and their medians; with
    `tied_medians` many genes share a median, so cells have equal values (ties)."""
    rng = np.random.default_rng(seed)
    specials = dict(SPECIALS_V2) if v2 else {"<pad>": 0, "<mask>": 1}
    genes = [ensembl(i) for i in rng.permutation(n_genes)]
    token_to_id = {**specials, **{g: len(specials) + k for k, g in enumerate(genes)}}
    values = rng.choice([0.5, 1.0, 2.0], n_genes) if tied_medians else rng.uniform(0.5, 3.0, n_genes)
    medians = {ensembl(i): float(values[i]) for i in range(n_genes)}
    return token_to_id, medians


@pytest.mark.parametrize("v2", [True, False])
@pytest.mark.parametrize("model_input_size", [4096, 8, 3])
@pytest.mark.parametrize("tied_medians", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_tokens_equal_per_cell_reference(v2, model_input_size, tied_medians, dtype):
    X = random_counts().astype(dtype)
    genes = [ensembl(i) for i in range(X.shape[1])]
    token_to_id, medians = pretrained(X.shape[1], v2=v2, tied_medians=tied_medians)
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), medians, model_input_size)
    tokens = tokenizer.tokenize(X, genes, seed=0)
    assert_cells_equal(cells_of(tokens), reference(X, genes, token_to_id, medians, model_input_size))
    assert tokens.values is None and tokens.genes_matched == tokens.genes_total == len(genes)
    keep = model_input_size - 2 if v2 else model_input_size
    assert tokens.lengths.max() == min(keep, int(np.diff(X.indptr).max())) + (2 if v2 else 0)


def test_ties_keep_column_order_and_v2_specials():
    # equal counts and equal medians: one value; order = data columns, whatever the token ids
    genes = [ensembl(3), ensembl(1), ensembl(2)]
    token_to_id = {**SPECIALS_V2, ensembl(1): 4, ensembl(2): 5, ensembl(3): 6}
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), {g: 1.0 for g in genes}, 4096)
    X = sp.csr_matrix(np.array([[2.0, 2.0, 2.0], [1.0, 3.0, 1.0]]))
    assert_cells_equal(cells_of(tokenizer.tokenize(X, genes, seed=0)), [[2, 6, 4, 5, 3], [2, 4, 6, 5, 3]])


def test_descending_order_is_a_stable_argsort_of_minus_the_values():
    rng = np.random.default_rng(1)
    inputs = [
        np.array([]),
        np.array([3.0]),
        rng.integers(1, 4, 500) / rng.choice([1.0, 3.0], 500),  # many ties
        rng.random(700) * 10.0 ** rng.uniform(-8, 8, 700),  # wide spread
        np.concatenate([[1e6], 1.0 + rng.random(300) * 1e-9]),  # a dense cluster: one long coarse run
        np.concatenate([[1e6], 1.0 + rng.integers(0, 3, 300) * 1e-12]),  # ties inside the long run
        np.concatenate([rng.random(50), -rng.random(50), [0.0, -0.0]]),  # any sign
        rng.integers(1, 50, 70_000) / 7.0,  # more entries than the packed radix sort takes
    ]
    for values in inputs:
        tokens = np.arange(len(values), dtype=np.int32)
        np.testing.assert_array_equal(geneformer._ranked(values, tokens), np.argsort(-values, kind="stable"))


def test_symbols_upper_case_and_duplicates_map_as_upstream():
    # data: a symbol (via gene_name_id), a lower-case id and a symbol (via the upper-cased ensembl mapping),
    # two columns that name the same gene (summed), an unknown gene and a special token name
    genes = ["TP53", "ensg00000000002", "gapdh", "ENSG00000000001", "NOTAGENE", "<cls>"]
    token_to_id = {**SPECIALS_V2, ensembl(1): 4, ensembl(2): 5, ensembl(3): 6}
    vocab = GeneformerVocab(
        token_to_id,
        ensembl_mapping={ensembl(1): ensembl(1), ensembl(2): ensembl(2), "GAPDH": ensembl(3)},
        gene_name_id={"TP53": ensembl(1)},
    )
    np.testing.assert_array_equal(vocab.lookup(genes), [4, 5, 6, 4, -1, -1])
    medians = {ensembl(1): 2.0, ensembl(2): 1.0, ensembl(3): 1.5}
    X = sp.csr_matrix(np.array([[1.0, 3.0, 4.0, 4.0, 9.0, 1.0], [2.0, 0.0, 1.0, 0.0, 1.0, 0.0]]))
    tokens = RankValueTokenizer(vocab, medians, 4096).tokenize(X, genes, seed=0)
    column_ids = [ensembl(1), ensembl(2), ensembl(3), ensembl(1), None, None]
    expected = reference(X, column_ids, token_to_id, medians, 4096)
    assert_cells_equal(cells_of(tokens), expected)
    # cell 0: ENSG2 3 / 1.0, gapdh 4 / 1.5, then TP53 + ENSG1 = 5 counts / 2.0 (each alone would rank last)
    assert_cells_equal(cells_of(tokens)[:1], [[2, 5, 6, 4, 3]])
    assert tokens.genes_matched == 4 and tokens.genes_total == 6


def test_lookup_order_ensembl_mapping_then_symbols_then_the_dictionary_itself():
    token_to_id = {**SPECIALS_V2, ensembl(1): 4, ensembl(2): 5, ensembl(3): 6}
    vocab = GeneformerVocab(
        token_to_id,
        ensembl_mapping={"ABC": ensembl(1), ensembl(3): ensembl(2), "GONE": "ENSG99999999999"},
        gene_name_id={"abc": ensembl(2), "GONE": ensembl(3)},
    )
    # upper-cased through the ensembl mapping beats as given through the symbols; the mapping beats a direct
    # match; a mapping to an id outside the dictionary falls through to the next table
    np.testing.assert_array_equal(
        vocab.lookup(["abc", ensembl(3), "gone", ensembl(1).lower(), "<pad>"]), [4, 5, 6, 4, -1]
    )


def test_zero_counts_and_genes_without_medians_are_dropped():
    genes = [ensembl(i) for i in range(4)]
    token_to_id = {**SPECIALS_V2, **{g: 4 + i for i, g in enumerate(genes)}}
    medians = {g: 1.0 for g in genes[:3]}  # genes[3] has no median: unmatched
    X = sp.csr_matrix((np.array([0.0, 2.0, 1.0, 5.0]), np.array([0, 1, 2, 3]), np.array([0, 4])), shape=(1, 4))
    assert X.nnz == 4  # an explicitly stored zero
    tokens = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096).tokenize(X, genes, seed=0)
    assert_cells_equal(cells_of(tokens), [[2, 5, 6, 3]])
    assert tokens.genes_matched == 3


def test_totals_given_or_summed_over_all_columns_including_unknown_genes():
    X = random_counts(n_genes=12, seed=3)
    genes = [ensembl(i) for i in range(10)] + ["OTHER1", "OTHER2"]  # two columns outside the vocabulary
    token_to_id, medians = pretrained(10, tied_medians=False)
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096)
    column_ids = genes[:10] + [None, None]
    computed = tokenizer.tokenize(X, genes, seed=0)
    assert_cells_equal(cells_of(computed), reference(X, column_ids, token_to_id, medians, 4096))
    totals = np.asarray(X.sum(axis=1)).ravel() * np.linspace(1.0, 3.0, X.shape[0])  # e.g. obs["n_counts"]
    given = tokenizer.tokenize(X, genes, seed=0, totals=totals)
    assert_cells_equal(cells_of(given), reference(X, column_ids, token_to_id, medians, 4096, totals=totals))
    with pytest.raises(UserError, match="totals"):
        tokenizer.tokenize(X, genes, seed=0, totals=totals[:-1])
    with pytest.raises(UserError, match="not positive"):
        tokenizer.tokenize(X, genes, seed=0, totals=np.zeros(X.shape[0]))


def test_each_cell_is_ordered_by_count_over_median():
    # the cell's total scales all its values alike: its order is that of count / median
    X = random_counts(seed=5)
    genes = [ensembl(i) for i in range(X.shape[1])]
    token_to_id, medians = pretrained(X.shape[1], tied_medians=False)
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096)
    dense = X.toarray()
    for i, ids in enumerate(cells_of(tokenizer.tokenize(X, genes, seed=0))):
        ratio = {token_to_id[g]: dense[i, c] / medians[g] for c, g in enumerate(genes) if dense[i, c]}
        assert all(ratio[a] >= ratio[b] for a, b in zip(ids[1:-2], ids[2:-1], strict=True))


def test_save_and_load_saved_rebuild_the_same_tokens(tmp_path):
    X = random_counts(seed=2)
    genes = [f"gene{i}" for i in range(X.shape[1])]
    built = RankValueTokenizer.from_data(X[:30], genes, v2=True, model_input_size=16)
    built.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"token_dictionary.json", "gene_median_dictionary.json"}
    loaded = RankValueTokenizer.load_saved(tmp_path, model_input_size=16)
    assert loaded.vocab.token_to_id == built.vocab.token_to_id and loaded.medians == built.medians
    assert loaded.cache_settings() == built.cache_settings()
    assert_cells_equal(cells_of(loaded.tokenize(X, genes, seed=1)), cells_of(built.tokenize(X, genes, seed=0)))
    (tmp_path / "gene_median_dictionary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="gene_median_dictionary"):
        RankValueTokenizer.load_saved(tmp_path, model_input_size=16)


def test_upstream_tables_with_numpy_scalars_work(tmp_path):
    # upstream's pickles hold numpy.int16 ids and numpy.float64 medians
    token_to_id, medians = pretrained(6)
    tokenizer = RankValueTokenizer(
        GeneformerVocab({g: np.int16(i) for g, i in token_to_id.items()}),
        {g: np.float64(m) for g, m in medians.items()},
        4096,
    )
    plain = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096)
    assert tokenizer.cache_settings() == plain.cache_settings()
    X = random_counts(n_genes=6, seed=7)
    genes = [ensembl(i) for i in range(6)]
    assert_cells_equal(cells_of(tokenizer.tokenize(X, genes, seed=0)), cells_of(plain.tokenize(X, genes, seed=0)))
    tokenizer.save(tmp_path)
    assert RankValueTokenizer.load_saved(tmp_path, model_input_size=4096).vocab.token_to_id == token_to_id


def test_from_data_layout_and_medians():
    X = random_counts(n_genes=6, seed=4)
    genes = ["b", "a", "c", "b", "e", "d"]  # a duplicated name: one gene, its columns summed
    tokenizer = RankValueTokenizer.from_data(X, genes, v2=False, model_input_size=2048)
    assert tokenizer.vocab.token_to_id == {"<pad>": 0, "<mask>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6}
    assert not tokenizer.vocab.is_v2 and tokenizer.vocab.cls_id is None and tokenizer.vocab.eos_id is None
    dense = X.toarray()
    summed = np.stack([dense[:, 1], dense[:, 0] + dense[:, 3], dense[:, 2], dense[:, 5], dense[:, 4]], axis=1)
    expected = gene_medians(sp.csr_matrix(summed), dense.sum(axis=1))
    assert tokenizer.medians == dict(zip("abcde", expected.tolist(), strict=True))
    v2 = GeneformerVocab.from_genes(["x", "y"], v2=True)
    assert v2.token_to_id == {**SPECIALS_V2, "x": 4, "y": 5} and v2.is_v2 and v2.size == 6 and v2.genes == ["x", "y"]


def test_gene_medians_match_numpy_over_non_zero_normalised_values():
    X = random_counts(n_cells=40, n_genes=9, seed=6).tolil()
    X[:, 4] = 0  # never expressed: median 1.0
    X = X.tocsr()
    totals = np.asarray(X.sum(axis=1)).ravel() + 7.0  # the file's totals also count genes not passed here
    dense = X.toarray()
    expected = []
    for column in range(X.shape[1]):
        normalised = dense[:, column] / totals * 10_000
        expected.append(np.median(normalised[normalised != 0]) if normalised.any() else 1.0)
    np.testing.assert_array_equal(gene_medians(X, totals), expected)
    np.testing.assert_array_equal(gene_medians(X, totals, columns=[8, 4, 0]), np.array(expected)[[8, 4, 0]])
    default = gene_medians(X)
    np.testing.assert_allclose(default[0], np.median(dense[dense[:, 0] > 0, 0] / dense.sum(1)[dense[:, 0] > 0] * 1e4))


def test_cache_settings_cover_medians_mappings_and_input_size():
    token_to_id, medians = pretrained(5)
    base = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096)
    changed = dict(medians, **{ensembl(0): medians[ensembl(0)] * (1 + 1e-15)})
    others = [
        RankValueTokenizer(GeneformerVocab(token_to_id), changed, 4096),
        RankValueTokenizer(GeneformerVocab(token_to_id), medians, 2048),
        RankValueTokenizer(GeneformerVocab(token_to_id, gene_name_id={"A": ensembl(0)}), medians, 4096),
        RankValueTokenizer(GeneformerVocab(token_to_id, ensembl_mapping={"A": ensembl(0)}), medians, 4096),
        RankValueTokenizer(GeneformerVocab({**token_to_id, ensembl(9): 99}), medians, 4096),
    ]
    settings = [t.cache_settings() for t in [base, *others]]
    assert len(set(settings)) == len(settings)
    assert (
        base.cache_settings() == RankValueTokenizer(GeneformerVocab(token_to_id), dict(medians), 4096).cache_settings()
    )
    assert base.input_kind == "counts"


def test_collate_pads_and_masks_and_keeps_empty_v1_cells():
    token_to_id, medians = pretrained(4, v2=False)
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 2048)
    X = sp.csr_matrix(np.array([[1.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]]))
    tokens = tokenizer.tokenize(X, [ensembl(i) for i in range(4)], seed=0)
    assert tokens.lengths.tolist() == [3, 0, 1]
    batch = tokenizer.collate([tokens.cell(i) for i in range(3)])
    assert batch["gene_ids"].dtype == torch.long and batch["gene_ids"].shape == (3, 3)
    assert batch["padding_mask"].tolist() == [[False] * 3, [True] * 3, [False, True, True]]
    assert (batch["gene_ids"][batch["padding_mask"]] == 0).all()
    only_empty = tokenizer.collate([tokens.cell(1)])
    assert only_empty["gene_ids"].tolist() == [[0]] and only_empty["padding_mask"].tolist() == [[True]]
    v2 = RankValueTokenizer(GeneformerVocab({**SPECIALS_V2, ensembl(0): 4}), {ensembl(0): 1.0}, 4096)
    assert cells_of(v2.tokenize(X[1:2, :1], [ensembl(0)], seed=0))[0].tolist() == [2, 3]


def test_no_overlap_is_a_user_error_that_names_the_identifiers():
    token_to_id, medians = pretrained(20)
    tokenizer = RankValueTokenizer(GeneformerVocab(token_to_id), medians, 4096)
    symbols = ["TP53", "GAPDH", "ACTB"] * 7
    X = sp.csr_matrix(np.ones((2, len(symbols))))
    with pytest.raises(UserError, match="none of the 21 genes.*symbols.*Ensembl ids"):
        tokenizer.tokenize(X, symbols, seed=0)
    no_medians = RankValueTokenizer(GeneformerVocab(token_to_id), {}, 4096)
    with pytest.raises(UserError, match="none of the"):
        no_medians.tokenize(X[:, :5], [ensembl(i) for i in range(5)], seed=0)


def test_bad_settings_are_user_errors():
    token_to_id, medians = pretrained(3)
    with pytest.raises(UserError, match="model_input_size"):
        RankValueTokenizer(GeneformerVocab(token_to_id), medians, 2)
    bad = RankValueTokenizer(GeneformerVocab(token_to_id), {ensembl(0): 0.0}, 8)
    with pytest.raises(UserError, match="positive"):
        bad.tokenize(sp.csr_matrix(np.ones((1, 1))), [ensembl(0)], seed=0)
