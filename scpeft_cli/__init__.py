"""scpeft-cli: parameter-efficient fine-tuning of single-cell foundation models from the command line."""

__version__ = "0.1.0"
