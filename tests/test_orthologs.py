"""Cross-species gene mapping (`data.species=mouse`, `data.ortholog_table=FILE`): pbmc68k_reduced renamed to its
mouse orthologs maps back exactly; the one-to-many / many-to-one rules; bad options are one line; a mouse run
records its mapping and `predict` maps new mouse cells the same way."""

from __future__ import annotations

import json
import re

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from omegaconf import OmegaConf

from scpeft_cli.assembly import build_backbone
from scpeft_cli.commands.predict import data_config_of_run
from scpeft_cli.data import orthologs
from scpeft_cli.data.loading import load_pbmc68k_reduced, prepare, read_h5ad
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import COUNTS_LAYER, TOTALS_COLUMN
from scpeft_cli.tokenizers.cache import tokenize_cells
from tests.conftest import TINY, run_cli

FAST = [*TINY, "evaluation.umap=false", "evaluation.baselines=false"]


def one_to_one_mouse_names() -> dict[str, str]:
    """human -> mouse for the shipped table's one-to-one pairs (one target per source, one source per target)."""
    table = orthologs.resolve(species="mouse", ortholog_table=None)
    source, target = pd.Series(table.source), pd.Series(table.target)
    one = (source.map(source.value_counts()) == 1) & (target.map(target.value_counts()) == 1)
    return dict(zip(target[one], source[one], strict=True))


@pytest.fixture(scope="module")
def mouse_pbmc(tmp_path_factory):
    """pbmc68k_reduced's .raw with mouse symbols (genes without a one-to-one ortholog get names that cannot map)."""
    full = sc.datasets.pbmc68k_reduced()
    mouse = one_to_one_mouse_names()
    renamed = anndata.AnnData(
        X=full.raw.X.copy(), obs=full.obs[["bulk_labels", "n_counts"]].copy(),
        var=pd.DataFrame(index=[mouse.get(g, f"nomouse-{g}") for g in full.raw.var_names]),
    )
    path = tmp_path_factory.mktemp("mouse") / "mouse_pbmc.h5ad"
    renamed.write_h5ad(path)
    return path, full.raw.var_names.isin(list(mouse))


def test_mouse_pbmc_maps_back_to_the_same_genes_values_and_tokens(mouse_pbmc, compose_config):
    path, one_to_one = mouse_pbmc
    mapped = read_h5ad(path=str(path), label_key="bulk_labels", species="mouse")
    original = load_pbmc68k_reduced()
    expected = original[:, one_to_one].copy()
    assert list(mapped.var_names) == list(expected.var_names) and 600 < mapped.n_vars < original.n_vars
    assert mapped.obs_names.equals(expected.obs_names)
    for matrix, reference in ((mapped.X, expected.X), (mapped.layers[COUNTS_LAYER], expected.layers[COUNTS_LAYER])):
        assert (matrix != reference).nnz == 0
    np.testing.assert_array_equal(mapped.obs[TOTALS_COLUMN], expected.obs[TOTALS_COLUMN])
    record = mapped.uns["scpeft_input"]["gene_mapping"]
    assert record["species"] == "mouse" and record["one_to_many"] == "drop"
    assert record["n_genes_before"] == 765 and record["n_mapped"] == record["n_genes_after"] == int(one_to_one.sum())

    backbone = build_backbone(compose_config(TINY), cells=original)  # the vocabulary of the human genes
    tokens, reference = (tokenize_cells(backbone.tokenizer, cells, seed=0) for cells in (mapped, expected))
    for name, array in reference.arrays().items():
        np.testing.assert_array_equal(tokens.arrays()[name], array, err_msg=name)


def table_file(tmp_path, rows, name="table.csv", header="source,target"):
    path = tmp_path / name
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return str(path)


# m1 -> H1 (1:1); m2 -> H2, H3 (one-to-many, H2 first); m3 and m4 -> H4 (many-to-one); m5 not in the table
TINY_TABLE = [("m1", "H1"), ("m2", "H2"), ("m2", "H3"), ("m3", "H4"), ("m4", "H4")]
GENES = ["m1", "m2", "m3", "m4", "m5"]
COUNTS = np.array([[1, 2, 3, 4, 5], [6, 0, 7, 0, 8]], dtype=np.float32)


def prepare_tiny(matrix, **mapping):
    obs = pd.DataFrame(index=["c0", "c1"])
    return prepare(
        sp.csr_matrix(matrix), obs=obs, genes=GENES, source="test", path=None, label_key=None, gene_key=None,
        layer=None, min_cells_per_class=0, drop_unlabeled=False, **mapping,
    )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("drop", {"H1": [1, 6], "H4": [7, 7]}),
        ("first", {"H1": [1, 6], "H2": [2, 0], "H4": [7, 7]}),
        ("sum", {"H1": [1, 6], "H2": [2, 0], "H3": [2, 0], "H4": [7, 7]}),
    ],
)
def test_one_to_many_policies_and_many_to_one_sums_counts(tmp_path, policy, expected):
    cells = prepare_tiny(COUNTS, ortholog_table=table_file(tmp_path, TINY_TABLE), one_to_many=policy)
    assert list(cells.var_names) == list(expected)
    np.testing.assert_array_equal(cells.layers[COUNTS_LAYER].toarray(), np.array(list(expected.values())).T)
    np.testing.assert_array_equal(cells.obs[TOTALS_COLUMN], COUNTS.sum(axis=1))  # the cell's depth over all its genes
    record = cells.uns["scpeft_input"]["gene_mapping"]
    assert record["n_one_to_many"] == 1 and record["n_many_to_one"] == 1 and record["n_not_in_table"] == 1
    assert record["n_mapped"] == (3 if policy == "drop" else 4) and record["species"] is None


def test_many_to_one_sums_log_normalised_values_as_counts(tmp_path):
    """log1p(a) and log1p(b) onto one gene give log1p(a + b): the value of the summed normalised counts."""
    logged = np.log1p(COUNTS)
    cells = prepare_tiny(logged, ortholog_table=table_file(tmp_path, TINY_TABLE))
    np.testing.assert_allclose(cells[:, "H4"].X.toarray().ravel(), np.log1p([7, 7]), rtol=1e-6)
    assert np.array_equal(cells[:, "H1"].X.toarray().ravel(), logged[:, 0])  # a single source is copied as is


def test_user_table_maps_any_species_and_gzip_works(tmp_path):
    rows = [("cd3e", "CD3E"), ("cd4", "CD4"), ("ms4a1", "MS4A1")]
    plain = tmp_path / "fish.csv"
    plain.write_text("source, target\n" + "\n".join(f"{a}, {b}" for a, b in rows) + "\n")
    compressed = tmp_path / "fish.csv.gz"
    pd.DataFrame(rows, columns=["source", "target"]).to_csv(compressed, index=False)
    genes = ["cd3e", "cd4", "ms4a1", "tbx21"]  # tbx21: not in the table
    for table in (plain, compressed):
        cells = prepare(
            sp.csr_matrix(np.ones((3, 4), dtype=np.float32)), obs=pd.DataFrame(index=["a", "b", "c"]), genes=genes,
            source="fish", path=None, label_key=None, gene_key=None, layer=None, min_cells_per_class=0,
            drop_unlabeled=False, species="zebrafish", ortholog_table=str(table),
        )
        assert list(cells.var_names) == ["CD3E", "CD4", "MS4A1"]
        record = cells.uns["scpeft_input"]["gene_mapping"]
        assert record["species"] == "zebrafish" and record["ortholog_table"] == str(table.resolve())
        assert record["n_not_in_table"] == 1 and record["n_uppercase_only"] == 0


def test_uppercase_matches_are_counted_as_a_hint_never_used(tmp_path):
    """m5 is not in the table; upper-cased it is M5, a target of another gene: counted, not mapped."""
    cells = prepare_tiny(COUNTS, ortholog_table=table_file(tmp_path, [*TINY_TABLE, ("x", "M5")]))
    assert "M5" not in cells.var_names and cells.uns["scpeft_input"]["gene_mapping"]["n_uppercase_only"] == 1


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("m1", "H1")], "from,to", r"has no column source, target \(its columns: from, to\); it needs columns source,target"),
        ([], "source,target", r"holds no source,target pairs"),
        ([("m1", "")], "source,target", r"holds no source,target pairs"),
    ],
)
def test_malformed_tables_are_one_line_errors(tmp_path, rows, header, message):
    with pytest.raises(UserError, match=message):
        prepare_tiny(COUNTS, ortholog_table=table_file(tmp_path, rows, header=header))


def test_missing_unreadable_and_unknown_options(tmp_path):
    with pytest.raises(UserError, match=r"ortholog table not found: .*nope.csv"):
        orthologs.resolve(species=None, ortholog_table=str(tmp_path / "nope.csv"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match=r"cannot read the ortholog table .*empty.csv as CSV"):
        orthologs.resolve(species=None, ortholog_table=str(empty))
    with pytest.raises(UserError, match=r"^data.species=zebrafish is not known; known: human \(no mapping\), mouse; .*data.ortholog_table"):
        orthologs.resolve(species="zebrafish", ortholog_table=None)
    with pytest.raises(UserError, match=r"data.one_to_many must be one of drop, sum, first, got 'all'"):
        orthologs.resolve(species="mouse", ortholog_table=None, one_to_many="all")
    assert orthologs.resolve(species="human", ortholog_table=None) is None
    assert "gene_mapping" not in prepare_tiny(COUNTS, species="Human").uns["scpeft_input"]


def test_human_genes_with_species_mouse_say_so():
    with pytest.raises(UserError, match=r"only 1 of the 765 genes .* have a human ortholog .*656 are human symbols already.*data.species=human"):
        load_pbmc68k_reduced(species="mouse")


def test_perturbation_conditions_are_renamed_with_the_genes(tmp_path):
    obs = pd.DataFrame({"condition": ["ctrl", "m1+ctrl", "m1+m3", "m2+ctrl"]}, index=[f"c{i}" for i in range(4)])
    counts = np.tile(COUNTS[:1], (4, 1))
    cells = prepare(
        sp.csr_matrix(counts), obs=obs, genes=GENES, source="test", path=None, label_key=None, gene_key=None, layer=None,
        min_cells_per_class=0, drop_unlabeled=False, condition_key="condition", unknown_perturbations="drop",
        ortholog_table=table_file(tmp_path, TINY_TABLE),
    )
    assert list(cells.obs["scpeft_condition"]) == ["ctrl", "H1+ctrl", "H1+H4"]  # m2 (dropped, one-to-many) cannot be modelled


def test_predict_and_embed_follow_the_runs_mapping_unless_told_otherwise(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"species": "mouse", "ortholog_table": None, "one_to_many": "first"}}))
    given = OmegaConf.create({"path": "x.h5ad", "species": None, "ortholog_table": None, "one_to_many": "drop"})
    followed = data_config_of_run(given, tmp_path)
    assert (followed.species, followed.one_to_many, followed.path) == ("mouse", "first", "x.h5ad")
    explicit = OmegaConf.merge(given, {"species": "human"})
    assert data_config_of_run(explicit, tmp_path) is explicit


def test_unknown_species_from_the_cli_is_one_line_exit_2(mouse_pbmc, tmp_path):
    path, _ = mouse_pbmc
    result = run_cli(
        "train", *FAST, "data=h5ad", f"data.path={path}", "data.label_key=bulk_labels", "data.species=zebrafish",
        f"hydra.run.dir={tmp_path / 'run'}", check=False,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stdout + result.stderr
    assert re.search(r"data.species=zebrafish is not known; known: human \(no mapping\), mouse", errors[0])
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_mouse_run_records_its_mapping_and_predict_maps_new_mouse_cells_alike(mouse_pbmc, tmp_path):
    path, one_to_one = mouse_pbmc
    run_dir = tmp_path / "run"
    run_cli("train", *FAST, "data=h5ad", f"data.path={path}", "data.label_key=bulk_labels", "data.species=mouse", f"hydra.run.dir={run_dir}")
    mapping = json.loads((run_dir / "metrics.json").read_text())["gene_mapping"]
    assert mapping["species"] == "mouse" and mapping["n_mapped"] == int(one_to_one.sum())
    assert "gene_mapping" not in pd.read_csv(run_dir / "metrics.csv").columns

    output = tmp_path / "predicted.h5ad"
    run_cli("predict", f"run={run_dir}", f"data.path={path}", f"output={output}", f"hydra.run.dir={tmp_path / 'log'}")
    result = anndata.read_h5ad(output)
    assert result.obs["scpeft_label"].notna().all()
    assert result.uns["scpeft"]["gene_overlap"]["n_matched"] == int(one_to_one.sum())  # every mapped gene is in the vocabulary
    assert result.uns["scpeft"]["gene_mapping"]["species"] == "mouse"
    embedded = tmp_path / "embedded.h5ad"
    run_cli("embed", f"run={run_dir}", f"data.path={path}", f"output={embedded}", f"hydra.run.dir={tmp_path / 'log2'}")
    assert anndata.read_h5ad(embedded).uns["scpeft"]["gene_overlap"]["n_matched"] == int(one_to_one.sum())
