"""Tests for loading scFoundation `models.ckpt` folders (and the random-init fallback).

Each checkpoint is a tiny folder in the official layout: `models.ckpt` a torch.save of the nested dict
{'gene', 'cell', 'rde'} -> {'config': {'model': 'mae_autobin', 'model_config': {'mae_autobin': ...}},
'state_dict': {'model.*': tensor}} (decoder keys included), and the panel TSV. The loaded model is
checked against an independent reference: the value embedding by its formula, PyTorch's
`nn.TransformerEncoderLayer` loaded with the raw layer tensors, and the final LayerNorm.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from scpeft_cli.backbones.base import DataNeeded
from scpeft_cli.backbones.scfoundation import AutoDiscretizationEmbedding, ScFoundation, build_scfoundation
from scpeft_cli.errors import UserError
from tests.conftest import run_cli

D, HEADS, LAYERS, BINS, ALPHA = 16, 2, 2, 7, 0.7
PANEL = [f"G{i:02d}" for i in range(12)]
SEQ_LEN = len(PANEL) + 2  # panel + T + S
PANEL_FILE = "OS_scRNA_gene_index.19264.tsv"
SIZES = dict(d_model=8, n_heads=2, d_ff=16, n_layers=1, dropout=0.0, bin_num=5, bin_alpha=1.0)  # YAML sizes (ignored with a checkpoint)


def make_entry(seed: int, *, n_layers: int = LAYERS, seq_len: int = SEQ_LEN) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "model.token_emb.mlp.weight": rand(BINS, 1, scale=1.0), "model.token_emb.mlp.bias": rand(BINS),
        "model.token_emb.mlp2.weight": rand(BINS, BINS), "model.token_emb.mlp2.bias": rand(BINS),
        "model.token_emb.emb.weight": rand(BINS, D, scale=1.0),
        "model.token_emb.emb_mask.weight": rand(1, D, scale=1.0), "model.token_emb.emb_pad.weight": rand(1, D, scale=1.0),
        "model.pos_emb.weight": rand(seq_len + 1, D, scale=1.0),
        "model.encoder.norm.weight": 1 + rand(D, scale=0.1), "model.encoder.norm.bias": rand(D, scale=0.1),
        # pretraining-only decoder (ignored)
        "model.decoder_embed.weight": rand(8, D), "model.decoder_embed.bias": rand(8),
        "model.decoder.performer.net.layers.0.0.fn.to_q.weight": rand(8, 8),
        "model.norm.weight": rand(8), "model.norm.bias": rand(8),
        "model.to_final.weight": rand(1, 8), "model.to_final.bias": rand(1),
    }  # fmt: skip
    for i in range(n_layers):
        p = f"model.encoder.transformer_encoder.{i}."
        state |= {
            p + "self_attn.in_proj_weight": rand(3 * D, D), p + "self_attn.in_proj_bias": rand(3 * D, scale=0.1),
            p + "self_attn.out_proj.weight": rand(D, D), p + "self_attn.out_proj.bias": rand(D, scale=0.1),
            p + "linear1.weight": rand(4 * D, D), p + "linear1.bias": rand(4 * D, scale=0.1),
            p + "linear2.weight": rand(D, 4 * D), p + "linear2.bias": rand(D, scale=0.1),
            p + "norm1.weight": 1 + rand(D, scale=0.1), p + "norm1.bias": rand(D, scale=0.1),
            p + "norm2.weight": 1 + rand(D, scale=0.1), p + "norm2.bias": rand(D, scale=0.1),
        }  # fmt: skip
    config = {
        "model": "mae_autobin",
        "model_config": {
            "mae_autobin": {
                "encoder": {"hidden_dim": D, "depth": n_layers, "heads": HEADS, "dim_head": D // HEADS, "module_type": "transformer"},
                "decoder": {"hidden_dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "module_type": "performer"},
                "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": BINS, "bin_alpha": ALPHA,
                "seq_len": seq_len,
            }
        },
        "dataset_config": {"rnaseq": {"seq_len": seq_len}},
    }  # fmt: skip
    return {"config": config, "state_dict": state}


def write_folder(folder: Path, *, panel=PANEL, mutate=None, extra_config=None, **entry_args) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"gene": make_entry(1, **entry_args), "cell": make_entry(2, **entry_args), "rde": make_entry(3, **entry_args)}
    if mutate is not None:
        mutate(ckpt["cell"]["state_dict"])
    if extra_config is not None:
        ckpt["cell"]["config"]["extra"] = extra_config
    torch.save(ckpt, folder / "models.ckpt")
    (folder / PANEL_FILE).write_text("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(panel)))
    return folder


def build(folder, **overrides):
    settings = dict(name="scfoundation", checkpoint=None if folder is None else str(folder), **SIZES, target_depth=4.0, max_seq_len=None, seed=0)
    return build_scfoundation(**(settings | overrides))


# ---------------------------------------------------------------------------------- the reference
def ref_value_embedding(sd: dict, values: torch.Tensor) -> torch.Tensor:
    x = values.reshape(-1, 1).double()
    h = F.leaky_relu(x @ sd["model.token_emb.mlp.weight"].double().T + sd["model.token_emb.mlp.bias"].double(), 0.1)
    h = ALPHA * h + (h @ sd["model.token_emb.mlp2.weight"].double().T + sd["model.token_emb.mlp2.bias"].double())
    out = torch.softmax(h, -1) @ sd["model.token_emb.emb.weight"].double()
    out[values == 102] = sd["model.token_emb.emb_mask.weight"][0].double()
    out[values == 103] = sd["model.token_emb.emb_pad.weight"][0].double()
    return out.reshape(*values.shape, D)


def ref_encoder(sd: dict, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One unpadded cell (length,) -> final-norm states (length, D), float64."""
    x = (ref_value_embedding(sd, values) + sd["model.pos_emb.weight"].double()[ids]).unsqueeze(0)
    for i in range(LAYERS):
        layer = nn.TransformerEncoderLayer(D, HEADS, 4 * D, dropout=0.0, batch_first=True).double().eval()
        p = f"model.encoder.transformer_encoder.{i}."
        layer.load_state_dict({k[len(p):]: v.double() for k, v in sd.items() if k.startswith(p)}, strict=True)
        with torch.no_grad():
            x = layer(x)
    return F.layer_norm(x[0], (D,), sd["model.encoder.norm.weight"].double(), sd["model.encoder.norm.bias"].double(), 1e-5)


def ref_cell_embedding(states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    t, s = len(PANEL), len(PANEL) + 1
    genes = states[(ids != t) & (ids != s)]
    s_state = states[ids == s][0] if (ids == s).any() else torch.zeros(D, dtype=states.dtype)
    return torch.cat([s_state, states[ids == t][0], genes.max(0).values, genes.mean(0)])


def counts() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    X = rng.poisson(1.5, size=(4, len(PANEL))).astype(np.float32) * (rng.random((4, len(PANEL))) < 0.6)
    X[2] = 0
    X[2, 3] = 1  # total 1: no S token
    X[3, 5] = 7
    return sp.csr_matrix(X)


def tokenized_batch(tokenizer):
    cells = tokenizer.tokenize(counts(), PANEL, seed=0)
    ragged = [(cells.gene_ids[a:b], cells.values[a:b]) for a, b in zip(cells.indptr[:-1], cells.indptr[1:], strict=True)]
    return ragged, tokenizer.collate(ragged)


# ---------------------------------------------------------------------------------------- tests
def test_checkpoint_matches_reference(tmp_path, capsys):
    folder = write_folder(tmp_path / "ckpt")
    loaded = build(folder, dropout=0.0)
    out = capsys.readouterr().out
    assert "ignored" in out and "decoder" in out and "d_model 16" in out
    assert loaded.pretrained and loaded.tokenizer.panel == tuple(PANEL)
    model = loaded.model.eval()
    assert isinstance(model, ScFoundation) and model.d_model == D and len(model.layers) == LAYERS
    sd = torch.load(folder / "models.ckpt", weights_only=True)["cell"]["state_dict"]

    ragged, batch = tokenized_batch(loaded.tokenizer)
    assert batch["padding_mask"].any()  # the batch really is padded
    with torch.no_grad():
        states = model(batch)
        pooled = model.cell_embedding(states, batch)
    assert pooled.shape == (len(ragged), 4 * D)
    for row, (ids, vals) in enumerate(ragged):
        ids, vals = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(vals)
        expected = ref_encoder(sd, ids, vals)
        torch.testing.assert_close(states[row, : len(ids)].double(), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(pooled[row].double(), ref_cell_embedding(expected, ids), atol=2e-5, rtol=1e-4)
    # the cell of total 1 has no S token: its S slot is zeros
    assert (batch["gene_ids"][2] == len(PANEL) + 1).sum() == 0
    assert torch.all(pooled[2, :D] == 0)


def test_value_embedding_by_hand():
    emb = AutoDiscretizationEmbedding(2, 2, 0.5)
    with torch.no_grad():
        emb.mlp.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        emb.mlp.bias.zero_()
        emb.mlp2.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        emb.mlp2.bias.copy_(torch.tensor([0.0, 0.25]))
        emb.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        emb.emb_mask.weight.copy_(torch.tensor([[7.0, 7.0]]))
        emb.emb_pad.weight.copy_(torch.tensor([[-3.0, -3.0]]))
    out = emb(torch.tensor([[2.0, 102.0, 103.0, 101.9]]))
    # x = 2: mlp -> (2, -2), LeakyReLU -> (2, -0.2); mlp2 -> (-0.2, 0.25); h = 0.5 * (2, -0.2) + (-0.2, 0.25) = (0.8, 0.15)
    w0 = 1 / (1 + math.exp(0.15 - 0.8))
    torch.testing.assert_close(out[0, 0], torch.tensor([w0, 2 * (1 - w0)]))
    torch.testing.assert_close(out[0, 1], torch.tensor([7.0, 7.0]))  # exactly 102: mask row
    torch.testing.assert_close(out[0, 2], torch.tensor([-3.0, -3.0]))  # exactly 103: pad row
    assert not torch.allclose(out[0, 3], torch.tensor([7.0, 7.0]))  # near 102 is an ordinary value


def test_missing_tensor_is_named(tmp_path):
    folder = write_folder(tmp_path / "ckpt", mutate=lambda sd: sd.pop("model.encoder.transformer_encoder.1.linear1.weight"))
    with pytest.raises(UserError, match=r"missing 1 tensor\(s\): layers\.1\.linear1\.weight"):
        build(folder)


def test_misshaped_tensor_is_named(tmp_path):
    def shrink(sd):
        sd["model.encoder.transformer_encoder.0.self_attn.in_proj_weight"] = torch.zeros(3 * D, D - 1)

    with pytest.raises(UserError, match=r"mis-shaped .*layers\.0\.self_attn\.qkv\.weight"):
        build(write_folder(tmp_path / "ckpt", mutate=shrink))


def test_unexpected_encoder_tensor_is_named(tmp_path):
    folder = write_folder(tmp_path / "ckpt", mutate=lambda sd: sd.update({"model.encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected 1 tensor\(s\): encoder\.extra\.weight"):
        build(folder)


def test_wrong_panel_length_is_one_line(tmp_path):
    folder = write_folder(tmp_path / "ckpt", panel=PANEL[:-1])
    with pytest.raises(UserError) as err:
        build(folder)
    message = str(err.value)
    assert "\n" not in message and "11 genes" in message and "seq_len 14" in message


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build(tmp_path / "nowhere")
    folder = write_folder(tmp_path / "ckpt")
    (folder / PANEL_FILE).unlink()
    with pytest.raises(UserError, match=f"lacks {PANEL_FILE}"):
        build(folder)


def test_code_referencing_checkpoint_needs_trust(tmp_path):
    folder = write_folder(tmp_path / "ckpt", extra_config=argparse.Namespace(lr=1e-3))
    with pytest.raises(UserError, match=r"weights_only=True .*backbone\.trust_checkpoint=true") as err:
        build(folder)
    assert "\n" not in str(err.value)
    loaded = build(folder, trust_checkpoint=True)
    assert loaded.pretrained and loaded.model.d_model == D


def test_vocab_only(tmp_path):
    folder = write_folder(tmp_path / "ckpt")
    vocab = build(folder, vocab_only=True)
    assert vocab.size == len(PANEL) and vocab.genes == PANEL
    assert build(None, vocab_only=True) is None


def test_random_init_with_anndata(tmp_path, capsys):
    genes = [f"R{i}" for i in range(9)]
    X = sp.csr_matrix(np.random.default_rng(1).poisson(2.0, size=(5, 9)).astype(np.float32))
    cells = anndata.AnnData(X=X, var=pd.DataFrame(index=genes))
    loaded = build(None, cells=cells, seed=3)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    assert not loaded.pretrained and loaded.checkpoint is None and loaded.tokenizer.panel == tuple(genes)
    model = loaded.model
    assert model.pos_emb.weight.shape == (len(genes) + 3, SIZES["d_model"]) and len(model.layers) == 1
    again = build(None, cells=cells, seed=3).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    tokens = loaded.tokenizer.tokenize(X, genes, seed=0)
    batch = loaded.tokenizer.collate([(tokens.gene_ids[a:b], tokens.values[a:b]) for a, b in zip(tokens.indptr[:-1], tokens.indptr[1:], strict=True)])
    model.eval()
    with torch.no_grad():
        pooled = model.cell_embedding(model(batch), batch)
    assert pooled.shape == (5, 4 * SIZES["d_model"]) and torch.isfinite(pooled).all()
    # the token-prompt point exists and is used
    assert model.token_embedding_adapter_owner is model.token_emb and hasattr(model.token_emb, "scpeft_adapter")
    # a trained run's saved panel is reused without data
    loaded.tokenizer.save(tmp_path)
    assert build(None, saved=tmp_path).tokenizer.panel == tuple(genes)
    with pytest.raises(DataNeeded, match="backbone.n_genes"):
        build(None)
    # without data, backbone.n_genes sizes the position table (describe at the release's 19,264 genes)
    assert build(None, n_genes=30).model.pos_emb.weight.shape == (33, SIZES["d_model"])


def test_state_dict_keys_match_checkpoint_names():
    from scpeft_cli.backbones.scfoundation import ScFoundationArchitecture, convert_scfoundation_state_dict

    arch = ScFoundationArchitecture(d_model=D, n_heads=HEADS, d_ff=4 * D, n_layers=LAYERS, bin_num=BINS, bin_alpha=ALPHA, seq_len=SEQ_LEN)
    converted, ignored = convert_scfoundation_state_dict(make_entry(0)["state_dict"])
    assert set(converted) == set(ScFoundation(arch).state_dict())
    assert sorted({k.split(".")[0] for k in ignored}) == ["decoder", "decoder_embed", "norm", "to_final"]


def test_training_backward_with_grad_checkpointing(tmp_path):
    loaded = build(write_folder(tmp_path / "ckpt"), dropout=0.1)
    model = loaded.model.train()
    model.set_memory_options(grad_checkpointing=True, recompute_frozen_qkv=True)
    _, batch = tokenized_batch(loaded.tokenizer)
    model.cell_embedding(model(batch), batch).sum().backward()
    assert model.token_emb.mlp.weight.grad is not None and model.layers[0].self_attn.qkv.weight.grad is not None
    assert model.encoder.norm.weight.grad is not None


def test_embed_with_an_official_folder_reproduces_scfoundations_cell_embeddings(tmp_path):
    """`scpeft embed backbone=scfoundation backbone.checkpoint=DIR` against get_embedding.py's input written
    out here (panel order, log1p over the panel total x 1e4, T = 4 and S = log10(total) at their
    positions, non-zero positions only) and the reference encoder and pooling above."""
    folder = write_folder(tmp_path / "scfoundation")
    genes = ["NOT_IN_PANEL", *reversed(PANEL[2:])]  # two panel genes absent, one foreign gene, reversed order
    rng = np.random.default_rng(5)
    counts = (rng.poisson(2.0, (5, len(genes))) * (rng.random((5, len(genes))) < 0.5)).astype(np.float32)
    counts[:, 0] += 9  # counts outside the panel do not enter its total
    counts[:, 3] += 1
    anndata.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]),
                    var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "cells.h5ad")  # fmt: skip
    output = tmp_path / "emb.h5ad"
    run_cli("embed", "backbone=scfoundation", f"backbone.checkpoint={folder}", "data=h5ad",
            f"data.path={tmp_path / 'cells.h5ad'}", f"output={output}", f"hydra.run.dir={tmp_path / 'log'}")  # fmt: skip
    ours = anndata.read_h5ad(output).obsm["X_scpeft"]

    sd = torch.load(folder / "models.ckpt", weights_only=True)["cell"]["state_dict"]
    expected = []
    for row in counts:
        panel_counts = np.array([row[genes.index(g)] if g in genes else 0.0 for g in PANEL], dtype=np.float64)
        total = panel_counts.sum()
        values = np.concatenate([np.log1p(panel_counts / total * 1e4), [4.0, math.log10(total)]])
        ids = np.flatnonzero(values > 0)
        states = ref_encoder(sd, torch.as_tensor(ids), torch.as_tensor(values[ids]))
        expected.append(ref_cell_embedding(states, torch.as_tensor(ids)).numpy())
    np.testing.assert_allclose(ours, np.stack(expected), rtol=1e-4, atol=2e-5)
