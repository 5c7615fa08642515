"""scBERT from a tiny checkpoint written as the official release writes it: architecture off the shapes,
every tensor loaded (projection matrices included, never redrawn), and the forward pass equal to an
independent reference of scBERT's Performer (pre-norm blocks, separate to_q/to_k/to_v, FAVOR+)."""

from __future__ import annotations

from collections import OrderedDict

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scpeft_cli.backbones.favor import draw_projection, favor_attention
from scpeft_cli.backbones.scbert import build_scbert
from scpeft_cli.data.loading import prepare
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.cache import tokenize_cells
from tests.conftest import run_cli

GENES = [f"G{i}" for i in range(11)]
DIM, DEPTH, HEADS, DIM_HEAD, FEATURES, FF, TOKENS = 12, 2, 3, 4, 8, 20, 7


def official_state(seed: int = 0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    state = OrderedDict()
    state["token_emb.weight"] = rand(TOKENS, DIM)
    state["pos_emb.emb.weight"] = rand(len(GENES) + 1, DIM).double()  # float64 in the release
    for i in range(DEPTH):
        p = f"performer.net.layers.{i}"
        state[f"{p}.0.norm.weight"], state[f"{p}.0.norm.bias"] = 1 + rand(DIM), rand(DIM)
        for role in "qkv":
            state[f"{p}.0.fn.to_{role}.weight"] = rand(HEADS * DIM_HEAD, DIM)
        state[f"{p}.0.fn.to_out.weight"], state[f"{p}.0.fn.to_out.bias"] = rand(DIM, HEADS * DIM_HEAD), rand(DIM)
        state[f"{p}.0.fn.fast_attention.projection_matrix"] = draw_projection(FEATURES, DIM_HEAD, g)
        state[f"{p}.1.norm.weight"], state[f"{p}.1.norm.bias"] = 1 + rand(DIM), rand(DIM)
        state[f"{p}.1.fn.fn.w1.weight"], state[f"{p}.1.fn.fn.w1.bias"] = rand(FF, DIM), rand(FF)
        state[f"{p}.1.fn.fn.w2.weight"], state[f"{p}.1.fn.fn.w2.bias"] = rand(DIM, FF), rand(DIM)
    state["norm.weight"], state["norm.bias"] = 1 + rand(DIM), rand(DIM)
    state["to_out.weight"], state["to_out.bias"] = rand(TOKENS, DIM), rand(TOKENS)
    state["performer.calls_since_last_redraw"] = torch.tensor(0)
    return state


def write_release(folder, state=None, genes=GENES):
    folder.mkdir(parents=True, exist_ok=True)
    state = official_state() if state is None else state
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "scheduler_state_dict": {}, "losses": 0.5}, folder / "panglao_pretrain.pth")  # fmt: skip
    anndata.AnnData(var=pd.DataFrame(index=list(genes))).write_h5ad(folder / "panglao_10000.h5ad")
    return folder


def load(folder):
    return build_scbert(name="scbert", checkpoint=str(folder), d_model=64, n_layers=1, n_heads=2, dim_head=8,
                        nb_features=4, d_ff=8, n_bins=5, seed=0)  # fmt: skip


def reference(state, tokens: torch.Tensor) -> torch.Tensor:
    """scBERT's forward written from its definition: embeddings, pre-norm FAVOR+ and GELU blocks, final norm."""
    x = state["token_emb.weight"][tokens] + state["pos_emb.emb.weight"].float()[: tokens.shape[1]]
    for i in range(DEPTH):
        p = f"performer.net.layers.{i}"
        h = F.layer_norm(x, (DIM,), state[f"{p}.0.norm.weight"], state[f"{p}.0.norm.bias"])
        q, k, v = (
            (h @ state[f"{p}.0.fn.to_{r}.weight"].T).view(*h.shape[:2], HEADS, DIM_HEAD).transpose(1, 2) for r in "qkv"
        )
        out = favor_attention(q, k, v, state[f"{p}.0.fn.fast_attention.projection_matrix"])
        x = x + out.transpose(1, 2).reshape(*h.shape[:2], -1) @ state[f"{p}.0.fn.to_out.weight"].T + state[f"{p}.0.fn.to_out.bias"]
        h = F.layer_norm(x, (DIM,), state[f"{p}.1.norm.weight"], state[f"{p}.1.norm.bias"])
        h = F.gelu(h @ state[f"{p}.1.fn.fn.w1.weight"].T + state[f"{p}.1.fn.fn.w1.bias"])
        x = x + h @ state[f"{p}.1.fn.fn.w2.weight"].T + state[f"{p}.1.fn.fn.w2.bias"]
    return F.layer_norm(x, (DIM,), state["norm.weight"], state["norm.bias"])


def cells() -> anndata.AnnData:
    """Prepared count data (as the data layer hands it over): 9 panel genes, 2 outside it."""
    counts = np.random.default_rng(0).poisson(3.0, (4, 11)).astype(np.float32) + 1
    return prepare(
        sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]), genes=GENES[2:] + ["NOT_IN_PANEL", "ALSO_NOT"],
        source="test", path=None, label_key=None, gene_key=None, layer=None, min_cells_per_class=0, drop_unlabeled=False,
    )  # fmt: skip


def test_the_checkpoint_loads_exactly_and_matches_the_reference_forward(tmp_path, capsys):
    state = official_state()
    loaded = load(write_release(tmp_path / "ckpt", state))
    arch = loaded.model.arch
    assert (arch.n_genes, arch.d_model, arch.n_layers, arch.n_heads, arch.dim_head, arch.nb_features, arch.d_ff) == (
        len(GENES), DIM, DEPTH, HEADS, DIM_HEAD, FEATURES, FF
    )
    assert "ignored 3 tensors: the MLM head" in capsys.readouterr().out
    for i in range(DEPTH):
        assert torch.equal(
            loaded.model.layers[i].self_attn.kernel.projection_matrix,
            state[f"performer.net.layers.{i}.0.fn.fast_attention.projection_matrix"],
        )
    adata = cells()
    tokens = tokenize_cells(loaded.tokenizer, adata, seed=0)
    batch = loaded.tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    assert batch["tokens"].shape == (4, len(GENES) + 1)
    loaded.model.eval()
    with torch.no_grad():
        states = loaded.model(batch)
        torch.testing.assert_close(states, reference(state, batch["tokens"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.model.cell_embedding(states, batch), states[:, : len(GENES)].mean(1))


def test_a_cell_embeds_the_same_alone_or_in_a_batch(tmp_path):
    loaded = load(write_release(tmp_path / "ckpt"))
    tokens = tokenize_cells(loaded.tokenizer, cells(), seed=0)
    batch = loaded.tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    alone = loaded.tokenizer.collate([tokens.cell(0)])
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(alone)[0], loaded.model(batch)[0], rtol=1e-6, atol=1e-6)


def test_a_checkpoint_without_projection_matrices_is_refused(tmp_path):
    state = {k: v for k, v in official_state().items() if "projection_matrix" not in k}
    with pytest.raises(UserError, match="projection matrix is never drawn anew"):
        load(write_release(tmp_path / "ckpt", state))


def test_a_misshaped_tensor_is_named(tmp_path):
    state = official_state()
    state["performer.net.layers.1.1.fn.fn.w2.bias"] = torch.zeros(DIM + 1)
    with pytest.raises(UserError, match=r"mis-shaped 1 tensor\(s\): layers.1.linear2.bias"):
        load(write_release(tmp_path / "ckpt", state))


def test_a_wrong_gene_panel_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="has 10 genes, the checkpoint 11: not this model's panel"):
        load(write_release(tmp_path / "ckpt", genes=GENES[:-1]))
    folder = tmp_path / "no_panel"
    write_release(folder)
    (folder / "panglao_10000.h5ad").unlink()
    with pytest.raises(UserError, match="lacks the gene panel"):
        load(folder)


def test_scberts_published_conv_head_reads_every_position(compose_config):
    from scpeft_cli.assembly import assemble

    cfg = compose_config(["backbone=scbert_small", "backbone.d_model=12", "backbone.n_layers=1", "backbone.dim_head=4",
                          "backbone.nb_features=8", "peft=head_only", "task.head=scbert_conv"])  # fmt: skip
    adata = cells()
    parts = assemble(cfg, head_settings={"n_classes": 3}, cells=adata)
    head, positions = parts.model.head, adata.n_vars + 1
    assert head.fc1.in_features == positions and head.conv1.kernel_size == (1, 12)
    assert sum(p.numel() for p in head.parameters()) == (12 + 1) + (positions * 512 + 512) + (512 * 128 + 128) + (128 * 3 + 3)
    tokens = tokenize_cells(parts.backbone.tokenizer, adata, seed=0)
    batch = parts.backbone.tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    logits, embedding = parts.model(batch)
    assert logits.shape == (4, 3) and embedding.shape == (4, 12)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(UserError, match="scbert_conv reads a fixed number of positions, which scGPT cells do not have"):
        assemble(compose_config(["backbone=scgpt_small", "task.head=scbert_conv"]), head_settings={"n_classes": 3}, cells=adata)


def test_embed_with_an_official_folder_reproduces_scberts_cell_embeddings(tmp_path):
    """`scpeft embed backbone=scbert backbone.checkpoint=DIR` against scBERT's preprocessing and forward pass
    written out here: panel order (zero-filled), 1e4 over the panel, min(floor(log2(1 + x)), 5), token 0
    appended, and the mean of the final LayerNorm's output over the gene positions."""
    state = official_state(seed=3)
    folder = write_release(tmp_path / "scbert", state)
    genes = ["NOT_IN_PANEL", *reversed(GENES[1:])]  # panel gene G0 absent, one foreign gene, reversed order
    rng = np.random.default_rng(1)
    counts = (rng.poisson(4.0, (6, len(genes))) * (rng.random((6, len(genes))) < 0.7)).astype(np.float32)
    counts[:, 1] += 1
    anndata.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]),
                    var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "cells.h5ad")  # fmt: skip
    output = tmp_path / "emb.h5ad"
    run_cli("embed", "backbone=scbert", f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={tmp_path / 'cells.h5ad'}",
            f"output={output}", f"hydra.run.dir={tmp_path / 'log'}")  # fmt: skip
    ours = anndata.read_h5ad(output).obsm["X_scpeft"]

    panel_counts = np.zeros((6, len(GENES)))
    for column, gene in enumerate(genes):
        if gene in GENES:
            panel_counts[:, GENES.index(gene)] = counts[:, column]
    normalised = panel_counts / panel_counts.sum(1, keepdims=True) * 1e4
    tokens = np.minimum(np.floor(np.log2(1 + normalised)), 5).astype(np.int64)
    tokens = torch.as_tensor(np.concatenate([tokens, np.zeros((6, 1), dtype=np.int64)], axis=1))
    with torch.no_grad():
        expected = reference(state, tokens)[:, : len(GENES)].mean(1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
