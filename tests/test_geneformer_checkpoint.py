"""Tests for loading official Geneformer model folders (and the random-init fallback).

Every checkpoint here is a tiny random `transformers` BERT written by transformers itself in the official
layout (`save_pretrained`: config.json + model.safetensors; or the older `pytorch_model.bin` state dict
with `position_ids` and the tied MLM decoder), next to the four gene dictionaries pickled as upstream
does (protocol 4, numpy int16 token ids and float64 medians, referring to `numpy.core.multiarray`).
The loaded model is checked against transformers' own forward pass, layer by layer.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from scpeft_cli.backbones.base import DataNeeded
from scpeft_cli.backbones.geneformer.checkpoint import build_geneformer
from scpeft_cli.backbones.geneformer.dictionaries import find_dictionary_files
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tokenizers.base import COUNTS_LAYER, TOTALS_COLUMN

# ---------------------------------------------------------------------------------------------------
# A tiny Geneformer in the official format
# ---------------------------------------------------------------------------------------------------

HIDDEN, HEADS, INTERMEDIATE, N_LAYERS, MAX_POSITIONS = 16, 2, 24, 3, 32
GENES = [f"ENSG{i:011d}" for i in range(20)]
SYMBOLS = [f"GENE{i}" for i in range(20)]
TOLERANCE = 1e-5


def token_dictionary(v2: bool, genes=GENES) -> dict:
    specials = ["<pad>", "<mask>", *(["<cls>", "<eos>"] if v2 else [])]
    return {token: np.int16(i) for i, token in enumerate([*specials, *genes])}


def upstream_pickle(obj, path: Path) -> None:
    """Pickle `obj` (protocol 4) as the geneformer package's files are: numpy scalars by way of
    `numpy.core.multiarray.scalar` (numpy 1.x's module name; numpy 2 would write `numpy._core`)."""
    data = pickle.dumps(obj, protocol=4)
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"
    assert data[2] == 0x95 and int.from_bytes(data[3:11], "little") == len(data) - 11  # one frame
    body = data[11:].replace(old, new)
    path.write_bytes(data[:2] + b"\x95" + len(body).to_bytes(8, "little") + body)


def write_dictionaries(folder: Path, *, v2: bool, suffix: str = "_gc30M", genes=GENES) -> None:
    """The four dictionaries as the geneformer package ships them (contents scaled down)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    medians = {gene: np.float64(rng.uniform(0.5, 5.0)) for gene in genes}
    name_id = dict(zip(SYMBOLS, genes, strict=False))
    mapping = {**{gene: gene for gene in genes}, **name_id}
    for stem, table in (
        ("token_dictionary", token_dictionary(v2, genes)),
        ("gene_median_dictionary", medians),
        ("gene_name_id_dict", name_id),
        ("ensembl_mapping_dict", mapping),
    ):
        upstream_pickle(table, folder / f"{stem}{suffix}.pkl")


def bert_config(v2: bool, **overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(token_dictionary(v2)), hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, hidden_act="relu", max_position_embeddings=MAX_POSITIONS, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02, pad_token_id=0,
    )  # fmt: skip
    settings.update(overrides)
    config = BertConfig(**settings)
    config._attn_implementation = "eager"  # the reference: transformers' explicit softmax attention
    return config


def random_bert(v2: bool, *, cls=BertForMaskedLM, seed: int = 0, **overrides):
    """A transformers BERT with every parameter random (LayerNorms and biases included), in eval mode."""
    torch.manual_seed(seed)
    model = cls(bert_config(v2, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_((1.0 if "word_embeddings" in name else 0.3) * torch.randn_like(param))
    return model.eval()


def write_model(folder: Path, *, v2: bool, layout: str = "safetensors", dictionaries: bool = True, **overrides):
    """A tiny Geneformer folder; returns the transformers model it holds (the reference)."""
    cls = BertModel if layout == "no_prefix" else BertForMaskedLM
    model = random_bert(v2, cls=cls, **overrides)
    if layout in ("safetensors", "no_prefix"):
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    elif layout == "bin":  # the older releases: a plain state dict with position_ids and the tied decoder
        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        state = dict(model.state_dict())
        state["bert.embeddings.position_ids"] = torch.arange(MAX_POSITIONS)[None]
        assert "cls.predictions.decoder.weight" in state and "cls.predictions.decoder.bias" in state
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    if dictionaries:
        write_dictionaries(folder, v2=v2, suffix="_gc104M" if v2 else "_gc30M")
    return model


def load(folder, **overrides):
    """build_geneformer on a checkpoint folder; the architecture arguments are deliberately wrong."""
    kwargs = dict(
        name="geneformer", checkpoint=str(folder), dictionary_dir=None, generation="v1", d_model=64, n_heads=4,
        d_ff=128, n_layers=5, max_input_size=7, dropout=0.5, attention_dropout=None, activation="gelu",
        layer_norm_eps=1e-3, vocab_size=99, embedding_layer="second_to_last", pooling="mean", seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return build_geneformer(**kwargs)


def random_kwargs(**overrides):
    kwargs = dict(
        name="geneformer_small", checkpoint=None, dictionary_dir=None, generation="v1", d_model=HIDDEN, n_heads=HEADS,
        d_ff=INTERMEDIATE, n_layers=N_LAYERS, max_input_size=MAX_POSITIONS, dropout=0.1, attention_dropout=0.0,
        activation="relu", layer_norm_eps=1e-12, vocab_size=None, embedding_layer="second_to_last", pooling="mean",
        seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def make_batch(v2: bool, lengths=(9, 6, 3), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded cells of gene tokens (V2: `<cls>` genes `<eos>`; lengths include them)."""
    g = torch.Generator().manual_seed(seed)
    first_gene = 4 if v2 else 2
    gene_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        n_genes = n - 2 if v2 else n
        genes = first_gene + torch.randperm(len(GENES), generator=g)[:n_genes]
        gene_ids[row, :n] = torch.cat([torch.tensor([2]), genes, torch.tensor([3])]) if v2 else genes
    return {"gene_ids": gene_ids, "padding_mask": gene_ids == 0}


def reference_states(reference, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = reference(
            input_ids=batch["gene_ids"], attention_mask=(~batch["padding_mask"]).long(), output_hidden_states=True
        )
    return out.hidden_states


def our_states(model, batch) -> list[torch.Tensor]:
    """The embedding output and every layer's output, all layers run (whatever `depth`)."""
    with torch.no_grad():
        x = model.embed(batch)
        states = [x]
        for layer in model.layers:
            x = layer(x, batch["padding_mask"])
            states.append(x)
    return states


def gene_token_mean(states: torch.Tensor, batch, *, v2: bool) -> torch.Tensor:
    """What Geneformer's emb_extractor computes (emb_mode="cell"): the mean of the gene-token states."""
    means = []
    for row, ids in enumerate(batch["gene_ids"]):
        n = int((ids != 0).sum())
        means.append(states[row, 1 : n - 1].mean(0) if v2 else states[row, :n].mean(0))
    return torch.stack(means)


def max_gap(ours: torch.Tensor, theirs: torch.Tensor, keep: torch.Tensor) -> float:
    return float((ours - theirs)[keep].abs().max())


def evil_pickle(marker: Path) -> bytes:
    """A pickle whose loading creates the directory `marker` (a stand-in for arbitrary code)."""

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    return pickle.dumps({"<pad>": Payload()}, protocol=4)


# ---------------------------------------------------------------------------------------------------
# Equivalence with transformers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v2", "layout", "activation"),
    [(False, "safetensors", "relu"), (True, "safetensors", "relu"), (False, "bin", "relu"),
     (True, "no_prefix", "relu"), (False, "safetensors", "gelu")],
)  # fmt: skip
def test_every_layer_matches_transformers(tmp_path, v2, layout, activation):
    reference = write_model(tmp_path, v2=v2, layout=layout, hidden_act=activation)
    loaded = load(tmp_path)
    model = loaded.model.eval()
    assert loaded.pretrained and loaded.checkpoint == str(tmp_path.resolve())
    assert loaded.tokenizer.model_input_size == MAX_POSITIONS and loaded.tokenizer.vocab.is_v2 == v2
    assert (model.arch.dropout, model.arch.attention_dropout) == (0.02, 0.02)  # the config's, not the arguments'
    batch = make_batch(v2)
    theirs = reference_states(reference, batch)
    ours = our_states(model, batch)
    assert len(ours) == len(theirs) == N_LAYERS + 1
    keep = ~batch["padding_mask"]
    gaps = [max_gap(a, b, keep) for a, b in zip(ours, theirs, strict=True)]
    assert max(gaps) < TOLERANCE, gaps
    # forward runs the layers up to the second-to-last: hidden_states[num_layers - 1]
    with torch.no_grad():
        states = model(batch)
    assert max_gap(states, theirs[N_LAYERS - 1], keep) < TOLERANCE


@pytest.mark.parametrize("v2", [False, True])
def test_cell_embedding_is_emb_extractors(tmp_path, v2):
    reference = write_model(tmp_path, v2=v2)
    batch = make_batch(v2)
    theirs = reference_states(reference, batch)

    def embedding(**overrides):
        model = load(tmp_path, **overrides).model.eval()
        with torch.no_grad():
            return model.cell_embedding(model(batch), batch)

    default = embedding()
    assert default.shape == (3, HIDDEN)
    assert torch.allclose(default, gene_token_mean(theirs[N_LAYERS - 1], batch, v2=v2), atol=TOLERANCE)
    last = embedding(embedding_layer="last")
    assert torch.allclose(last, gene_token_mean(theirs[-1], batch, v2=v2), atol=TOLERANCE)
    if v2:
        assert torch.allclose(embedding(pooling="cls"), theirs[N_LAYERS - 1][:, 0], atol=TOLERANCE)
        assert torch.allclose(embedding(pooling="cls", embedding_layer="last"), theirs[-1][:, 0], atol=TOLERANCE)
    else:
        with pytest.raises(UserError, match="pooling=cls needs a <cls> token"):
            embedding(pooling="cls")


def test_second_to_last_runs_one_layer_less(tmp_path):
    write_model(tmp_path, v2=False)
    model = load(tmp_path).model
    assert model.depth == N_LAYERS - 1 and len(model.active_layers) == N_LAYERS - 1
    assert model.unused_parameter_names() and all(
        n.startswith(f"layers.{N_LAYERS - 1}.") for n in model.unused_parameter_names()
    )
    assert load(tmp_path, embedding_layer="last").model.depth is None


def test_attention_dropout_given_overrides_the_configs(tmp_path):
    write_model(tmp_path, v2=False)
    arch = load(tmp_path, attention_dropout=0.0, dropout=0.3).model.arch
    assert (arch.dropout, arch.attention_dropout) == (0.02, 0.0)  # hidden dropout: always the config's


def test_token_adapter_slot_adapts_the_normalised_embedding(tmp_path):
    """The token-prompt point: after the embedding LayerNorm, before dropout, feeding the first layer."""
    write_model(tmp_path, v2=False)
    model = load(tmp_path).model.eval()
    batch = make_batch(False)
    assert "token_adapter" in model.supports and model.token_embedding_adapter_owner is model.embeddings
    with torch.no_grad():
        plain = model.embed(batch)

        class AddOne(torch.nn.Module):
            def forward(self, x):
                return x + 1.0

        model.token_embedding_adapter_owner.scpeft_adapter = AddOne()
        assert torch.equal(model.embed(batch), plain + 1.0)


def test_tokenizer_output_matches_transformers(tmp_path):
    """Cells tokenised by the returned tokenizer and collated give transformers' states (V2 specials)."""
    reference = write_model(tmp_path, v2=True)
    loaded = load(tmp_path)
    rng = np.random.default_rng(3)
    counts = sp.csr_matrix(rng.poisson(0.8, size=(5, len(GENES))).astype(np.float32))
    tokens = loaded.tokenizer.tokenize(counts, SYMBOLS, seed=0, totals=np.full(5, 500.0))
    batch = loaded.tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    assert (batch["gene_ids"][:, 0] == 2).all()  # <cls> first
    theirs = reference_states(reference, batch)
    ours = our_states(loaded.model.eval(), batch)
    assert max(max_gap(a, b, ~batch["padding_mask"]) for a, b in zip(ours, theirs, strict=True)) < TOLERANCE


def test_transformers_reads_the_folder_we_write(tmp_path):
    """The fixture is the official layout: transformers itself loads it back, nothing missing."""
    reference = write_model(tmp_path, v2=False)
    again = BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = make_batch(False)
    assert torch.equal(reference_states(reference, batch)[-1], reference_states(again, batch)[-1])
    assert sorted(json.loads((tmp_path / "config.json").read_text()))  # written by transformers


def test_ignored_tensors_are_reported(tmp_path, capsys):
    write_model(tmp_path, v2=False, layout="bin")
    load(tmp_path)
    out = capsys.readouterr().out
    n_head = sum(k.startswith("cls.") for k in torch.load(tmp_path / "pytorch_model.bin", weights_only=True))
    assert f"ignored {n_head + 1} tensors" in out  # the MLM head and position_ids
    assert "loaded Geneformer V1 checkpoint" in out


# ---------------------------------------------------------------------------------------------------
# Defects in the weights and the config
# ---------------------------------------------------------------------------------------------------


def edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    write_model(tmp_path, v2=False)
    edit_weights(tmp_path, lambda s: s.pop("bert.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(UserError, match=r"missing 1 tensor\(s\): bert\.encoder\.layer\.1\.attention\.self\.key\.bias"):
        load(tmp_path)


def test_extra_tensor_is_named(tmp_path):
    write_model(tmp_path, v2=False)
    edit_weights(
        tmp_path, lambda s: s.update({"bert.encoder.layer.3.output.dense.weight": torch.zeros(HIDDEN, INTERMEDIATE)})
    )
    with pytest.raises(UserError, match=r"unexpected 1 tensor\(s\): bert\.encoder\.layer\.3\.output\.dense\.weight"):
        load(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    write_model(tmp_path, v2=False)
    edit_weights(
        tmp_path, lambda s: s.update({"bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(25, HIDDEN)})
    )
    with pytest.raises(
        UserError, match=r"mis-shaped 1 tensor\(s\): bert\.encoder\.layer\.0\.intermediate\.dense\.weight \(25, 16\)"
    ):
        load(tmp_path)


def test_config_contradicting_its_tensors_fails_in_one_line(tmp_path):
    write_model(tmp_path, v2=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 2 * INTERMEDIATE
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "does not match its config.json" in message
    assert "intermediate.dense.weight (24, 16) (config.json expects (48, 16))" in message


@pytest.mark.parametrize("key", ["hidden_size", "pad_token_id", "layer_norm_eps"])
def test_config_without_a_key_fails(tmp_path, key):
    write_model(tmp_path, v2=False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"config.json lacks {key}"):
        load(tmp_path)


def test_unsupported_activation_fails(tmp_path):
    write_model(tmp_path, v2=False, hidden_act="gelu_new")
    with pytest.raises(UserError, match="activation 'gelu_new' is not supported"):
        load(tmp_path)


def test_folder_without_weights_or_config(tmp_path):
    write_model(tmp_path, v2=False)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds neither model.safetensors nor pytorch_model.bin"):
        load(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="lacks config.json"):
        load(tmp_path)
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load(tmp_path / "nowhere")


def test_evil_pickle_fixture_runs_code(tmp_path):
    """The payload used below does run code when loaded the unsafe way (so the tests below mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(evil_pickle(marker))  # our own fixture, in tmp_path
    assert marker.is_dir()


def test_training_args_bin_is_never_read(tmp_path):
    write_model(tmp_path, v2=False)
    marker = tmp_path / "code_ran"
    (tmp_path / "training_args.bin").write_bytes(evil_pickle(marker))
    assert load(tmp_path).pretrained
    assert not marker.exists()


def test_code_running_weights_are_refused(tmp_path):
    write_model(tmp_path, v2=False, layout="bin")
    marker = tmp_path / "code_ran"
    (tmp_path / "pytorch_model.bin").unlink()

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"bert.embeddings.word_embeddings.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert re.search(r"run code \(it references (posix|os|nt)\.mkdir\)", message), message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Gene dictionaries
# ---------------------------------------------------------------------------------------------------


def test_dictionaries_are_read_with_plain_types(tmp_path):
    write_model(tmp_path, v2=True)
    vocab = load(tmp_path, vocab_only=True)
    assert vocab.is_v2 and (vocab.cls_id, vocab.eos_id, vocab.pad_id) == (2, 3, 0)
    assert all(type(i) is int for i in vocab.token_to_id.values())
    tokenizer = load(tmp_path).tokenizer
    assert all(type(m) is float for m in tokenizer.medians.values()) and set(tokenizer.medians) == set(GENES)
    assert vocab.gene_name_id["GENE3"] == GENES[3]


def test_vocab_only_reads_no_weights(tmp_path):
    write_model(tmp_path, v2=False)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    vocab = load(tmp_path, vocab_only=True)
    assert vocab.size == len(GENES) + 2 and not vocab.is_v2
    assert build_geneformer(**random_kwargs(vocab_only=True)) is None


def test_folder_without_dictionaries(tmp_path):
    write_model(tmp_path, v2=False, dictionaries=False)
    with pytest.raises(UserError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "copy the four dictionaries that ship with the geneformer package" in message
    assert "backbone.dictionary_dir" in message


def test_dictionary_dir_elsewhere(tmp_path):
    write_model(tmp_path / "model", v2=False, dictionaries=False)
    write_dictionaries(tmp_path / "dicts", v2=False, suffix="")
    loaded = load(tmp_path / "model", dictionary_dir=str(tmp_path / "dicts"))
    assert loaded.tokenizer.vocab.size == len(GENES) + 2


def test_one_dictionary_missing(tmp_path):
    write_model(tmp_path, v2=False)
    (tmp_path / "ensembl_mapping_dict_gc30M.pkl").unlink()
    with pytest.raises(UserError, match=r"lacks ensembl_mapping_dict\*\.pkl"):
        load(tmp_path)


def test_code_running_dictionary_is_refused(tmp_path):
    write_model(tmp_path, v2=False)
    marker = tmp_path / "code_ran"
    (tmp_path / "token_dictionary_gc30M.pkl").write_bytes(evil_pickle(marker))
    with pytest.raises(
        UserError, match=r"token_dictionary_gc30M\.pkl as a plain-data pickle \(refusing to load (posix|os|nt)\.mkdir"
    ):
        load(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("table", "match"),
    [({"<pad>": 0.5, "ENSG1": 1}, "integer ids"), ({"<pad>": np.int16(0), "ENSG1": np.int16(0)}, "share an id"),
     (["<pad>"], "not a dictionary"), ({"ENSG1": 1}, "no <pad> token")],
)  # fmt: skip
def test_malformed_token_dictionary(tmp_path, table, match):
    write_model(tmp_path, v2=False)
    upstream_pickle(table, tmp_path / "token_dictionary_gc30M.pkl")
    with pytest.raises(UserError, match=match):
        load(tmp_path)


@pytest.mark.parametrize(
    ("stem", "table", "match"),
    [("gene_median_dictionary", {"ENSG1": "high"}, "map gene ids to numbers"),
     ("gene_median_dictionary", {"ENSG1": np.float64(0.0)}, "positive finite"),
     ("gene_name_id_dict", {"GENE1": 3}, "strings to Ensembl id strings")],
)  # fmt: skip
def test_malformed_other_dictionaries(tmp_path, stem, table, match):
    write_model(tmp_path, v2=False)
    upstream_pickle(table, tmp_path / f"{stem}_gc30M.pkl")
    with pytest.raises(UserError, match=match):
        load(tmp_path)


def test_dictionaries_of_the_other_generation_fail(tmp_path):
    write_model(tmp_path, v2=False, dictionaries=False)
    write_dictionaries(tmp_path, v2=True, suffix="_gc104M")
    with pytest.raises(UserError, match=r"token_dictionary_gc104M\.pkl \(24 tokens.*vocab_size 22"):
        load(tmp_path)


@pytest.mark.parametrize("v2", [False, True])
def test_several_sets_pick_the_one_of_the_vocab_size(tmp_path, v2):
    write_model(tmp_path, v2=v2, dictionaries=False)
    write_dictionaries(tmp_path, v2=False, suffix="_gc30M")
    write_dictionaries(tmp_path, v2=True, suffix="_gc104M")
    loaded = load(tmp_path)
    assert loaded.tokenizer.vocab.is_v2 == v2
    files = find_dictionary_files(tmp_path, vocab_size=len(token_dictionary(v2)))
    assert {p.name for p in files.values()} == {f"{s}{'_gc104M' if v2 else '_gc30M'}.pkl" for s in (
        "token_dictionary", "gene_median_dictionary", "gene_name_id_dict", "ensembl_mapping_dict")}  # fmt: skip


def test_ambiguous_dictionaries(tmp_path):
    write_model(tmp_path, v2=False, dictionaries=False)
    write_dictionaries(tmp_path, v2=False, suffix="_gc30M")
    write_dictionaries(tmp_path, v2=False, suffix="_gc95M")
    with pytest.raises(UserError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "ambiguous Geneformer dictionaries" in message and "\n" not in message
    assert "token_dictionary_gc30M.pkl, token_dictionary_gc95M.pkl" in message


# ---------------------------------------------------------------------------------------------------
# A random model
# ---------------------------------------------------------------------------------------------------


def training_cells(n_cells: int = 12, seed: int = 0) -> ad.AnnData:
    """Prepared data as the data layer hands them over: raw counts layer, totals over all of the file's genes."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(n_cells, len(GENES))).astype(np.float32)
    counts[:, -1] = 0  # a gene never expressed: median 1.0
    X = sp.csr_matrix(counts)
    cells = ad.AnnData(X=X.copy())
    cells.var_names = GENES
    cells.layers[COUNTS_LAYER] = X
    cells.obs[TOTALS_COLUMN] = counts.sum(axis=1) + rng.uniform(
        50, 100, size=n_cells
    )  # genes outside the file's columns
    return cells


def expected_medians(cells: ad.AnnData) -> dict[str, float]:
    counts = cells.layers[COUNTS_LAYER].toarray().astype(np.float64)
    normalised = counts / cells.obs[TOTALS_COLUMN].to_numpy()[:, None] * 10_000
    return {
        g: float(np.median(col[col > 0])) if (col > 0).any() else 1.0
        for g, col in zip(GENES, normalised.T, strict=True)
    }


def test_random_model_is_flagged_and_uses_the_training_cells(capsys):
    cells = training_cells()
    loaded = build_geneformer(**random_kwargs(), cells=cells)
    assert not loaded.pretrained and loaded.checkpoint is None
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    tokenizer = loaded.tokenizer
    assert not tokenizer.vocab.is_v2 and tokenizer.vocab.size == len(GENES) + 2
    assert tokenizer.model_input_size == MAX_POSITIONS
    expected = expected_medians(cells)
    assert tokenizer.medians.keys() == expected.keys()
    assert all(abs(tokenizer.medians[g] - expected[g]) <= 1e-9 * expected[g] for g in GENES)
    model = loaded.model.eval()
    batch = tokenizer.collate([tokenizer.tokenize(cells.layers[COUNTS_LAYER], GENES, seed=0).cell(i) for i in range(3)])
    with torch.no_grad():
        assert model.cell_embedding(model(batch), batch).shape == (3, HIDDEN)


def test_random_model_is_seeded_and_leaves_the_global_rng_alone():
    cells = training_cells()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_geneformer(**random_kwargs(seed=5), cells=cells).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_geneformer(**random_kwargs(seed=5), cells=cells).model.state_dict()
    c = build_geneformer(**random_kwargs(seed=6), cells=cells).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.self_attn.qkv.weight"], c["layers.0.self_attn.qkv.weight"])


@pytest.mark.parametrize("generation", ["v1", "v2"])
def test_saved_round_trip_rebuilds_the_same_tokenizer(tmp_path, generation):
    cells = training_cells()
    first = build_geneformer(**random_kwargs(generation=generation, seed=2), cells=cells)
    first.tokenizer.save(tmp_path)
    again = build_geneformer(**random_kwargs(generation=generation, seed=2), saved=str(tmp_path))
    assert again.tokenizer.vocab.token_to_id == first.tokenizer.vocab.token_to_id
    assert again.tokenizer.medians == first.tokenizer.medians
    assert again.tokenizer.cache_settings() == first.tokenizer.cache_settings()
    assert again.tokenizer.vocab.is_v2 == (generation == "v2")
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_model_needs_data_or_vocab_size():
    with pytest.raises(DataNeeded):
        build_geneformer(**random_kwargs())
    loaded = build_geneformer(**random_kwargs(vocab_size=100))
    assert loaded.model.embeddings.word_embeddings.num_embeddings == 100
    assert loaded.tokenizer.medians == {}


def test_random_model_pads_the_vocabulary_to_vocab_size():
    loaded = build_geneformer(**random_kwargs(vocab_size=50), cells=training_cells())
    assert loaded.model.embeddings.word_embeddings.num_embeddings == 50


def test_bad_settings_are_refused():
    cells = training_cells()
    with pytest.raises(UserError, match="needs at least 2 layers"):
        build_geneformer(**random_kwargs(n_layers=1), cells=cells)
    assert build_geneformer(**random_kwargs(n_layers=1, embedding_layer="last"), cells=cells).model.depth is None
    with pytest.raises(UserError, match="pooling=cls needs a <cls> token"):
        build_geneformer(**random_kwargs(pooling="cls"), cells=cells)
    assert build_geneformer(**random_kwargs(pooling="cls", generation="v2"), cells=cells).model.cls_id == 2
    with pytest.raises(UserError, match="generation must be v1 or v2"):
        build_geneformer(**random_kwargs(generation="v3"), cells=cells)
    with pytest.raises(UserError, match="activation 'swish' is not supported"):
        build_geneformer(**random_kwargs(activation="swish"), cells=cells)
    with pytest.raises(UserError, match="embedding_layer must be one of"):
        build_geneformer(**random_kwargs(embedding_layer="first"), cells=cells)


def test_too_long_cells_are_refused():
    loaded = build_geneformer(**random_kwargs(max_input_size=4), cells=training_cells())
    with pytest.raises(UserError, match="exceed this Geneformer's 4 input positions"):
        loaded.model(make_batch(False, lengths=(5, 2)))


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "millions"), [("geneformer", 39.30), ("geneformer_6l", 10.20), ("geneformer_v2", 103.77)]
)
def test_preset_parameter_counts(compose_config, preset, millions):
    """Built from the preset alone (vocab_size, no data), on the meta device: the released models' sizes."""
    cfg = compose_config([f"backbone={preset}"])
    with torch.device("meta"):
        loaded = instantiate(cfg.backbone, seed=0, cells=None, saved=None)
    count = sum(p.numel() for p in loaded.model.parameters())
    assert abs(count / 1e6 - millions) <= 0.001 * millions, count
    assert not any(n.startswith(("cls.", "pooler")) for n, _ in loaded.model.named_parameters())


def test_small_preset_builds_from_data(compose_config):
    cfg = compose_config(["backbone=geneformer_small"])
    loaded = instantiate(cfg.backbone, seed=0, cells=training_cells(), saved=None)
    assert not loaded.pretrained and len(loaded.model.layers) == 2 and loaded.model.depth == 1
    assert loaded.model.arch.attention_dropout == 0.0
