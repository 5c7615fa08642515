"""comparison.png: one metric per configuration, bar = mean over seeds, whisker = std; baselines in grey."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from scpeft_cli.artifacts import save_figure  # selects the non-interactive Agg backend
from scpeft_cli.report.baselines import BASELINE

COLOURS = {"strategy": "tab:blue", "baseline": "tab:gray"}


def plot_comparison(path: Path, summary: pd.DataFrame, *, metric: str) -> None:
    rows = summary[summary[f"{metric}_mean"].notna()]
    kinds = np.where(rows["peft"] == BASELINE, "baseline", "strategy")
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows)))
    try:
        positions = np.arange(len(rows))
        ax.barh(
            positions, rows[f"{metric}_mean"], xerr=rows[f"{metric}_std"].fillna(0), capsize=3,
            color=[COLOURS[kind] for kind in kinds],
        )
        ax.set_yticks(positions, rows["configuration"], fontsize=8)
        ax.invert_yaxis()  # same order as the tables, top to bottom
        ax.set_xlabel(f"test {metric} (mean ± std over seeds)")
        ax.legend(
            handles=[Patch(color=COLOURS[kind], label=kind) for kind in dict.fromkeys(kinds)], fontsize=8,
            loc="lower right", bbox_to_anchor=(1, 1), ncol=2, frameon=False,  # above the axes: never over a bar
        )
        fig.tight_layout()
        save_figure(path, fig)
    finally:
        plt.close(fig)
