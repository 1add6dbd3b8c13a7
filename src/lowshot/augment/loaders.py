"""The training loaders of both scripts, and the choice between the two augmentation paths: batched on the
device (:class:`DeviceLoader`, views by :mod:`.batched`) or per image in DataLoader workers (:mod:`.views`),
as ``data.augment_path`` says; ``ssl/pretrain.py`` and ``finetune/train.py`` each call one function here."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from ..config import Config
from ..data import Rebatch, Store, balanced_draw_weights, eval_transform, split_train_loader
from ..device import memory_format
from .batched import compiled_render, render, views
from .views import ViewSpec, simclr_spec, simclr_views, train_spec, train_transform

log = logging.getLogger(__name__)


class DeviceLoader:
    """Batches of augmented views drawn from a uint8 store that lives on the device (or, when it does not
    fit in a quarter of the free GPU memory, in pinned host memory, copied batch by batch).

    Each pass is one epoch: a permutation shared by all processes (seeded by ``seed`` and the epoch),
    this process's ``rank::world`` share of it, full batches only, from batch ``start`` on (0; a continued
    run sets ``epoch``, ``start`` and the generator's state). Yields ``((x0, x1), y)`` for
    ``n_views=2`` (SimCLR, like the DataLoader of lightly's transform) and ``(x, y)`` for 1; the
    augmentation draws from ``generator`` (seed it per process). ``balance`` draws items with
    replacement at 1 / (K n_class) instead of a permutation. ``compile``: render through
    ``compiled_render`` (falls back to eager, with a warning, if compiling fails); ``channels_last``:
    views in NHWC.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: ViewSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        seed: int = 0,
        n_views: int = 2,
        channels: int = 0,
        rank: int = 0,
        world: int = 1,
        balance: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        # (N, H, W, C) numpy layout → (N, C, H, W)
        images = images.permute(0, 3, 1, 2).contiguous() if images.shape[-1] in (1, 3) else images
        fits = device.type != "cuda" or images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0]
        self.images = images.to(device) if fits else images.pin_memory()
        self.labels = labels.to(self.images.device)
        self.spec, self.device, self.generator, self.seed = spec, device, generator, seed
        self.n_views, self.channels, self.rank, self.world = n_views, channels, rank, world
        self.batch_size = max(1, min(batch_size, len(images) // world))
        self.balance, self.epoch, self.channels_last = balance, 0, channels_last
        self.start = 0  # the batch the next pass begins at (a run continued inside an epoch; lowshot.resume)
        self.renderer = compiled_render() if compile else render
        self.compiled = compile  # until the first batch has gone through the compiler

    def __len__(self) -> int:
        return (len(self.images) // self.world) // self.batch_size

    def prepare(self, accelerator: Accelerator) -> DeviceLoader:
        """Nothing to do: the loader shards itself (one call shape with ``data.Rebatch``)."""
        return self

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.spec, self.generator, self.n_views, self.channels)
        if not self.compiled:
            return views(*args, self.renderer, self.channels_last)
        state = self.generator.get_state()
        try:
            out = views(*args, self.renderer, self.channels_last)
            self.compiled = False  # compiled once: later calls need no guard
            return out
        except Exception as e:  # an inductor/Triton failure must not stop a training run
            msg = f"torch.compile of the augmentation failed ({type(e).__name__}: {e}); eager instead"
            warnings.warn(msg, stacklevel=2)
            self.renderer, self.compiled = render, False
            self.generator.set_state(state)
            return views(*args, self.renderer, self.channels_last)

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # the same on every process
        self.epoch += 1
        n = len(self.images)
        if self.balance:
            weights = torch.from_numpy(balanced_draw_weights(self.labels.cpu().numpy())).float()
            order = torch.multinomial(weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        mine = order[self.rank :: self.world].to(self.images.device)
        start, self.start = self.start, 0
        for step in range(start, len(self)):
            idx = mine[step * self.batch_size : (step + 1) * self.batch_size]
            v = self._views(self.images[idx].to(self.device, non_blocking=True))
            y = self.labels[idx].to(self.device, non_blocking=True)
            yield (tuple(v.chunk(self.n_views)), y) if self.n_views > 1 else (v, y)


def use_batched(path: str) -> bool:
    """data.augment_path: "auto" is batched, on a GPU and on CPU alike (see DataConfig)."""
    return path != "per_image"


def use_compile(setting: str, device: torch.device) -> bool:
    """data.augment_compile: compiled on a GPU for "auto" (on CPU the compile takes longer than it saves
    in a short run; bench/simclr_throughput.py measures both)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def batched_loader(
    store: Store,
    splits: tuple[str, ...],
    spec: ViewSpec,
    batch_size: int,
    accelerator: Accelerator,
    cfg: Config,
    n_views: int,
    channels: int,
    balance: bool = False,
) -> DeviceLoader:
    """The training loader of the batched path over the store rows of ``splits`` for this process: a
    ``DeviceLoader``, each process drawing its own augmentations (generator seeded by cfg.seed and
    process index) from a shared permutation, compiled and laid out as ``cfg`` says
    (data.augment_compile, channels_last). On CPU it runs in the main process on all its threads: on 2
    cores that made views ~1.6x faster than rendering chunks in 2 single-threaded DataLoader workers
    (2,559 vs 1,585 pairs/s at 64 px, bench/simclr_throughput.py)."""
    rows = store.indices(*splits)
    rank, device = accelerator.process_index, accelerator.device
    images, labels = torch.from_numpy(store.images[rows]), torch.from_numpy(store.labels[rows])
    g = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    return DeviceLoader(
        images,
        labels,
        spec,
        batch_size,
        device,
        g,
        cfg.seed,
        n_views,
        channels,
        rank,
        accelerator.num_processes,
        balance,
        compile=use_compile(cfg.data.augment_compile, device),
        channels_last=memory_format(cfg.channels_last, device) == torch.channels_last,
    )


def pretraining_loader(
    store: Store, cfg: Config, accelerator: Accelerator, in_chans: int, norm: dict[str, list[float]]
) -> DeviceLoader | Rebatch:
    """Pairs of SimCLR views of the store's 'train' rows (the pretraining set: no labels), batched on the
    device (``data.augment_path`` auto/batched: both views of a batch in one augmentation) or per image."""
    loader: DeviceLoader | Rebatch
    if use_batched(cfg.data.augment_path):
        spec = simclr_spec(cfg.aug, cfg.data.size, store.grayscale, norm)
        loader = batched_loader(store, ("train",), spec, cfg.ssl.batch_size, accelerator, cfg, 2, in_chans)
    else:
        pipeline = simclr_views(cfg.aug, cfg.data.size, store.grayscale, norm)
        n, workers = accelerator.num_processes, cfg.data.num_workers
        loader = split_train_loader(
            store, "train", pipeline, in_chans == 3, cfg.ssl.batch_size, workers, processes=n
        )
    return said(loader, "ssl.batch_size", cfg.ssl.batch_size, accelerator.num_processes)


def finetune_loader(
    store: Store,
    cfg: Config,
    accelerator: Accelerator,
    in_chans: int,
    norm: dict[str, list[float]],
    balance: bool,
) -> DeviceLoader | Rebatch:
    """Augmented (``train.augment``) training images with their labels, shuffled or class-balanced draws
    (``balance``), batched on the device or per image as ``data.augment_path`` says; un-augmented images
    go through the per-image path."""
    tc = cfg.train
    loader: DeviceLoader | Rebatch
    if tc.augment and use_batched(cfg.data.augment_path):  # views made batched
        spec = train_spec(tc, cfg.data.size, norm)
        loader = batched_loader(
            store, ("train",), spec, tc.batch_size, accelerator, cfg, 1, in_chans, balance
        )
    else:
        aug: Callable[..., Any] = (
            train_transform(cfg.data.size, tc, norm) if tc.augment else eval_transform(norm)
        )
        n, workers = accelerator.num_processes, cfg.data.num_workers
        loader = split_train_loader(store, "train", aug, in_chans == 3, tc.batch_size, workers, n, balance)
    return said(loader, "train.batch_size", tc.batch_size, accelerator.num_processes)


def said(loader: DeviceLoader | Rebatch, key: str, asked: int, processes: int) -> DeviceLoader | Rebatch:
    """A batch larger than the images each process gets shrinks to them (a full batch is a step); the run
    says so, since config.yaml keeps the value asked for (issue 41)."""
    if (loader.batch_size or asked) < asked:
        log.warning(
            "%s=%d is more than the training images allow (%d process(es)): batches of %d are used",
            key,
            asked,
            processes,
            loader.batch_size,
        )
    return loader
