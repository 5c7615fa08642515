"""Numbers out of a metrics dict, and their mean and sample std over seeds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

NOT_METRICS = frozenset({"seed"})  # an identifier, not a result


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Every numeric field, whatever its name, so that new metrics appear without code changes; bools are flags."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_METRICS
    }


def mean_std(samples: Iterable[dict[str, float]]) -> dict[str, float]:
    """`M_mean`, `M_std` per metric; the std is the sample std (ddof=1), NaN for a single run."""
    table = pd.DataFrame(list(samples))
    result: dict[str, float] = {}
    for metric in table.columns:
        result[f"{metric}_mean"] = table[metric].mean()
        result[f"{metric}_std"] = table[metric].std(ddof=1)
    return result
