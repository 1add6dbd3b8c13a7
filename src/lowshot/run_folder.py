"""The run folder: the names of the files a run directory holds, their one reader and one writer, the
provenance a run records (git sha, package versions, processor) and the headline metrics every table shows.

A run directory ``out_dir/name/`` holds ``config.yaml`` (the resolved config), ``meta.json`` (seed, git
sha, exact command, versions, status, lockbox openings), ``metrics.jsonl`` (one line per logged step),
``results.json`` (the run's numbers) and, for a probe or fine-tune, ``predictions.npz`` (what ``lowshot
report`` and ``compare`` read). Every file is written through a temporary file and a rename, so a kill at
any moment leaves the old file or the new one. :mod:`lowshot.tracking` writes a run as it trains;
``ensemble``, ``external`` and the readers below ask this module for the names.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .data.cache import save_npz_atomic, write_atomic

RESULTS = "results.json"
CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.npz"
# What reproduces a run's number, copied beside a report.
PROVENANCE = (CONFIG, META, RESULTS, METRICS)

# The runs table's shared columns: every job's headline under one name, beside the nested detail.
HEADLINE = ("auroc", "accuracy", "balanced_accuracy", "macro_f1", "ece", "brier")


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of a run (a missing file raises FileNotFoundError naming it)."""
    return dict(json.loads((Path(run_dir) / RESULTS).read_text()))


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a run or a checkpoint folder; {} where there is none."""
    f = Path(run_dir) / META
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def read_predictions(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """``predictions.npz`` (no pickles) as {name: array}; None where the run saved none."""
    f = Path(run_dir) / PREDICTIONS
    if not f.is_file():
        return None
    with np.load(f, allow_pickle=False) as z:
        return dict(z)


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    return write_atomic(Path(run_dir) / RESULTS, json.dumps(results, indent=2))


def write_meta(run_dir: str | Path, meta: dict[str, Any]) -> Path:
    return write_atomic(Path(run_dir) / META, json.dumps(meta, indent=2))


def write_predictions(run_dir: str | Path, **arrays: np.ndarray) -> Path:
    return save_npz_atomic(Path(run_dir) / PREDICTIONS, **arrays)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished probe or fine-tune run's files as {dir, name, results, meta, metrics, pred, config}, what
    ``lowshot report`` and ``compare`` read; raises FileNotFoundError naming what is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).is_file():
        raise FileNotFoundError(
            f"{run_dir}: no results.json; point `lowshot report` at a finished finetune/train.py run directory"
        )
    run: dict[str, Any] = {"dir": run_dir, "name": run_dir.name}
    run["results"] = read_results(run_dir)
    if "val" not in run["results"] or "selected" not in run["results"]:
        raise FileNotFoundError(
            f"{run_dir} is a {run['results'].get('job', 'non-training')} run; `lowshot report` and `compare` take "
            f"finetune/train.py runs (probe or fine-tune)"
        )
    run["meta"] = read_meta(run_dir)
    lines = (run_dir / METRICS).read_text().splitlines() if (run_dir / METRICS).is_file() else []
    run["metrics"] = [json.loads(line) for line in lines if line.strip()]
    run["pred"] = read_predictions(run_dir)
    run["config"] = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    return run


def scored(run: dict[str, Any]) -> str:
    """'test', or 'val' for a selection-only run (eval.test=false: the test split stayed sealed)."""
    return "test" if "test" in run["results"] else "val"


def headline(results: dict[str, Any]) -> dict[str, float]:
    """``test/auroc``, ``test/auroc_low``, ``test/auroc_high``, ... (``val/`` for a selection-only run),
    ``test_at_point/...`` and ``selected/val_auroc``; pretraining: ``pretrain/final_loss`` and its kNN."""
    out: dict[str, float] = {}
    for split in ("val", "test", "test_clean"):
        for key in (split, f"{split}_at_point"):
            for m, v in (results.get(key) or {}).get("metrics", {}).items():
                if m in HEADLINE:
                    out |= {
                        f"{key}/{m}": v["value"],
                        f"{key}/{m}_low": v["low"],
                        f"{key}/{m}_high": v["high"],
                    }
    if "selected" in results:
        out["selected/val_auroc"] = results["selected"]["val_auroc"]
    if results.get("job") == "pretrain":
        out["pretrain/final_loss"] = results["final_loss"]
        out |= {f"pretrain/{k.replace('/', '_')}": v for k, v in results.items() if k.startswith("knn/")}
    return out


# ------------------------------------------------------------------------------------------------ provenance


def git_sha() -> str:
    """The checkout's commit (12 hex digits), ``-dirty`` with uncommitted changes; "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def typed_command(parent: list[str], own: list[str]) -> str:
    """The command that reproduces the run, as the user typed it: ``accelerate launch …`` or ``torchrun …``
    when one of them started this process (``parent``: its argv), else this interpreter's ``own`` argv
    (issue 41: meta.json said ``python3 ssl/pretrain.py …`` for an ``accelerate launch`` run)."""
    launcher: list[str] = []
    for i, a in enumerate(parent):
        name = Path(a).name
        if a == "accelerate.commands.launch" and i and parent[i - 1] == "-m":
            launcher = ["accelerate", "launch", *parent[i + 1 :]]
        elif name == "accelerate" and parent[i + 1 : i + 2] == ["launch"]:
            launcher = ["accelerate", *parent[i + 1 :]]
        elif name == "torchrun" or (a == "torch.distributed.run" and i and parent[i - 1] == "-m"):
            launcher = ["torchrun", *parent[i + 1 :]]
        if launcher:
            break
    return shlex.join(launcher or own)


def parent_argv() -> list[str]:
    """The parent process's argv (Linux /proc); [] where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


# The packages whose versions a run records: pillow decodes and resizes, scikit-learn and faiss-cpu make
# the splits and duplicate groups, the rest train.
VERSIONED = (
    "torch",
    "timm",
    "lightly",
    "accelerate",
    "wandb",
    "scikit-learn",
    "numpy",
    "pillow",
    "faiss-cpu",
)


def versions() -> dict[str, str]:
    """{package: version} for :data:`VERSIONED` ("absent" where one is not installed)."""
    return {pkg: _version(pkg) for pkg in VERSIONED}


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except Exception:
        return "absent"
