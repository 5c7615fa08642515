"""`scpeft train`: a Hydra app, so overrides, -m sweeps, hydra.run.dir and --cfg work as usual."""

import hydra
from omegaconf import DictConfig

from scpeft_cli.annotation_run import OPTIONS, run_annotation
from scpeft_cli.commands.guard import guarded
from scpeft_cli.paths import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best epoch's validation macro F1, so that sweepers (e.g. Optuna) tune on validation
    data, never on the test split."""
    metrics = guarded(run_annotation, options=OPTIONS)(cfg)
    return None if metrics is None else metrics["best_val_macro_f1"]
