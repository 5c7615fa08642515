"""The wheel carries the configs: `scpeft describe` works from an installed wheel outside the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_conf_and_runs_describe_outside_the_repo(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next(wheels.glob("scpeft_cli-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    assert (target / "scpeft_cli" / "conf" / "train.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import scpeft_cli.paths as p; print(p.config_dir())"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip().startswith(str(target))
    subprocess.run(
        [sys.executable, "-m", "scpeft_cli", "describe", "backbone=scgpt", "peft=head_only", "task.n_classes=18", "hydra.run.dir=out"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )
    report = json.loads((elsewhere / "out" / "describe.json").read_text())
    assert report["trainable_params"] == 536_594
