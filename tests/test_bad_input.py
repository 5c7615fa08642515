"""Bad input through `scpeft train`: exit code 2, one line naming the problem, no traceback, no metrics.json."""

from __future__ import annotations

import re

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tests.conftest import run_cli
from tests.test_scgpt_checkpoint import GENES, make_args, make_state_dict, write_checkpoint

N_CELLS = 60


def make_adata(*, genes=GENES, seed: int = 0) -> anndata.AnnData:
    """Counts for 60 cells of 3 types from 4 donors; gene names shared with the test checkpoint."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(N_CELLS, len(genes))).astype(np.float32) * (rng.random((N_CELLS, len(genes))) < 0.6)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"cell_type": np.repeat(["T", "B", "NK"], N_CELLS // 3), "donor": np.tile(["d1", "d2", "d3", "d4"], N_CELLS // 4)},
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list(genes)))


def write(adata: anndata.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


def labels_with_missing(a):
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[:4, 0] = np.nan
    return a


def one_class_tiny(a):
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[:2, 0] = "rare"  # 2 cells: cannot be in train, val and test
    return a


def two_donors(a):
    a.obs["donor"] = np.tile(["d1", "d2"], N_CELLS // 2)
    return a


def with_value(value):
    def mutate(a):
        X = a.X.toarray()
        X[3, 2] = value
        a.X = sp.csr_matrix(X)
        return a

    return mutate


def all_zero(a):
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    return a


def duplicated_genes(a):
    a.var_names = [GENES[0], *GENES[:-1]]
    return a


def ensembl_genes(a):
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    return a


DATA_CASES = {
    # name: (mutation of the AnnData, extra overrides, expected message)
    "missing label column": (None, ["data.label_key=celltype"], r"label column 'celltype' not in obs; available: .*cell_type"),
    "missing gene column": (None, ["data.gene_key=symbol"], r"gene column 'symbol' not in var"),
    "missing layer": (None, ["data.layer=counts"], r"layer 'counts' not in the file"),
    "missing split column": (None, ["split=column", "split.column=fold"], r"fold.*not in obs|not in obs.*fold"),
    "missing group column": (None, ["split=group", "split.group_key=patient"], r"patient"),
    "labels with missing values": (labels_with_missing, [], r"4 cells have no label.*data.drop_unlabeled=true"),
    "class too small": (one_class_tiny, [], r"rare \(2\).*data.min_cells_per_class=3"),
    "group split with two donors": (two_donors, ["split=group", "split.group_key=donor"], r"at least 3 groups.*found 2"),
    "negative values": (with_value(-1.5), [], r"1 negative values; scaled data"),
    "nan values": (with_value(np.nan), [], r"NaN or infinite"),
    "infinite values": (with_value(np.inf), [], r"NaN or infinite"),
    "all cells empty": (all_zero, [], r"every cell has all-zero expression"),
    "duplicated genes": (duplicated_genes, [], r"duplicated gene identifiers .*GENE00"),
}


def assert_clear_failure(result, run_dir, pattern: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    assert re.search(pattern, error_lines[0]), error_lines[0]
    assert not (run_dir / "metrics.json").exists()


def train(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    return run_cli("train", "backbone=scgpt_small", "trainer.max_steps=1", *overrides, f"hydra.run.dir={run_dir}", check=False), run_dir


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_clear_line(tmp_path, case):
    mutate, overrides, pattern = DATA_CASES[case]
    adata = make_adata()
    path = write(mutate(adata) if mutate else adata, tmp_path / "data.h5ad")
    result, run_dir = train(tmp_path, "data=h5ad", f"data.path={path}", "data.label_key=cell_type", *overrides)
    assert_clear_failure(result, run_dir, pattern)


def test_missing_and_unreadable_files(tmp_path):
    result, run_dir = train(tmp_path, "data=h5ad", f"data.path={tmp_path / 'nope.h5ad'}", "data.label_key=x")
    assert_clear_failure(result, run_dir, r"data file not found")
    text = tmp_path / "notes.h5ad"
    text.write_text("not an h5ad file")
    result, run_dir = train(tmp_path, "data=h5ad", f"data.path={text}", "data.label_key=x")
    assert_clear_failure(result, run_dir, r"cannot read .*notes.h5ad as an .h5ad file")


def checkpoint_case(tmp_path, name):
    folder = tmp_path / "ckpt"
    if name == "missing file":
        write_checkpoint(folder)
        (folder / "args.json").unlink()
    elif name == "truncated weights":
        write_checkpoint(folder)
        data = (folder / "best_model.pt").read_bytes()
        (folder / "best_model.pt").write_bytes(data[: len(data) // 2])
    elif name == "shapes contradict args.json":
        write_checkpoint(folder, args=make_args(embsize=32))
    elif name == "vocab does not match the embedding":
        vocab = {**{g: i for i, g in enumerate(GENES)}, "EXTRA": len(GENES), "<pad>": len(GENES) + 1, "<cls>": len(GENES) + 2, "<eoc>": len(GENES) + 3}
        write_checkpoint(folder, vocab=vocab)
    elif name == "code in the weight file":
        write_checkpoint(folder)
        torch.save({"weights": make_state_dict(), "hook": print}, folder / "best_model.pt")
    return folder


CHECKPOINT_CASES = {
    "missing file": r"lacks args.json",
    "truncated weights": r"cannot load .*best_model.pt",
    "shapes contradict args.json": r"does not match the model: .*mis-shaped",
    "vocab does not match the embedding": r"mis-shaped .*encoder.embedding.weight",
    "code in the weight file": r"refused .*best_model.pt: loading it could run code \(it references [\w.]*print\)",
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoints_are_one_clear_line(tmp_path, case):
    folder = checkpoint_case(tmp_path, case)
    path = write(make_adata(), tmp_path / "data.h5ad")
    result, run_dir = train(tmp_path, f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={path}", "data.label_key=cell_type")
    assert_clear_failure(result, run_dir, CHECKPOINT_CASES[case])


def test_tiny_gene_overlap_is_refused_with_the_figures(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    genes = [GENES[0], *(f"OTHER{i}" for i in range(39))]
    path = write(make_adata(genes=genes), tmp_path / "data.h5ad")
    result, run_dir = train(tmp_path, f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={path}", "data.label_key=cell_type")
    assert_clear_failure(result, run_dir, r"only 1 of 40 genes \(2.5%\) are in the model vocabulary, below the 10% minimum")


def test_no_gene_overlap_names_ensembl_ids(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    path = write(ensembl_genes(make_adata()), tmp_path / "data.h5ad")
    result, run_dir = train(tmp_path, f"backbone.checkpoint={folder}", "data=h5ad", f"data.path={path}", "data.label_key=cell_type")
    assert_clear_failure(result, run_dir, r"none of the .* genes are in the model vocabulary.*Ensembl")


CONFIG_CASES = {
    "unknown group option": (["peft=nonsense"], r"unknown peft option 'nonsense'; choose from: .*lora"),
    "unknown key": (["trainer.learning_rate=0.1"], r"trainer.learning_rate"),
    "negative learning rate": (["trainer.lr=-0.1"], r"trainer.lr must be positive"),
    "no epochs": (["trainer.max_epochs=0"], r"trainer.max_epochs must be a whole number >= 1, got 0"),
    "negative checkpointed layers": (["trainer.grad_checkpointing=-1"], r"trainer.grad_checkpointing=-1: use true"),
    "recompute switch not a boolean": (["trainer.recompute_frozen_qkv=sometimes"], r"trainer.recompute_frozen_qkv='sometimes' is not valid: expected true or false"),
    "rank zero": (["peft=lora", "peft.r=0"], r"peft.r \(LoRA rank\) must be >= 1"),
    "ratio outside (0, 1]": (["peft=token_prompt", "peft.ratio=1.5"], r"peft.ratio must be in \(0, 1\]"),
    "too many prefix tokens": (["peft=prefix", "peft.n_tokens=5000"], r"peft.n_tokens must be between 1 and"),
    "wrong type": (["trainer.batch_size=big"], r"trainer.batch_size='big' is not valid: expected an integer"),
    "missing required setting": (["data=h5ad"], r"missing required setting\(s\): data.label_key, data.path"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_configuration_is_one_clear_line(tmp_path, case):
    overrides, pattern = CONFIG_CASES[case]
    result, run_dir = train(tmp_path, *overrides)
    assert_clear_failure(result, run_dir, pattern)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", "trainer.lr=-0.1", f"hydra.run.dir={tmp_path}", check=False, isolated=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_config_errors_fail_before_any_data_is_read(tmp_path):
    result, _ = train(tmp_path, "data=h5ad", f"data.path={tmp_path / 'nope.h5ad'}", "data.label_key=x", "trainer.batch_size=big")
    assert "batch_size" in result.stdout and "data file not found" not in result.stdout
