"""Shared fixtures. The real data live in ../shared/data (or $LOWSHOT_DATA_ROOT); under CI=true a
missing file fails the test instead of skipping it."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lowshot.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
# The timeout of every subprocess a test starts: a guard against a hang, never a speed limit (issue 39: a
# 3-minute run hit a 600 s limit on a loaded 2-core machine). Speed is measured in bench/, not here.
HANG_S = 3600
DATA = Path(os.environ.get("LOWSHOT_DATA_ROOT") or REPO.parent / "shared" / "data").resolve()


def need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is missing: set LOWSHOT_DATA_ROOT to the folder with breastmnist.npz, retinamnist.npz, busi/"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    need(DATA / "breastmnist.npz")
    return DATA


@pytest.fixture(scope="session")
def busi(data_root: Path) -> Path:
    return need(data_root / "busi")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-store cache for the session (the data folder itself is read-only)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may reach for the network or an ambient W&B login.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("LOWSHOT_CACHE", raising=False)


@dataclass
class Ran:
    """What a user sees of a command: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def lowshot_cli(*args: str) -> Ran:
    """``lowshot ARGS`` in this process: the CLI starts no launcher, so its exit code and output are what
    a user sees, without the ~7 s of a new interpreter (its entry point runs as a subprocess in
    test_e2e's quickstart and keep.sh). An exception the CLI does not turn into one line propagates."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(list(args))
        except SystemExit as e:  # as the interpreter reports it: a message is printed, exit 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Ran(code, out.getvalue(), err.getvalue())
