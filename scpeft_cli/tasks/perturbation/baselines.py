"""Training-free baselines for perturbation prediction: the bar any model's metrics must clear.

Each baseline predicts one mean profile (log-normalised, over genes) per held-out condition from the training cells:

* ``control_mean``: the mean of the training control cells, i.e. "the perturbation does nothing". Its predicted
  change from control is exactly zero, so its ``pearson_delta`` is 0 by definition; its all-genes ``pearson`` is
  already near 1, which is why that metric alone says little;
* ``perturbed_mean``: the mean of all training perturbed (non-control) cells, the same profile for every
  condition. It captures the response perturbations share and is hard to beat: on Norman et al., a mean
  training profile scored the same pearson_delta as GEARS' own predictions (a user's report, GEARS issue #82);
* ``additive``: control mean plus, for each gene the condition perturbs, that gene's single-perturbation change
  (training ``GENE+ctrl`` mean minus control mean), a gene without a training single adding nothing. This is the
  additive baseline of Ahlmann-Eltze et al. (2024), which deep models did not outperform on double perturbations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scpeft_cli.data.conditions import CONTROL, perturbed_genes
from scpeft_cli.errors import UserError

__all__ = ["BASELINES", "baseline_predictions"]

BASELINES = ("control_mean", "perturbed_mean", "additive")


def _mean(X, rows: np.ndarray) -> np.ndarray:
    """Mean over the selected rows of a dense or sparse matrix, as a float64 vector."""
    return np.asarray(X[rows].mean(axis=0, dtype=np.float64)).ravel()


def baseline_predictions(
    train_X, train_conditions: Sequence[str], test_conditions: Sequence[str], *, control: str = CONTROL
) -> dict[str, np.ndarray]:
    """The three baselines' predictions, each (n_test_conditions, n_genes) in the order of ``test_conditions``.

    ``train_X``: training cells x genes (dense or sparse, log-normalised); ``train_conditions``: each training
    cell's condition in GEARS notation.
    """
    conditions = np.asarray(train_conditions, dtype=str)
    if conditions.shape != (train_X.shape[0],):
        raise ValueError(f"one condition per training cell needed: {conditions.shape[0]} for {train_X.shape[0]} cells")
    is_control = conditions == control
    if not is_control.any() or is_control.all():
        raise UserError(f"the baselines need both '{control}' and perturbed cells in training; check the split")
    control_mean = _mean(train_X, is_control)
    perturbed_mean = _mean(train_X, ~is_control)
    singles: dict[str, list[str]] = {}  # gene -> its single conditions ("G+ctrl", or "ctrl+G")
    for condition in np.unique(conditions[~is_control]):
        genes = perturbed_genes(condition)
        if len(genes) == 1:
            singles.setdefault(genes[0], []).append(condition)
    shift = {gene: _mean(train_X, np.isin(conditions, names)) - control_mean for gene, names in singles.items()}

    zero = np.zeros_like(control_mean)
    additive = [control_mean + sum((shift.get(g, zero) for g in perturbed_genes(c)), zero) for c in test_conditions]
    n_test = len(test_conditions)
    return {
        "control_mean": np.tile(control_mean, (n_test, 1)),
        "perturbed_mean": np.tile(perturbed_mean, (n_test, 1)),
        "additive": np.array(additive).reshape(n_test, control_mean.size),
    }
