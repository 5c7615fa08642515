"""`scpeft COMMAND [overrides]`: picks the subcommand and hands the rest of the line to its Hydra app."""

from __future__ import annotations

import importlib
import sys

from scpeft_cli import __version__

COMMANDS = {
    "train": "one training run, or a sweep with -m",
    "describe": "build backbone + strategy and print the parameter table",
    "predict": "apply a trained run to new cells",
    "embed": "cell embeddings into obsm['X_scpeft']",
    "inspect": "preflight checks on a dataset",
    "report": "aggregate run dirs into summary tables",
}

USAGE = "usage: scpeft COMMAND [hydra overrides...]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in COMMANDS.items()
) + "\n\n'scpeft COMMAND --help' shows the config groups and options of a command."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    module = importlib.import_module(f"scpeft_cli.commands.{command}")
    sys.argv = [f"scpeft {command}", *rest]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
