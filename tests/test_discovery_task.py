"""task=discovery: unsupervised adaptation (its strategies' gradients, the per-epoch mask ratio), clusters and
their scores against labels and baselines, outputs, report, and bad settings."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from scpeft_cli.assembly import assemble
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.discovery.clustering import cluster_embedding
from scpeft_cli.tasks.integration.metrics import ari, nmi
from scpeft_cli.tokenizers.cache import tokenize_cells
from tests.conftest import run_cli, train_task_steps
from tests.test_strategies import BACKBONES, CELLS, STRATEGIES


@pytest.mark.parametrize("case", ["full", "token_prompt", "encoder_prompt", "lora", "prefix"])
def test_the_discovery_objective_trains_the_strategy_and_the_decoders_only(compose_config, case):
    cfg = compose_config(["task=discovery", *BACKBONES["scgpt"], *STRATEGIES[case]])
    parts = assemble(cfg, head_settings={"batches": []}, cells=CELLS)
    tokens = tokenize_cells(parts.backbone.tokenizer, CELLS, seed=0)
    batch = parts.backbone.tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    model, task = parts.model, parts.task
    loss, terms, frozen = train_task_steps(model, task.objective(None, None), batch)
    assert set(terms) == {"gep", "mvc", "ecs"} and torch.isfinite(loss)
    assert {n.split(".")[1] for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad} == {"decoder", "mvc_decoder"}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_the_mask_ratio_is_drawn_per_epoch_from_the_seed(compose_config):
    task = instantiate(compose_config(["task=discovery"]).task)
    epochs = [task.training_mask_ratio(type("T", (), {"epoch": e})()) for e in range(30)]
    assert set(epochs) == {0.15, 0.25, 0.4}  # every ratio comes up
    assert epochs == [task.training_mask_ratio(type("T", (), {"epoch": e})()) for e in range(30)]  # a resumed epoch draws the same


def test_clustering_scores_equal_the_integration_metrics_on_their_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    centres = rng.normal(size=(3, 5)) * 8
    embedding = centres[np.repeat([0, 1, 2], 40)] + rng.normal(size=(120, 5))
    found = cluster_embedding(embedding, labels, resolution=0.5, n_neighbors=15, seed=0)
    assert found.scores["n_clusters"] == len(set(found.clusters))
    assert found.scores["nmi"] == nmi(labels, found.clusters) and found.scores["ari"] == ari(labels, found.clusters)
    assert found.scores["nmi"] > 0.9  # three well separated states are found
    from sklearn.metrics import calinski_harabasz_score

    assert found.scores["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(embedding, labels))
    assert set(cluster_embedding(embedding, None, resolution=0.5, n_neighbors=15, seed=0).scores) == {"n_clusters"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("task.objectives.dab=true", "task=discovery has no batches"),
        ("task.mask_ratios=[]", "task.mask_ratios must be a non-empty list"),
    ],
)
def test_bad_discovery_settings_are_clear_errors(compose_config, override, message):
    with pytest.raises(UserError, match=message):
        instantiate(compose_config(["task=discovery", override]).task)


TINY = ["task=discovery", "backbone=scgpt_small", "backbone.d_model=16", "backbone.n_layers=1", "data.n_top_genes=200",
        "trainer.max_epochs=2", "trainer.batch_size=32", "peft=encoder_prompt"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("discovery") / "run"
    run_cli("train", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_discovery_run_writes_clusters_markers_embeddings_and_baselines(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert list(metrics)[:4] == ["n_clusters", "nmi", "ari", "calinski_harabasz"]
    assert set(metrics["baselines"]) == {"zero_shot", "pca"} and metrics["monitor"] == "val_gep"
    assert metrics["baselines"]["pca"]["nmi"] > 0.5  # pbmc68k_reduced's cell types are found on its PCA
    clusters = pd.read_csv(finished / "clusters.csv")
    assert len(clusters) == 700 and {"scpeft_cluster", "zero_shot_cluster", "pca_cluster", "label"} <= set(clusters.columns)
    assert clusters["scpeft_cluster"].nunique() == metrics["n_clusters"]
    assert nmi(clusters["label"].astype(str), clusters["scpeft_cluster"].astype(str)) == pytest.approx(metrics["nmi"])
    markers = pd.read_csv(finished / "cluster_markers.csv")
    assert set(markers["cluster"]) == set(clusters["scpeft_cluster"]) and markers.groupby("cluster").size().max() == 20
    cells = anndata.read_h5ad(finished / "embeddings.h5ad")
    assert cells.obsm["X_scpeft"].shape == (700, 16) and "scpeft_cluster" in cells.obs
    assert json.loads(cells.uns["scpeft"]["metrics"])["scpeft"]["nmi"] == pytest.approx(metrics["nmi"])
    assert (finished / "umap.png").stat().st_size > 10_000


def test_report_aggregates_discovery_runs_with_their_baselines(finished, tmp_path):
    run_cli("report", str(finished.parent), "--out", str(tmp_path), "--require", "nmi>=0")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"baseline: zero_shot", "baseline: pca"} <= set(summary["configuration"]), summary["configuration"].tolist()
    assert "nmi_mean" in summary.columns


def test_extra_genes_are_kept_beside_the_most_variable(tmp_path):
    from scpeft_cli.data.loading import load_pbmc68k_reduced

    hvg = load_pbmc68k_reduced(n_top_genes=100)
    others = [g for g in load_pbmc68k_reduced().var_names if g not in set(hvg.var_names)][:7]
    (tmp_path / "tfs.txt").write_text("\n".join([*others, "NOT_A_GENE"]) + "\n")
    cells = load_pbmc68k_reduced(n_top_genes=100, extra_genes=str(tmp_path / "tfs.txt"))
    assert set(cells.var_names) == set(hvg.var_names) | set(others) and cells.n_vars == 107
    with pytest.raises(UserError, match="gene list not found"):
        load_pbmc68k_reduced(n_top_genes=100, extra_genes=str(tmp_path / "missing.txt"))
