"""task=perturbation: its strategies' gradients, the flags, the pairing of examples, one end-to-end run on the
simulated Perturb-seq oracle (outputs, baselines, report) and bad input as one line with exit 2."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from scpeft_cli.assembly import assemble
from scpeft_cli.data.conditions import perturbed_genes
from scpeft_cli.data.loading import CONDITION_COLUMN, read_h5ad
from scpeft_cli.data.simulated_perturbation import simulate_perturbseq, write_simulated_perturbseq_h5ad
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.perturbation.heads import CONDITION_IDS, FLAG_NONE, FLAG_PERTURBED, TARGET_CELLS
from scpeft_cli.tokenizers.cache import tokenize_cells
from scpeft_cli.training.loaders import CellTokens, make_loader
from tests.conftest import run_cli, train_task_steps
from tests.test_strategies import BACKBONES, STRATEGIES

SIZES = {"n_genes": 60, "n_control": 40, "n_single": 12, "n_double": 6, "cells_per_condition": 6}
SIMULATED = ["data=perturbseq_simulated", *(f"data.{key}={value}" for key, value in SIZES.items())]
CASES = ["full", "head_only", "token_prompt", "encoder_prompt", "prefix", "lora", "hf_lora", "hybrid"]


def _loaded(compose_config, *overrides, backbone="scgpt"):
    cfg = compose_config(["task=perturbation", *BACKBONES[backbone], *SIMULATED, *overrides])
    task = instantiate(cfg.task)
    data = task.load(cfg)
    parts = assemble(cfg, head_settings=data.head_settings, cells=data.adata[data.index["train"]])
    parts.task = task  # the instance that loaded the data holds the targets
    tokens = tokenize_cells(parts.backbone.tokenizer, data.adata, seed=0)
    return cfg, task, data, parts, tokens


def _batch(parts, data, tokens, rows):
    loader = make_loader(CellTokens(tokens, data.targets, rows), parts.backbone.tokenizer.collate, batch_size=len(rows), shuffle=False, seed=0)
    return next(iter(loader))


MATRIX = [("scgpt", case) for case in CASES] + [("scfoundation", case) for case in ("full", "token_prompt", "encoder_prompt", "prefix", "lora")]
SPECIAL_TOKENS = {"scgpt": 1, "scfoundation": 2}  # <cls>; T and S


@pytest.mark.parametrize("backbone,case", MATRIX)
def test_the_perturbation_objective_trains_exactly_the_strategy_and_the_head(compose_config, backbone, case):
    _, task, data, parts, tokens = _loaded(compose_config, *STRATEGIES[case], backbone=backbone)
    tokenizer = parts.backbone.tokenizer
    assert tokenizer.include_zero_genes and tokenizer.max_seq_len is None  # the backbone's gene_values options
    batch, model = _batch(parts, data, tokens, data.index["train"][:12]), parts.model
    assert batch["gene_ids"].shape[1] == SPECIAL_TOKENS[backbone] + SIZES["n_genes"], "every gene is a token, zeros included"
    loss, terms, frozen = train_task_steps(model, task.objective(data, None), batch)
    assert set(terms) == {"mse"} and torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not [n for n in no_grad if n != "backbone.encoder.embedding.weight" or case != "full"], no_grad
    assert {n.split(".")[1] for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad} == {"pert_encoder", "decoder"}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_flags_mark_exactly_the_perturbed_genes_and_the_input_is_a_control_cell(compose_config):
    _, _, data, parts, tokens = _loaded(compose_config, "peft=lora")
    examples, genes = data.adata, list(data.head_settings["genes"])
    rows = np.arange(examples.n_obs)
    batch = _batch(parts, data, tokens, rows)
    head = parts.model.head
    columns = head.columns(batch)
    flags = head.flags(batch, columns)
    assert (columns[:, 0] == -1).all() and (flags[:, 0] == FLAG_NONE).all()  # <cls> is no gene
    for row in range(len(rows)):
        condition = examples.obs[CONDITION_COLUMN].iloc[row]
        assert data.head_settings["conditions"][int(batch[CONDITION_IDS][row])] == condition
        marked = {genes[int(c)] for c in columns[row][flags[row] == FLAG_PERTURBED]}
        assert marked == set(perturbed_genes(condition))
    # a control cell is its own input and target
    inputs = examples.obs["input_cell"].to_numpy()
    is_control = examples.obs[CONDITION_COLUMN].to_numpy() == "ctrl"
    np.testing.assert_array_equal(inputs[is_control], examples.obs_names.to_numpy()[is_control])
    assert TARGET_CELLS in batch


def test_conditions_never_cross_splits_and_every_cell_is_one_example(compose_config):
    _, task, data, _, _ = _loaded(compose_config, "peft=head_only")
    obs = data.adata.obs
    by_split = {s: set(obs[CONDITION_COLUMN].iloc[data.index[s]]) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"]) and not (by_split["val"] & by_split["test"])
    assert "ctrl" in by_split["train"] and by_split["test"]
    assert data.adata.obs_names.is_unique and data.adata.n_obs == sum(len(i) for i in data.index.values())
    input_conditions = task._screen.cells.obs.loc[obs["input_cell"], CONDITION_COLUMN].to_numpy()
    assert (input_conditions == "ctrl").all()


@pytest.fixture(scope="module")
def screen_file(tmp_path_factory):
    return write_simulated_perturbseq_h5ad(tmp_path_factory.mktemp("data") / "pert.h5ad", **SIZES)


TINY = ["task=perturbation", "data=h5ad", "data.condition_key=condition", "data.label_key=null", "backbone=scgpt_small",
        "backbone.d_model=32", "backbone.n_layers=1", "trainer.max_epochs=2", "trainer.batch_size=32"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(screen_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("perturbation") / "run"
    run_cli("train", *TINY, f"data.path={screen_file}", "peft=encoder_prompt", f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_perturbation_run_writes_metrics_per_condition_predictions_and_plot(finished, screen_file):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert list(metrics)[:6] == ["pearson", "pearson_de", "pearson_delta", "pearson_de_delta", "mse", "mse_de"]
    assert metrics["monitor"] == "val_pearson" and np.isfinite(metrics["best_val_pearson"]) and metrics["seconds_per_epoch"] > 0
    assert set(metrics["baselines"]) == {"control_mean", "perturbed_mean", "additive"}
    assert metrics["baselines"]["control_mean"]["pearson_delta"] == 0.0  # its change from control is none
    table = pd.read_csv(finished / "per_condition.csv")
    assert set(table["predictor"]) == {"scpeft", "control_mean", "perturbed_mean", "additive"}
    ours = table[table["predictor"] == "scpeft"]
    assert len(ours) == metrics["n_test_conditions"] and ours["subgroup"].notna().all()
    assert metrics["pearson_delta"] == pytest.approx(ours["pearson_delta"].mean())
    for subgroup in set(ours["subgroup"]):
        assert metrics[f"{subgroup}_pearson"] == pytest.approx(ours.loc[ours["subgroup"] == subgroup, "pearson"].mean())

    predictions = anndata.read_h5ad(finished / "predictions.h5ad")
    assert predictions.shape == (len(ours), SIZES["n_genes"]) and set(predictions.obs["condition"]) == set(ours["condition"])
    cells = read_h5ad(path=str(screen_file), label_key=None, condition_key="condition")  # log-normalised, as trained
    for condition in predictions.obs_names[:3]:
        truth = np.asarray(cells.X[(cells.obs[CONDITION_COLUMN] == condition).to_numpy()].mean(axis=0)).ravel()
        np.testing.assert_allclose(predictions[condition].layers["truth"].ravel(), truth, rtol=1e-5, atol=1e-6)
    control = np.asarray(cells.X[(cells.obs[CONDITION_COLUMN] == "ctrl").to_numpy()].mean(axis=0)).ravel()
    np.testing.assert_allclose(predictions.layers["control_mean"][0], control, rtol=1e-5, atol=1e-6)
    assert len(json.loads(predictions.uns["scpeft"]["top_de_genes"])[predictions.obs_names[0]]) == 20
    assert (finished / "de_deltas.png").stat().st_size > 10_000


def test_report_shows_the_strategy_beside_the_three_baselines(finished, tmp_path):
    run_cli("report", str(finished.parent), "--out", str(tmp_path), "--require", "pearson>=-1")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"baseline: control_mean", "baseline: perturbed_mean", "baseline: additive"} <= set(summary["configuration"])
    assert "pearson_delta_mean" in summary.columns


def _screen_with(tmp_path, change) -> str:
    cells = simulate_perturbseq(**SIZES)
    cells.obs["condition"] = change(cells.obs["condition"].astype(str).to_numpy())
    cells.write_h5ad(tmp_path / "bad.h5ad")
    return str(tmp_path / "bad.h5ad")


def _rename_a_single(new: str):
    """Relabel the cells of the first single perturbation as `new`."""

    def change(conditions):
        single = sorted(c for c in set(conditions) if c.endswith("+ctrl"))[0]
        return np.where(conditions == single, new, conditions)

    return change


@pytest.mark.parametrize(
    "change,extra,message",
    [
        (lambda c: np.where(c == "ctrl", "G000+ctrl", c), [], "has no control cells"),
        (_rename_a_single("G001+G002+G003"), [], "is not GEARS notation"),
        (_rename_a_single("NOTAGENE+ctrl"), [], "set data.unknown_perturbations=drop"),
        (lambda c: np.full(len(c), "ctrl"), [], "left no unseen condition for testing"),
        (None, ["data.condition_key=null"], "task=perturbation needs data.condition_key=COL"),
        (None, ["split=stratified"], "use split=perturbation"),
        (None, ["backbone=geneformer_small", "backbone.n_layers=2"], "needs the backbone's gene_values"),
    ],
)
def test_bad_perturbation_input_is_one_line_and_exit_2(screen_file, tmp_path, change, extra, message):
    path = screen_file if change is None else _screen_with(tmp_path, change)
    result = run_cli("train", *TINY, f"data.path={path}", *extra, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and message in result.stdout, result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("error:")]) == 1


def test_unknown_perturbed_genes_can_be_dropped(tmp_path):
    path = _screen_with(tmp_path, _rename_a_single("NOTAGENE+ctrl"))
    cells = read_h5ad(path=path, label_key=None, condition_key="condition", unknown_perturbations="drop")
    assert "NOTAGENE+ctrl" not in set(cells.obs[CONDITION_COLUMN]) and (cells.obs[CONDITION_COLUMN] == "ctrl").any()


@pytest.mark.slow
def test_a_trained_model_beats_the_control_mean_on_the_oracle(tmp_path):
    """The simulated screen's answer is known; scgpt_small trained on it must predict some of the change."""
    run_cli("train", "task=perturbation", "data=perturbseq_simulated", "backbone=scgpt_small", "peft=full", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pearson_delta"] > metrics["baselines"]["control_mean"]["pearson_delta"] + 0.1


def test_a_perturbed_gene_outside_the_model_vocabulary_is_one_clear_error():
    from types import SimpleNamespace

    from scpeft_cli.errors import UserError
    from scpeft_cli.tasks.perturbation import PerturbationTask
    from scpeft_cli.tokenizers.vocab import GeneVocab

    backbone = SimpleNamespace(model=SimpleNamespace(d_model=8), tokenizer=SimpleNamespace(vocab=GeneVocab.from_genes(["A", "B"])))
    settings = {"genes": ["A", "B", "C"], "conditions": ["A+C", "B+ctrl", "ctrl"]}
    with pytest.raises(UserError, match="1 perturbed gene.*not in the model's vocabulary.*: C;"):
        PerturbationTask().build_head("perturbation", backbone, settings)
    head = PerturbationTask().build_head("perturbation", backbone, {**settings, "conditions": ["B+ctrl", "ctrl"]})
    assert head.perturbed_columns.tolist() == [[1, -1], [-1, -1]]
