"""task=integration: its strategies' gradients, save/reload identity, pretrained decoders, bad input, and one
end-to-end run on the simulated-batch oracle (train, report, embed, resume)."""

from __future__ import annotations

import json
import signal

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from scpeft_cli.assembly import assemble, load_trained
from scpeft_cli.data.loading import BATCH_COLUMN
from scpeft_cli.data.simulated import simulate_batches, write_simulated_h5ad
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.peft.persistence import save_adapter
from scpeft_cli.tasks.integration.heads import BATCH_IDS
from scpeft_cli.tokenizers.cache import tokenize_cells
from tests.conftest import run_cli, train_task_steps
from tests.test_resume import comparable, start_and_interrupt
from tests.test_scgpt_checkpoint import D_MODEL, make_state_dict, write_checkpoint
from tests.test_strategies import BACKBONES, CELLS, STRATEGIES

BATCHES = ["b0", "b1", "b2"]
GENES_IN_CELLS = list(CELLS.var_names)
D_MODEL_SMALL = 16  # BACKBONES["scgpt"]'s d_model
CASES = ["full", "head_only", "token_prompt", "encoder_prompt", "prefix", "lora", "hybrid"]


def _compose(compose_config, *overrides):
    return compose_config(["task=integration", *BACKBONES["scgpt"], *overrides])


def _batch(parts) -> dict[str, torch.Tensor]:
    tokenizer = parts.backbone.tokenizer
    tokens = tokenize_cells(tokenizer, CELLS, seed=0)
    out = tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    out[BATCH_IDS] = torch.tensor([0, 1, 2, 0, 1, 2])
    return out


def _loss(task, model, batch):
    loss, parts = task.objective(None, None)(model, batch)
    return loss, parts


@pytest.mark.parametrize("case", CASES)
def test_the_integration_objective_trains_exactly_the_strategy_and_heads(compose_config, case):
    cfg = _compose(compose_config, *STRATEGIES[case])
    parts = assemble(cfg, head_settings={"batches": BATCHES}, cells=CELLS)
    batch, model = _batch(parts), parts.model
    assert parts.backbone.tokenizer.include_zero_genes and parts.backbone.tokenizer.max_seq_len == 1201
    assert batch["gene_ids"].shape[1] == 1 + len(GENES_IN_CELLS), "zero-expressed genes are tokens too"
    loss, terms, frozen = train_task_steps(model, parts.task.objective(None, None), batch)
    assert set(terms) == {"gep", "mvc", "ecs", "dab"} and torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not [n for n in no_grad if n != "backbone.encoder.embedding.weight" or case != "full"], no_grad
    assert {n.split(".")[1] for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad} == {
        "decoder", "mvc_decoder", "grad_reverse_discriminator"
    }  # DSBN (affine=False, as upstream) has running statistics only
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_save_and_reload_gives_identical_embeddings_with_the_batch_norm_statistics(compose_config, tmp_path):
    cfg = _compose(compose_config, "peft=encoder_prompt")
    parts = assemble(cfg, head_settings={"batches": BATCHES}, cells=CELLS)
    batch = _batch(parts)
    parts.model.train()
    _loss(parts.task, parts.model, batch)[0].backward()  # updates DSBN's running statistics
    parts.model.eval()
    with torch.no_grad():
        expected = parts.model.embed(batch)
    saved = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "peft", "task")}
    save_adapter(parts.model, tmp_path, config={**saved, "seed": cfg.seed, "batches": BATCHES, "pretrained": False})
    parts.backbone.tokenizer.save(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert {f"head.dsbn.bns.{k}.running_mean" for k in range(3)} <= set(stored)
    assert not torch.equal(stored["head.dsbn.bns.0.running_mean"], torch.zeros(D_MODEL_SMALL))
    reloaded, _ = load_trained(tmp_path)
    reloaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.embed(batch), expected, rtol=0, atol=0)


def test_dsbn_normalises_each_batch_with_its_own_statistics_in_eval(compose_config):
    parts = assemble(_compose(compose_config, "peft=head_only"), head_settings={"batches": BATCHES}, cells=CELLS)
    batch = _batch(parts)
    parts.model.eval()
    with torch.no_grad():
        mixed = parts.model.embed(batch)
        parts.model.head.dsbn.bns[1].running_mean.add_(5.0)
        shifted = parts.model.embed(batch)
    changed = ~torch.isclose(mixed, shifted).all(dim=1)
    assert changed.tolist() == [b == 1 for b in batch[BATCH_IDS].tolist()]


def test_switched_off_objectives_leave_the_loss_and_the_head(compose_config):
    cfg = _compose(compose_config, "peft=head_only", "task.objectives.mvc=false", "task.objectives.dab=false",
                   "task.objectives.dsbn=false")  # fmt: skip
    parts = assemble(cfg, head_settings={"batches": BATCHES}, cells=CELLS)
    _, terms = _loss(parts.task, parts.model, _batch(parts))
    assert set(terms) == {"gep", "ecs"}
    assert {name for name, _ in parts.model.head.named_children()} == {"decoder"}


def test_pretrained_decoders_are_loaded_by_name_and_the_rest_said_to_start_random(compose_config, tmp_path, capsys):
    state = make_state_dict()
    folder = write_checkpoint(tmp_path / "ckpt", state=state)
    cfg = _compose(compose_config, "peft=lora", f"backbone.checkpoint={folder}")
    parts = assemble(cfg, head_settings={"batches": BATCHES})
    parts.task.initialise_head(parts.model.head, parts.backbone)
    head = parts.model.head
    assert torch.equal(head.decoder.fc[4].weight, state["decoder.fc.4.weight"])
    assert torch.equal(head.mvc_decoder.W.weight, state["mvc_decoder.W.weight"])
    out = capsys.readouterr().out
    assert "heads loaded from the checkpoint: decoder, mvc_decoder" in out
    assert "heads starting random: grad_reverse_discriminator, dsbn" in out
    assert head.decoder.fc[0].weight.shape == (D_MODEL, D_MODEL)


def test_a_misshaped_pretrained_decoder_is_an_error_not_a_silent_skip(compose_config, tmp_path):
    state = make_state_dict()
    state["decoder.fc.0.weight"] = torch.zeros(3, 3)
    folder = write_checkpoint(tmp_path / "ckpt", state=state)
    with pytest.raises(UserError, match=r"decoder.*mis-shaped 1 tensor\(s\): fc.0.weight"):
        parts = assemble(_compose(compose_config, f"backbone.checkpoint={folder}"), head_settings={"batches": BATCHES})
        parts.task.initialise_head(parts.model.head, parts.backbone)


def test_a_checkpoint_without_decoders_warns_that_they_start_random(compose_config, tmp_path, capsys):
    state = {k: v for k, v in make_state_dict().items() if not k.startswith(("decoder.", "mvc_decoder."))}
    folder = write_checkpoint(tmp_path / "ckpt", state=state)
    parts = assemble(_compose(compose_config, f"backbone.checkpoint={folder}"), head_settings={"batches": BATCHES})
    parts.task.initialise_head(parts.model.head, parts.backbone)
    assert "WARNING heads starting random: decoder, mvc_decoder" in " ".join(capsys.readouterr().out.split())


def test_integration_on_a_backbone_without_expression_values_is_one_clear_error(compose_config):
    cfg = compose_config(["task=integration", *BACKBONES["geneformer"], "peft=head_only"])
    with pytest.raises(UserError, match="task=integration needs the backbone's expression_values, which Geneformer does not offer"):
        assemble(cfg, head_settings={"batches": BATCHES}, cells=CELLS)


def test_linear_probe_has_no_integration_head(compose_config):
    with pytest.raises(UserError, match="task=integration has no 'linear' head"):
        assemble(_compose(compose_config, "peft=linear_probe"), head_settings={"batches": BATCHES}, cells=CELLS)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+task.objectives.typo=1", "unknown setting task.objectives.typo"),
        ("task.objectives.mask_ratio=1.5", "mask_ratio must be in"),
        ("task.val_fraction=0", "val_fraction must be in"),
    ],
)
def test_invalid_integration_settings_are_clear_errors(compose_config, override, message):
    with pytest.raises(UserError, match=message):
        instantiate(_compose(compose_config, override).task)


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["task=integration", "backbone=scgpt_small", "backbone.d_model=32", "backbone.n_layers=1",
        "data=h5ad", "data.batch_key=batch", "data.label_key=bulk_labels", "data.n_top_genes=60",
        "task.max_seq_len=61", "trainer.max_epochs=3", "trainer.patience=null", "trainer.batch_size=16"]  # fmt: skip


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "simulated.h5ad"
    write_simulated_h5ad(path)
    return path


@pytest.fixture(scope="module")
def finished(simulated, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("integration") / "run"
    run_cli("train", *TINY, f"data.path={simulated}", "peft=encoder_prompt", f"hydra.run.dir={run_dir}")
    return run_dir


def test_an_integration_run_writes_its_metrics_embeddings_and_plots(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert list(metrics)[:3] == ["avg_bio", "avg_batch", "overall"]
    for key in ("nmi", "ari", "asw_label", "asw_batch", "graph_connectivity", "pcr_batch", "final_train_gep",
                "final_train_mvc", "final_train_ecs", "final_train_dab", "best_val_gep", "trainable_params"):  # fmt: skip
        assert np.isfinite(metrics[key]), key
    assert metrics["n_cells"] == 700 and metrics["n_batches"] == 3 and metrics["monitor"] == "val_gep"
    assert set(metrics["baselines"]) == {"pca", "harmony", "zero_shot"}
    # the oracle (on these 60 HVGs; on all genes the margin is larger: test_integration_baselines.py)
    assert metrics["baselines"]["harmony"]["avg_batch"] > metrics["baselines"]["pca"]["avg_batch"]
    history = pd.read_csv(finished / "history.csv")
    assert {"train_gep", "train_mvc", "train_ecs", "train_dab", "val_gep", "val_mvc", "val_ecs", "val_dab"} <= set(history.columns)
    assert metrics["best_val_gep"] == history["val_gep"].min()
    cells = anndata.read_h5ad(finished / "embeddings.h5ad")
    assert {"X_scpeft", "X_pca", "X_harmony", "X_zero_shot"} <= set(cells.obsm) and cells.n_obs == 700
    assert cells.obsm["X_scpeft"].shape == (700, 32)
    assert json.loads(cells.uns["scpeft"]["metrics"])["scpeft"]["avg_bio"] == pytest.approx(metrics["avg_bio"])
    assert (finished / "umap.png").stat().st_size > 10_000


def test_report_gates_integration_runs_with_their_baselines(finished, tmp_path):
    result = run_cli("report", str(finished.parent), "--out", str(tmp_path), "--require", "avg_bio>=0", "--require", "avg_batch<=1")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"baseline: pca", "baseline: harmony", "baseline: zero_shot"} <= set(summary["configuration"]), result.stdout
    assert "avg_bio_mean" in summary.columns
    failing = run_cli("report", str(finished.parent), "--out", str(tmp_path / "gate"), "--require", "avg_bio>=0.99", check=False)
    assert failing.returncode != 0


def test_embed_of_an_integration_run_reproduces_its_embedding(finished, simulated, tmp_path):
    out = tmp_path / "embedded.h5ad"
    run_cli("embed", f"run={finished}", f"data.path={simulated}", "data.batch_key=batch", f"output={out}")
    np.testing.assert_allclose(
        anndata.read_h5ad(out).obsm["X_scpeft"], anndata.read_h5ad(finished / "embeddings.h5ad").obsm["X_scpeft"], atol=1e-5
    )
    missing = run_cli("embed", f"run={finished}", f"data.path={simulated}", f"output={tmp_path / 'x.h5ad'}", check=False)
    assert missing.returncode == 2 and "data.batch_key=COL" in missing.stdout


def test_an_interrupted_integration_run_resumes_to_the_same_metrics(finished, simulated, tmp_path):
    resumed = tmp_path / "resumed"
    overrides = [*TINY, f"data.path={simulated}", "peft=encoder_prompt"]
    process = start_and_interrupt(resumed, signal.SIGKILL, overrides=overrides)
    assert process.returncode != 0 and not (resumed / "metrics.json").exists()
    run_cli("train", *overrides, f"hydra.run.dir={resumed}")
    assert comparable(resumed) == comparable(finished)


def _bad_data(tmp_path, batches):
    cells = simulate_batches()
    cells.obs["batch"] = pd.Categorical(batches(cells.n_obs))
    cells.write_h5ad(tmp_path / "bad.h5ad")
    return tmp_path / "bad.h5ad"


@pytest.mark.parametrize(
    "batches,extra,message",
    [
        (None, ["data.batch_key=null"], "task=integration needs data.batch_key=COL"),
        (None, ["data.batch_key=donor"], "batch column 'donor' not in obs"),
        (lambda n: ["one"] * n, [], "has a single value (one)"),
        (lambda n: ["lonely"] + ["a", "b"] * ((n - 1) // 2) + ["a"] * ((n - 1) % 2), [], "lonely of 'batch' hold a single cell"),
    ],
)
def test_bad_batch_columns_are_one_line_and_exit_2(simulated, tmp_path, batches, extra, message):
    path = simulated if batches is None else _bad_data(tmp_path, batches)
    result = run_cli("train", *TINY, f"data.path={path}", *extra, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and message in result.stdout, result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("error:")]) == 1


def test_integration_on_geneformer_from_the_command_line_is_one_line_and_exit_2(simulated, tmp_path):
    overrides = [*TINY, f"data.path={simulated}", "backbone=geneformer_small", "backbone.n_layers=2"]
    result = run_cli("train", *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 2 and "needs the backbone's expression_values" in result.stdout, result.stdout


def test_batch_column_is_kept_as_scpeft_batch(simulated):
    from scpeft_cli.data.loading import read_h5ad

    cells = read_h5ad(path=str(simulated), label_key=None, batch_key="batch")
    assert list(cells.obs[BATCH_COLUMN].cat.categories) == ["batch0", "batch1", "batch2"]


def test_describe_counts_the_integration_heads_without_data(tmp_path):
    run_cli("describe", "task=integration", "task.n_batches=3", "backbone=scgpt", "peft=encoder_prompt", f"hydra.run.dir={tmp_path}")
    report = json.loads((tmp_path / "describe.json").read_text())
    assert report["task"] == "integration" and report["head"] == "3 batches"
    for module in ("head.decoder", "head.mvc_decoder", "head.grad_reverse_discriminator", "backbone.layers.*.scpeft_"):
        assert any(group.startswith(module) for group in report["trains"]), (module, report["trains"])
    # whole-human scGPT: the decoders' size follows d_model 512 (GEP 2 x 512^2 + 512, MVC 2 x 512^2 + 512)
    assert report["groups"]["head"]["total"] > 1_000_000


def test_inspect_checks_the_batch_column_of_an_integration_run(simulated, tmp_path):
    ok = run_cli("inspect", *TINY, f"data.path={simulated}", "data.label_key=null", f"hydra.run.dir={tmp_path / 'ok'}")
    assert "inspect: OK" in ok.stdout and "3 batches" in ok.stdout
    missing = run_cli("inspect", *TINY, f"data.path={simulated}", "data.batch_key=null", f"hydra.run.dir={tmp_path / 'no'}", check=False)
    assert missing.returncode == 2 and "needs data.batch_key=COL" in missing.stdout
    assert not json.loads((tmp_path / "no" / "inspect.json").read_text())["ok"]
