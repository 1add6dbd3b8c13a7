"""SimCLR throughput in image pairs per second: lowshot's pipelines against a lightly-example-style
pipeline and the compute bound, in one run, on one device.

    python bench/simclr_throughput.py                                   # CPU here: 64 px, resnet18
    python bench/simclr_throughput.py --size 224 --batch 256 --workers 15 --models resnet18 resnet50 --compile

Pipelines (each timed on the views alone, "data", and with a SimCLR training step, "end to end"):
  compute            synthetic view tensors already on the device: the most the model can take
                     (on a GPU: bf16 and fp16 autocast, channels_last, and with --compile torch.compile)
  lightly-style      PNG files → PIL → lightly SimCLRTransform on DataLoader workers (lightly's examples)
  lowshot per-image  decode-once uint8 store → PIL → the same SimCLRTransform on workers
  lowshot batched    uint8 store on the device → lowshot.augment: both views of a batch in one batched
                     pass (same distributions as SimCLRTransform; what ssl/pretrain.py uses on a GPU)
Writes bench/results/simclr_throughput-<device>.{json,md}.
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from lightly.transforms import SimCLRTransform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from lowshot.augment import DeviceLoader, simclr_spec
from lowshot.config import AugConfig, DataConfig
from lowshot.data import StoreDataset, load_store, normalisation
from lowshot.methods import SimCLR, simclr_views

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-root", default=os.environ.get("LOWSHOT_DATA_ROOT", "../shared/data"))
p.add_argument("--source", default="busi", help="a class-per-folder PNG directory under --data-root")
p.add_argument("--size", type=int, default=64)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--models", nargs="+", default=["resnet18"])
p.add_argument("--compile", action="store_true", help="also time torch.compile on the compute bound")
p.add_argument("--out", default="bench/results")
args = p.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = device.type == "cuda"
amp = (
    torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
)  # fp32 on CPU
memory_format = torch.channels_last if cuda else torch.contiguous_format
folder = Path(args.data_root) / args.source
norm = normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)
views = simclr_views(AugConfig(), args.size, grayscale=False, norm=norm)
t0 = time.perf_counter()
store = load_store(DataConfig(root=args.data_root, source=args.source, size=args.size, color="rgb"))
decode_s = time.perf_counter() - t0
print(
    f"{store.describe()} (store ready in {decode_s:.1f} s) | device {device} | workers {args.workers}",
    flush=True,
)


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


def loader(ds: torch.utils.data.Dataset) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=cuda,
    )


def batches_from(dl: DataLoader):
    """Endless (view0, view1) batches on the device."""
    for (x0, x1), _ in itertools.chain.from_iterable(itertools.repeat(dl)):
        yield x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)


device_loader = DeviceLoader(
    torch.from_numpy(store.images),
    torch.from_numpy(store.labels),
    simclr_spec(AugConfig(), args.size, grayscale=False, norm=norm),
    args.batch,
    device,
    torch.Generator(device).manual_seed(0),
)


def device_batches():
    """Endless (view0, view1) batches from lowshot's batched device augmentation."""
    for (x0, x1), _ in itertools.chain.from_iterable(itertools.repeat(device_loader)):
        yield x0, x1


def timed(batches, step=None) -> float:
    """Pairs per second over args.steps batches after args.warmup."""
    for _ in range(args.warmup):
        b = next(batches)
        step(*b) if step else None
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        b = next(batches)
        step(*b) if step else None
    sync()
    return args.batch * args.steps / (time.perf_counter() - t)


rows = []
pipelines = {
    "lightly-style": lambda: batches_from(
        loader(ImageFolder(str(folder), transform=SimCLRTransform(input_size=args.size, normalize=norm)))
    ),
    "lowshot per-image": lambda: batches_from(
        loader(StoreDataset(store.images, store.labels, views, rgb=True))
    ),
    "lowshot batched": device_batches,
}
for name, make in pipelines.items():
    pairs = timed(make())
    rows.append({"model": "-", "pipeline": name, "measure": "data", "pairs_per_s": pairs})
    print(f"data only      {name:<18} {pairs:9.1f} pairs/s", flush=True)

for model_name in args.models:
    backbone = timm.create_model(model_name, num_classes=0)
    model = SimCLR(backbone, backbone.num_features, 2048, 128, 0.2).to(device, memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(
        x0: torch.Tensor, x1: torch.Tensor, m: torch.nn.Module = model, opt: torch.optim.Optimizer = opt
    ) -> None:
        with amp:
            loss = m(x0.contiguous(memory_format=memory_format), x1.contiguous(memory_format=memory_format))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    synth = torch.randn(2, args.batch, 3, args.size, args.size, device=device)
    variants = {"compute": (itertools.repeat((synth[0], synth[1])), step)}
    if cuda:  # fp16 autocast with a gradient scaler, what accelerate does for mixed_precision=fp16
        scaler = torch.amp.GradScaler("cuda")

        def step16(
            x0: torch.Tensor,
            x1: torch.Tensor,
            m: torch.nn.Module = model,
            opt: torch.optim.Optimizer = opt,
            scaler: torch.amp.GradScaler = scaler,
        ) -> None:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = m(
                    x0.contiguous(memory_format=memory_format), x1.contiguous(memory_format=memory_format)
                )
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        variants["compute fp16"] = (itertools.repeat((synth[0], synth[1])), step16)
    if args.compile:
        compiled = torch.compile(model)
        variants["compute+compile"] = (
            itertools.repeat((synth[0], synth[1])),
            lambda a, b, c=compiled: step(a, b, c),
        )
    for name, make in pipelines.items():
        variants[name] = (make(), step)
    for name, (batches, fn) in variants.items():
        pairs = timed(batches, fn)
        rows.append({"model": model_name, "pipeline": name, "measure": "end to end", "pairs_per_s": pairs})
        print(f"{model_name:<14} {name:<18} {pairs:9.1f} pairs/s", flush=True)

bound = {
    r["model"]: max(
        x["pairs_per_s"] for x in rows if x["model"] == r["model"] and x["pipeline"].startswith("compute")
    )
    for r in rows
    if r["model"] != "-"
}
for r in rows:
    r["of_compute_bound"] = r["pairs_per_s"] / bound[r["model"]] if r["model"] in bound else None

dev_name = (
    torch.cuda.get_device_name()
    if cuda
    else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
)
sha = (
    subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    or "unknown"
)
meta = {
    "device": dev_name,
    "precision": "bf16 autocast (compute fp16: fp16 autocast + grad scaler), channels_last"
    if cuda
    else "fp32",
    "command": " ".join([Path(sys.executable).name, *sys.argv]),
    "git_sha": sha,
    "data": f"{folder} ({len(store.labels)} PNGs), store decoded in {decode_s:.1f} s",
    "size": args.size,
    "batch": args.batch,
    "workers": args.workers,
    "steps": args.steps,
    "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    "date": time.strftime("%Y-%m-%d"),
}
table = ["| model | pipeline | measure | pairs/s | of compute bound |", "|---|---|---|---|---|"]
for r in rows:
    frac = f"{r['of_compute_bound']:.2f}" if r["of_compute_bound"] is not None else ""
    table.append(f"| {r['model']} | {r['pipeline']} | {r['measure']} | {r['pairs_per_s']:.1f} | {frac} |")
tag = "cuda-" + "-".join(dev_name.lower().split()) if cuda else "cpu"
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"simclr_throughput-{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
md = [f"# SimCLR throughput on {dev_name}", "", *[f"- {k}: {v}" for k, v in meta.items()], "", *table, ""]
(out / f"simclr_throughput-{tag}.md").write_text("\n".join(md))
print("\n".join(table))
print(f"wrote {out / f'simclr_throughput-{tag}.md'}")
