"""The W&B sweep files, offline: each passes the sweep schema of W&B's own `sweeps` library, the runs its
controller proposes expand (with wandb's agent code) into `accelerate launch finetune/train.py` commands
whose arguments lowshot accepts and applies, and one such command runs for real (offline, tiny) and
reports the metric the sweep maximises while never opening the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sweeps
import yaml
from conftest import HANG_S
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from lowshot.config import flatten, parse_args, to_dict

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def expand(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command `wandb agent` runs for one proposed run (wandb_agent.Agent._command_run, no network)."""
    args = create_sweep_command_args({"args": params})
    macros = {**args, "env": ["/usr/bin/env"], "program": [sweep["program"]], "interpreter": ["python"]}
    out: list[str] = []
    for c in create_sweep_command(sweep["command"]):
        out += macros[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    return out


def proposals(sweep: dict[str, Any], n: int) -> list[dict[str, Any]]:
    runs: list[sweeps.SweepRun] = []
    for i in range(n):
        run = sweeps.next_run(sweep, runs)
        assert run is not None
        runs.append(
            sweeps.SweepRun(
                name=f"r{i}",
                config=run.config,
                state=sweeps.RunState.finished,
                summary_metrics={"selected.val_auroc": 0.5 + 0.01 * i},
            )
        )
    return [r.config for r in runs]


def test_there_are_sweeps_for_lr_decay_unfreezing_and_mixup() -> None:
    swept = {k for f in FILES for k in yaml.safe_load(f.read_text())["parameters"]}
    assert {
        "train.lr",
        "train.weight_decay",
        "train.unfreeze_every",
        "train.strategy",
        "train.mixup",
    } <= swept


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_sweep_file_is_valid_and_its_commands_resolve(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    assert sweep["metric"]["name"] == "selected.val_auroc"  # chosen on validation, never on test
    for params in proposals(sweep, 3):
        cmd = expand(sweep, params)
        assert cmd[:4] == ["/usr/bin/env", "accelerate", "launch", "finetune/train.py"]
        cfg, _ = parse_args([*cmd[4:], "data.root=."])  # --config relative to the repository root
        resolved = flatten(to_dict(cfg))
        for key, spec in params.items():
            assert resolved[key] == pytest.approx(spec["value"]), key
        assert resolved["eval.test"] is False


@pytest.mark.slow
def test_a_sweep_run_reports_the_metric_and_keeps_test_sealed(
    data_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "unfreeze-schedule.yaml").read_text())
    cmd = expand(sweep, proposals(sweep, 1)[0])
    smoke = [f"data.root={data_root}", f"data.cache_dir={cache_dir}", f"out_dir={tmp_path}", "name=sweep-run"]
    smoke += ["data.limit=64", "data.size=32", "train.epochs=2", "check.leakage=drop", "eval.bootstrap=50"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run(
        [*launch, *cmd[3:], *smoke], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "sweep-run" / "results.json").read_text())
    assert sweep["metric"]["name"] in flatten(results) and "test" not in results
    summary = next((tmp_path / "sweep-run" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"selected.val_auroc" in summary  # the W&B summary the sweep controller reads
