"""A deep ensemble of finished runs: the average of their class probabilities (Lakshminarayanan, Pritzel &
Blundell, "Simple and scalable predictive uncertainty estimation using deep ensembles", NeurIPS 2017).

On a few hundred labelled images the seed alone moves a fine-tune's test AUROC by ±0.03 (BreastMNIST,
recommended recipe, sd 0.029 over 5 seeds); averaging the members' probabilities removes most of that
variance instead of betting on one draw. ``combine`` reads each member's ``predictions.npz`` (the scores
of its selected model), checks that all scored the same validation (and test) images with the same labels
and were trained on one class prior, and writes an ensemble run directory that ``lowshot show``,
``compare`` and ``report`` read like any run: ``results.json`` (the validation and test reports with
bootstrap CIs, a temperature and an operating point chosen on the averaged *validation* probabilities),
``predictions.npz``, ``operating_point.json`` and ``members.json``. :func:`load` gives it to ``predict``,
``evaluate`` and ``export`` as one model (:class:`Averaged`).

No test image is scored anew: a member without test predictions (``eval.test=false``) gives an ensemble
without a test report, so choosing to ensemble can be done on validation with the test split sealed; then
``combine(..., open_test=True)`` (``lowshot ensemble --open-test``) opens it once for the ensemble.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import operating_point as op
from .config import load_yaml
from .data import DataError, load_store
from .data.cache import write_atomic
from .data.decode import to_channels
from .data.guards import copied_from_train_val
from .evaluation import final_reports
from .inference import Loaded, load_run, to_input
from .lockbox import open_lockbox
from .report import same_images
from .run_folder import (
    CONFIG,
    PREDICTIONS,
    RESULTS,
    git_sha,
    read_results,
    write_meta,
    write_predictions,
    write_results,
)

MEMBERS = "members.json"
# What turns a file into the stored uint8 image (inference.read_images): equal for every member; the
# normalisation after it (in_chans, mean, std) is each member's own.
STORE_KEYS = ("size", "store_channels", "color", "dicom", "classes")


def _member(d: Path) -> dict[str, Any]:
    for name in (RESULTS, PREDICTIONS, CONFIG, op.FILE):
        if not (d / name).is_file():
            raise DataError(
                f"{d / name} is missing: an ensemble member must be a finished finetune/train.py run"
            )
    results = read_results(d)
    if results.get("job") not in ("probe", "finetune"):
        raise DataError(f"{d} is a {results.get('job')} run; an ensemble is made of finetune/train.py runs")
    with np.load(d / PREDICTIONS, allow_pickle=False) as z:
        pred = dict(z)
    return {
        "dir": d,
        "results": results,
        "pred": pred,
        "point": op.load_point(d),
        "cfg": load_yaml(d / CONFIG),
    }


def combine(run_dirs: list[Path], out: Path, command: str = "", open_test: bool = False) -> dict[str, Any]:
    """Average the members' probabilities; write and return the ensemble's results (see the module).
    ``command`` (the command line that made it) goes into ``meta.json`` with the git sha and the members.

    ``open_test``: members chosen with the test split sealed (``eval.test=false``) have no test scores;
    the ensemble then opens it once itself (:func:`score_test`), recorded in the lockbox ledger."""
    if len(run_dirs) < 2:
        raise DataError("an ensemble needs at least two runs")
    members = [_member(Path(d)) for d in run_dirs]
    first = members[0]
    classes = list(first["results"]["classes"])
    tested = sum("test_prob" in m["pred"] for m in members)
    if open_test and tested:
        raise DataError(
            f"{tested} of the {len(members)} members already scored the test split: their ensemble averages "
            "those scores; leave out --open-test (it is for members trained with eval.test=false)"
        )
    splits = ["val"] + ["test"] * (tested == len(members))
    for m in members[1:]:
        if list(m["results"]["classes"]) != classes:
            raise DataError(f"{m['dir']} has classes {m['results']['classes']}, {first['dir']} has {classes}")
        for split in splits:  # same images, same order, same labels: else the average mixes images
            try:
                same_images(first["pred"], m["pred"], split, str(first["dir"]), str(m["dir"]))
            except ValueError as err:
                raise DataError(f"{err}; an ensemble's members must share their splits") from None
        if not np.allclose(m["point"]["train_prior"], first["point"]["train_prior"]):
            raise DataError(
                f"{m['dir']} was trained on the class prior {m['point']['train_prior']} and {first['dir']} on "
                f"{first['point']['train_prior']} (train.balance or the label budget differ): their probabilities "
                "do not average to one model's"
            )
    prob = {s: np.mean([m["pred"][f"{s}_prob"] for m in members], axis=0) for s in splits}
    y = {s: first["pred"][f"{s}_y"].astype(int) for s in splits}
    paths = {s: first["pred"][f"{s}_path"] for s in splits if f"{s}_path" in first["pred"]}
    lockbox = clean = None
    if open_test:
        y["test"], prob["test"], paths["test"], lockbox, clean = score_test(members, out)
        splits.append("test")
    cfg = first["cfg"]
    e = cfg.eval
    prior = np.asarray(first["point"]["train_prior"], float)  # the members' training prior
    point = op.from_config(e, classes, None, False, y["val"], prob["val"], train_prior=prior)
    test = (y["test"], prob["test"]) if "test" in prob else None
    results: dict[str, Any] = {
        "job": "ensemble",
        "data": first["results"].get("data"),
        "classes": classes,
        "counts": first["results"].get("counts"),
        "model": "+".join(sorted({str(m["results"].get("model")) for m in members})),
        "weights": "+".join(sorted({str(m["results"].get("weights")) for m in members})),
        "members": [str(m["dir"]) for m in members],
        # what `lowshot show` prints as the selection: the members' own selected validation AUROCs
        "selected": {
            "members": len(members),
            "val_auroc": float(np.mean([m["results"]["selected"]["val_auroc"] for m in members])),
            "epoch": [m["results"]["selected"].get("epoch") for m in members],
            "candidates": max(int(m["results"]["selected"].get("candidates", 1)) for m in members),
        },
    }
    results |= final_reports((y["val"], prob["val"]), test, classes, e, cfg.seed, point, clean)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"{s}_y": y[s] for s in splits} | {f"{s}_path": paths[s] for s in paths}
    arrays |= {f"{s}_prob": prob[s] for s in splits}
    write_predictions(out, **arrays)
    op.save(point, out)
    write_atomic(out / MEMBERS, json.dumps([str(m["dir"].resolve()) for m in members], indent=2))
    write_atomic(out / CONFIG, (first["dir"] / CONFIG).read_text())
    meta = {
        "job_type": "ensemble",
        "command": command,
        "git_sha": git_sha(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "members": results["members"],
        "seed": [m["results"].get("seed", m["cfg"].seed) for m in members],
        "status": "finished",
    }
    if lockbox is not None:
        meta["lockbox"] = lockbox
    write_meta(out, meta)
    write_results(out, results)
    return results


def score_test(
    members: list[dict[str, Any]], out: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """Open the test split for an ensemble of selection-only members, once: the first member's data
    loaded as it trained on it (checked: the same validation images), the test images scored by every
    member (:class:`Averaged`), the opening recorded in the split's lockbox ledger. Returns the test
    labels, averaged probabilities, paths, the ledger record and which test images have no verified copy
    in train/val (the store as loaded: a train copy the members' check.leakage=drop removed still counts,
    so "clean" errs on the side of leaving out)."""
    runs, model = averaged([m["dir"] for m in members])
    cfg = members[0]["cfg"]
    store = load_store(cfg.data)
    val = store.paths[store.indices("val")].astype(str)
    if list(val) != list(members[0]["pred"]["val_path"].astype(str)):
        raise DataError(
            f"{members[0]['dir']}: its data ({cfg.data.source}) no longer splits into the validation images it "
            "was chosen on; the test split it would open is not the members' own"
        )
    rows, ledger = open_lockbox(store, cfg, out, "ensemble")
    images = to_channels(store.images[rows], runs[0].prep["store_channels"])
    with torch.no_grad():
        logits = [model(to_input(images[i : i + 64], runs[0].prep))[0] for i in range(0, len(rows), 64)]
    prob = torch.cat(logits).softmax(1).numpy() if logits else np.zeros((0, len(store.classes)))
    clean = ~np.isin(rows, copied_from_train_val(store, cfg))
    return store.labels[rows].astype(int), prob, store.paths[rows].astype(str), ledger, clean


def is_ensemble(run_dir: Path) -> bool:
    return (Path(run_dir) / MEMBERS).is_file()


def member_dirs(run_dir: Path) -> list[Path]:
    """The members' run folders, as :func:`combine` recorded them (resolved paths)."""
    return [Path(m) for m in json.loads((Path(run_dir) / MEMBERS).read_text())]


class Averaged(nn.Module):
    """The members as one module with a single run's interface: image (B, C, H, W), normalised as the
    *first* member's ``preprocessing.json`` says → (logits (B, K), embedding (B, D)).

    ``logits`` = log of the members' averaged softmax probabilities (a log-sum-exp of their log-softmax,
    minus log M), so softmax(logits) is the ensemble's probability and the temperature (softmax(log p / T),
    ``evaluation.with_temperature``) and operating point apply to it as to one run's logits. Each member
    gets the input in its own normalisation: undone to [0, 1] with the first member's mean/std, gray
    replicated to 3 channels or the one gray channel taken back, then (x - mean_i) / std_i. ``embedding``
    is the first member's (what "unlike the training data" is measured with)."""

    def __init__(self, members: list[nn.Module], preps: list[dict[str, Any]]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.channels = [int(p["in_chans"]) for p in preps]

        def stat(p: dict[str, Any], k: str) -> torch.Tensor:  # (1, C, 1, 1)
            return torch.tensor(p[k], dtype=torch.float32).view(1, -1, 1, 1)

        for i, p in enumerate(preps):  # member 0's are also the input's
            self.register_buffer(f"mean{i}", stat(p, "mean"))
            self.register_buffer(f"std{i}", stat(p, "std"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, C_0, H, W) in [0, 1]: the stored image / 255
        unit = x * self.get_buffer("std0") + self.get_buffer("mean0")
        logps, first = [], None
        for i, member in enumerate(self.members):
            u = unit
            if self.channels[i] != u.shape[1]:  # 1 ↔ 3: only a gray store is fed to both (STORE_KEYS)
                u = u.expand(-1, 3, -1, -1) if self.channels[i] == 3 else u[:, :1]
            logits, emb = member((u - self.get_buffer(f"mean{i}")) / self.get_buffer(f"std{i}"))
            logps.append(logits.float().log_softmax(1))
            first = emb if first is None else first
        assert first is not None
        return torch.logsumexp(torch.stack(logps), 0) - math.log(len(logps)), first


def averaged(names: list[Path]) -> tuple[list[Loaded], Averaged]:
    """The member runs (``inference.load_run``, each checked as a run), after checking that they decode a
    file into the same stored image, and their :class:`Averaged` module."""
    runs = [load_run(m) for m in names]
    decoding = {k: runs[0].prep.get(k) for k in STORE_KEYS}
    for m, r in zip(names[1:], runs[1:], strict=True):
        if {k: r.prep.get(k) for k in STORE_KEYS} != decoding:  # one file must become one image for all
            raise DataError(
                f"{m} decodes images otherwise than {names[0]} (size, channels, colour, DICOM window or "
                "classes differ): one set of decoded images cannot serve both"
            )
    return runs, Averaged([r.model for r in runs], [r.prep for r in runs]).eval()


def load_model(run_dir: str | Path) -> Loaded:
    """A finished run (:func:`lowshot.inference.load_run`) or an ensemble (:func:`load_ensemble`) as
    one :class:`~lowshot.inference.Loaded`: what ``predict``, ``evaluate`` and ``export`` score with."""
    d = Path(run_dir)
    res_file = d / RESULTS
    if not res_file.is_file():
        raise DataError(f"{res_file} does not exist: RUN_DIR must be a finished finetune/train.py run")
    if json.loads(res_file.read_text()).get("job") == "ensemble":  # its members averaged in one module
        return load_ensemble(d)
    return load_run(d)


def load_ensemble(run_dir: Path) -> Loaded:
    """An ensemble written by :func:`combine` as one :class:`~lowshot.inference.Loaded` run: the
    members (each checked as ``inference.load_run`` checks a run, and all decoding a file into the same
    stored image) in one :class:`Averaged` module, the ensemble's own temperature and operating point
    (fitted on the averaged validation probabilities), and the first member's preprocessing, starting
    backbone and reference embeddings for "unlike the training data" (the members of one recipe share
    the starting backbone it is measured in). ``predict``, ``evaluate`` and ``export`` take it as a run."""
    d = Path(run_dir)
    runs, model = averaged(member_dirs(d))
    results = read_results(d)
    return replace(
        runs[0],
        model=model,
        classes=list(results["classes"]),
        temperature=float(results.get("calibration", {}).get("temperature", 1.0)),
        point=op.load_point(d),
        results=results,
    )
