"""`scpeft report` on synthetic run dirs: aggregation, failures, output files, CI gates and usage errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scpeft_cli.commands.report import main
from scpeft_cli.paths import config_dir
from scpeft_cli.report.options import recorded_option
from tests.conftest import run_cli

# configuration -> (strategy name in metrics.json as older runs recorded it: the class name; macro F1 of seeds 0-2)
STRATEGIES = {"peft=full": ("FullFineTuning", [0.90, 0.92, 0.94]), "peft=lora": ("LoRA", [0.80, 0.82, 0.84])}
CONF = Path(config_dir())
ROWS = ["peft=full", "peft=lora", "baseline: pca_logreg", "baseline: zero_shot_knn (scgpt_small)"]


def write_run(path, *, overrides, metrics=None, failed=None, per_class=None):
    """A run dir as `scpeft train` leaves it; with neither metrics nor failed it looks crashed."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if failed is not None:
        (path / "failed.json").write_text(json.dumps(failed))
    if per_class is not None:
        pd.DataFrame(per_class, columns=["cell_type", "precision", "recall", "f1", "support"]).to_csv(path / "per_class.csv", index=False)
    return path


def run_metrics(*, peft, seed, macro_f1):
    """Baselines depend on the seed only, so both strategies of a seed record the same values."""
    return {
        "accuracy": macro_f1 + 0.05, "balanced_accuracy": macro_f1, "macro_f1": macro_f1, "weighted_f1": macro_f1,
        "trainable_params": 1_234_567 if peft == "LoRA" else 50_000_000, "total_params": 50_000_000,
        "trainable_fraction": 0.0247 if peft == "LoRA" else 1.0, "adapter_bytes": 4_938_268, "train_seconds": 12.0 + seed,
        "cells_per_second": 500.0, "pretrained": False, "backbone": "scgpt_small", "checkpoint": None, "peft": peft,
        "monitor": "val_loss", "seed": seed, "device": "cpu",
        "baselines": {"pca_logreg": {"accuracy": 0.75, "macro_f1": 0.70 + 0.01 * seed}, "zero_shot_knn": {"macro_f1": 0.60 + 0.01 * seed}},
    }


def make_sweep(root, *, shift=0.0, strategies=STRATEGIES):
    """Three seeds per strategy in numbered job dirs, as `scpeft train -m` writes them."""
    job = 0
    for override, (peft, scores) in strategies.items():
        for seed, score in enumerate(scores):
            per_class = [("T", 0.9, 0.9, score, 100), ("rare", 0.5, 0.5, score / 2, 3), ("B", 0.8, 0.8, 0.8, 40)]
            write_run(
                root / str(job), overrides=[override, f"seed={seed}", "hydra.job.chdir=false"],
                metrics=run_metrics(peft=peft, seed=seed, macro_f1=score + shift), per_class=per_class,
            )
            job += 1
    return root


def add_failures(root):
    write_run(root / "10", overrides=["peft=prefix", "seed=0"], failed={"error": "prefix longer than max_seq_len", "type": "UserError"})
    write_run(root / "11", overrides=["peft=lora", "seed=3"])  # killed before metrics.json
    return root


def report(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


def summary_of(directory):
    return pd.read_csv(directory / "summary.csv", keep_default_na=True).set_index("configuration")


def test_seeds_are_averaged_per_configuration_and_baselines_count_each_seed_once(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    assert report(sweep) == 0
    summary = summary_of(sweep)
    assert list(summary.index) == ROWS
    assert summary.loc["peft=full", "macro_f1_mean"] == pytest.approx(0.92)
    assert summary.loc["peft=full", "macro_f1_std"] == pytest.approx(0.02)
    lora = summary.loc["peft=lora", ["backbone", "peft", "n_runs", "n_failed"]]
    assert lora.tolist() == ["scgpt_small", "lora", 3, 0]  # the option, not the class name LoRA in metrics.json
    assert summary.loc["peft=lora", "cells_per_second_mean"] == 500.0  # any numeric key is aggregated
    assert "seed_mean" not in summary.columns
    pca = summary.loc["baseline: pca_logreg"]
    assert (pca["peft"], pca["n_runs"]) == ("baseline", 3)  # 6 runs, 3 seeds
    assert (pca["macro_f1_mean"], pca["macro_f1_std"]) == (pytest.approx(0.71), pytest.approx(0.01))
    assert math.isnan(pca["trainable_params_mean"])  # a baseline carries only its own metrics
    assert summary.loc["baseline: zero_shot_knn (scgpt_small)", "macro_f1_mean"] == pytest.approx(0.61)


def test_failed_and_crashed_jobs_are_counted_with_their_errors_but_do_not_fail_without_a_gate(tmp_path, capsys):
    sweep = add_failures(make_sweep(tmp_path / "sweep"))
    assert report(sweep) == 0
    summary = summary_of(sweep)
    assert summary.loc["peft=lora", ["n_runs", "n_failed", "errors"]].tolist() == [3, 1, "no metrics.json (crashed, killed or still running)"]
    assert summary.loc["peft=prefix", ["n_runs", "n_failed", "errors"]].tolist() == [0, 1, "prefix longer than max_seq_len"]
    assert "prefix longer than max_seq_len" in (sweep / "summary.md").read_text()
    assert "peft=prefix: 1 failed job(s)" in capsys.readouterr().out


def test_writes_tables_and_chart(tmp_path, capsys):
    sweep, out = make_sweep(tmp_path / "sweep"), tmp_path / "report"
    assert report(sweep, "--out", out) == 0
    written = ["summary.csv", "summary.md", "per_class_f1.csv", "per_class_f1.md", "comparison.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "summary.md").read_text()
    assert "| peft=full | 3 | 0 | 0.970 ± 0.020 |" in markdown
    assert "1,234,567 ± 0" in markdown and "13.0 ± 1.0" in markdown and "2.47% ± 0.00%" in markdown
    per_class = pd.read_csv(out / "per_class_f1.csv")
    assert per_class["cell_type"].tolist() == ["rare", "B", "T"]  # rarest first
    assert per_class.columns.tolist() == ["cell_type", "support", "peft=full", "peft=lora"]
    assert per_class.loc[0, "peft=lora"] == pytest.approx(0.41)
    assert "| rare | 3 | 0.460 | 0.410 |" in (out / "per_class_f1.md").read_text()
    assert str(out / "comparison.png") in capsys.readouterr().out


def test_a_single_run_dir_has_no_std(tmp_path):
    run = write_run(tmp_path / "run", overrides=[], metrics=run_metrics(peft="LoRA", seed=0, macro_f1=0.8))
    assert report(run) == 0
    summary = summary_of(run)
    assert list(summary.index)[0] == "backbone=scgpt_small peft=lora"  # an older run's class name, as its option
    assert math.isnan(summary.iloc[0]["macro_f1_std"])
    assert "| backbone=scgpt_small peft=lora | 1 | 0 | 0.850 | 0.800 |" in (run / "summary.md").read_text()


@pytest.mark.parametrize("requirement", ["macro_f1>=0.8", " macro_f1 >= 0.8 ", "accuracy>0.5"])
def test_require_passes_when_every_strategy_meets_it(tmp_path, requirement):
    assert report(make_sweep(tmp_path / "sweep"), "--require", requirement, "--require", "trainable_fraction<=1") == 0


def test_require_fails_naming_each_failing_row(tmp_path, capsys):
    assert report(make_sweep(tmp_path / "sweep"), "--require", "macro_f1>=0.9") == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert failures == ["FAIL peft=lora: macro_f1 = 0.82 (required: macro_f1 >= 0.9)"]  # baselines are not gated
    assert report(make_sweep(tmp_path / "again"), "--require", "macro_f1>=1.5") == 1
    assert sum(line.startswith("FAIL peft=") for line in capsys.readouterr().out.splitlines()) == 2


def test_require_fails_when_a_configuration_has_failed_jobs(tmp_path, capsys):
    sweep = add_failures(make_sweep(tmp_path / "sweep"))
    assert report(sweep, "--require", "macro_f1>=0.5") == 1
    out = capsys.readouterr().out
    assert "FAIL peft=prefix: jobs = 1 failed: prefix longer than max_seq_len" in out
    assert "FAIL peft=lora: jobs = 1 failed: no metrics.json" in out
    assert "FAIL peft=full" not in out


def test_baseline_detects_a_regression_and_passes_within_max_drop(tmp_path, capsys):
    old = make_sweep(tmp_path / "old")
    assert report(old) == 0
    new = make_sweep(tmp_path / "new", shift=-0.1)
    assert report(new, "--baseline", old / "summary.csv", "--max-drop", "0.05") == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failures] == ["FAIL peft=full", "FAIL peft=lora"]
    assert report(new, "--baseline", old / "summary.csv", "--max-drop", "0.2") == 0
    assert report(old, "--baseline", old / "summary.csv") == 0  # compared before being rewritten


def test_baseline_reports_configurations_found_on_one_side_only(tmp_path, capsys):
    old = make_sweep(tmp_path / "old")
    assert report(old) == 0
    only_lora = {"peft=lora": STRATEGIES["peft=lora"], "peft=dora": ("DoRA", [0.5])}
    assert report(make_sweep(tmp_path / "new", strategies=only_lora), "--baseline", old / "summary.csv") == 0
    out = capsys.readouterr().out
    assert "peft=dora: not in the baseline" in out and "peft=full: in the baseline only" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--require", "macro_f1 => 0.8"], "expected METRIC OP NUMBER"),
        (["--require", "macro_f1>=high"], "expected METRIC OP NUMBER"),
        (["--require", "f2>=0.5"], "no configuration has the metric 'f2'"),
        (["--metric", "f2"], "no configuration has the metric 'f2'"),
        (["--baseline", "missing.csv"], "cannot read it"),
        (["--max-drop", "0.1"], "--max-drop needs --baseline"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    sweep = make_sweep(tmp_path / "sweep")
    assert report(sweep, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (sweep / "summary.csv").exists()  # nothing written on a usage error


def test_no_run_dirs_and_a_baseline_that_is_no_summary_are_usage_errors(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report(tmp_path / "empty") == 2
    assert "no run dirs" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert report(make_sweep(tmp_path / "sweep"), "--baseline", tmp_path / "other.csv") == 2
    assert "not a summary.csv" in capsys.readouterr().err


def test_runs_as_a_subprocess_with_the_cli_argv_and_never_loads_torch(tmp_path):
    """Layer rule: the report reads files only, so a CI job can run it without loading the model stack."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
        "sys.argv = ['scpeft report', *sys.argv[1:]]; from scpeft_cli.commands.report import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(make_sweep(tmp_path / "sweep")), "--require", "macro_f1>=0.9"],
        env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "FAIL peft=lora" in result.stdout and "torch loaded: False" in result.stdout
    assert "peft=full" in result.stdout and "0.920 ± 0.020" in result.stdout  # the rich summary table


def test_scpeft_report_command(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    assert run_cli("report", str(sweep), "--require", "macro_f1>=0.8").returncode == 0
    assert run_cli("report", str(sweep), "--require", "macro_f1>=1.5", check=False).returncode == 1


def write_choices(run, **choices):
    """.hydra/hydra.yaml as Hydra writes it, reduced to what the report reads: hydra.runtime.choices."""
    choices = {"hydra/launcher": "basic", "experiment": None, "task": "annotation", **choices}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return run


def test_configurations_are_named_by_option_never_by_class_name(tmp_path, capsys):
    """A run chose `peft=head_only` (here through a preset, so no peft= override): every output says head_only."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        run = write_run(
            sweep / str(seed), overrides=["experiment=frozen", f"seed={seed}"],
            metrics=run_metrics(peft="HeadOnly", seed=seed, macro_f1=0.7),
            per_class=[("T", 0.9, 0.9, 0.7, 100)],
        )
        write_choices(run, backbone="scgpt_small", peft="head_only")
    default = write_run(sweep / "2", overrides=[], metrics=run_metrics(peft="FullFineTuning", seed=0, macro_f1=0.9))
    write_choices(default, backbone="scgpt_small", peft="full")
    assert report(sweep) == 0
    summary = summary_of(sweep)
    assert list(summary.index)[:2] == ["experiment=frozen", "backbone=scgpt_small peft=full"]
    assert summary["peft"].tolist()[:2] == ["head_only", "full"]
    out = capsys.readouterr().out
    assert "backbone=scgpt_small peft=full" in out
    written = "".join((sweep / name).read_text() for name in ("summary.csv", "summary.md", "per_class_f1.csv"))
    assert "HeadOnly" not in out + written and "FullFineTuning" not in out + written


def test_the_peft_column_follows_hydra_choices_then_overrides_then_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    # hydra.yaml wins over a class name in metrics.json, and also names a job that failed
    write_choices(write_run(sweep / "0", overrides=[], metrics=run_metrics(peft="HeadOnly", seed=0, macro_f1=0.7)),
                  peft="head_only", backbone="scgpt_small")
    write_choices(write_run(sweep / "1", overrides=["peft=prefix"], failed={"error": "boom", "type": "UserError"}),
                  peft="prefix", backbone="scgpt_small")
    # no hydra.yaml: the override, then the option name a new run records
    write_run(sweep / "2", overrides=["peft=lora"], metrics=run_metrics(peft="LoRA", seed=0, macro_f1=0.8))
    new_run = run_metrics(peft="encoder_prompt", seed=0, macro_f1=0.6)
    write_run(sweep / "3", overrides=["trainer.lr=0.1"], metrics=new_run)
    # a combination: parts in the order of peft.parts
    combo = write_run(
        sweep / "4", overrides=["peft=combo", "peft.parts=[token_prompt,encoder_prompt]"],
        metrics=run_metrics(peft="TokenPrompt+EncoderPrompt", seed=0, macro_f1=0.75),
    )
    write_choices(combo, peft="combo", backbone="scgpt_small")
    parts = {"peft": {"parts": ["token_prompt", "encoder_prompt"]}}
    (combo / ".hydra" / "config.yaml").write_text(yaml.safe_dump(parts))
    for seed, recorded in ((1, "combo:token_prompt+lora"), (2, "TokenPrompt+LoRA")):  # a new run, an older one
        metrics = run_metrics(peft=recorded, seed=seed, macro_f1=0.7)
        write_run(sweep / str(4 + seed), overrides=[f"seed={seed}"], metrics=metrics)
    assert report(sweep) == 0
    summary = summary_of(sweep)
    strategies = summary[summary["peft"] != "baseline"]
    assert strategies["peft"].tolist() == [
        "head_only", "prefix", "lora", "encoder_prompt", "combo:token_prompt+encoder_prompt", "combo:token_prompt+lora",
    ]
    assert strategies.loc["backbone=scgpt_small peft=combo:token_prompt+lora", "n_runs"] == 2


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "peft").glob("*.yaml")))
def test_every_strategy_class_maps_back_to_its_option(option):
    """Older runs recorded the class name; each conf/peft option's class names that option."""
    target = yaml.safe_load((CONF / "peft" / f"{option}.yaml").read_text())["_target_"]
    assert recorded_option(target.rsplit(".", 1)[-1]) == option
    assert recorded_option(option) == option
