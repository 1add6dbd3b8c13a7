"""Self-supervised pretraining (SimCLR, MoCo, BYOL, VICReg, DINO) of any timm backbone, from scratch or
from any weights, on the training images and an unlabelled pool (ssl.unlabelled).

    accelerate launch ssl/pretrain.py [--config FILE.yaml] [key=value ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ssl/pretrain.py ...   # 2 CPU processes

Writes ``out_dir/<name>/checkpoint/`` (backbone.safetensors + config.yaml): pass that folder to
``finetune/train.py model.weights=...``. Labels are never used for training; the training and
validation labels only feed the online kNN monitor (training images as the bank, validation images as
queries), because the loss alone says little about the representation. The test split is never trained
on; its fingerprints are compared with the pool's, to keep copies of it out (check.pool_leakage).
"""

import sys
import time

import torch
from accelerate.utils import set_seed
from lightly.utils.benchmarking import knn_predict
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from lowshot.augment import pretraining_loader, use_batched
from lowshot.config import parse_args
from lowshot.data import eval_transform, load_store, split_loader
from lowshot.data.guards import leakage_guard, pool_guard, unlabelled_guard
from lowshot.data.pool import load_pool, pretraining_store
from lowshot.device import memory_format
from lowshot.errors import user_errors
from lowshot.guard import check_epoch, weight_norm
from lowshot.methods import build_method, negatives_per_anchor
from lowshot.models import backbone_for, embed, save_checkpoint, weights_fingerprint
from lowshot.optim import make_optimizer, warmup_cosine
from lowshot.resume import States
from lowshot.tracking import Run, make_accelerator, preflight

user_errors()
cfg, overrides = parse_args(sys.argv[1:])
preflight(cfg)  # output folder, weights, W&B: fail before any decoding
accelerator = make_accelerator(cfg)
set_seed(cfg.seed, device_specific=True)  # each process draws its own augmentations
with accelerator.main_process_first():  # the first process decodes and caches; the others read the cache
    store = load_store(cfg.data)
    pool = load_pool(cfg.ssl.unlabelled, cfg.data, store.images.shape[-1]) if cfg.ssl.unlabelled else None
leakage = leakage_guard(store, cfg)  # identical images in two splits: stop, warn or drop
unlabelled = unlabelled_guard(store, cfg)  # a label budget's leftovers are pretrained on: guarded as a pool
accelerator.print(store.describe())
pool_leakage: dict = {}
if pool is not None:  # copies of the val/test images in the pool: stop, warn or drop (check.pool_leakage)
    pool, pool_leakage = pool_guard(pool, store, cfg)
    accelerator.print(
        f"pool: {len(pool)} images from {', '.join(cfg.ssl.unlabelled)} ({len(pool.skipped)} unreadable, "
        f"{pool_leakage['pairs']} copies of val/test images: {pool_leakage['by_kind'] or 'none'})"
    )
ssl_set = pretraining_store(store, pool, cfg.ssl.use_train)  # all rows 'train'; labels unused
run = Run(accelerator, cfg, "pretrain", store.name, overrides)

# ---- model, views, data --------------------------------------------------------------------------------
backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
model = build_method(cfg, backbone)
rgb, plain, workers = in_chans == 3, eval_transform(norm), cfg.data.num_workers
# No labels: the training split, the images left unlabelled by data.train_per_class, the pool; two views
# of each, batched on the device or per image in DataLoader workers (data.augment_path).
loader = pretraining_loader(ssl_set, cfg, accelerator, in_chans, norm)
batched = use_batched(cfg.data.augment_path)
batch_size = loader.batch_size or 1
bank_loader = split_loader(store, "train", plain, rgb, 256, workers)  # kNN bank: un-augmented training images
val_loader = split_loader(store, "val", plain, rgb, 256, workers)

if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
    # BatchNorm statistics over the global batch, as SimCLR/BYOL/VICReg train (torch has no CPU SyncBatchNorm).
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
model = model.to(memory_format=memory_format(cfg.channels_last, accelerator.device))
optimizer = make_optimizer(model, cfg.ssl.optimizer, cfg.ssl.lr, cfg.ssl.weight_decay)
model, optimizer, bank_loader, val_loader = accelerator.prepare(model, optimizer, bank_loader, val_loader)
loader = loader.prepare(accelerator)  # shards the chunks over processes (the device loader: itself)
steps_per_epoch = len(loader)  # per process, after sharding
total_steps = cfg.ssl.steps or cfg.ssl.epochs * steps_per_epoch
epochs = -(-total_steps // steps_per_epoch)  # ssl.steps: the last epoch stops at the budget
scheduler = warmup_cosine(
    optimizer, cfg.ssl.warmup_epochs * steps_per_epoch, total_steps, cfg.ssl.min_lr_ratio
)
global_batch = batch_size * accelerator.num_processes
accelerator.print(
    f"{cfg.ssl.method}: {cfg.model.name} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M params, {in_chans} ch, "
    f"{cfg.data.size} px) | {accelerator.num_processes} process(es) on {accelerator.device}, precision {accelerator.mixed_precision} | "
    f"global batch {global_batch} → {negatives_per_anchor(cfg, global_batch)} negatives per anchor | {steps_per_epoch} steps/epoch, {total_steps} steps in {epochs} epochs | "
    f"views: {'batched on ' + str(accelerator.device) if batched else 'per image (PIL) in the DataLoader'}"
)


def knn_monitor() -> dict[str, float]:
    """Weighted kNN (Wu et al., 2018) of validation images against the training bank, cosine similarity."""
    unwrapped = accelerator.unwrap_model(model).encoder()
    bank, bank_y = embed(unwrapped, bank_loader, accelerator)
    val, val_y = embed(unwrapped, val_loader, accelerator)
    bank, val = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(val, dim=1)
    pred = knn_predict(
        val, bank.T.contiguous(), bank_y, store.num_classes, knn_k=cfg.ssl.knn_k, knn_t=cfg.ssl.knn_t
    )[:, 0]
    return {
        "knn/val_accuracy": float((pred == val_y).float().mean()),
        "knn/val_balanced_accuracy": float(balanced_accuracy_score(val_y.numpy(), pred.numpy())),
    }


# ---- training ------------------------------------------------------------------------------------------
# Training states (every state.every_minutes, after the last epoch, on SIGTERM/SIGINT; lowshot.resume):
# a killed or preempted run continues with resume=auto, bit-identically.
states = States(accelerator, run, cfg.state, loader, scheduler)
states.extra = {"knn": {}, "start_norm": weight_norm(model)}  # the guard compares against the start norm
if run.plan.state is not None:
    states.restore(run.plan.state)
knn, start_norm = states.extra["knn"], states.extra["start_norm"]
for epoch in range(states.epoch, epochs):
    model.train()
    sums = states.sums or {"total": torch.zeros((), device=accelerator.device), "count": 0, "skipped": 0}
    total, count, skipped = sums["total"].to(accelerator.device), sums["count"], sums["skipped"]
    done = states.position
    t0, data_time = time.perf_counter(), 0.0
    t_data = time.perf_counter()
    for (x0, x1), _ in tqdm(
        states.batches(epoch),
        desc=f"epoch {epoch + 1}/{epochs}",
        total=min(len(loader), total_steps - epoch * steps_per_epoch),
        initial=done,
        disable=not accelerator.is_local_main_process,
        leave=False,
    ):
        data_time += time.perf_counter() - t_data
        loss = model(x0, x1)
        accelerator.backward(loss)
        optimizer.step()
        skipped += accelerator.optimizer_step_was_skipped  # fp16: the grad scaler skipped an overflow step
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # momentum copies follow (MoCo, BYOL, DINO); a state is saved on state.every_steps or a signal
        accelerator.unwrap_model(model).after_step(states.step, total_steps)
        total += loss.detach()
        count += 1
        states.after_step({"total": total, "count": count, "skipped": skipped})
        t_data = time.perf_counter()
        if states.step >= total_steps:  # ssl.steps reached inside the last epoch
            break
    epoch_time = time.perf_counter() - t0
    metrics = {
        "epoch": epoch + 1,
        "train/loss": float(accelerator.reduce(total / max(count, 1), reduction="mean")),
        "lr": scheduler.get_last_lr()[0],
        "train/skipped_steps": skipped,
        "pairs_per_s": global_batch * (count - done) / epoch_time,
        "data_time_frac": data_time / epoch_time,
    }
    where = f"pretraining epoch {epoch + 1}/{epochs}"
    check_epoch(metrics["train/loss"], model, start_norm, where, metrics["lr"], "ssl.lr")
    if cfg.ssl.knn_every and ((epoch + 1) % cfg.ssl.knn_every == 0 or epoch + 1 == epochs):
        knn = knn_monitor()
        metrics.update(knn)
    run.log(metrics, step=states.step)
    accelerator.print(
        " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    )
    states.extra |= {"knn": knn, "metrics": metrics}
    states.end_epoch(epochs)

# ---- save ----------------------------------------------------------------------------------------------
metrics = states.extra["metrics"]  # the last epoch's (also when a continued run had no epoch left)
accelerator.wait_for_everyone()
ckpt = run.dir / "checkpoint"
if accelerator.is_main_process:
    save_checkpoint(
        ckpt,
        accelerator.unwrap_model(model).encoder(),
        cfg,
        {
            "in_chans": in_chans,
            "epochs": epochs,
            "steps": total_steps,
            "method": cfg.ssl.method,
            # where pretraining started (continued pretraining from ImageNet or a checkpoint, or scratch)
            "started_from": {
                "weights": cfg.model.weights,
                "fingerprint": weights_fingerprint(cfg.model.weights),
            },
            "pretrained_on": {
                "images": len(ssl_set.labels),
                "labelled_train": cfg.ssl.use_train,
                "pool": cfg.ssl.unlabelled,
            },
            **run.meta,
        },
    )
    run.log_model([ckpt], "backbone", ckpt / "backbone.safetensors")  # W&B: what fine-tunes will use
run.finish(
    {
        "job": "pretrain",
        "method": cfg.ssl.method,
        "data": store.name,
        "splits": store.split_digests(),  # which images each split held
        "model": cfg.model.name,
        "checkpoint": str(ckpt),
        "final_loss": metrics["train/loss"],
        "world_size": accelerator.num_processes,
        "global_batch": global_batch,
        "steps": total_steps,  # optimizer steps per process (ssl.steps, or ssl.epochs x steps_per_epoch)
        "steps_per_epoch": steps_per_epoch,
        "negatives_per_anchor": negatives_per_anchor(cfg, global_batch),
        "augment_path": "batched" if batched else "per_image",
        **knn,
        "leakage": leakage,
        "pool_leakage": pool_leakage,
        "unlabelled_leakage": unlabelled,  # copies of val/test among the images a label budget left unlabelled
        "pretrain_images": len(ssl_set.labels),
        "started_from": cfg.model.weights,
    }
)
accelerator.print(
    f"checkpoint: {ckpt}  (next: accelerate launch finetune/train.py --probe model.weights={ckpt})"
)
