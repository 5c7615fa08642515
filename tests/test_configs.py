"""Every config group option composes, and the objects it names can be built."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from scpeft_cli.paths import config_dir

CONF = Path(config_dir())
# Options whose mandatory (???) keys a user must give; filled here so they compose.
REQUIRED = {
    ("data", "h5ad"): ["data.path=x.h5ad", "data.label_key=cell_type"],
    ("split", "group"): ["split.group_key=donor"],
    ("split", "column"): ["split.column=fold"],
}


def group_options():
    for group in ("backbone", "peft", "task", "data", "split", "trainer"):
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes(compose_config, group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert cfg[group]["_target_"].startswith(("scpeft_cli.", "torch."))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(compose_config, experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.backbone and cfg.peft and cfg.trainer


def test_presets_override_the_groups_and_the_command_line_overrides_the_presets(compose_config):
    """experiment: null sits last in train.yaml's defaults, so a preset's values win over the groups' own."""
    assert compose_config(["experiment=quick"]).trainer.max_steps == 10
    assert compose_config(["experiment=quick", "trainer.max_steps=3"]).trainer.max_steps == 3
    paper = compose_config(["experiment=paper_annotation", "peft=lora"])
    assert paper.backbone.name == "scgpt" and paper.split._target_.endswith(".group_split")
    assert paper.trainer.lr == 1.0e-4 and paper.trainer.patience == 10 and paper.peft._target_.endswith(".LoRA")
    assert "experiment" not in compose_config() and "hparams_search" not in compose_config()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "peft").glob("*.yaml")))
def test_every_strategy_instantiates(compose_config, option):
    strategy = instantiate(compose_config([f"peft={option}"]).peft)
    assert strategy.head in {None, "linear"}  # None: the task's own head


def test_trainer_instantiates_with_partial_optimizer(compose_config):
    trainer = instantiate(compose_config(["trainer.lr=0.01"]).trainer)
    assert trainer.lr == 0.01 and callable(trainer.optimizer_factory)


def test_default_run_is_the_embedded_cpu_demo(compose_config):
    cfg = compose_config()
    assert cfg.data._target_.endswith("load_pbmc68k_reduced")
    assert cfg.backbone.name == "scgpt_small" and cfg.backbone.checkpoint is None


def test_every_option_is_documented():
    for path in CONF.rglob("*.yaml"):
        assert path.read_text().lstrip().startswith("#"), f"{path} has no leading comment saying what it is"


def test_the_default_learning_rate_follows_the_checkpoint(compose_config):
    """1e-4 (the published protocol) with a checkpoint, 1e-3 for a random backbone; a number overrides both."""
    assert compose_config(["backbone=scgpt"]).trainer.lr == 1e-3
    assert compose_config(["backbone=scgpt", "backbone.checkpoint=/some/dir"]).trainer.lr == 1e-4
    assert compose_config(["backbone=geneformer", "backbone.checkpoint=/some/dir"]).trainer.lr == 1e-4
    assert compose_config(["backbone.checkpoint=/some/dir", "trainer.lr=0.01"]).trainer.lr == 0.01
