"""``lowshot predict``: score image files (folders, files, CSV manifests) with a finished run or an
ensemble, one CSV row per file (class probabilities at the run's temperature, the decision at its
operating point, how unlike the training images each is), and say what was scored and what was not.
Reading and scoring are :mod:`lowshot.inference`'s."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import inference
from .data import IMAGE_SUFFIXES, DataError
from .ensemble import load_model


def predict_files(
    run_dir: Path, inputs: list[str], out: Path | None, flag_at: float, batch_size: int
) -> Path:
    """Score image files (folders, files, CSV manifests) with a run's selected model: one CSV row per file."""
    run = load_model(run_dir)  # an ensemble loads as one module: its members averaged
    files, labels = inference.expand_inputs(list(inputs))
    if not files:
        raise DataError(
            f"no image files in {' '.join(map(str, inputs))} ({'/'.join(sorted(IMAGE_SUFFIXES))})"
        )
    images, kept, bad = inference.read_images(files, run.prep)
    if not kept:  # nothing to score is a failed call, not "0 of N" with exit 0
        shown = "; ".join(f"{f}: {why}" for f, why in bad[:3])
        raise DataError(f"none of the {len(files)} file(s) given could be read as an image ({shown})")
    run.model.to("cuda" if torch.cuda.is_available() else "cpu")
    scores = inference.score(run, images, batch_size)
    rows = inference.predictions_table(run, files, labels, scores, kept, bad, flag_at)
    out = out or Path(run_dir) / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    inference.write_csv(rows, out)
    counts = {c: sum(r.get("predicted") == c for r in rows) for c in run.classes}
    flagged = sum(bool(r.get("unlike_training")) for r in rows)
    rule = run.point["rule"] + (
        f", P({run.point['positive']}) >= {run.point['threshold']:.3f}" if "threshold" in run.point else ""
    )
    print(
        f"scored {len(kept)} of {len(files)} images with {run_dir} (operating point: {rule}; T={run.temperature:.2f})"
    )
    print(f"  predicted: {counts}")
    print(
        f"  unlike the training data (distance above the {flag_at:g}th percentile of familiar images'): "
        f"{flagged} of {len(kept)}"
    )
    for f, why in bad[:10]:
        print(f"  not scored: {f}: {why}")
    if len(bad) > 10:
        print(f"  ... and {len(bad) - 10} more unreadable files (the CSV lists all)")
    print(f"wrote {out}")
    return out
