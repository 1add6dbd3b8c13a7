"""The linear probe: one estimator for ``--probe``, the quickstart's verdict and the label-efficiency tables.

Multinomial logistic regression (L-BFGS) on frozen embeddings, on features standardised with statistics
that need no label: the mean and standard deviation of every image the probe sees without labels (the
training split, labelled or not, and the validation split; never the sealed test split), each standard
deviation floored at ``FLOOR`` times their median. So the normalisation does not depend on how many
images happen to be labelled. Fitted on the K labelled images alone, a feature that is near-constant among
them (standard deviation 0.00022 over 20 chest X-rays, median 0.45) was blown up thousands of times on the
validation and test images: val AUROC 0.58 where the same embeddings gave 0.96 (issue 38). Measured against
the alternatives (the labelled-image scaler, raw features, SimpleShot's CL2N) on the three shared sets at
1-20 labels per class and all: bench/results/probe_features/table.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .data import DataError
from .data.cache import save_safetensors_atomic
from .evaluation import auroc

# Each feature's standard deviation is at least this fraction of the median one. A feature nearly constant
# over every label-free image (a ReLU unit that rarely fires) would otherwise be scaled far above the rest:
# what varies in it is noise, and a few labelled images can make that noise look predictive.
FLOOR = 0.1


def label_free_scaler(x_free: np.ndarray) -> StandardScaler:
    """A ``StandardScaler`` (mean_, scale_) fitted on ``x_free`` (M, D), the embeddings of the images seen
    without labels, with scale_ floored at FLOOR x its median (a zero median: floored at 1, sklearn's value
    for a constant feature)."""
    scaler = StandardScaler().fit(x_free)
    median = float(np.median(scaler.scale_))
    scaler.scale_ = np.maximum(scaler.scale_, FLOOR * median if median > 0 else 1.0)
    return scaler


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cs: list[float],
    seed: int = 0,
    x_free: np.ndarray | None = None,
) -> tuple[Pipeline, float, list[dict[str, float]]]:
    """Logistic regression on frozen features, L2 strength chosen on validation.

    x_*: (N, D) embeddings; y_*: (N,) labels; ``x_free`` (M, D): the embeddings the normalisation is
    fitted on, which needs no label (default: the training and validation rows). For each inverse strength
    C in ``cs`` a probe is fitted on train and scored on val by AUROC (ties → the stronger regularisation,
    the smaller C). Returns the selected fitted pipeline (scaler, regression), its C, and the validation
    curve ``[{"C", "val_auroc", "val_accuracy"}, ...]``."""
    scaler = label_free_scaler(np.concatenate([x_train, x_val]) if x_free is None else x_free)
    z_train, z_val = scaler.transform(x_train), scaler.transform(x_val)
    curve = []
    best: tuple[float, LogisticRegression, float] | None = None
    for c in sorted(cs):
        lr = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z_train, y_train)
        prob = lr.predict_proba(z_val)
        score = auroc(y_val, prob)
        score = -1.0 if math.isnan(score) else score
        curve.append({"C": c, "val_auroc": score, "val_accuracy": float((prob.argmax(1) == y_val).mean())})
        if best is None or score > best[0] + 1e-12:
            best = (score, lr, c)
    assert best is not None, "probe_cs is empty"
    if best[0] == -1.0:  # every C's validation AUROC undefined: nothing can be selected, nor the test opened
        absent = sorted(set(np.unique(y_train).tolist()) - set(np.unique(y_val).tolist()))
        raise DataError(
            f"the validation split has no image of class {absent or '(every class but one)'}, so no probe strength "
            "can be chosen on it and the test split stays sealed; give every class validation images (a larger "
            "data.val_fraction, or a split column in the manifest)"
        )
    return make_pipeline(scaler, best[1]), best[2], curve


def save_probe(clf: Pipeline, path: Path, backbone_weights: str) -> Path:
    """The fitted probe as plain arrays (``probe.safetensors``: standardise with ``mean``/``scale``, then
    logits = x @ coef.T + intercept), what predict, the ONNX and the timm export read back;
    ``backbone_weights``: the fingerprint of the backbone it was fitted on (checked when it is loaded)."""
    scaler, lr = clf[0], clf[-1]
    arrays = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": lr.coef_, "intercept": lr.intercept_}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in arrays.items()}
    return save_safetensors_atomic(path, tensors, {"backbone_weights": backbone_weights})
