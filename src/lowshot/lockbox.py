"""The lockbox ledger: every opening of a sealed test split, recorded where any later run can count it.

A store's test split is sealed (:meth:`lowshot.data.Store.seal`) before any selection; a run opens it
once, for its final evaluation, through :func:`open_lockbox` (``tracking.Run.open_test``,
``ensemble.score_test``), and ``lowshot evaluate`` records its external set through
:func:`record_opening`. The ledger lives in the cache folder (``lockbox/<data>-<test digest>.jsonl``):
one line per opening, so a report can say how often that test set had already been looked at, i.e. how
far its number may be the best of many tries (``report.believe`` reads the count from meta.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, DataConfig, setting_key, to_dict
from .data import Store, cache_root


def open_lockbox(store: Store, cfg: Config, run_dir: Path, job: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Unseal the store's test split and record the opening (run, job, setting) in its ledger; returns
    the test rows and :func:`record_opening`'s record."""
    rows = store.unseal()
    entry = {"run": str(Path(run_dir).resolve()), "job": job, "setting": setting_key(to_dict(cfg))}
    return rows, record_opening(cfg.data, f"{store.name}-{store.test_digest()}", entry)


def record_opening(data: DataConfig, ledger_name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` (run, job, setting) with the time to the ledger ``lockbox/<ledger_name>.jsonl`` in
    the cache folder; returns the ledger's path and how often it had been opened before, by how many runs
    and by how many other settings (the openings that can make a test number the best of many tries)."""
    ledger = cache_root(data) / "lockbox" / f"{ledger_name}.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    before = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.is_file() else []
    with open(ledger, "a") as f:
        f.write(json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return {
        "ledger": str(ledger),
        "opened_before": len(before),
        "runs_before": len({e["run"] for e in before}),
        "other_settings_before": len({e.get("setting") for e in before} - {entry.get("setting")}),
    }
