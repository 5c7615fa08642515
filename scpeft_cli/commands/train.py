"""`scpeft train`: a Hydra app, so overrides, -m sweeps, hydra.run.dir and --cfg work as usual."""

import hydra
from omegaconf import DictConfig

from scpeft_cli.annotation_run import run_annotation
from scpeft_cli.commands.guard import guarded
from scpeft_cli.paths import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns test macro F1 so that Hydra sweepers (e.g. Optuna) can optimise it."""
    metrics = guarded(run_annotation)(cfg)
    return None if metrics is None else metrics["macro_f1"]
