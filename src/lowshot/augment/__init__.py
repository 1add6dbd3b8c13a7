"""Augmentation, one home: per-image pipelines (:mod:`.views`), their batched twins on the device
(:mod:`.batched`), and the training loaders that choose between them (:mod:`.loaders`).

A new augmentation goes into both twins and its :class:`ViewSpec`; tests/test_augment.py holds the twins
to the same distributions of parameters and the same intensity statistics.
"""

from .batched import compiled_render, render, sample_params, views
from .loaders import (
    DeviceLoader,
    batched_loader,
    finetune_loader,
    pretraining_loader,
    use_batched,
    use_compile,
)
from .views import ViewSpec, simclr_spec, simclr_views, train_spec, train_transform

__all__ = [
    "DeviceLoader",
    "ViewSpec",
    "batched_loader",
    "compiled_render",
    "finetune_loader",
    "pretraining_loader",
    "render",
    "sample_params",
    "simclr_spec",
    "simclr_views",
    "train_spec",
    "train_transform",
    "use_batched",
    "use_compile",
    "views",
]
