"""Datasets, DataLoaders and transforms over a store (the per-image path; lowshot.augment is the batched one)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms as T

from .store import Store


class StoreDataset(Dataset):
    """Images of a store as PIL images through ``transform``; items are ``(transform(img), label)``.

    ``rgb=True`` replicates grayscale to 3 channels (data.channels=replicate); ``False`` keeps 1.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any], rgb: bool
    ):
        self.images, self.labels, self.transform, self.rgb = images, labels, transform, rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        a = self.images[i]
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        if self.rgb and im.mode == "L":
            im = im.convert("RGB")
        return self.transform(im), int(self.labels[i])


def balanced_draw_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) per-item draw weights 1 / n_class(item): drawn with replacement, every class equally often."""
    return 1.0 / np.bincount(labels)[labels]


def resolve_workers(num_workers: int) -> int:
    """data.num_workers=-1 picks: 0 on CPU (the cores are busy with the model), else the CPU cores per
    local process less one, at most 8."""
    if num_workers >= 0:
        return num_workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(0, (os.cpu_count() or 1) // local - 1)) if torch.cuda.is_available() else 0


def make_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int,
    train: bool,
    balance: np.ndarray | None = None,
) -> DataLoader:
    """Shuffled, last partial batch dropped, for training; in order and complete for evaluation.

    ``balance``: (N,) labels to draw training items with replacement at probability 1 / (K n_class), so
    every class is drawn equally often in expectation. ``num_workers``: see ``resolve_workers``."""
    num_workers = resolve_workers(num_workers)
    sampler = None
    if balance is not None:
        sampler = WeightedRandomSampler(
            balanced_draw_weights(balance).tolist(), len(balance), replacement=True
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_sigterm,
    )


def _ignore_sigterm(worker_id: int) -> None:
    """A preemption's SIGTERM reaches the workers too (the process group, or the launcher's signal to the
    whole process tree); a worker that died of it would break the main process's step and the state it is
    about to save. The main process decides: it stops after that step and shuts its workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _cat(parts: list[Any]) -> Any:
    """Concatenate same-shaped nested tuples of tensors along the batch dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_cat([p[i] for p in parts]) for i in range(len(parts[0])))


class Rebatch:
    """Training batches assembled in the main process from ``per_batch`` chunks of a DataLoader, so each
    worker augments a chunk, not a whole batch. With whole batches per worker, batch 256 and ~1000 images,
    only ~4 workers ever hold one and the rest idle (issue #6 measured 199 pairs/s on 15 workers against
    954 with 16-image chunks). Call ``prepare`` instead of ``accelerator.prepare`` (it shards the chunks
    over processes)."""

    def __init__(self, loader: DataLoader, per_batch: int) -> None:
        self.loader, self.per_batch = loader, per_batch
        self.batch_size = (loader.batch_size or 1) * per_batch

    def prepare(self, accelerator: Any) -> Rebatch:
        self.loader = accelerator.prepare(self.loader)
        return self

    def __len__(self) -> int:
        return len(self.loader) // self.per_batch

    def __iter__(self) -> Any:
        parts: list[Any] = []
        for chunk in self.loader:
            parts.append(chunk)
            if len(parts) == self.per_batch:
                yield _cat(parts) if self.per_batch > 1 else parts[0]
                parts = []


def train_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int,
    balance: np.ndarray | None = None,
) -> Rebatch:
    """A training loader that keeps every worker busy. Each worker prefetches 2 batches; when an epoch
    has fewer than 2 batches per worker (many workers, few images, big batches), each batch is split
    into one chunk per worker (the largest divisor of the batch not above the worker count), joined
    again by ``Rebatch``. With enough batches, whole batches per worker: on 2 cores chunks measured no
    faster (711-729 vs 788-1,032 pairs/s at 64 px), so the split is kept for where it helps."""
    workers = resolve_workers(num_workers)
    per = 1
    if workers > 1 and len(ds) // batch_size < 2 * workers:  # type: ignore[arg-type]
        per = max(k for k in range(1, workers + 1) if batch_size % k == 0)
    return Rebatch(make_loader(ds, batch_size // per, workers, True, balance), per)


def store_loader(
    store: Store,
    rows: np.ndarray,
    transform: Callable[[Image.Image], Any],
    rgb: bool,
    num_workers: int,
    batch_size: int = 256,
) -> DataLoader:
    """An evaluation loader (in order, complete) over the given store rows."""
    return make_loader(
        StoreDataset(store.images[rows], store.labels[rows], transform, rgb), batch_size, num_workers, False
    )


def split_loader(
    store: Store,
    split: str | tuple[str, ...],
    transform: Callable[[Image.Image], Any],
    rgb: bool,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """An evaluation loader (in order, complete) over one split (or a tuple of splits) of the store."""
    idx = store.indices(*((split,) if isinstance(split, str) else split))
    return store_loader(store, idx, transform, rgb, num_workers, batch_size)


def split_train_loader(
    store: Store,
    split: str | tuple[str, ...],
    transform: Callable[[Image.Image], Any],
    rgb: bool,
    batch_size: int,
    num_workers: int,
    processes: int = 1,
    balance: bool = False,
) -> Rebatch:
    """A training loader over one split (or a tuple of splits): shuffled (or class-balanced draws), full
    batches, in per-worker chunks (``train_loader``). The batch shrinks to the images each of
    ``processes`` gets, so dropping the last partial batch still leaves a step."""
    idx = store.indices(*((split,) if isinstance(split, str) else split))
    batch_size = max(1, min(batch_size, len(idx) // processes))
    ds = StoreDataset(store.images[idx], store.labels[idx], transform, rgb)
    return train_loader(ds, batch_size, num_workers, store.labels[idx] if balance else None)


def normalisation(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> dict[str, list[float]]:
    """Model mean/std for ``channels`` input channels (1: the mean of the RGB values)."""
    if channels == 1:
        return {"mean": [float(np.mean(mean))], "std": [float(np.mean(std))]}
    return {"mean": list(mean), "std": list(std)}


def eval_transform(norm: dict[str, list[float]]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL → (C, H, W) float tensor, normalised; no augmentation (the store is at working size)."""
    return T.Compose([T.ToTensor(), T.Normalize(norm["mean"], norm["std"])])
