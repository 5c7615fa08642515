"""What a new user meets first: each command's --help page, preset spellings, and where the token cache goes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from scpeft_cli import cli
from scpeft_cli.paths import config_dir
from tests.conftest import run_cli

CONF = Path(config_dir())
REPO = Path(__file__).resolve().parents[1]


def options(group: str) -> str:
    return f"{group}: " + ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))


# command -> the groups its page lists
GROUPS = {
    "train": ["backbone", "data", "experiment", "hparams_search", "peft", "split", "task", "trainer"],
    "describe": ["backbone", "data", "peft", "split", "task", "trainer"],
    "inspect": ["backbone", "data", "split"],
    "predict": ["data"],
    "embed": ["backbone", "data"],
}


@pytest.mark.parametrize("command", sorted(GROUPS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_page_says_what_the_command_does_lists_the_groups_and_examples(command, flag, tmp_path):
    result = run_cli(command, flag, cwd=tmp_path)
    text = result.stdout
    assert text.splitlines()[0].startswith(f"scpeft {command}: ")
    for group in GROUPS[command]:
        assert options(group) in text.splitlines(), f"{group} and its options are not listed"
    assert len(re.findall(rf"^  scpeft {command} \S", text, flags=re.MULTILINE)) >= 2  # two examples
    assert f"scpeft {command} [overrides] --cfg job" in text  # how to see the whole config
    assert "powered by hydra" not in text.lower() and "_target_:" not in text  # no generic page, no config dump
    assert not list(tmp_path.iterdir())  # --help starts no run


def test_help_pages_of_predict_and_embed_list_only_the_groups_they_use():
    assert "peft:" not in run_cli("predict", "--help").stdout
    assert "backbone:" not in run_cli("predict", "--help").stdout
    assert "trainer:" not in run_cli("embed", "--help").stdout


def test_help_shows_the_options_chosen_with_the_overrides_before_it():
    text = run_cli("train", "peft=lora", "experiment=quick", "--help").stdout
    assert "Chosen now: backbone=scgpt_small peft=lora task=annotation" in text


def test_hydra_help_pages_stay_reachable():
    assert "Hydra (" in run_cli("train", "--hydra-help").stdout
    assert "powered by Hydra" in run_cli("train", "--help", "hydra/help=default").stdout  # a page chosen by the user


@pytest.mark.parametrize("preset", ["experiment=quick", "+experiment=quick"])
def test_both_spellings_of_a_preset_pass_the_up_front_check(preset):
    assert cli.composition_problem("train", cli.presets_without_plus([preset, "peft=lora"])) is None


def test_both_spellings_of_a_preset_compose_the_same_config(tmp_path):
    without = run_cli("train", "experiment=quick", "--cfg", "job", cwd=tmp_path).stdout
    with_plus = run_cli("train", "+experiment=quick", "--cfg", "job", cwd=tmp_path).stdout
    assert without == with_plus and "max_steps: 10" in without
    assert "max_steps: 10" not in run_cli("train", "--cfg", "job", cwd=tmp_path).stdout


def test_a_plus_is_dropped_only_from_the_preset_groups():
    overrides = ["+experiment=quick", "+hparams_search=optuna_lora", "+peft.options.lora.r=4", "++seed=1"]
    assert cli.presets_without_plus(overrides) == [
        "experiment=quick", "hparams_search=optuna_lora", "+peft.options.lora.r=4", "++seed=1",
    ]


@pytest.mark.parametrize("search", ["hparams_search=optuna_lora", "+hparams_search=optuna_lora"])
def test_both_spellings_of_the_search_preset_compose(search):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    assert cli.composition_problem("train", cli.presets_without_plus([search])) is None


@pytest.fixture(scope="module")
def module_fixture_cache():
    """What a module-scoped fixture (the trained runs of test_train_cli, test_sweep, ...) sees."""
    return os.environ.get("SCPEFT_CACHE_DIR")


def test_the_token_cache_of_a_test_is_a_tmp_dir(compose_config, token_cache, tmp_path_factory):
    """conftest points $SCPEFT_CACHE_DIR at a fresh dir per test module: never the repository's outputs/.cache."""
    cache = Path(compose_config().cache_dir).resolve()
    assert cache == token_cache.resolve()
    assert cache.is_relative_to(tmp_path_factory.getbasetemp().resolve()) and not cache.is_relative_to(REPO)


def test_module_scoped_fixtures_get_the_same_tmp_cache(module_fixture_cache, token_cache):
    assert module_fixture_cache == str(token_cache)


def test_a_cli_subprocess_inherits_the_tests_token_cache(token_cache, tmp_path):
    result = run_cli("train", "--cfg", "job", "--resolve", cwd=tmp_path, isolated=True)
    assert f"cache_dir: {token_cache}" in result.stdout.splitlines()
