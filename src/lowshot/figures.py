"""A finished run's figures: learning curves (or a probe's selection curve), ROC with a bootstrap band,
confusion matrix and reliability diagram (before and after the temperature), drawn from its run folder
into PNGs (``finetune/train.py`` at the end of a run, ``lowshot report``, ``lowshot evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from .run_folder import PREDICTIONS, RESULTS, read_run, scored


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), imported where a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_figures(run_dir: Path, dest: Path | None = None) -> dict[str, Path]:
    """Draw a finished train run's figures into ``dest`` (default: the run directory); {name: path}.
    Runs without predictions (pretraining, few-shot) give none."""
    run_dir = Path(run_dir)
    if not (run_dir / PREDICTIONS).is_file() or not (run_dir / RESULTS).is_file():
        return {}
    run = read_run(run_dir)
    dest = Path(dest or run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out = {
        "learning_curves": plot_learning_curves(run, dest / "learning_curves.png"),
        "roc": plot_roc(run, dest / "roc.png"),
        "confusion": plot_confusion(run, dest / "confusion.png"),
        "reliability": plot_reliability(run, dest / "reliability.png"),
    }
    return {k: v for k, v in out.items() if v is not None}


def plot_learning_curves(run: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    res, rows = run["results"], [r for r in run["metrics"] if "epoch" in r]
    if res.get("curve"):  # a probe: validation AUROC against the inverse L2 strength C
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        c = [p["C"] for p in res["curve"]]
        ax.semilogx(c, [p["val_auroc"] for p in res["curve"]], "o-", label="val AUROC")
        ax.semilogx(c, [p["val_accuracy"] for p in res["curve"]], "s--", label="val accuracy")
        ax.axvline(res["selected"]["C"], color="gray", ls=":", label=f"selected C={res['selected']['C']:g}")
        ax.set(xlabel="C (inverse L2 strength)", ylabel="validation score", title="probe selection")
        ax.legend(fontsize=8)
    elif rows:
        ep = [r["epoch"] for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
        series = (
            ("train/loss", "train loss (augmented, train mode)", "C0", "--"),
            ("train/loss_clean", "train loss (clean, eval mode)", "C0", "-"),
            ("val/loss", "val loss", "C1", "-"),
        )
        for key, label, color, ls in series:
            if key in rows[0]:
                axes[0].plot(ep, [r[key] for r in rows], color=color, ls=ls, label=label)
        for key, label, color, ls in (
            ("train/accuracy_augmented", "train acc (augmented)", "C0", "--"),
            ("train/accuracy_clean", "train acc (clean)", "C0", "-"),
            ("val/accuracy", "val acc", "C1", "-"),
            ("val/auroc", "val AUROC", "C2", "-"),
        ):
            if key in rows[0]:
                axes[1].plot(ep, [r[key] for r in rows], color=color, ls=ls, label=label)
        for ax, name in zip(axes, ("loss (cross-entropy)", "score"), strict=True):
            ax.axvline(res["selected"]["epoch"], color="gray", ls=":", label="selected epoch")
            ax.set(xlabel="epoch", ylabel=name)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
    else:
        return None
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def roc_band(
    y: np.ndarray, score: np.ndarray, n_boot: int = 500, ci: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fpr grid (101,), tpr, low, high): the ROC interpolated on a grid and its percentile band over
    bootstrap resamples of the test images (resamples with one class are skipped)."""
    grid = np.linspace(0, 1, 101)
    fpr, tpr, _ = roc_curve(y, score)
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        f, t, _ = roc_curve(y[i], score[i])
        curves.append(np.interp(grid, f, t))
    lo, hi = np.quantile(np.array(curves), [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return grid, np.interp(grid, fpr, tpr), lo, hi


def plot_roc(run: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    p, classes, split = run["pred"], run["results"]["classes"], scored(run)
    y, prob = p[f"{split}_y"].astype(int), p[f"{split}_prob"]
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=100)
    shown = [1] if len(classes) == 2 else list(range(len(classes)))  # binary: the positive class only
    for c in shown:
        if len(np.unique(y == c)) < 2:  # no image of the class in the split (issue 41): no curve to draw
            continue
        grid, tpr, lo, hi = roc_band((y == c).astype(int), prob[:, c])
        (line,) = ax.plot(
            grid, tpr, label=f"{classes[c]} vs rest" if len(shown) > 1 else f"positive: {classes[c]}"
        )
        ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
    a = run["results"][split]["metrics"]["auroc"]
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{split} ROC, AUROC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(run: dict[str, Any], path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    split = scored(run)
    cm = np.array(run["results"][split]["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=100)
    ConfusionMatrixDisplay(cm, display_labels=[c[:14] for c in run["results"]["classes"]]).plot(
        ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title(f"{split} confusion matrix (n={cm.sum()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(run: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    cal = run["results"].get("calibration")
    if not cal:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=100)
    split = scored(run)
    for key, label, color in ((split, "as trained", "C0"), ("test_scaled", "temperature-scaled", "C1")):
        if key not in cal:
            continue
        b = cal[key]["bins"]
        extra = f", T={cal['temperature']:.2f}" if key == "test_scaled" else ""
        ax.plot(
            [r["confidence"] for r in b],
            [r["accuracy"] for r in b],
            "o-",
            color=color,
            label=f"{label}: ECE {cal[key]['ece']:.3f}{extra}",
        )
        for r in b:  # marker area ~ images in the bin: a dot of 2 images says little
            ax.scatter(r["confidence"], r["accuracy"], s=4 * r["n"], color=color, alpha=0.25)
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"{split} reliability (dot area = images in bin)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
