"""A trained run as a model in use: its exact preprocessing, its classifier, and how unlike its training
images a new image is.

``finetune/train.py`` writes, beside ``results.json``:

- ``preprocessing.json``: what turns an image file into the model's input, read from the run, never
  re-guessed: decode (``lowshot.data.decode_image``: 16-bit/float windows to 8 bits, alpha onto black,
  EXIF orientation), pad to a centred square with black, bicubic antialiased resize to ``size`` px,
  the store's channels (colour → ITU-R 601 luma for a gray store; gray replicated for an RGB one), then
  ``in_chans`` (gray replicated to 3 for ``data.channels=replicate``), /255, (x - mean) / std.
- ``reference.safetensors``: L2-normalised embeddings of the training images (N_train, D) by the
  *frozen starting backbone* (``model.weights``: what the probe used, what the fine-tune began from),
  and the distances that give the "unlike the training data" score its scale (deep nearest neighbours,
  Sun, Ming, Zhu & Li, ICML 2022: the cosine distance to the k-th nearest training embedding, read as a
  percentile of the validation images' distances to the training set and of the training images'
  leave-one-out distances). The starting backbone, not the fine-tuned one: fine-tuning on a few
  hundred images collapses the features onto the task, and its embeddings flagged 1-3% of fundus
  photographs as unlike breast ultrasound where the frozen ImageNet ones flagged 100%
  (bench/results/ood/table.md). A random-init run keeps its starting weights in ``detector.safetensors``.
- the classifier: ``probe.safetensors`` (standardise, then a logistic regression, on the backbone
  named by ``model.weights``, checked by content) or ``checkpoint/`` (the fine-tuned backbone and head).

``load`` rebuilds any of them as one ``Deployed`` module, image (B, C, H, W) → (logits (B, K),
embedding (B, D)), and an ensemble (``lowshot ensemble``) as one module with the same inputs and outputs
(``ensemble.Averaged``); ``predict`` scores image files with the run's temperature (fitted on validation)
and operating point (chosen on validation), and ``lowshot export`` writes the same module to ONNX.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import operating_point as op
from .config import Config, load_yaml
from .data import DataError, Store, decode_image, eval_transform, square_resize, store_loader
from .data.cache import save_safetensors_atomic, write_atomic
from .data.decode import UNREADABLE, to_channels, unreadable
from .evaluation import with_temperature
from .models import WeightsError, cached_embeddings, create_backbone, embed, weights_fingerprint, weights_kind
from .run_folder import CONFIG, RESULTS

PREPROCESSING = "preprocessing.json"
REFERENCE = "reference.safetensors"
PROBE = "probe.safetensors"
DETECTOR = "detector.safetensors"  # the starting backbone of a random-init run (others: model.weights)
# k of the k-th nearest training embedding (bench/results/ood/table.md compares k = 1, 5, 10).
OOD_K = 5
# An image is flagged "unlike the training data" when its distance exceeds this percentile of the familiar
# images' distances (validation images to the training set, training images leave-one-out): about 5% of
# images like them are flagged.
OOD_PERCENTILE = 95.0


def preprocessing(cfg: Config, store: Store, in_chans: int, norm: dict[str, list[float]]) -> dict[str, Any]:
    """The run's input pipeline as plain values (see the module docstring for the order of steps)."""
    return {
        "format": 1,
        "size": cfg.data.size,
        "store_channels": int(store.images.shape[-1]),
        "in_chans": in_chans,
        "mean": norm["mean"],
        "std": norm["std"],
        "color": cfg.data.color,
        "pad": "centred square, black",
        "resize": "bicubic, antialiased (PIL)",
        "dicom": [cfg.data.dicom_window, cfg.data.dicom_frames],
        "classes": store.classes,
    }


def to_input(images: np.ndarray, prep: dict[str, Any]) -> torch.Tensor:
    """(N, S, S, C_store) uint8 → (N, in_chans, S, S) float32, normalised: the same arithmetic as the
    training evaluation (torchvision's ToTensor then Normalize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
    if prep["in_chans"] == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(prep["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(prep["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def read_image(path: Path, prep: dict[str, Any]) -> np.ndarray:
    """One file → (S, S, C_store) uint8, exactly as the run's store decoded its images."""
    dicom = tuple(prep.get("dicom", ("auto", "middle")))
    return conform(decode_image(path, 0, (dicom[0], dicom[1])), prep)


def conform(native: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """A decoded (H, W, C) uint8 image at any size → the run's (S, S, C_store): padded square, resized,
    the store's channels."""
    return to_channels(square_resize(native, prep["size"]), prep["store_channels"])


def read_images(
    paths: list[Path], prep: dict[str, Any]
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode ``paths``: (M, S, S, C) uint8 of the readable ones, their indices, and (file, reason) of
    the rest (listed, never fatal)."""
    images, kept, bad = [], [], []
    for i, f in enumerate(paths):
        try:
            images.append(read_image(f, prep))
            kept.append(i)
        except UNREADABLE as err:
            bad.append((str(f), unreadable(err)))
    shape = (0, prep["size"], prep["size"], prep["store_channels"])
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), kept, bad


def expand_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[str | None]]:
    """Files to score and their labels where known: a folder (every file below it but hidden ones: images
    by suffix, DICOM files with or without one, and the rest, which are then listed as not scored, never
    dropped unsaid), a CSV manifest (its ``path`` column, relative to the CSV, and ``label`` if present),
    or files. A path that does not exist stays in the list (it is reported as unreadable)."""
    files: list[Path] = []
    labels: list[str | None] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                f
                for f in item.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(item).parts)
            )
            files += found
            labels += [None] * len(found)
        elif item.suffix.lower() == ".csv":
            with open(item, newline="") as fh:
                reader = csv.DictReader(fh)
                if "path" not in (reader.fieldnames or []):
                    raise DataError(
                        f"{item}: a manifest to score needs a 'path' column; got {reader.fieldnames}"
                    )
                for row in reader:
                    p = Path(row["path"]).expanduser()
                    files.append(p if p.is_absolute() else item.parent / p)
                    labels.append((row.get("label") or "").strip() or None)
        else:
            files.append(item)
            labels.append(None)
    return files, labels


class Deployed(nn.Module):
    """The selected model of a run: normalised images (B, C, H, W) → (logits (B, K), embedding (B, D)).

    The embedding is the backbone's pooled feature, what the "unlike the training data" score uses."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.head(f), f


def probe_as_linear(arrays: dict[str, torch.Tensor]) -> nn.Linear:
    """The saved probe (standardise with mean/scale, then scikit-learn's logistic regression) folded into
    one linear layer (D → K) in float64 arithmetic: ((f - m) / s) W^T + b = f (W / s)^T + (b - (m / s) W^T).
    A binary probe has one logit z with P(class 1) = sigmoid(z) = softmax([0, z])[1], so it becomes two."""
    mean, scale = arrays["mean"].double(), arrays["scale"].double()
    coef, intercept = arrays["coef"].double(), arrays["intercept"].double()
    w = coef / scale
    b = intercept - (mean / scale) @ coef.T
    if w.shape[0] == 1:
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.float(), b.float()
    return lin


@dataclass
class Loaded:
    """A run ready to score images: the module, its preprocessing and the decisions fitted on validation."""

    model: nn.Module  # Deployed; an ensemble's: ensemble.Averaged (the same inputs and outputs)
    prep: dict[str, Any]
    classes: list[str]
    temperature: float  # 1.0 when the run fitted none
    point: dict[str, Any]
    reference: torch.Tensor  # (N_train, D) L2-normalised training embeddings (starting backbone)
    scale: np.ndarray  # sorted distances of familiar images: the percentile's yardstick
    k: int
    detector: nn.Module | None  # the frozen starting backbone; None: the model's own (a probe)
    cfg: Config
    results: dict[str, Any]


def load_run(run_dir: str | Path) -> Loaded:
    """A finished finetune/train.py run (probe or fine-tune) as a :class:`Loaded`; a clear error names
    the missing file and the fix. An ensemble folder is read by :func:`lowshot.ensemble.load_model`."""
    d = Path(run_dir)
    res_file = d / RESULTS
    if not res_file.is_file():
        raise DataError(f"{res_file} does not exist: RUN_DIR must be a finished finetune/train.py run")
    results = json.loads(res_file.read_text())
    if results.get("job") not in ("probe", "finetune"):
        raise DataError(
            f"{d} is a {results.get('job')} run; predict, evaluate and export take a finetune/train.py run "
            "or a `lowshot ensemble` of them"
        )
    for name in (PREPROCESSING, REFERENCE, op.FILE):
        if not (d / name).is_file():
            raise DataError(
                f"{d / name} is missing: the run was trained before lowshot wrote it; train it again"
            )
    cfg = load_yaml(d / CONFIG)
    prep = json.loads((d / PREPROCESSING).read_text())
    ref = load_file(d / REFERENCE)
    if results["job"] == "probe":
        # the backbone the probe was fitted on (its content is checked against the reference's below)
        backbone = starting_backbone(cfg, prep["in_chans"], d)
        head = probe_as_linear(load_file(d / PROBE))
    else:
        ckpt = d / "checkpoint"
        backbone = create_backbone(replace(cfg.model, weights=str(ckpt)), prep["in_chans"], cfg.data.size)
        state = load_file(ckpt / "head.safetensors")
        head = nn.Linear(state["1.weight"].shape[1], state["1.weight"].shape[0])
        head.load_state_dict({"weight": state["1.weight"], "bias": state["1.bias"]})
    model = Deployed(backbone, head).eval()
    with safe_open(str(d / REFERENCE), "pt") as fh:
        meta = fh.metadata() or {}
    k = int(meta.get("k", OOD_K))
    if meta.get("backbone_weights") not in (None, weights_fingerprint(cfg.model.weights)):
        raise WeightsError(  # the probe and the distances were made with other weights than that path holds
            f"{cfg.model.weights} (model.weights of {d}) no longer holds the weights the run used (content "
            f"{meta['backbone_weights']}). Restore them, or train again."
        )
    detector = None if results["job"] == "probe" else starting_backbone(cfg, prep["in_chans"], d).eval()
    return Loaded(
        model=model,
        prep=prep,
        classes=list(results["classes"]),
        temperature=float(results.get("calibration", {}).get("temperature", 1.0)),
        point=op.load_point(d),
        reference=ref["train"],
        scale=np.sort(np.concatenate([ref[n].numpy() for n in SCALE if n in ref])),
        k=k,
        detector=detector,
        cfg=cfg,
        results=results,
    )


def knn_distance(feats: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 4096) -> np.ndarray:
    """(N,) cosine distance of each row of ``feats`` (N, D) to its k-th nearest row of ``reference``
    (M, D, already L2-normalised); ``feats`` is normalised here."""
    f = nn.functional.normalize(feats.float(), dim=1)
    k = min(k, len(reference))
    out = [
        1.0 - (f[i : i + chunk] @ reference.T).topk(k, dim=1).values[:, -1] for i in range(0, len(f), chunk)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def loo_distance(train: torch.Tensor, k: int) -> np.ndarray:
    """(N,) each training embedding's distance to its k-th nearest *other* training embedding."""
    return knn_distance(train, train, k + 1)  # the nearest is itself, at distance 0


# The yardstick of the percentile: which familiar images' distances (bench/results/ood/table.md compares
# validation alone, training leave-one-out alone and both: the validation split alone is small, e.g. 78
# images, so its 95th percentile is its 4th largest distance).
SCALE = ("val_distance", "train_distance")


def write_reference(
    directory: Path, train_feats: torch.Tensor, val_feats: torch.Tensor, weights: str, k: int = OOD_K
) -> Path:
    """``reference.safetensors``: normalised training embeddings (N_train, D), the sorted distances of the
    validation embeddings (N_val, D) to them and the training embeddings' leave-one-out distances
    (temp + rename); ``weights``: the fingerprint of the backbone that made them."""
    train = nn.functional.normalize(train_feats.float(), dim=1).contiguous()
    val = torch.from_numpy(np.sort(knn_distance(val_feats, train, k)))
    loo = torch.from_numpy(np.sort(loo_distance(train, k)))
    meta = {"k": str(k), "backbone_weights": weights, "embedding": "frozen starting backbone (model.weights)"}
    arrays = {"train": train, "val_distance": val, "train_distance": loo}
    return save_safetensors_atomic(directory / REFERENCE, arrays, meta)


# What a run writes for `lowshot predict/evaluate/export` beside its classifier (a random-init run's detector too).
BUNDLE = (PREPROCESSING, op.FILE, REFERENCE, DETECTOR)


def write_bundle(
    run_dir: Path,
    cfg: Config,
    store: Store,
    in_chans: int,
    norm: dict[str, list[float]],
    point: dict[str, Any],
    reference: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """What :func:`load_run` reads back: the operating point and the exact preprocessing beside the model
    (and in a fine-tune's ``checkpoint/``), and the training embeddings that "unlike the training data" is
    measured against (``reference``: train and val embeddings of the starting backbone)."""
    prep = json.dumps(preprocessing(cfg, store, in_chans, norm), indent=2)
    for where in [run_dir] + ([] if cfg.train.probe else [run_dir / "checkpoint"]):
        op.save(point, where)
        write_atomic(where / PREPROCESSING, prep)
    write_reference(run_dir, *reference, weights_fingerprint(cfg.model.weights))


def starting_backbone(cfg: Config, in_chans: int, run_dir: Path) -> nn.Module:
    """The frozen backbone a run started from: ``model.weights`` again, or, for random init, the weights
    the run kept in ``detector.safetensors``."""
    net = create_backbone(cfg.model, in_chans, cfg.data.size)
    if weights_kind(cfg.model.weights) == "none":
        if not (run_dir / DETECTOR).is_file():
            raise DataError(
                f"{run_dir / DETECTOR} is missing: a random-init run keeps its starting weights there"
            )
        net.load_state_dict(load_file(run_dir / DETECTOR))
    return net


def save_detector(net: nn.Module, run_dir: Path) -> None:
    """Keep a random-init run's starting weights (``detector.safetensors``; temp + rename)."""
    save_safetensors_atomic(run_dir / DETECTOR, net.state_dict())


def reference_embeddings(
    cfg: Config, store: Store, in_chans: int, norm: dict[str, list[float]], accelerator: Any, run_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) embeddings of the store by the frozen starting backbone, through the embedding cache
    (the same extraction a probe of those weights makes) except for random init."""
    if weights_kind(cfg.model.weights) != "none":
        net = create_backbone(cfg.model, in_chans, cfg.data.size).requires_grad_(False)
        feats = cached_embeddings(cfg, store, net, in_chans, norm, accelerator)[0]
    else:  # random init: made again from the seed (the same on every process), and kept
        torch.manual_seed(cfg.seed)
        net = create_backbone(cfg.model, in_chans, cfg.data.size).requires_grad_(False)
        if accelerator.is_main_process:
            save_detector(net, run_dir)
        rows = np.arange(len(store.labels))
        loader = store_loader(store, rows, eval_transform(norm), in_chans == 3, cfg.data.num_workers)
        feats = embed(net.to(accelerator.device), accelerator.prepare(loader), accelerator)[0]
    tr, va = (torch.from_numpy(store.indices(s)) for s in ("train", "val"))
    return feats[tr], feats[va]


def percentile(distance: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N,) share (in %) of the familiar images' distances (sorted ``scale``) below each distance."""
    return 100.0 * np.searchsorted(scale, distance, side="left") / max(1, len(scale))


def decisions(run: Loaded, raw: np.ndarray) -> dict[str, np.ndarray]:
    """From softmax probabilities ``raw`` (N, K): themselves, after the run's temperature, and the
    decisions at its operating point and at argmax (N,)."""
    return {
        "prob_raw": raw,
        "prob": with_temperature(raw, run.temperature) if len(raw) else raw,
        "decision": op.decide(raw, run.point["weights"]) if len(raw) else np.zeros(0, int),
        "argmax": raw.argmax(1) if len(raw) else np.zeros(0, int),
    }


@torch.no_grad()
def score(run: Loaded, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Scores of (N, S, S, C) uint8 images: ``prob_raw`` (N, K), ``prob`` (temperature-scaled), the
    decisions at the operating point and at argmax (N,), and the starting backbone's embeddings with their
    ``distance`` to the training embeddings and its ``percentile``."""
    device = next(run.model.parameters()).device
    logits, feats, own = [], [], []
    bar = tqdm(total=len(images), desc="scoring", unit="image", leave=False, disable=len(images) < 512)
    for i in range(0, len(images), batch_size):
        bar.update(min(batch_size, len(images) - i))
        x = to_input(images[i : i + batch_size], run.prep).to(device)
        lo, f = run.model(x)
        logits.append(lo.float().cpu())
        own.append(f.float().cpu())
        feats.append(own[-1] if run.detector is None else run.detector.to(device)(x).float().cpu())
    bar.close()
    k = len(run.classes)
    logit = torch.cat(logits) if logits else torch.zeros(0, k)
    feat = torch.cat(feats) if feats else torch.zeros(0, run.reference.shape[1])
    raw = logit.softmax(1).numpy()
    dist = knn_distance(feat, run.reference, run.k)
    return {
        **decisions(run, raw),
        "distance": dist,
        "percentile": percentile(dist, run.scale),
        "embedding": feat.numpy(),  # the starting backbone's (what the distance is of)
        "model_embedding": (torch.cat(own) if own else torch.zeros(0, 1)).numpy(),  # the model's own
    }


def predictions_table(
    run: Loaded,
    files: list[Path],
    labels: list[str | None],
    scores: dict[str, np.ndarray],
    kept: list[int],
    bad: list[tuple[str, str]],
    flag_at: float = OOD_PERCENTILE,
) -> list[dict[str, Any]]:
    """One row per input file, in input order: scores of the readable ones, the reason for the rest."""
    rows: list[dict[str, Any]] = []
    at = {i: j for j, i in enumerate(kept)}
    why = dict(bad)
    for i, f in enumerate(files):
        row: dict[str, Any] = {"path": str(f)}
        if any(lab is not None for lab in labels):
            row["label"] = labels[i] or ""
        if i in at:
            j = at[i]
            row["predicted"] = run.classes[int(scores["decision"][j])]
            row["predicted_argmax"] = run.classes[int(scores["argmax"][j])]
            row |= {f"p_{c}": round(float(scores["prob"][j, c_i]), 6) for c_i, c in enumerate(run.classes)}
            row |= {
                f"p_raw_{c}": round(float(scores["prob_raw"][j, c_i]), 6) for c_i, c in enumerate(run.classes)
            }
            row["ood_distance"] = round(float(scores["distance"][j]), 6)
            row["ood_percentile"] = round(float(scores["percentile"][j]), 2)
            row["unlike_training"] = bool(scores["percentile"][j] >= flag_at)
            row["error"] = ""
        else:
            row["error"] = why.get(str(f), "not scored")
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as CSV (columns: the union, in first-seen order), written with temp + rename."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="")
    w.writeheader()
    w.writerows(rows)
    return write_atomic(path, buf.getvalue())
