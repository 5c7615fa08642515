"""Tests for loading official scGPT checkpoint folders (and the random-init fallback).

Every checkpoint here is a tiny folder written in exactly the official layout (`best_model.pt` as a
plain state dict, `vocab.json`, `args.json`). The loaded model is checked against two references
built straight from the raw state dict: plain torch ops, and `torch.nn.TransformerEncoderLayer`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scpeft_cli.backbones.scgpt_checkpoint import build_scgpt
from scpeft_cli.errors import UserError

# ---------------------------------------------------------------------------------------------------
# A tiny scGPT in the official format
# ---------------------------------------------------------------------------------------------------

D_MODEL, N_HEADS, D_HID, N_LAYERS = 16, 2, 32, 2
GENES = [f"GENE{i:02d}" for i in range(17)]
# Official ordering: genes first, then <pad>, <cls>, <eoc> at the end of the table.
VOCAB = {**{gene: i for i, gene in enumerate(GENES)}, "<pad>": 17, "<cls>": 18, "<eoc>": 19}
PAD_ID, CLS_ID, N_TOKENS = VOCAB["<pad>"], VOCAB["<cls>"], len(VOCAB)
N_BINS, PAD_VALUE = 11, -2.0
EPS = 1e-5

# The three published spellings of each layer's attention tensors (same [q; k; v] packing).
LAYOUTS = {
    "flash_wqkv": {
        "qkv_weight": "self_attn.Wqkv.weight",
        "qkv_bias": "self_attn.Wqkv.bias",
        "out_weight": "self_attn.out_proj.weight",
        "out_bias": "self_attn.out_proj.bias",
    },
    "torch_in_proj": {
        "qkv_weight": "self_attn.in_proj_weight",
        "qkv_bias": "self_attn.in_proj_bias",
        "out_weight": "self_attn.out_proj.weight",
        "out_bias": "self_attn.out_proj.bias",
    },
    "nested_impl": {
        "qkv_weight": "self_attn._impl.Wqkv.weight",
        "qkv_bias": "self_attn._impl.Wqkv.bias",
        "out_weight": "self_attn._impl.out_proj.weight",
        "out_bias": "self_attn._impl.out_proj.bias",
    },
}



def layer_key(i: int, name: str) -> str:
    return f"transformer_encoder.layers.{i}.{name}"


def attn_key(layout: str, i: int, role: str) -> str:
    """The checkpoint key of attention tensor `role` (qkv_weight, ..., out_bias) of layer i."""
    return layer_key(i, LAYOUTS[layout][role])


def make_state_dict(layout: str = "flash_wqkv", *, seed: int = 0, d: int = D_MODEL, d_hid: int = D_HID,
                    n_layers: int = N_LAYERS, n_tokens: int = N_TOKENS) -> OrderedDict:
    """A random official-format scGPT state dict, pretraining-only heads included."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def norm_params(prefix):
        return {f"{prefix}.weight": 1.0 + rand(d, scale=0.1), f"{prefix}.bias": rand(d, scale=0.1)}

    state = OrderedDict()
    state["encoder.embedding.weight"] = rand(n_tokens, d, scale=1.0)
    state.update(norm_params("encoder.enc_norm"))
    state["value_encoder.linear1.weight"] = rand(d, 1)
    state["value_encoder.linear1.bias"] = rand(d)
    state["value_encoder.linear2.weight"] = rand(d, d)
    state["value_encoder.linear2.bias"] = rand(d)
    state.update(norm_params("value_encoder.norm"))
    for i in range(n_layers):
        state[attn_key(layout, i, "qkv_weight")] = rand(3 * d, d)
        state[attn_key(layout, i, "qkv_bias")] = rand(3 * d)
        state[attn_key(layout, i, "out_weight")] = rand(d, d)
        state[attn_key(layout, i, "out_bias")] = rand(d)
        state[layer_key(i, "linear1.weight")] = rand(d_hid, d)
        state[layer_key(i, "linear1.bias")] = rand(d_hid)
        state[layer_key(i, "linear2.weight")] = rand(d, d_hid)
        state[layer_key(i, "linear2.bias")] = rand(d)
        state.update(norm_params(layer_key(i, "norm1")))
        state.update(norm_params(layer_key(i, "norm2")))
    # Pretraining-only heads (expression decoder, MVC decoder, flag encoder) and a task head.
    for j, (rows, cols) in zip((0, 2, 4), ((d, d), (d, d), (1, d)), strict=True):
        state[f"decoder.fc.{j}.weight"] = rand(rows, cols)
        state[f"decoder.fc.{j}.bias"] = rand(rows)
    state["mvc_decoder.gene2query.weight"] = rand(d, d)
    state["mvc_decoder.gene2query.bias"] = rand(d)
    state["mvc_decoder.W.weight"] = rand(d, d)
    state["flag_encoder.weight"] = rand(2, d)
    state["cls_decoder._decoder.0.weight"] = rand(d, d)
    state["cls_decoder.out_layer.weight"] = rand(3, d)
    return state


def make_args(**overrides) -> dict:
    """args.json as scGPT's pretraining script writes it (the relevant subset, scaled down)."""
    args = {
        "data_source": "/scratch/cellxgene", "pad_token": "<pad>", "input_style": "binned",
        "input_emb_style": "continuous", "n_bins": N_BINS, "max_seq_len": 1200, "mask_ratio": [0.25, 0.5, 0.75],
        "fast_transformer": True, "nlayers": N_LAYERS, "nheads": N_HEADS, "embsize": D_MODEL, "d_hid": D_HID,
        "dropout": 0.2, "n_layers_cls": 3, "mask_value": -1, "pad_value": PAD_VALUE, "USE_CLS": True,
        "MVC": True, "USE_GENERATIVE_TRAINING": True,
    }
    args.update(overrides)
    return args


def write_checkpoint(folder: Path, *, state=None, vocab=None, args=None, layout: str = "flash_wqkv") -> Path:
    """Write best_model.pt / vocab.json / args.json into `folder` (defaults: the tiny model above)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(make_state_dict(layout) if state is None else state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(VOCAB if vocab is None else vocab))
    (folder / "args.json").write_text(json.dumps(make_args() if args is None else args, indent=2))
    return folder


def load(folder, **overrides):
    """build_scgpt on a checkpoint folder; the architecture arguments are deliberately wrong."""
    kwargs = dict(
        name="scgpt", checkpoint=str(folder), d_model=64, n_heads=4, d_hid=128, n_layers=5, dropout=0.1,
        attention_dropout=0.0, vocab_size=None, n_bins=51, max_seq_len=64, pad_value=-99.0, seed=0,
    )
    kwargs.update(overrides)
    return build_scgpt(**kwargs)


def genes_only(genes):
    """An AnnData of no cells whose var_names are `genes`: all a random backbone reads from data."""
    return anndata.AnnData(var=pd.DataFrame(index=list(genes)))


def build_random(seed: int = 0, genes=("GENE_B", "GENE_A", "GENE_C"), vocab_size=None):
    return build_scgpt(
        name="scgpt", checkpoint=None, d_model=D_MODEL, n_heads=N_HEADS, d_hid=D_HID, n_layers=N_LAYERS,
        dropout=0.2, attention_dropout=0.0, vocab_size=vocab_size, n_bins=N_BINS, max_seq_len=64,
        pad_value=PAD_VALUE, seed=seed, cells=genes_only(genes) if genes is not None else None,
    )


def make_batch(lengths=(7, 5, 3), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded cells: `<cls>` (value 0) first, then genes with bin values; one value above 512."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    gene_ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    values = torch.full((len(lengths), width), PAD_VALUE)
    for row, n in enumerate(lengths):
        gene_ids[row, 0] = CLS_ID
        gene_ids[row, 1:n] = torch.randperm(len(GENES), generator=g)[: n - 1]
        values[row, 0] = 0.0
        values[row, 1:n] = torch.randint(1, N_BINS, (n - 1,), generator=g).float()
    values[0, 1] = 900.0  # exercises the clamp at 512
    return {"gene_ids": gene_ids, "values": values, "padding_mask": gene_ids == PAD_ID}


# ---------------------------------------------------------------------------------------------------
# Independent references computed from the raw state dict
# ---------------------------------------------------------------------------------------------------


def reference_embed(state, gene_ids, values) -> torch.Tensor:
    """enc_norm(embedding(gene_ids)) + value_encoder(values), with plain functional ops."""
    d = state["encoder.embedding.weight"].shape[1]
    h = F.embedding(gene_ids, state["encoder.embedding.weight"])
    h = F.layer_norm(h, (d,), state["encoder.enc_norm.weight"], state["encoder.enc_norm.bias"], EPS)
    v = torch.clamp(values, max=512.0).unsqueeze(-1)
    v = F.linear(v, state["value_encoder.linear1.weight"], state["value_encoder.linear1.bias"])
    v = F.linear(F.relu(v), state["value_encoder.linear2.weight"], state["value_encoder.linear2.bias"])
    v = F.layer_norm(v, (d,), state["value_encoder.norm.weight"], state["value_encoder.norm.bias"], EPS)
    return h + v


def reference_forward(state, batch, *, layout: str, n_heads: int, n_layers: int) -> torch.Tensor:
    """scGPT's post-norm encoder by hand: explicit softmax attention with a -inf key mask, in float64."""
    state = {k: v.double() for k, v in state.items()}
    x = reference_embed(state, batch["gene_ids"], batch["values"].double())
    batch_size, length, d = x.shape
    head_dim = d // n_heads
    key_is_pad = batch["gene_ids"] == PAD_ID
    for i in range(n_layers):
        qkv = F.linear(x, state[attn_key(layout, i, "qkv_weight")], state[attn_key(layout, i, "qkv_bias")])
        q, k, v = (t.reshape(batch_size, length, n_heads, head_dim).transpose(1, 2) for t in qkv.split(d, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(key_is_pad[:, None, None, :], float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch_size, length, d)
        attended = F.linear(attended, state[attn_key(layout, i, "out_weight")], state[attn_key(layout, i, "out_bias")])
        norm1 = state[layer_key(i, "norm1.weight")], state[layer_key(i, "norm1.bias")]
        x = F.layer_norm(x + attended, (d,), *norm1, EPS)
        ff = F.linear(x, state[layer_key(i, "linear1.weight")], state[layer_key(i, "linear1.bias")])
        ff = F.linear(F.relu(ff), state[layer_key(i, "linear2.weight")], state[layer_key(i, "linear2.bias")])
        norm2 = state[layer_key(i, "norm2.weight")], state[layer_key(i, "norm2.bias")]
        x = F.layer_norm(x + ff, (d,), *norm2, EPS)
    return x.float()


def torch_layers_forward(state, batch, *, layout: str, n_heads: int, n_layers: int) -> torch.Tensor:
    """Second reference: the same weights in `nn.TransformerEncoderLayer` (post-norm, relu, batch_first)."""
    x = reference_embed(state, batch["gene_ids"], batch["values"])
    d, d_hid = x.shape[-1], state[layer_key(0, "linear1.weight")].shape[0]
    for i in range(n_layers):
        layer = nn.TransformerEncoderLayer(
            d, n_heads, d_hid, dropout=0.0, activation="relu", layer_norm_eps=EPS, batch_first=True, norm_first=False
        )
        weights = {
            "self_attn.in_proj_weight": state[attn_key(layout, i, "qkv_weight")],
            "self_attn.in_proj_bias": state[attn_key(layout, i, "qkv_bias")],
            "self_attn.out_proj.weight": state[attn_key(layout, i, "out_weight")],
            "self_attn.out_proj.bias": state[attn_key(layout, i, "out_bias")],
        }
        for name in ("linear1", "linear2", "norm1", "norm2"):
            for param in ("weight", "bias"):
                weights[f"{name}.{param}"] = state[layer_key(i, f"{name}.{param}")]
        layer.load_state_dict(weights, strict=True)
        layer.eval()
        x = layer(x, src_key_padding_mask=batch["padding_mask"])
    return x


def assert_close_on_tokens(actual, expected, padding_mask, atol=1e-5, rtol=1e-5):
    """Compare token states at non-padding positions only (padding outputs are meaningless)."""
    keep = ~padding_mask
    torch.testing.assert_close(actual[keep], expected[keep], atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------
# 1-2. Loading and numerical equivalence
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_matches_reference_forward(tmp_path, layout):
    """Token states of the loaded model equal a hand-written forward pass from the raw state dict."""
    state = make_state_dict(layout)
    backbone = load(write_checkpoint(tmp_path / "ckpt", state=state, layout=layout))
    model = backbone.model.eval()
    batch = make_batch()
    with torch.no_grad():
        states = model(batch)
        cells = model.cell_embedding(states, batch)
    expected = reference_forward(state, batch, layout=layout, n_heads=N_HEADS, n_layers=N_LAYERS)

    assert states.shape == (3, 7, D_MODEL)
    assert torch.isfinite(states[~batch["padding_mask"]]).all()
    assert_close_on_tokens(states, expected, batch["padding_mask"])
    torch.testing.assert_close(cells, expected[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_matches_torch_transformer_encoder_layer(tmp_path, layout):
    """Cross-check against nn.TransformerEncoderLayer fed the same weights through in_proj_weight."""
    state = make_state_dict(layout, seed=3)
    model = load(write_checkpoint(tmp_path / "ckpt", state=state, layout=layout)).model.eval()
    batch = make_batch(lengths=(4, 6, 6, 2), seed=5)
    with torch.no_grad():
        states = model(batch)
        expected = torch_layers_forward(state, batch, layout=layout, n_heads=N_HEADS, n_layers=N_LAYERS)
    assert_close_on_tokens(states, expected, batch["padding_mask"])


def test_the_three_layouts_load_identically(tmp_path):
    """The same tensors under the three attention spellings give bit-identical models."""
    base = make_state_dict("flash_wqkv", seed=7)
    loaded = []
    for layout in sorted(LAYOUTS):
        renamed = OrderedDict()
        for key, tensor in base.items():
            for i in range(N_LAYERS):
                for role in LAYOUTS[layout]:
                    if key == attn_key("flash_wqkv", i, role):
                        key = attn_key(layout, i, role)
                        break
            renamed[key] = tensor
        loaded.append(load(write_checkpoint(tmp_path / layout, state=renamed)).model.state_dict())
    for other in loaded[1:]:
        assert other.keys() == loaded[0].keys()
        for key in other:
            assert torch.equal(other[key], loaded[0][key]), key


def test_padding_does_not_change_token_states(tmp_path):
    """A cell gives the same states alone as inside a padded batch (the key mask really masks)."""
    model = load(write_checkpoint(tmp_path / "ckpt")).model.eval()
    batch = make_batch(lengths=(7, 3))
    alone = {key: value[1:2, :3] for key, value in batch.items()}
    with torch.no_grad():
        padded_states = model(batch)[1, :3]
        alone_states = model(alone)[0]
    torch.testing.assert_close(padded_states, alone_states, atol=1e-5, rtol=1e-5)


def test_every_backbone_tensor_is_copied(tmp_path):
    """Each loaded parameter equals its checkpoint tensor (no silent re-initialisation)."""
    state = make_state_dict("torch_in_proj", seed=11)
    loaded = load(write_checkpoint(tmp_path / "ckpt", state=state)).model.state_dict()
    for i in range(N_LAYERS):
        qkv = state[attn_key("torch_in_proj", i, "qkv_weight")]
        assert torch.equal(loaded[f"layers.{i}.self_attn.qkv.weight"], qkv)
        assert torch.equal(loaded[f"layers.{i}.norm2.bias"], state[layer_key(i, "norm2.bias")])
    assert torch.equal(loaded["encoder.embedding.weight"], state["encoder.embedding.weight"])
    assert torch.equal(loaded["value_encoder.linear1.weight"], state["value_encoder.linear1.weight"])


def test_pretraining_only_tensors_are_ignored_and_reusable_decoders_kept_with_a_log_line(tmp_path, capsys):
    state = make_state_dict()
    backbone = load(write_checkpoint(tmp_path / "ckpt", state=state))
    out = capsys.readouterr().out
    n_ignored = sum(key.startswith(("flag_encoder.", "cls_decoder.")) for key in state)
    assert f"ignored {n_ignored} pretraining-only tensors (cls_decoder, flag_encoder)" in out
    assert "kept the pretrained decoder, mvc_decoder tensors" in out
    assert set(backbone.heads) == {"decoder", "mvc_decoder"}
    for head, tensors in backbone.heads.items():
        assert {f"{head}.{key}" for key in tensors} == {key for key in state if key.startswith(f"{head}.")}
        assert all(torch.equal(tensor, state[f"{head}.{key}"]) for key, tensor in tensors.items())
    assert build_random().heads == {}


# ---------------------------------------------------------------------------------------------------
# 3. Provenance and architecture from args.json
# ---------------------------------------------------------------------------------------------------


def test_architecture_and_tokenizer_come_from_args_json(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    backbone = load(folder, d_model=64, n_heads=4, d_hid=128, n_layers=5, n_bins=51, pad_value=-99.0)
    model = backbone.model

    assert backbone.pretrained is True
    assert backbone.checkpoint == str(folder)
    assert backbone.name == "scgpt"
    assert model.d_model == D_MODEL
    assert len(model.layers) == N_LAYERS
    assert all(layer.self_attn.n_heads == N_HEADS for layer in model.layers)
    assert model.layers[0].linear1.out_features == D_HID
    assert model.encoder.embedding.num_embeddings == N_TOKENS
    assert backbone.tokenizer.n_bins == N_BINS
    assert backbone.tokenizer.pad_value == PAD_VALUE
    assert backbone.tokenizer.vocab.token_to_id == VOCAB
    assert backbone.tokenizer.vocab.pad_id == PAD_ID and backbone.tokenizer.vocab.cls_id == CLS_ID


def test_larger_architecture_in_args_json_is_respected(tmp_path):
    """A 3-layer, 4-head, d=24 checkpoint builds a 3-layer, 4-head, d=24 model whatever the arguments."""
    state = make_state_dict(d=24, d_hid=40, n_layers=3)
    folder = write_checkpoint(tmp_path / "ckpt", state=state, args=make_args(embsize=24, nheads=4, d_hid=40, nlayers=3))
    model = load(folder, d_model=D_MODEL, n_heads=N_HEADS, d_hid=D_HID, n_layers=N_LAYERS).model.eval()
    assert (model.d_model, len(model.layers), model.layers[0].self_attn.n_heads) == (24, 3, 4)
    batch = make_batch()
    with torch.no_grad():
        states = model(batch)
    expected = reference_forward(state, batch, layout="flash_wqkv", n_heads=4, n_layers=3)
    assert_close_on_tokens(states, expected, batch["padding_mask"])


# ---------------------------------------------------------------------------------------------------
# 4. Defective checkpoints: one clear UserError naming the problem
# ---------------------------------------------------------------------------------------------------


def test_missing_backbone_tensor_is_named(tmp_path):
    state = make_state_dict()
    del state["transformer_encoder.layers.1.linear2.weight"]
    with pytest.raises(UserError, match=r"missing .*layers\.1\.linear2\.weight"):
        load(write_checkpoint(tmp_path / "ckpt", state=state))


def test_missing_attention_tensor_is_reported(tmp_path):
    state = make_state_dict("nested_impl")
    del state[attn_key("nested_impl", 0, "qkv_bias")]
    with pytest.raises(UserError, match=r"missing .*layers\.0\.self_attn\.qkv\.bias"):
        load(write_checkpoint(tmp_path / "ckpt", state=state))


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    state = make_state_dict()
    state["transformer_encoder.layers.0.linear1.weight"] = torch.zeros(D_HID + 1, D_MODEL)
    expected = f"layers.0.linear1.weight ({D_HID + 1}, {D_MODEL}) (model expects ({D_HID}, {D_MODEL}))"
    with pytest.raises(UserError, match=r"mis-shaped .*" + re.escape(expected)):
        load(write_checkpoint(tmp_path / "ckpt", state=state))


def test_unexpected_key_is_named(tmp_path):
    state = make_state_dict()
    state["encoder.positional.weight"] = torch.zeros(4, D_MODEL)
    with pytest.raises(UserError, match=r"unexpected .*encoder\.positional\.weight"):
        load(write_checkpoint(tmp_path / "ckpt", state=state))


@pytest.mark.parametrize("filename", ["best_model.pt", "vocab.json", "args.json"])
def test_folder_lacking_a_file_names_it(tmp_path, filename):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / filename).unlink()
    with pytest.raises(UserError, match=re.escape(filename)):
        load(folder)


def test_nonexistent_folder(tmp_path):
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_weights_file(tmp_path, damage):
    folder = write_checkpoint(tmp_path / "ckpt")
    weights = folder / "best_model.pt"
    data = weights.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\x00" * 64, "empty": b""}
    weights.write_bytes(damaged[damage])
    with pytest.raises(UserError, match=r"cannot load .*best_model\.pt"):
        load(folder)


@pytest.mark.parametrize("change", ["extra_gene", "missing_last_token"])
def test_vocab_size_mismatch_is_a_misshaped_embedding(tmp_path, change):
    vocab = dict(VOCAB)
    if change == "extra_gene":
        vocab["GENE_NEW"] = N_TOKENS
        rows = N_TOKENS + 1
    else:
        del vocab["<eoc>"]  # the highest id: the vocabulary now indexes one row fewer
        rows = N_TOKENS - 1
    expected = f"encoder.embedding.weight ({N_TOKENS}, {D_MODEL}) (model expects ({rows}, {D_MODEL}))"
    with pytest.raises(UserError, match=r"mis-shaped .*" + re.escape(expected)):
        load(write_checkpoint(tmp_path / "ckpt", vocab=vocab))


@pytest.mark.parametrize("key", ["embsize", "nheads", "d_hid", "nlayers"])
def test_args_json_missing_a_required_key(tmp_path, key):
    args = make_args()
    del args[key]
    with pytest.raises(UserError, match=rf"args\.json lacks '{key}'"):
        load(write_checkpoint(tmp_path / "ckpt", args=args))


def test_args_json_not_json(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "args.json").write_text("{embsize: 16,")
    with pytest.raises(UserError, match=r"args\.json"):
        load(folder)


@pytest.mark.parametrize(
    "vocab_text, message",
    [
        (json.dumps({g: i for g, i in VOCAB.items() if g != "<cls>"}), "special tokens"),
        (json.dumps(["<pad>", "<cls>"]), "not a JSON object"),
        ("{not json", "cannot read vocabulary"),
    ],
    ids=["no_cls", "a_list", "not_json"],
)
def test_bad_vocab_json(tmp_path, vocab_text, message):
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "vocab.json").write_text(vocab_text)
    with pytest.raises(UserError, match=message):
        load(folder)


# ---------------------------------------------------------------------------------------------------
# 5. Safe loading: weights_only refuses arbitrary pickles
# ---------------------------------------------------------------------------------------------------


class NotAStateDict:
    """A custom object a malicious or careless checkpoint might pickle."""

    def __init__(self):
        self.weights = torch.zeros(2)


class RunsCodeOnLoad:
    """Unpickling this with the full pickle protocol would create a directory (a stand-in for any code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_custom_object_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", state=NotAStateDict())
    with pytest.raises(UserError, match=r"refused .*best_model\.pt: loading it could run code \(it references test_scgpt_checkpoint\.NotAStateDict\)"):
        load(folder)


def test_custom_object_inside_a_state_dict_is_refused(tmp_path):
    state = make_state_dict()
    state["extra"] = NotAStateDict()
    with pytest.raises(UserError, match=r"refused .*best_model\.pt: loading it could run code"):
        load(write_checkpoint(tmp_path / "ckpt", state=state))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    folder = write_checkpoint(tmp_path / "ckpt", state={"payload": RunsCodeOnLoad(str(marker))})
    with pytest.raises(UserError, match=r"refused .*best_model\.pt: loading it could run code \(it references posix\.mkdir\)") as err:
        load(folder)
    assert not marker.exists()
    assert len(str(err.value)) < 250 and "weights_only" not in str(err.value)  # one short line, no advice to disable the check


def test_safe_non_dict_payload_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", state=[torch.zeros(2), torch.ones(2)])
    with pytest.raises(UserError, match="not a state dict"):
        load(folder)


# ---------------------------------------------------------------------------------------------------
# 6. Random initialisation (checkpoint=None)
# ---------------------------------------------------------------------------------------------------


def test_random_build_is_not_pretrained_and_uses_data_genes(capsys):
    backbone = build_random(genes=("GENE_B", "GENE_A", "GENE_C"))
    assert backbone.pretrained is False
    assert backbone.checkpoint is None
    vocab = backbone.tokenizer.vocab.token_to_id
    assert set(vocab) == {"GENE_A", "GENE_B", "GENE_C", "<pad>", "<cls>", "<eoc>"}
    assert sorted(vocab.values()) == list(range(6))
    assert backbone.model.encoder.embedding.num_embeddings == 6
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out


def test_random_build_pads_embedding_to_vocab_size():
    backbone = build_random(vocab_size=50)
    assert backbone.model.encoder.embedding.num_embeddings == 50
    assert backbone.tokenizer.vocab.size == 6


def test_random_build_without_genes_or_vocab_size_is_refused():
    with pytest.raises(UserError, match="vocab_size"):
        build_random(genes=None)


def test_random_build_is_reproducible_per_seed():
    first, again, other = (build_random(seed=s).model.state_dict() for s in (5, 5, 6))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_random_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    build_random(seed=5)
    after_build = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(4))


def test_random_build_runs_on_a_padded_batch():
    backbone = build_random(genes=GENES)
    vocab = backbone.tokenizer.vocab
    cells = [
        (np.array([vocab.cls_id, 0, 3, 5]), np.array([0.0, 1.0, 4.0, 2.0], dtype=np.float32)),
        (np.array([vocab.cls_id, 7]), np.array([0.0, 3.0], dtype=np.float32)),
    ]
    batch = backbone.tokenizer.collate(cells)
    model = backbone.model.eval()
    with torch.no_grad():
        states = model(batch)
    assert states.shape == (2, 4, D_MODEL)
    assert torch.isfinite(states[~batch["padding_mask"]]).all()
    assert model.cell_embedding(states, batch).shape == (2, D_MODEL)
