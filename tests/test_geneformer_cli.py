"""Geneformer through the CLI as a user runs it: train / predict / embed on a random model, and `embed` on
an official-layout checkpoint reproducing Geneformer's own cell embeddings (independent reference:
transformers' BERT on tokens from the per-cell reference tokenizer)."""

from __future__ import annotations

import json
import pickle
import re

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from tests.conftest import run_cli
from tests.test_geneformer_checkpoint import GENES, N_LAYERS, evil_pickle, token_dictionary, write_model
from tests.test_geneformer_tokenizer import reference

TINY_GENEFORMER = [
    "backbone=geneformer_small",
    "backbone.d_model=32",
    "backbone.n_heads=2",
    "backbone.d_ff=32",
    "backbone.n_layers=2",
    "trainer.max_epochs=2",
    "trainer.max_steps=3",
    "trainer.batch_size=16",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneformer")
    run_dir = root / "run"
    run_cli("train", *TINY_GENEFORMER, "peft=encoder_prompt", "evaluation.umap=false", f"hydra.run.dir={run_dir}")
    source = root / "pbmc.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(source)
    return run_dir, source


def test_train_on_pbmc_flags_the_random_model_and_saves_its_gene_tables(trained):
    run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backbone"] == "geneformer_small" and metrics["peft"] == "encoder_prompt"
    assert metrics["pretrained"] is False and 0 < metrics["trainable_fraction"] < 1
    medians = json.loads((run_dir / "adapter" / "gene_median_dictionary.json").read_text())
    tokens = json.loads((run_dir / "adapter" / "token_dictionary.json").read_text())
    assert len(medians) > 500 and set(medians) <= set(tokens)  # pbmc68k_reduced's genes, medians of the training cells


def test_predict_on_the_run_reproduces_its_predictions(trained, tmp_path):
    run_dir, source = trained
    output = tmp_path / "annotated.h5ad"
    run_cli(
        "predict", f"run={run_dir}", f"data.path={source}", "data.layer=raw", f"output={output}",
        f"hydra.run.dir={tmp_path / 'log'}",
    )  # fmt: skip
    result = anndata.read_h5ad(output)
    expected = pd.read_csv(run_dir / "predictions.csv").set_index("cell_id")["prediction"]
    assert (result.obs["scpeft_label"].astype(str) == expected.loc[result.obs_names]).all()
    assert result.uns["scpeft"]["strategy"] == "encoder_prompt"


def test_embed_with_the_run_is_deterministic(trained, tmp_path):
    run_dir, source = trained
    outputs = [tmp_path / f"emb{i}.h5ad" for i in range(2)]
    for output in outputs:
        run_cli(
            "embed", f"run={run_dir}", f"data.path={source}", "data.layer=raw", f"output={output}",
            f"hydra.run.dir={tmp_path / 'log'}",
        )  # fmt: skip
    first, second = (anndata.read_h5ad(o).obsm["X_scpeft"] for o in outputs)
    assert first.shape == (700, 32) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def counts_file(path, genes, *, n_cells=12, seed=0, with_totals=False):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n_cells, len(genes))) * (rng.random((n_cells, len(genes))) < 0.6)
    counts[:, 0] += 1
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    if with_totals:  # the file's genes are a subset: the cells' totals are larger than their row sums
        obs["n_counts"] = counts.sum(axis=1) + rng.integers(50, 500, n_cells)
    anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return counts, obs.get("n_counts")


@pytest.mark.parametrize("v2", [False, True])
def test_embed_with_an_official_checkpoint_reproduces_geneformers_cell_embeddings(tmp_path, v2):
    folder = tmp_path / "Geneformer"
    bert = write_model(folder, v2=v2)
    genes = list(reversed(GENES))  # not the token dictionary's order
    counts, totals = counts_file(tmp_path / "cells.h5ad", genes, with_totals=True)
    output = tmp_path / "emb.h5ad"
    run_cli(
        "embed", "backbone=geneformer", f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={tmp_path / 'cells.h5ad'}",
        f"output={output}", f"hydra.run.dir={tmp_path / 'log'}",
    )  # fmt: skip
    ours = anndata.read_h5ad(output).obsm["X_scpeft"]

    suffix = "_gc104M" if v2 else "_gc30M"
    medians = pickle.loads((folder / f"gene_median_dictionary{suffix}.pkl").read_bytes())  # our own test file
    vocab = {k: int(v) for k, v in token_dictionary(v2).items()}
    cells = reference(counts, genes, vocab, {k: float(v) for k, v in medians.items()}, bert.config.max_position_embeddings,
                      totals=totals.to_numpy())  # fmt: skip
    expected = []
    with torch.no_grad():
        for ids in cells:
            hidden = bert(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True).hidden_states
            states = hidden[N_LAYERS - 1][0]  # emb_extractor: emb_layer=-1, the second-to-last layer
            expected.append((states[1:-1] if v2 else states).mean(0).numpy())
    np.testing.assert_allclose(ours, np.stack(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "problem,match",
    [
        ("no dictionaries", r"dictionar"),
        ("symbols without mapping", r"none of the 20 genes are in the model vocabulary .*gene symbols.*Ensembl ids"),
        ("config contradicts tensors", r"does not match its config.json: mis-shaped"),
        ("code-running dictionary", r"token_dictionary_gc30M.pkl"),
        ("log-normalised data without totals", r"this backbone tokenises raw counts.*obs\['n_counts'\]"),
    ],
)
def test_bad_geneformer_inputs_are_one_line_exit_2(tmp_path, problem, match):
    folder = tmp_path / "Geneformer"
    write_model(folder, v2=False, dictionaries=problem != "no dictionaries")
    genes = GENES
    if problem == "symbols without mapping":  # symbols the dictionaries do not map to Ensembl ids
        genes = [f"SYMBOL{i}" for i in range(len(GENES))]
    marker = tmp_path / "code_ran"
    if problem == "code-running dictionary":
        (folder / "token_dictionary_gc30M.pkl").write_bytes(evil_pickle(marker))
    if problem == "config contradicts tensors":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] += 8
        (folder / "config.json").write_text(json.dumps(config))
    counts_file(tmp_path / "cells.h5ad", genes)
    if problem == "log-normalised data without totals":
        cells = anndata.read_h5ad(tmp_path / "cells.h5ad")
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
        cells.write_h5ad(tmp_path / "cells.h5ad")
    result = run_cli(
        "embed", "backbone=geneformer", f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={tmp_path / 'cells.h5ad'}",
        f"output={tmp_path / 'emb.h5ad'}", f"hydra.run.dir={tmp_path / 'log'}", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in output, output
    assert re.search(match, error[0]), error[0]
    assert not marker.exists(), "a pickle's code ran"


def test_describe_counts_the_published_geneformer(tmp_path):
    result = run_cli("describe", "backbone=geneformer", "peft=full", "task.n_classes=18", f"hydra.run.dir={tmp_path}")
    report = json.loads((tmp_path / "describe.json").read_text())
    backbone = sum(group["total"] for name, group in report["groups"].items() if name.startswith("backbone"))
    assert backbone == pytest.approx(39.30e6, rel=1e-3), result.stdout


def test_inspect_reports_the_overlap_through_the_dictionaries_without_reading_weights(tmp_path):
    folder = tmp_path / "Geneformer"
    write_model(folder, v2=False)
    (folder / "model.safetensors").write_bytes(b"never read by inspect")
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, (30, len(GENES))).astype(np.float32) + 1
    obs = pd.DataFrame({"cell_type": ["a", "b", "c"] * 10}, index=[f"c{i}" for i in range(30)])
    symbols = [f"GENE{i}" for i in range(len(GENES))]  # the dictionaries map them to Ensembl ids
    anndata.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=symbols)).write_h5ad(tmp_path / "cells.h5ad")
    run_cli(
        "inspect", "backbone=geneformer", f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={tmp_path / 'cells.h5ad'}",
        "data.label_key=cell_type", f"hydra.run.dir={tmp_path / 'log'}",
    )  # fmt: skip
    report = json.loads((tmp_path / "log" / "inspect.json").read_text())
    assert report["ok"] and report["vocab_overlap"]["count"] == len(GENES)
    assert report["vocab_overlap"]["source"] == "checkpoint" and report["vocab_overlap"]["vocab_id_kind"] == "ensembl"
