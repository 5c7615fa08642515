"""`scpeft COMMAND [overrides]`: picks the subcommand and hands the rest of the line to its Hydra app."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from scpeft_cli import __version__
from scpeft_cli.paths import config_dir
from scpeft_cli.training.interrupt import TrainingInterrupted

COMMANDS = {
    "train": "one training run, or a sweep with -m",
    "describe": "build backbone + strategy and print the parameter table",
    "predict": "apply a trained run to new cells",
    "embed": "cell embeddings into obsm['X_scpeft']",
    "inspect": "preflight checks on a dataset",
    "report": "aggregate run dirs into summary tables",
    "markers": "marker genes per cell state from a run's attention",
}

CONFIG_NAMES = {"train": "train", "describe": "train", "inspect": "train", "predict": "predict", "embed": "embed", "markers": "markers"}
HYDRA_COMMANDS = set(CONFIG_NAMES)
USAGE = "usage: scpeft [--debug] COMMAND [hydra overrides...]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in COMMANDS.items()
) + (
    "\n\n'scpeft COMMAND --help' shows the config groups and options of a command."
    "\n--debug shows Python tracebacks (same as HYDRA_FULL_ERROR=1)."
    "\nexit codes: 0 ok, 1 a report gate failed, 2 bad input or configuration, 3 internal error."
)
GROUP_CHOICE = re.compile(r"^[+~]?([a-z_]+)=([\w,]+)$")
# Groups that conf/train.yaml declares as `GROUP: null`: `+GROUP=NAME` (the usual Hydra spelling for a group
# missing from the defaults) would be refused as a second value, so it is read as `GROUP=NAME`.
PRESET_GROUPS = ("experiment", "hparams_search")
HELP_FLAGS = {"-h", "--help"}


def unknown_group_option(overrides: list[str]) -> str | None:
    """One line for `peft=nonsense` (Hydra's own message spans many lines)."""
    conf = Path(config_dir())
    for override in overrides:
        match = GROUP_CHOICE.match(override)
        if not match or match[1] == "hydra" or not (conf / match[1]).is_dir():
            continue
        group = match[1]
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        for option in match[2].split(","):
            if option not in choices:
                return f"unknown {group} option '{option}'; choose from: {', '.join(choices)}"
    return None


def composition_problem(command: str, overrides: list[str]) -> str | None:
    """Compose a single run's config up front so an unknown key or bad override is one line.

    Sweeps and Hydra flags (-m, --cfg, ...) are left to Hydra, whose messages span a few lines.
    """
    problem = unknown_group_option(overrides)
    if problem or any(arg.startswith("-") for arg in overrides):
        return problem
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            compose(config_name=CONFIG_NAMES[command], overrides=[o for o in overrides if not o.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as err:
        return " ".join(str(err).split("\n")[0:3]).replace("  ", " ")
    return None


def presets_without_plus(overrides: list[str]) -> list[str]:
    """`+experiment=quick` -> `experiment=quick` (both spellings work; the README uses the second)."""
    return [o[1:] if o.startswith(tuple(f"+{group}=" for group in PRESET_GROUPS)) else o for o in overrides]


def group_options(*groups: str) -> str:
    """`GROUP: OPTION, OPTION` lines, for the --help pages of commands that use only some of the groups."""
    conf = Path(config_dir())
    return "\n".join(f"{group}: {', '.join(sorted(p.stem for p in (conf / group).glob('*.yaml')))}" for group in groups)


def with_help_template(command: str, args: list[str]) -> list[str]:
    """`--help` shows the command's own page (conf/hydra/help/COMMAND.yaml), not Hydra's generic one,
    unless the user picks a `hydra/help=...` of their own."""
    if not HELP_FLAGS & set(args) or any(arg.startswith("hydra/help=") for arg in args):
        return args
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("scpeft_groups", group_options, replace=True)
    return [f"hydra/help={command}", *args]


def expand_resume(overrides: list[str]) -> list[str]:
    """`resume=RUN_DIR` -> that run's own overrides, then the new ones, writing into RUN_DIR again."""
    requested = [o for o in overrides if o.startswith("resume=")]
    if not requested:
        return overrides
    run_dir = Path(requested[-1].split("=", 1)[1]).expanduser()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise SystemExit(f"error: resume={run_dir} is not a run dir of `scpeft train` (no .hydra/overrides.yaml)")
    import yaml

    previous = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.startswith("hydra.run.dir=")]
    others = [o for o in overrides if not o.startswith("resume=")]
    return [*previous, *others, f"hydra.run.dir={run_dir}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--debug":
        os.environ["HYDRA_FULL_ERROR"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(f"scpeft-cli {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"scpeft: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "train":
        try:
            rest = expand_resume(rest)
        except SystemExit as err:
            print(err, file=sys.stderr)
            return 2
    if CONFIG_NAMES.get(command) == "train":
        rest = presets_without_plus(rest)
    if command in HYDRA_COMMANDS:
        rest = with_help_template(command, rest)
        problem = composition_problem(command, rest)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    module = importlib.import_module(f"scpeft_cli.commands.{command}")
    sys.argv = [f"scpeft {command}", *rest]
    try:
        module.main()
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    except SystemExit as exit_:
        # Hydra reports a config it cannot compose (bad override syntax, unknown key) with exit code 1;
        # for us that is bad input: 2. Our own commands exit with 2 or 3, and report's gate with 1.
        if command in HYDRA_COMMANDS and exit_.code == 1:
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
