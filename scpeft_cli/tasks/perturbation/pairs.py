"""Training examples as GEARS builds them: every perturbed cell is the target of one randomly drawn control
cell (the input); a control cell is its own input and target. Conditions were split before, so an example's
split is its target's condition's split; control inputs come from the one control pool, as in GEARS."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd

from scpeft_cli.data.conditions import CONTROL
from scpeft_cli.data.loading import CONDITION_COLUMN
from scpeft_cli.tasks.perturbation.splits import PerturbationSplit

SPLITS = ("train", "val", "test")


def pair_with_controls(cells: anndata.AnnData, split: PerturbationSplit, *, seed: int) -> tuple[anndata.AnnData, np.ndarray, dict[str, np.ndarray]]:
    """(examples, target cell of each example, example rows per split). The examples' matrix and obs are
    their input (control) cells'; `obs[CONDITION_COLUMN]` is the target's condition, `obs["input_cell"]`
    names the input cell."""
    conditions = cells.obs[CONDITION_COLUMN].to_numpy().astype(str)
    controls = np.flatnonzero(conditions == CONTROL)
    rng = np.random.default_rng(seed)
    targets, inputs, splits = [], [], []
    for name in SPLITS:
        members = np.flatnonzero(np.isin(conditions, split.conditions[name]))
        is_control = conditions[members] == CONTROL
        drawn = rng.choice(controls, size=len(members))
        targets.append(members)
        inputs.append(np.where(is_control, members, drawn))
        splits.append(np.full(len(members), name))
    target, source, which = np.concatenate(targets), np.concatenate(inputs), np.concatenate(splits)
    obs = cells.obs.iloc[source].copy()
    obs.index = pd.Index(cells.obs_names[target].astype(str))
    obs[CONDITION_COLUMN] = conditions[target]
    obs["input_cell"] = cells.obs_names[source].astype(str)
    obs["split"] = pd.Categorical(which, categories=list(SPLITS))
    examples = anndata.AnnData(
        X=cells.X[source], obs=obs, var=cells.var.copy(),
        layers={key: layer[source] for key, layer in cells.layers.items()}, uns=dict(cells.uns),
    )  # fmt: skip
    index = {name: np.flatnonzero(which == name) for name in SPLITS}
    return examples, target, index
