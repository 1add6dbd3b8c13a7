"""Backbones from timm, their weights, and lowshot checkpoints.

A backbone is ``timm.create_model(name, num_classes=0)``: it maps (B, C, H, W) images to (B, D)
pooled features, D = ``backbone.num_features``. Weights come from one of four sources
(``model.weights``): ``none`` (random init), ``hub`` (timm ``pretrained=True``, online machines), a
local file (``.safetensors`` / ``.pth`` / ``.bin``, loaded by timm through
``pretrained_cfg_overlay=dict(file=...)``, which also adapts the stem to ``in_chans`` and drops the
classifier), or a lowshot checkpoint directory. Checkpoints are ``backbone.safetensors`` plus the
resolved ``config.yaml``; nothing is ever unpickled (timm reads ``.pth`` with ``weights_only=True``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .config import Config, ModelConfig, load_yaml, to_yaml
from .data import normalisation

CHECKPOINT_WEIGHTS = "backbone.safetensors"
CHECKPOINT_CONFIG = "config.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the model; the message says what to change."""


def weights_kind(weights: str) -> str:
    """'none' | 'hub' | 'checkpoint' | 'file' (for run tags)."""
    if weights in ("none", "hub"):
        return weights
    return "checkpoint" if Path(weights).expanduser().is_dir() else "file"


def create_backbone(cfg: ModelConfig, in_chans: int = 3, img_size: int | None = None) -> nn.Module:
    """A timm model without classifier, weights per ``cfg.weights``; forward gives (B, num_features)."""
    kwargs: dict[str, Any] = dict(
        num_classes=0,
        in_chans=in_chans,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        **cfg.kwargs,
    )
    kind = weights_kind(cfg.weights)
    if kind == "checkpoint":
        ckpt = Path(cfg.weights).expanduser()
        _check_checkpoint_fits(ckpt, cfg, in_chans)
        model = _create(cfg.name, img_size, pretrained=False, **kwargs)
        state = load_file(ckpt / CHECKPOINT_WEIGHTS)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise WeightsError(
                f"{ckpt / CHECKPOINT_WEIGHTS} does not fit {cfg.name}: {str(err)[:400]}"
            ) from None
        return model
    if kind == "file":
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"model.weights={cfg.weights}: no such file or lowshot checkpoint directory. Use none, hub, a "
                f"{'/'.join(WEIGHT_SUFFIXES)} file, or a run directory's checkpoint folder."
            )
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(
                f"{path}: unknown weights format {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}"
            )
        try:
            return _create(
                cfg.name, img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
        except Exception as err:  # torch's weights_only unpickler refusing objects, shape mismatches, ...
            raise WeightsError(
                f"cannot load {path} into {cfg.name}: {type(err).__name__}: {str(err)[:400]}"
            ) from None
    try:
        return _create(cfg.name, img_size, pretrained=kind == "hub", **kwargs)
    except RuntimeError as err:
        if kind == "hub":
            raise WeightsError(
                f"could not fetch hub weights for {cfg.name} ({str(err)[:200]}). Offline, download the weights "
                f"elsewhere and pass model.weights=PATH (.safetensors or .pth)."
            ) from None
        raise


def _create(name: str, img_size: int | None, **kwargs: Any) -> nn.Module:
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise WeightsError(
            f"model.name={name} is not a timm model" + (f"; similar: {close}" if close else "")
        )
    if img_size is not None and "img_size" not in kwargs:
        # ViT-like models fix their position embeddings to img_size; conv nets reject the keyword.
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


def _check_checkpoint_fits(ckpt: Path, cfg: ModelConfig, in_chans: int) -> None:
    if not (ckpt / CHECKPOINT_WEIGHTS).is_file():
        raise WeightsError(
            f"{ckpt} is a directory but holds no {CHECKPOINT_WEIGHTS}; point model.weights at a lowshot checkpoint"
        )
    if (ckpt / CHECKPOINT_CONFIG).is_file():
        saved = load_yaml(ckpt / CHECKPOINT_CONFIG)
        if saved.model.name != cfg.name:
            raise WeightsError(
                f"{ckpt} holds a {saved.model.name} backbone; set model.name={saved.model.name}"
            )
        meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
        if meta.get("in_chans", in_chans) != in_chans:
            raise WeightsError(
                f"{ckpt} was trained with {meta['in_chans']} input channel(s), this run feeds {in_chans}; "
                f"set data.channels={'single' if meta['in_chans'] == 1 else 'replicate'}"
            )


def backbone_for(cfg: Config, grayscale: bool) -> tuple[nn.Module, int, dict[str, list[float]]]:
    """The run's backbone for a store, its input channel count and its input normalisation.

    Grayscale data feed 1 channel with ``data.channels=single`` (timm adapts the stem), else the
    gray channel is replicated to 3. Mean/std come from timm's ``resolve_model_data_config``.
    """
    in_chans = 1 if grayscale and cfg.data.channels == "single" else 3
    backbone = create_backbone(cfg.model, in_chans, cfg.data.size)
    dc = timm.data.resolve_model_data_config(backbone)
    return backbone, in_chans, normalisation(tuple(dc["mean"]), tuple(dc["std"]), in_chans)


def save_checkpoint(directory: str | Path, backbone: nn.Module, cfg: Config, meta: dict[str, Any]) -> Path:
    """Write ``backbone.safetensors``, the resolved ``config.yaml`` and ``meta.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(state, str(d / CHECKPOINT_WEIGHTS), metadata={"model": cfg.model.name})
    (d / CHECKPOINT_CONFIG).write_text(to_yaml(cfg))
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    return d


@torch.no_grad()
def embed(
    backbone: nn.Module, loader: DataLoader, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every item of a prepared ``loader``: (N, D) float32 and (N,) labels, in loader order,
    gathered from all processes (``gather_for_metrics`` drops the padding of the last batch)."""
    was_training = backbone.training
    backbone.eval()  # eval mode: BatchNorm uses its running statistics and does not update them
    feats, labels = [], []
    for x, y in loader:
        with accelerator.autocast():
            f = backbone(x)
        f, y = accelerator.gather_for_metrics((f.float(), y))
        feats.append(f.cpu())
        labels.append(y.cpu())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
