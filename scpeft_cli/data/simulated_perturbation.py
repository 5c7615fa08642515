"""A simulated Perturb-seq screen: an oracle for perturbation-prediction models, baselines and metrics.

Real screens never say what a perturbation truly does to the mean expression; here it is known by construction.
Every cell draws Poisson counts from ``base_mean * depth * exp(lfc(condition))``:

* ``base_mean``: one log-normal mean per gene (median about 2.7 counts per cell, most genes above 1), the same
  for every condition; ``depth``: one modest log-normal factor per cell (sd 0.2 in log space);
* a single perturbation ``"G012+ctrl"`` (CRISPRi-like) multiplies its own gene by ``knockdown`` and shifts a
  fixed program of ``program_size`` other genes (its own seeded choice) by a natural-log fold change of
  ``+effect`` or ``-effect`` (random signs). Perturbed genes are drawn from the better-expressed half of the genes,
  so a knockdown is visible;
* a double perturbation ``"G003+G017"`` pairs two of the single genes and adds their log fold changes: both
  knockdowns, both programs (a gene in both programs gets the sum). There is no interaction term, so the true
  double is exactly the additive combination of its singles and the additive baseline is right in expectation;
* ``"ctrl"`` cells have no effect at all.

So the true mean of every condition is known (``true_condition_means``), and so are its planted genes: the
knocked-down gene(s) and the program(s), which differential expression against control should recover.

The doubles pair distinct singles without reuse while there are enough (8 doubles use 16 of the 24 default single
genes), because disjoint pairs make every GEARS subgroup most likely. Under GEARS' simulation split (75% of the
single genes seen in training) the 8 default doubles hold on average 4.4 combos with both genes seen
(``combo_seen2``), 3.1 with one (``combo_seen1``) and 0.4 with none (``combo_seen0``); a split has at least one
``combo_seen0`` in about 39% of seeds. ``n_double=12`` pairs all 24 singles and raises that to about 56%.

Cells are ordered control, singles, doubles; obs holds ``condition`` (GEARS notation), ``cell_type``
("simulated") and ``n_counts``, and var ``gene_name``, the columns GEARS' ``PertData.new_data_process`` reads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scpeft_cli.data.conditions import CONTROL, perturbed_genes
from scpeft_cli.data.loading import prepare
from scpeft_cli.errors import UserError

__all__ = [
    "load_simulated_perturbseq",
    "simulate_perturbseq",
    "true_condition_means",
    "write_simulated_perturbseq_h5ad",
]

UNS_KEY = "simulated_perturbseq"
LOG_MEAN_CENTRE, LOG_MEAN_SD = 1.0, 1.0  # per-gene base means: exp(N(1, 1)) counts per cell
DEPTH_SD = 0.2


def simulate_perturbseq(
    *, n_genes: int = 200, n_control: int = 300, n_single: int = 24, n_double: int = 8,
    cells_per_condition: int = 20, program_size: int = 15, knockdown: float = 0.1, effect: float = 1.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Raw Poisson counts of a simulated screen (see the module docstring); the same ``seed`` gives the same data.

    Returns X as CSR float32 counts (cells x genes ``G000``, ``G001``, ...), obs ``condition``, ``cell_type``,
    ``n_counts``; ``uns["simulated_perturbseq"]`` records the parameters and the truth ``true_condition_means``
    reads (base means, perturbed genes, their log fold changes).
    """
    _check_parameters(n_genes, n_control, n_single, n_double, cells_per_condition, program_size, knockdown, effect)
    rng = np.random.default_rng(seed)
    genes = [f"G{i:0{max(3, len(str(n_genes - 1)))}d}" for i in range(n_genes)]
    base_mean = np.exp(rng.normal(LOG_MEAN_CENTRE, LOG_MEAN_SD, size=n_genes))
    well_expressed = np.flatnonzero(base_mean >= np.median(base_mean))
    targets = np.sort(rng.choice(well_expressed, size=n_single, replace=False))
    lfc = np.stack([_single_effect(rng, int(g), n_genes, program_size, knockdown, effect) for g in targets])

    pairs = _double_pairs(rng, n_single, n_double)
    singles = [f"{genes[g]}+{CONTROL}" for g in targets]
    doubles = ["+".join(sorted((genes[targets[a]], genes[targets[b]]))) for a, b in pairs]
    double_lfc = np.array([lfc[a] + lfc[b] for a, b in pairs]).reshape(-1, n_genes)
    condition_lfc = np.vstack([np.zeros((1, n_genes)), lfc, double_lfc])
    names = [CONTROL, *singles, *doubles]
    sizes = np.array([n_control] + [cells_per_condition] * (len(names) - 1))
    codes = np.repeat(np.arange(len(names)), sizes)

    depth = np.exp(rng.normal(0.0, DEPTH_SD, size=codes.size))
    counts = rng.poisson(base_mean * np.exp(condition_lfc[codes]) * depth[:, None]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical.from_codes(codes, categories=names),
            "cell_type": pd.Categorical(["simulated"] * codes.size),
            "n_counts": counts.sum(axis=1, dtype=np.float64).astype(np.float32),
        },
        index=[f"cell{i:05d}" for i in range(codes.size)],
    )
    adata = anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))
    adata.uns[UNS_KEY] = {
        "seed": int(seed), "knockdown": float(knockdown), "effect": float(effect), "program_size": int(program_size),
        "depth_sd": DEPTH_SD, "genes": genes, "base_mean": base_mean,
        "perturbed_genes": [genes[g] for g in targets], "log_fold_changes": lfc,
    }
    return adata


def _check_parameters(
    n_genes: int, n_control: int, n_single: int, n_double: int, cells_per_condition: int, program_size: int,
    knockdown: float, effect: float,
) -> None:
    if n_genes < 4 or n_control < 1 or cells_per_condition < 1:
        raise ValueError(
            f"need n_genes >= 4, n_control >= 1, cells_per_condition >= 1; "
            f"got {n_genes}, {n_control}, {cells_per_condition}"
        )
    if not 1 <= n_single <= n_genes // 2:
        raise ValueError(f"n_single must be in [1, n_genes // 2 = {n_genes // 2}] (targets), got {n_single}")
    if not 0 <= n_double <= n_single * (n_single - 1) // 2:
        raise ValueError(f"n_double must be in [0, {n_single * (n_single - 1) // 2}] (distinct pairs), got {n_double}")
    if not 0 <= program_size < n_genes:
        raise ValueError(f"program_size must be in [0, n_genes), got {program_size}")
    if not 0 < knockdown <= 1 or effect < 0:
        raise ValueError(f"need 0 < knockdown <= 1 and effect >= 0, got {knockdown} and {effect}")


def _single_effect(
    rng: np.random.Generator, gene: int, n_genes: int, program_size: int, knockdown: float, effect: float
) -> np.ndarray:
    """Log fold changes of knocking ``gene`` down: its own knockdown plus its program of other genes."""
    lfc = np.zeros(n_genes)
    program = rng.choice(np.delete(np.arange(n_genes), gene), size=program_size, replace=False)
    lfc[program] = effect * rng.choice([-1.0, 1.0], size=program_size)
    lfc[gene] = np.log(knockdown)
    return lfc


def _double_pairs(rng: np.random.Generator, n_single: int, n_double: int) -> list[tuple[int, int]]:
    """``n_double`` distinct pairs of single indices: disjoint pairs first, then random further pairs."""
    order = rng.permutation(n_single)
    disjoint = [tuple(sorted((int(order[2 * i]), int(order[2 * i + 1])))) for i in range(min(n_double, n_single // 2))]
    rest = sorted(set(itertools.combinations(range(n_single), 2)) - set(disjoint))
    extra = rng.choice(len(rest), size=n_double - len(disjoint), replace=False) if n_double > len(disjoint) else []
    return disjoint + [rest[i] for i in extra]


def true_condition_means(adata: anndata.AnnData, condition_key: str = "condition") -> pd.DataFrame:
    """The expected counts of a cell of depth factor 1 in each condition (rows) for each of ``adata``'s genes
    (columns): what a perfect model's mean should be proportional to. Works on the prepared data too."""
    truth = adata.uns.get(UNS_KEY)
    if truth is None or condition_key not in adata.obs.columns:
        raise UserError(
            f"no simulation truth (uns['{UNS_KEY}']) or no obs['{condition_key}']; use data from simulate_perturbseq"
        )
    effect_of = dict(zip(truth["perturbed_genes"], np.asarray(truth["log_fold_changes"]), strict=True))
    conditions = list(pd.unique(adata.obs[condition_key].astype(str)))
    lfc = np.array([sum((effect_of[g] for g in perturbed_genes(c)), np.zeros(len(truth["genes"]))) for c in conditions])
    means = pd.DataFrame(np.asarray(truth["base_mean"]) * np.exp(lfc), index=conditions, columns=list(truth["genes"]))
    return means[list(adata.var_names)]


def write_simulated_perturbseq_h5ad(path: str | Path, **simulate_kwargs) -> Path:
    """Simulate (``simulate_perturbseq(**simulate_kwargs)``) and write the counts as .h5ad; returns the path."""
    path = Path(path)
    simulate_perturbseq(**simulate_kwargs).write_h5ad(path)
    return path


def load_simulated_perturbseq(
    *, label_key: str | None = None, condition_key: str = "condition", unknown_perturbations: str = "error",
    n_top_genes: int | None = None,
    simulation_seed: int = 0, n_genes: int = 200, n_control: int = 300, n_single: int = 24, n_double: int = 8,
    cells_per_condition: int = 20, program_size: int = 15, knockdown: float = 0.1, effect: float = 1.0,
    species: str | None = None, ortholog_table: str | None = None, one_to_many: str = "drop",
) -> anndata.AnnData:
    """The simulated screen, prepared as any dataset (`data.loading.prepare`), with the condition of every cell in
    ``obs["scpeft_condition"]`` and the simulation truth kept in uns for ``true_condition_means``."""
    simulated = simulate_perturbseq(
        n_genes=n_genes, n_control=n_control, n_single=n_single, n_double=n_double,
        cells_per_condition=cells_per_condition, program_size=program_size, knockdown=knockdown, effect=effect,
        seed=simulation_seed,
    )
    adata = prepare(
        simulated.X, obs=simulated.obs, genes=simulated.var_names, source="simulated_perturbseq", path=None,
        label_key=label_key, gene_key=None, layer=None, min_cells_per_class=0, drop_unlabeled=False,
        n_top_genes=n_top_genes, condition_key=condition_key, unknown_perturbations=unknown_perturbations,
        species=species, ortholog_table=ortholog_table, one_to_many=one_to_many,
    )
    adata.uns[UNS_KEY] = simulated.uns[UNS_KEY]
    return adata
