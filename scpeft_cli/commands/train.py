"""`scpeft train`: a Hydra app, so overrides, -m sweeps, hydra.run.dir and --cfg work as usual."""

import hydra
from hydra.utils import get_class
from omegaconf import DictConfig

from scpeft_cli.commands.guard import guarded
from scpeft_cli.paths import config_dir
from scpeft_cli.tasks.runner import run_options, run_task


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the task's best validation score (annotation: macro F1), so that sweepers (e.g. Optuna)
    tune on validation data, never on the test split."""
    metrics = guarded(run_task, options=run_options)(cfg)
    return None if metrics is None else metrics[get_class(cfg.task._target_).sweep_metric]
