"""`scpeft markers`: scPEFT's attention marker genes from a trained run, LoRA updates included."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from scpeft_cli.assembly import assemble, load_trained
from scpeft_cli.commands.markers import gene_columns, marker_tokenizer
from scpeft_cli.data.loading import load_pbmc68k_reduced, prepare
from scpeft_cli.markers.scoring import rank_normalised_scores, state_sums
from scpeft_cli.peft.lora import LoRALinear
from scpeft_cli.peft.persistence import save_adapter
from scpeft_cli.tokenizers.cache import tokenize_cells
from scpeft_cli.training.runtime import Runtime
from tests.conftest import run_cli
from tests.test_bad_input import assert_clear_failure

TINY_RUN = [
    "backbone.d_model=16", "backbone.n_heads=2", "backbone.n_layers=2", "trainer.max_steps=1", "trainer.max_epochs=1", "trainer.batch_size=32",
    "evaluation.umap=false", "evaluation.baselines=false", "data.n_top_genes=32",
]  # fmt: skip
GENES = [f"GENE{i}" for i in range(12)]


@pytest.fixture(scope="module")
def scgpt_run(tmp_path_factory):
    """A tiny scGPT with LoRA on its last layer only, trained on pbmc68k_reduced's 32 most variable genes."""
    run_dir = tmp_path_factory.mktemp("markers") / "run"
    run_cli("train", "backbone=scgpt_small", "peft=lora", "peft.layers=[1]", *TINY_RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def markers(run_dir, out, *overrides, check=True):
    return run_cli("markers", f"run={run_dir}", "batch_size=350", *overrides, f"hydra.run.dir={out}", check=check)


def make_cells(n_cells: int = 8) -> anndata.AnnData:
    """Prepared cells of two states, every gene expressed in every cell."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (n_cells, len(GENES))) + 1
    obs = pd.DataFrame({"state": ["a", "b"] * (n_cells // 2)}, index=[f"c{i}" for i in range(n_cells)])
    return prepare(
        sp.csr_matrix(counts.astype(np.float32)), obs=obs, genes=GENES, source="test", path=None, label_key="state",
        gene_key=None, layer=None, min_cells_per_class=0, drop_unlabeled=False,
    )  # fmt: skip


def pbmc_cells() -> anndata.AnnData:
    """24 prepared pbmc68k_reduced cells on the run's genes."""
    return load_pbmc68k_reduced(n_top_genes=32)[:24].copy()


def per_cell_scores(parts, cells) -> pd.DataFrame:
    """Every cell its own state: cells x genes scores, through the command's own path."""
    tokenizer = marker_tokenizer(parts.backbone, None)
    tokens = tokenize_cells(tokenizer, cells, seed=0)
    genes, token_column = gene_columns(tokenizer, cells.var_names, tokens.gene_ids)
    sums = state_sums(
        parts, tokens, collate=tokenizer.collate, token_column=token_column, n_genes=len(genes), states=np.arange(len(tokens)),
        n_states=len(tokens), inputs={}, runtime=Runtime.create(device="cpu", precision="fp32"), batch_size=3,
    )  # fmt: skip
    return pd.DataFrame(sums, index=cells.obs_names, columns=genes)


def test_markers_writes_table_h5ad_and_heatmap_and_is_deterministic(scgpt_run, tmp_path):
    first, second = tmp_path / "m1", tmp_path / "m2"
    markers(scgpt_run, first)
    markers(scgpt_run, second)
    table = pd.read_csv(first / "markers.csv")
    assert (first / "markers.csv").read_text() == (second / "markers.csv").read_text()
    assert (first / "markers.png").stat().st_size > 0
    assert list(table.columns[:4]) == ["state", "gene", "score", "rank"]
    assert table["state"].nunique() == 10 and (table.groupby("state").size() == 20).all()
    assert table.groupby("state")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    np.testing.assert_allclose(table["score"], table["state_mean"] - table["background_mean"], atol=1e-12)

    adata = anndata.read_h5ad(first / "markers.h5ad")
    assert adata.shape == (10, 32) and adata.uns["scpeft"]["include_zero_genes"]
    nk = sc.get.rank_genes_groups_df(adata, group="CD56+ NK").head(20)
    expected = table[table["state"] == "CD56+ NK"]
    assert list(nk["names"]) == list(expected["gene"])
    np.testing.assert_allclose(nk["scores"], expected["score"], rtol=1e-6)


def test_a_state_as_background_and_top_k(scgpt_run, tmp_path):
    markers(scgpt_run, tmp_path, "markers.background=CD19+ B", "markers.top_k=3")
    table = pd.read_csv(tmp_path / "markers.csv")
    assert "CD19+ B" not in set(table["state"]) and table["state"].nunique() == 9
    assert (table.groupby("state").size() == 3).all()


def test_new_cells_from_a_file_with_their_own_label_column(scgpt_run, tmp_path):
    pbmc = sc.datasets.pbmc68k_reduced()[::3]
    new = anndata.AnnData(X=pbmc.raw.X, obs=pbmc.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"}), var=pbmc.raw.var)
    new.write_h5ad(tmp_path / "new.h5ad")
    markers(scgpt_run, tmp_path / "m", f"data.path={tmp_path / 'new.h5ad'}", "data.label_key=cell_type", "markers.background=none")
    adata = anndata.read_h5ad(tmp_path / "m" / "markers.h5ad")
    assert adata.shape == (10, 32) and adata.obs["n_cells"].sum() == new.n_obs
    assert adata.uns["scpeft"]["label_key"] == "cell_type"
    np.testing.assert_array_equal(adata.X, adata.layers["state_mean"])  # no background: the state's mean


def test_the_scores_include_the_lora_update_of_the_last_layer(scgpt_run):
    """LoRA sits on the last layer only, so its input is the same either way: what changes the scores is
    the update in the captured q."""
    parts, _ = load_trained(scgpt_run / "adapter")
    cells = pbmc_cells()
    wrapped = parts.backbone.model.layers[1].self_attn.qkv
    assert isinstance(wrapped, LoRALinear)
    with torch.no_grad():
        for b in wrapped.scpeft_lora_B:
            b.zero_()
        without = per_cell_scores(parts, cells)
        for b in wrapped.scpeft_lora_B:
            b.copy_(torch.randn_like(b))
        with_update = per_cell_scores(parts, cells)
    assert not np.allclose(without.to_numpy(), with_update.to_numpy())


def test_the_huggingface_lora_update_is_in_the_scores_too(compose_config):
    cfg = compose_config(["backbone=scgpt_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.n_layers=2",
                          "peft=hf", "peft.layers=[1]"])  # fmt: skip
    cells = make_cells()
    parts = assemble(cfg, head_settings={"n_classes": 2}, cells=cells)
    before = per_cell_scores(parts, cells)
    with torch.no_grad():
        for name, p in parts.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    assert not np.allclose(before.to_numpy(), per_cell_scores(parts, cells).to_numpy())


def test_a_planted_pattern_puts_the_genes_cls_attends_to_on_top(compose_config):
    """One layer on the token embeddings: q reads dimension 1 (only <cls> has it), k reads dimension 0
    (only the chosen genes have it), so <cls>, and no other query, attends to the chosen genes."""
    cfg = compose_config(["backbone=scgpt_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.n_layers=1",
                          "backbone.dropout=0", "peft=head_only"])  # fmt: skip
    cells = make_cells()
    parts = assemble(cfg, head_settings={"n_classes": 2}, cells=cells)
    model, vocab = parts.backbone.model, parts.backbone.tokenizer.vocab
    chosen = ["GENE3", "GENE7", "GENE10"]
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.value_encoder.linear2.weight.zero_()  # value embeddings: LayerNorm(0) = 0
        model.value_encoder.linear2.bias.zero_()
        table = torch.randn(model.encoder.embedding.weight.shape, generator=rng)
        table[:, :2] = 0
        table -= table.mean(dim=1, keepdim=True)  # zero mean: dimensions 0 and 1 stay 0 through the LayerNorm
        table[:, :2] = 0
        for gene in chosen:
            table[int(vocab.lookup([gene])[0])] = 10 * torch.eye(16)[0]
        table[vocab.cls_id] = 10 * torch.eye(16)[1]
        model.encoder.embedding.weight.copy_(table)
        qkv = model.layers[0].self_attn.qkv
        weight = 0.05 * torch.randn(qkv.weight.shape, generator=rng)  # a little unrelated attention everywhere
        for head in range(2):
            weight[head * 8] = torch.eye(16)[1]  # q, each head's first dimension
            weight[16 + head * 8] = torch.eye(16)[0]  # k
        qkv.weight.copy_(weight)
        qkv.bias.zero_()
    scores = per_cell_scores(parts, cells)
    for _, cell in scores.iterrows():
        assert set(cell.nlargest(3).index) == set(chosen)
        assert cell[chosen].min() > 0.8  # at most (M - 1) / M = 12 / 13


def test_the_rank_procedure_equals_the_published_notebook_for_cls():
    """scPEFT's extract_attention (rows ranked, then columns, /M, heads averaged, the <cls> row), with
    stable sorts, against ours on random q and k without padding."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 9, 5, generator=gen), torch.randn(3, 4, 9, 5, generator=gen)
    m = q.shape[2]
    scores = q @ k.transpose(-1, -2)
    rows = scores.argsort(dim=-1, stable=True).argsort(dim=-1) / m
    columns = (rows.transpose(-1, -2).argsort(dim=-1, stable=True).argsort(dim=-1) / m).transpose(-1, -2)
    expected = columns.mean(1)[:, 0]
    reader = torch.zeros(3, m)
    reader[:, 0] = 1
    ours = rank_normalised_scores(q, k, torch.ones(3, m, dtype=torch.bool), reader)
    torch.testing.assert_close(ours, expected)


def test_padding_is_neither_a_query_nor_a_key():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 6, 4, generator=gen), torch.randn(1, 2, 6, 4, generator=gen)
    reader = torch.zeros(1, 6)
    reader[:, 0] = 1
    alone = rank_normalised_scores(q[:, :, :4], k[:, :, :4], torch.ones(1, 4, dtype=torch.bool), reader[:, :4])
    valid = torch.tensor([[True] * 4 + [False] * 2])
    padded = rank_normalised_scores(q, k, valid, reader)
    torch.testing.assert_close(padded[:, :4], alone)
    assert (padded[:, 4:] == 0).all()


def test_a_performer_run_is_refused_in_one_line(compose_config, tmp_path):
    """A scBERT run dir as `scpeft train` leaves it (adapter, gene panel, metrics.json), written directly."""
    cfg = compose_config(["backbone=scbert_small", "backbone.d_model=8", "backbone.dim_head=4", "backbone.nb_features=8", "peft=head_only"])
    parts = assemble(cfg, head_settings={"n_classes": 2}, cells=make_cells())
    run_dir = tmp_path / "scbert"
    saved = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "peft", "task")}
    save_adapter(parts.model, run_dir / "adapter", config={**saved, "seed": 0, "classes": ["a", "b"], "pretrained": False})
    parts.backbone.tokenizer.save(run_dir / "adapter")
    (run_dir / "metrics.json").write_text("{}")
    assert_clear_failure(markers(run_dir, tmp_path / "m", check=False), tmp_path / "m", r"FAVOR|Performer")


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["markers.background=nonsense"], r"not a cell state.*CD14\+ Monocyte.*Dendritic"),
        (["data.label_key=no_such_column"], r"label column 'no_such_column' not in obs"),
    ],
)
def test_bad_settings_are_one_line(scgpt_run, tmp_path, overrides, pattern):
    assert_clear_failure(markers(scgpt_run, tmp_path, *overrides, check=False), tmp_path, pattern)


@pytest.mark.parametrize(
    "overrides",
    [
        ["backbone=geneformer_small", "backbone.d_ff=24", "backbone.n_layers=3"],
        ["backbone=geneformer_small", "backbone.generation=v2", "backbone.pooling=cls", "backbone.d_ff=24", "backbone.n_layers=3"],
        ["backbone=scfoundation_small", "backbone.d_ff=24", "backbone.bin_num=6"],
        ["backbone=scgpt_small", "peft=prefix", "peft.n_tokens=3"],
    ],
    ids=["geneformer_mean", "geneformer_v2_cls", "scfoundation", "scgpt_prefix"],
)
def test_every_softmax_backbone_and_prompts_give_scores_over_the_cells_genes(compose_config, overrides):
    cfg = compose_config(["backbone.d_model=16", "backbone.n_heads=2", *overrides])
    cells = make_cells()
    parts = assemble(cfg, head_settings={"n_classes": 2}, cells=cells)
    scores = per_cell_scores(parts, cells)
    assert scores.shape == (cells.n_obs, len(GENES))
    assert ((scores >= 0) & (scores < 1)).all().all() and scores.to_numpy().std() > 0


def test_the_help_page_names_the_outputs_and_the_data_options(tmp_path):
    text = run_cli("markers", "--help", cwd=tmp_path).stdout
    assert text.startswith("scpeft markers: ") and "markers.csv" in text and "markers.h5ad" in text
    assert "data: h5ad, pbmc68k_batches, pbmc68k_reduced, perturbseq_simulated" in text.splitlines()
    assert "scpeft markers [overrides] --cfg job" in text and text.count("\n  scpeft markers run=") >= 2
    assert not list(tmp_path.iterdir())
