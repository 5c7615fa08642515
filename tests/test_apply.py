"""`scpeft predict` and `scpeft embed` round trips on a trained run, as a user runs them."""

import hashlib

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")
    run_dir = root / "run"
    run_cli("train", *TINY, "peft=lora", "evaluation.umap=false", f"hydra.run.dir={run_dir}")
    source = root / "pbmc.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(source)
    return run_dir, source


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predict(run_dir, source, output, *extra, check=True):
    return run_cli(
        "predict", f"run={run_dir}", f"data.path={source}", "data.layer=raw", f"output={output}",
        f"hydra.run.dir={output.parent / 'log'}", *extra, check=check,
    )


def test_predict_writes_a_new_annotated_file_matching_the_run(trained, tmp_path):
    run_dir, source = trained
    before = digest(source)
    output = tmp_path / "annotated.h5ad"
    predict(run_dir, source, output)
    assert digest(source) == before, "the input file must never be modified"
    result = anndata.read_h5ad(output)
    assert {"scpeft_label", "scpeft_confidence"} <= set(result.obs.columns)
    assert result.obsm["X_scpeft"].shape[0] == result.n_obs
    assert result.uns["scpeft"]["gene_overlap"]["fraction"] == 1.0
    assert result.uns["scpeft"]["strategy"] == "lora"  # the peft= option, as the user typed it
    run_predictions = pd.read_csv(run_dir / "predictions.csv").set_index("cell_id")
    test = run_predictions[run_predictions["split"] == "test"]
    assert (result.obs.loc[test.index, "scpeft_label"].astype(str) == test["prediction"]).all()
    # batches are padded differently than in the run: float32 noise only
    np.testing.assert_allclose(result.obs.loc[test.index, "scpeft_confidence"], test["confidence"], atol=1e-4)
    table = pd.read_csv(output.with_suffix(".csv"))
    assert list(table.columns) == ["cell_id", "scpeft_label", "scpeft_confidence"] and len(table) == result.n_obs


def test_predict_handles_another_gene_set_and_reports_the_overlap(trained, tmp_path):
    run_dir, source = trained
    adata = sc.datasets.pbmc68k_reduced()
    raw = adata.raw.to_adata()
    keep = np.random.default_rng(0).permutation(raw.n_vars)[: raw.n_vars // 2]
    subset = raw[:, keep].copy()
    subset.var_names = [*subset.var_names[:-5], "NOTAGENE1", "NOTAGENE2", "NOTAGENE3", "NOTAGENE4", "NOTAGENE5"]
    path = tmp_path / "subset.h5ad"
    subset.write_h5ad(path)
    output = tmp_path / "subset_annotated.h5ad"
    run_cli("predict", f"run={run_dir}", f"data.path={path}", f"output={output}", f"hydra.run.dir={tmp_path / 'log'}")
    overlap = anndata.read_h5ad(output).uns["scpeft"]["gene_overlap"]
    assert overlap["n_genes"] == len(keep) and overlap["n_matched"] == len(keep) - 5


def test_predict_refuses_to_overwrite(trained, tmp_path):
    run_dir, source = trained
    same = predict(run_dir, source, source, check=False)
    assert same.returncode == 2 and "never modified" in same.stdout
    existing = tmp_path / "exists.h5ad"
    existing.write_bytes(b"x")
    again = predict(run_dir, source, existing, check=False)
    assert again.returncode == 2 and "overwrite=true" in again.stdout


def test_embed_with_the_run_equals_predict_embeddings_and_zero_shot_is_normalised(trained, tmp_path):
    run_dir, source = trained
    predicted = tmp_path / "predicted.h5ad"
    predict(run_dir, source, predicted)
    with_run = tmp_path / "with_run.h5ad"
    run_cli("embed", f"run={run_dir}", f"data.path={source}", "data.layer=raw", "normalize=false", f"output={with_run}", f"hydra.run.dir={tmp_path / 'l1'}")
    np.testing.assert_allclose(anndata.read_h5ad(with_run).obsm["X_scpeft"], anndata.read_h5ad(predicted).obsm["X_scpeft"], rtol=1e-5, atol=1e-6)

    zero_shot = tmp_path / "zero_shot.h5ad"
    result = run_cli("embed", "backbone=scgpt_small", f"data.path={source}", "data.layer=raw", f"output={zero_shot}", f"hydra.run.dir={tmp_path / 'l2'}")
    assert "RANDOMLY INITIALISED" in result.stdout
    embeddings = anndata.read_h5ad(zero_shot).obsm["X_scpeft"]
    assert embeddings.shape == (700, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
