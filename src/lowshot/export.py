"""``lowshot export RUN_DIR``: a trained run's selected model for people who do not run lowshot.

Two formats, both written beside the run's decisions (``preprocessing.json``, ``operating_point.json``,
``calibration.json`` with the validation temperature, ``reference.safetensors`` for the "unlike the
training data" score) and a ``parity.json`` that states how far the exported model is from lowshot's own:

- ``onnx``: ``model.onnx``, input ``image`` (B, C, S, S) float32 already normalised (preprocessing.json),
  outputs ``logits`` (B, K) and ``embedding`` (B, D); checked through onnxruntime on the run's own
  validation images (the maximum absolute difference of the logits and probabilities is stated). A
  fine-tune also gets ``detector.onnx``: its frozen starting backbone, image → ``embedding``, the
  embedding ``reference.safetensors`` holds (a probe's ``model.onnx`` embedding is already that one).
- ``timm``: ``model.safetensors`` + ``config.json`` in timm's layout, so that
  ``timm.create_model(architecture, num_classes=K, in_chans=C, **model_args)`` and ``load_state_dict``
  give the classifier (a probe's standardise + logistic regression folded into timm's classifier layer).

An ensemble (``lowshot ensemble``) exports as one ONNX graph with the same input and outputs as one run
(``ensemble.Averaged``: ``logits`` = log of the members' averaged probabilities), the first member's
preprocessing, reference and starting backbone, and the ensemble's own temperature and operating point.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ensemble, inference
from . import operating_point as op
from .data import DataError, load_store
from .data.cache import save_safetensors_atomic, write_atomic
from .models import WeightsError, build_timm

FORMATS = ("onnx", "timm")


def parity_images(run: inference.Loaded, n: int = 64) -> tuple[np.ndarray, str]:
    """Up to ``n`` of the run's validation images as its store decoded them (the data must be reachable
    through the run's data.root); random images, said so, where they are not."""
    try:
        store = load_store(run.cfg.data)
        rows = store.indices("val")[:n]
        return store.images[rows], f"{len(rows)} validation images of {store.name}"
    except DataError as err:
        shape = (n, run.prep["size"], run.prep["size"], run.prep["store_channels"])
        why = str(err).split(".")[0]
        return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), f"{n} random images ({why})"


def to_onnx(
    module: torch.nn.Module,
    path: Path,
    example: torch.Tensor,
    outputs: tuple[str, ...] = ("logits", "embedding"),
) -> None:
    """``module`` (the Deployed model, or a fine-tune's frozen starting backbone) to ONNX (opset 17,
    dynamic batch), written with temp + rename.

    The TorchScript-based exporter: it needs only the ``onnx`` package (the torch.export-based one also
    needs onnxscript) and handles timm's convolutional and transformer backbones."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise WeightsError("--format onnx needs the onnx package: pip install 'lowshot[export]'") from None
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings about shape asserts
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=["image"],
            output_names=list(outputs),
            dynamic_axes={n: {0: "batch"} for n in ("image", *outputs)},
            opset_version=17,
        )
    tmp.replace(path)


def onnx_parity(path: Path, x: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How far onnxruntime's logits (and probabilities) are from torch's on the same input."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise WeightsError("the ONNX parity check needs onnxruntime: pip install 'lowshot[export]'") from None

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return differences(torch.from_numpy(sess.run(["logits"], {"image": x.numpy()})[0]), logits)


def differences(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Max |difference| of two (N, K) logit tensors and of their softmax probabilities."""
    return {
        "max_abs_logit_diff": float((got - want).abs().max()),
        "max_abs_prob_diff": float((got.softmax(1) - want.softmax(1)).abs().max()),
    }


def to_timm(run: inference.Loaded, out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """timm's own model with the run's classifier in its classifier layer, and timm's config.json."""
    mc = run.cfg.model
    if not isinstance(run.model, inference.Deployed):
        raise WeightsError(
            "an ensemble is several timm models, not one: export it with --format onnx (one graph that "
            "averages the members), or each member with --format timm"
        )
    if mc.small_input_stem or mc.name.startswith("lowshot_"):
        raise WeightsError(
            f"{mc.name}{' with model.small_input_stem' if mc.small_input_stem else ''} is not a plain timm "
            "architecture; export it with --format onnx"
        )
    k, c = len(run.classes), run.prep["in_chans"]
    full = build_timm(mc.name, run.cfg.data.size, pretrained=False, num_classes=k, in_chans=c, **mc.kwargs)
    missing, unexpected = full.load_state_dict(run.model.backbone.state_dict(), strict=False)
    clf = full.get_classifier()  # type: ignore[operator]
    ids = {id(p) for p in clf.parameters()}
    head_keys = {n for n, p in full.named_parameters() if id(p) in ids}
    if unexpected or not isinstance(clf, torch.nn.Linear) or set(missing) - head_keys:
        raise WeightsError(
            f"{mc.name}: the backbone does not map onto timm's classifier model ({missing[:4]})"
        )
    clf.weight.data.copy_(run.model.head.weight.data)
    clf.bias.data.copy_(run.model.head.bias.data)
    full.eval()
    # ViT-like models fix their position embeddings to the size they were built at (models.build_timm)
    takes_size = "img_size" in inspect.signature(type(full).__init__).parameters
    sized = {"img_size": run.cfg.data.size} if takes_size and "img_size" not in mc.kwargs else {}
    config = {
        "architecture": mc.name,
        "num_classes": k,
        "num_features": int(run.model.head.in_features),
        "model_args": {"in_chans": c, **mc.kwargs, **sized},
        "pretrained_cfg": {
            "input_size": [c, run.prep["size"], run.prep["size"]],
            "mean": run.prep["mean"],
            "std": run.prep["std"],
            "num_classes": k,
            "label_names": run.classes,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        },
    }
    save_safetensors_atomic(out / "model.safetensors", full.state_dict())
    write_atomic(out / "config.json", json.dumps(config, indent=2))
    return full, config


def export(run_dir: Path, fmt: str, out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``fmt`` (onnx | timm) of a finished run into ``out`` (default RUN_DIR/export-FMT); returns
    the folder and the parity record."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: choose one of {FORMATS}")
    run = ensemble.load_model(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / f"export-{fmt}"
    out.mkdir(parents=True, exist_ok=True)
    images, what = parity_images(run)
    x = inference.to_input(images, run.prep)
    with torch.no_grad():
        logits = run.model(x)[0]
    if fmt == "onnx":
        to_onnx(run.model, out / "model.onnx", x[:2])
        diff = onnx_parity(out / "model.onnx", x, logits)
        if run.detector is not None:  # a fine-tune: the "unlike the training data" embedding is its start's
            to_onnx(run.detector, out / "detector.onnx", x[:2], ("embedding",))
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out / "detector.onnx"), providers=["CPUExecutionProvider"])
            with torch.no_grad():
                want = run.detector(x)
            got = torch.from_numpy(sess.run(["embedding"], {"image": x.numpy()})[0])
            diff["detector_max_abs_embedding_diff"] = float((got - want).abs().max())
    else:
        full, _ = to_timm(run, out)
        with torch.no_grad():
            diff = differences(full(x), logits)
    members = ensemble.member_dirs(run_dir) if ensemble.is_ensemble(run_dir) else []
    parity: dict[str, Any] = {
        "format": fmt,
        "inputs": what,
        **diff,
        "reference": f"lowshot.{type(run.model).__module__.split('.')[-1]}.{type(run.model).__name__} "
        "(torch, fp32)",
    }
    if members:
        parity["members"] = [str(m) for m in members]
    # an ensemble's input and "unlike the training data" reference are its first member's
    home = members[0] if members else Path(run_dir)
    for name in (inference.PREPROCESSING, inference.REFERENCE):
        shutil.copyfile(home / name, out / name)
    shutil.copyfile(Path(run_dir) / op.FILE, out / op.FILE)
    write_atomic(out / "calibration.json", json.dumps({"temperature": run.temperature}, indent=2))
    write_atomic(out / "parity.json", json.dumps(parity, indent=2))
    return out, parity
