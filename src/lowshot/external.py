"""``lowshot evaluate RUN_DIR data.source=OTHER``: external validation of a trained run.

Every image of OTHER (all its splits: none of it was seen in training or selection) is scored with the
run's own preprocessing, temperature and operating point, and gets every metric, CI, calibration and
figure of a test report. Before any number is believed:

- classes are matched by name (case-insensitive), or by ``--map OTHER_CLASS=MODEL_CLASS`` (several
  model classes, ``--map "normal, benign=benign+normal"``, are merged: their probabilities add up); a
  class of OTHER the model never saw is an error naming it and the fix;
- OTHER is checked for copies of the run's own images (exact, near and crop/resize copies, as
  ``lowshot check check.against``): a copy of a training image is not external evidence, so the metrics
  are given on all images and on the images without a copy in the run's train/val splits;
- the opening is recorded in OTHER's lockbox ledger (``lockbox/<name>-external-<digest>.jsonl``), so a
  later report can say how often that external set had been looked at.

The result folder looks like a train run (results.json with ``test`` = the external report,
predictions.npz, figures), so ``lowshot show``/``report`` read it; ``external`` holds the details and
``internal`` the run's own test report, printed side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import inference
from .config import Config, parse_args, to_yaml
from .data import DataError, Store, load_store
from .data.cache import save_npz_atomic, write_atomic
from .data.decode import to_channels
from .data.duplicates import store_thumbnails
from .data.guards import pool_copies
from .data.pool import Pool
from .ensemble import load_model
from .evaluation import calibration, classification_report, format_ci, with_temperature
from .figures import run_figures
from .lockbox import record_opening
from .operating_point import reweighted
from .run_folder import CONFIG, PREDICTIONS, write_results

# Settings evaluate takes: where OTHER is and how it is read; the model's settings are the run's.
ALLOWED = ("data.", "eval.bootstrap", "eval.ci", "eval.calibration_bins")
RUN_OWN = ("data.size", "data.color", "data.channels")  # the preprocessing: read from the run


def class_map(
    model: list[str], other: list[str], explicit: dict[str, list[str]]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Evaluation classes E, the (K, E) 0/1 matrix that sums model probabilities into them, and the (O,)
    evaluation class of each of OTHER's classes. ``explicit``: OTHER class → model classes."""
    lower = {m.lower(): m for m in model}
    if unknown := sorted(set(explicit) - set(other)):
        raise DataError(f"--map names {unknown}, which are not classes of the external set {other}")
    target: dict[str, list[str]] = {}
    for o in other:
        if o in explicit:
            names = explicit[o]
            if bad := [n for n in names if n not in model]:
                raise DataError(f"--map {o}={'+'.join(names)}: {bad} are not the model's classes {model}")
            target[o] = names
        elif o.strip().lower() in lower:
            target[o] = [lower[o.strip().lower()]]
        else:
            raise DataError(
                f"the external set has class {o!r}, which the model never saw (its classes: {model}). Map it: "
                f"--map '{o}=MODEL_CLASS' (or MODEL_CLASS+MODEL_CLASS to merge), or leave those images out"
            )
    group: dict[str, str] = {}  # model class → merged evaluation class
    for o, names in target.items():
        if len(names) > 1:
            for n in names:
                if n in group and group[n] != o:
                    raise DataError(f"--map puts model class {n!r} into two merged classes ({group[n]}, {o})")
                group[n] = o
    classes: list[str] = []
    for m in model:
        e = group.get(m, m)
        if e not in classes:
            classes.append(e)
    merge = np.zeros((len(model), len(classes)))
    for i, m in enumerate(model):
        merge[i, classes.index(group.get(m, m))] = 1.0
    labels = np.array([classes.index(group.get(target[o][0], target[o][0])) for o in other])
    return classes, merge, labels


def as_pool(store: Store) -> Pool:
    """A store's images as a Pool (what the copy check compares), every row."""
    hashes, digests = store.fingerprints()
    return Pool(store.images, store.paths, hashes, digests, store_thumbnails(store), [], [store.name])


def other_config(run: inference.Loaded, overrides: list[str]) -> Config:
    """The run's config with OTHER's data settings; the preprocessing stays the run's and the run's own
    subsetting (limit, label budget, folds) does not apply to OTHER unless given again."""
    for o in overrides:
        key = o.lstrip("-").split("=", 1)[0]
        if not key.startswith(ALLOWED) or key in RUN_OWN:
            raise DataError(
                f"{o}: evaluate takes where the external set is and how it is read ({', '.join(ALLOWED)}, "
                f"except {', '.join(RUN_OWN)}: the run's preprocessing); the model's settings are the run's"
            )
    base = replace(run.cfg.data, limit=0, train_per_class=0, folds=0, group_duplicates=False)
    with tempfile.TemporaryDirectory() as d:  # the run's resolved config < the command line
        path = Path(d) / CONFIG
        path.write_text(to_yaml(replace(run.cfg, data=base)))
        return parse_args(["--config", str(path), *overrides])[0]


def external_digest(store: Store) -> str:
    """SHA-1 of every image (native-pixel digests) and label of the external set."""
    h = hashlib.sha1("".join(map(str, store.fingerprints()[1])).encode())
    h.update(np.ascontiguousarray(store.labels).data)
    return h.hexdigest()[:16]


def evaluate(
    run_dir: Path, overrides: list[str], explicit: dict[str, list[str]], out: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Score every image of the external set; write the report folder; returns it and results.json."""
    run = load_model(run_dir)
    cfg = other_config(run, overrides)
    other = load_store(cfg.data)
    other.images = to_channels(other.images, run.prep["store_channels"])
    classes, merge, label_of = class_map(run.classes, other.classes, explicit)
    y = label_of[other.labels]
    scores = inference.score(run, other.images)
    prob = scores["prob_raw"] @ merge
    at_point = reweighted(scores["prob_raw"], run.point["weights"]) @ merge
    ec = cfg.eval
    report = classification_report(y, prob, classes, ec.bootstrap, ec.ci, cfg.seed)
    at = classification_report(y, at_point, classes, ec.bootstrap, ec.ci, cfg.seed)
    absent = [c for i, c in enumerate(classes) if not (y == i).any()]

    # copies of the run's own images: those are not external evidence
    try:
        own = load_store(run.cfg.data)
        own.images = to_channels(own.images, run.prep["store_channels"])
        pairs, cut = pool_copies(as_pool(other), own, run.cfg, ("train", "val", "test"))
        copy_check: dict[str, Any] = {"run": True, **cut.record()}
    except DataError as err:
        pairs, copy_check = [], {"run": False, "why": str(err)}
    seen = {p["pool_row"] for p in pairs if p["split"] in ("train", "val")}
    copy_check |= {
        "pairs": len(pairs),
        "by_split": {
            s: len({p["pool_row"] for p in pairs if p["split"] == s}) for s in ("train", "val", "test")
        },
        "external_images_with_a_copy_in_train_or_val": len(seen),
        "examples": pairs[:20],
    }
    clean = np.setdiff1d(np.arange(len(y)), sorted(seen))
    on_clean = (
        classification_report(y[clean], prob[clean], classes, ec.bootstrap, ec.ci, cfg.seed)
        if seen and len(clean) and len(np.unique(y[clean])) > 1
        else None
    )
    out = (
        Path(out)
        if out is not None
        else Path(run_dir) / f"external-{other.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    ledger = record_opening(
        cfg.data,
        f"{other.name}-external-{external_digest(other)}",
        {"run": str(Path(run_dir).resolve()), "job": "evaluate", "setting": str(Path(run_dir).resolve())},
    )
    t = run.temperature
    internal = run.results
    results = {
        "job": "evaluate",
        "data": other.name,
        "classes": classes,
        "model": internal["model"],
        "weights": internal["weights"],
        "selected": internal["selected"],
        "val": internal["val"],  # the run's own validation report (what the model was chosen on)
        "test": report,
        "test_at_point": at,
        # the run's point; its positive class named as the evaluation class it falls in (merged or not)
        "operating_point": {
            **run.point,
            "positive": classes[int(merge[run.classes.index(run.point["positive"])].argmax())],
            "model_positive": run.point["positive"],
        },
        "calibration": {
            "test": calibration(y, prob, ec.calibration_bins),
            "temperature": t,
            "test_scaled": calibration(y, with_temperature(prob, t), ec.calibration_bins),
        },
        "external": {
            "run": str(Path(run_dir).resolve()),
            "source": str(cfg.data.source),
            "n": len(y),
            "skipped_files": len(other.skipped),
            "class_map": {o: classes[int(label_of[i])] for i, o in enumerate(other.classes)},
            "absent_classes": absent,
            "copies": copy_check,
            "without_copies": on_clean,
            "lockbox": ledger,
            "unlike_training": {
                "flagged_at_95th_percentile": int((scores["percentile"] >= inference.OOD_PERCENTILE).sum()),
                "median_percentile": float(np.median(scores["percentile"])) if len(y) else float("nan"),
            },
        },
        "internal": {k: internal[k] for k in ("test", "test_at_point") if k in internal},
    }
    write_results(out, results)
    saved = np.load(Path(run_dir) / PREDICTIONS)
    save_npz_atomic(
        out / PREDICTIONS,
        val_prob=saved["val_prob"] @ merge,
        val_y=label_of_model(saved["val_y"], merge),
        test_prob=prob,
        test_y=y,
        test_path=other.paths.astype(str),
        test_distance_percentile=scores["percentile"],
    )
    write_atomic(out / CONFIG, (Path(run_dir) / CONFIG).read_text())
    run_figures(out)
    return out, results


def label_of_model(y: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """The run's own labels (model classes) as evaluation classes."""
    return np.asarray(merge.argmax(1)[np.asarray(y, dtype=int)])


def format_side_by_side(results: dict[str, Any]) -> str:
    """Internal test and external metrics with their CIs, one line each, and what limits the external."""
    ext, internal = results["external"], results["internal"].get("test")
    lines = [
        f"EXTERNAL validation of {ext['run']} on {results['data']} ({ext['n']} images; classes {ext['class_map']})",
        f"  {'metric':<18} {'internal test':>24} {'external':>24}"
        + ("  external, no copies" if ext["without_copies"] else ""),
    ]
    for m in ("auroc", "accuracy", "balanced_accuracy", "macro_f1", "ece", "brier"):
        cells = []
        for rep in (internal, results["test"], ext["without_copies"]):
            if rep is None:
                continue
            r = rep["metrics"][m]
            cells.append(format_ci(r))
        if internal is None:
            cells.insert(0, "–")
        lines.append(f"  {m:<18} " + " ".join(f"{c:>24}" for c in cells))
    pt, ba = results["operating_point"], "balanced_accuracy"
    cells = [
        format_ci(r["metrics"][ba])
        for r in (results["internal"].get("test_at_point"), results["test_at_point"])
        if r is not None
    ]
    lines.append(f"  {'bal. acc at point':<18} " + " ".join(f"{c:>24}" for c in cells) + f"  ({pt['rule']})")
    c = ext["copies"]
    if not c["run"]:
        lines.append(f"  copy check not run (the run's data are not reachable: {c['why']})")
    elif c["external_images_with_a_copy_in_train_or_val"]:
        lines.append(
            f"  WARNING: {c['external_images_with_a_copy_in_train_or_val']} of {ext['n']} external images are copies "
            f"of the run's own training/validation images {c['by_split']}: those are not external evidence"
        )
    else:
        lines.append(f"  copy check: no external image is a copy of the run's images ({c['by_split']})")
    if ext["absent_classes"]:
        lines.append(
            f"  classes absent from the external set: {ext['absent_classes']} (their sensitivity is undefined)"
        )
    u = ext["unlike_training"]
    lines.append(
        f"  unlike the training data: {u['flagged_at_95th_percentile']} of {ext['n']} above the 95th percentile of "
        f"familiar images (median percentile {u['median_percentile']:.0f})"
    )
    lines.append(
        f"  external set opened {ext['lockbox']['opened_before'] + 1} time(s) (ledger {ext['lockbox']['ledger']})"
    )
    return "\n".join(lines)


def evaluate_command(argv: list[str]) -> Path:
    """``lowshot evaluate RUN_DIR data.source=OTHER [data.root=...] [--map O=M[+M]] [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="lowshot evaluate", description="external validation of a train run")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--map", action="append", default=[], metavar="OTHER_CLASS=MODEL_CLASS[+MODEL_CLASS]")
    ap.add_argument("--out", type=Path, help="folder to write (default: RUN_DIR/external-<name>-<time>)")
    args, overrides = ap.parse_known_args(argv)
    explicit = {}
    for m in args.map:
        if "=" not in m:
            raise DataError(f"--map {m}: write OTHER_CLASS=MODEL_CLASS (or MODEL_CLASS+MODEL_CLASS to merge)")
        o, _, t = m.rpartition("=")
        explicit[o.strip()] = [x.strip() for x in t.split("+")]
    if not any(o.lstrip("-").startswith("data.source=") for o in overrides):
        raise DataError(
            "lowshot evaluate needs the external set: data.source=OTHER (and data.root= if elsewhere)"
        )
    out, results = evaluate(args.run_dir, overrides, explicit, args.out)
    print(format_side_by_side(results))
    print(f"wrote {out}/ (results.json, predictions.npz, roc.png, confusion.png, reliability.png)")
    return out
