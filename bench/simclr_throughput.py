"""SimCLR throughput in image pairs per second: lowshot's pipelines against a lightly-example-style
pipeline and the compute bound, in one run, on one device.

    python bench/simclr_throughput.py                                   # CPU here: 64 px, resnet18
    python bench/simclr_throughput.py --size 224 --batch 256 --workers 15 --models resnet18 resnet50 --compile

Pipelines (each timed on the views alone, "data", and with a SimCLR training step, "end to end"):
  compute            synthetic view tensors already on the device: the most the model can take
                     (on a GPU: bf16 and fp16 autocast, channels_last, and with --compile torch.compile)
  lightly-style      PNG files → PIL → lightly SimCLRTransform on DataLoader workers (lightly's examples)
  lowshot per-image  decode-once uint8 store → PIL → the same SimCLRTransform on workers, through
                     lowshot.data.train_loader (a chunk of every batch per worker where whole batches
                     would leave workers idle)
  lowshot batched    uint8 store on the device → lowshot.augment: both views of a batch in one batched
                     pass (same distributions as SimCLRTransform; what ssl/pretrain.py uses on a GPU),
                     compiled where data.augment_compile=auto compiles it (a GPU); "lowshot batched
                     eager" / "compiled" is the other one. On a GPU it also runs end to end with each
                     faster model setting (fp16, compile).
Worker-fed pipelines run --slow-steps timed steps (data-bound at ~200 pairs/s on an H100, 20 steps of
256 would take half a minute each). Each row is written as soon as it is measured; a row that fails is
recorded with its error instead of stopping the run.
Writes bench/results/simclr_throughput/<device>.{json,md}.
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

from lowshot.augment import DeviceLoader, simclr_spec, simclr_views, use_compile
from lowshot.config import AugConfig, DataConfig, SSLConfig
from lowshot.data import StoreDataset, load_store, normalisation, train_loader
from lowshot.methods import SimCLR

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-root", default=os.environ.get("LOWSHOT_DATA_ROOT", "../shared/data"))
p.add_argument("--source", default="busi", help="a class-per-folder PNG directory under --data-root")
p.add_argument("--size", type=int, default=64)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
p.add_argument("--slow-steps", type=int, default=0, help="timed steps of worker-fed pipelines (0: --steps)")
p.add_argument("--data-steps", type=int, default=0, help="timed steps of the views-only rows (0: --steps)")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--models", nargs="+", default=["resnet18"])
p.add_argument("--compile", action="store_true", help="also time torch.compile of the model")
p.add_argument("--out", default="bench/results/simclr_throughput")
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
spec = simclr_spec(AugConfig(), args.size, grayscale=False, norm=norm)
t0 = time.perf_counter()
store = load_store(DataConfig(root=args.data_root, source=args.source, size=args.size, color="rgb"))
decode_s = time.perf_counter() - t0
print(
    f"{store.describe()} (store ready in {decode_s:.1f} s) | device {device} | workers {args.workers}",
    flush=True,
)
dev_name = (
    torch.cuda.get_device_name()
    if cuda
    else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
)
# GIT_SHA first: the lent GPU machine gets a copy of the working tree whose .git may name an older commit
sha = os.environ.get("GIT_SHA") or (
    subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    or "unknown"
)
meta = {
    "device": dev_name,
    "precision": "bf16 autocast (fp16: fp16 autocast + grad scaler), channels_last" if cuda else "fp32",
    "command": " ".join([Path(sys.executable).name, *sys.argv]),
    "git_sha": sha,
    "data": f"{folder} ({len(store.labels)} PNGs), store decoded in {decode_s:.1f} s",
    "size": args.size,
    "batch": args.batch,
    "workers": args.workers,
    "steps": args.steps,
    "data_steps": args.data_steps or args.steps,
    "slow_steps": args.slow_steps or args.steps,
    "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    "date": time.strftime("%Y-%m-%d"),
}
tag = "cuda-" + "-".join(dev_name.lower().split()) if cuda else "cpu"
out = Path(args.out)
rows: list[dict] = []


def write() -> None:
    """The table so far, as JSON and markdown (rewritten after every row)."""
    bound: dict[str, float] = {}
    for r in rows:
        if r["pipeline"].startswith("compute") and not r["error"]:
            bound[r["model"]] = max(bound.get(r["model"], 0.0), r["pairs_per_s"])
    for r in rows:
        r["of_compute_bound"] = r["pairs_per_s"] / bound[r["model"]] if r["model"] in bound else None
    table = ["| model | pipeline | measure | pairs/s | of best compute bound |", "|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['of_compute_bound']:.2f}" if r["of_compute_bound"] is not None else ""
        name = r["pipeline"] + (f" (failed: {r['error']})" if r["error"] else "")
        table.append(f"| {r['model']} | {name} | {r['measure']} | {r['pairs_per_s']:.1f} | {frac} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [f"# SimCLR throughput on {dev_name}", "", *[f"- {k}: {v}" for k, v in meta.items()], "", *table, ""]
    (out / f"{tag}.md").write_text("\n".join(md))


def record(model: str, pipeline: str, measure: str, measure_fn) -> None:
    """Measure one row and write the table; an error is recorded and the run goes on."""
    try:
        pairs, error = measure_fn(), ""
    except Exception as e:  # one failed variant (a compile error, say) must not lose the other rows
        pairs, error = float("nan"), f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    rows.append(
        {"model": model, "pipeline": pipeline, "measure": measure, "pairs_per_s": pairs, "error": error}
    )
    print(f"{model:<10} {pipeline:<30} {measure:<10} {pairs:9.1f} pairs/s {error}", flush=True)
    write()


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


def batches_from(dl):
    """Endless (view0, view1) batches on the device."""
    for (x0, x1), _ in itertools.chain.from_iterable(itertools.repeat(dl)):
        yield x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)


def device_batches(compile: bool):
    """Endless (view0, view1) batches of lowshot's batched augmentation, as ssl/pretrain.py makes them
    (channels_last on a GPU)."""
    dl = DeviceLoader(
        torch.from_numpy(store.images),
        torch.from_numpy(store.labels),
        spec,
        args.batch,
        device,
        torch.Generator(device).manual_seed(0),
        compile=compile,
        channels_last=cuda,
    )
    for (x0, x1), _ in itertools.chain.from_iterable(itertools.repeat(dl)):
        yield x0, x1


def timed(batches, step=None, steps: int = args.steps) -> float:
    """Pairs per second over ``steps`` batches after args.warmup."""
    for _ in range(args.warmup):
        b = next(batches)
        step(*b) if step else None
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        b = next(batches)
        step(*b) if step else None
    sync()
    return args.batch * steps / (time.perf_counter() - t)


slow = args.slow_steps or args.steps
default_compiled = use_compile("auto", device)  # what ssl/pretrain.py does on this device
pipelines = {
    "lightly-style": (
        lambda: batches_from(
            loader(ImageFolder(str(folder), transform=SimCLRTransform(input_size=args.size, normalize=norm)))
        ),
        slow,
    ),
    "lowshot per-image": (  # lowshot's training loader (chunks per worker where whole batches idle some)
        lambda: batches_from(
            train_loader(StoreDataset(store.images, store.labels, views, True), args.batch, args.workers)
        ),
        slow,
    ),
    "lowshot batched": (lambda: device_batches(default_compiled), args.steps),
    f"lowshot batched {'eager' if default_compiled else 'compiled'}": (
        lambda: device_batches(not default_compiled),
        args.steps,
    ),
}
for name, (make, n) in pipelines.items():
    n = args.data_steps or n
    record("-", name, "data", lambda make=make, n=n: timed(make(), None, n))

for model_name in args.models:
    backbone = timm.create_model(model_name, num_classes=0)
    model = SimCLR(
        backbone, backbone.num_features, SSLConfig(proj_hidden_dim=2048, proj_dim=128, temperature=0.2)
    ).to(device, memory_format=memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(
        x0: torch.Tensor, x1: torch.Tensor, m: torch.nn.Module = model, opt: torch.optim.Optimizer = opt
    ) -> None:
        with amp:
            loss = m(x0.contiguous(memory_format=memory_format), x1.contiguous(memory_format=memory_format))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    synth = tuple(  # two views, in the layout the model takes
        torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
            memory_format=memory_format
        )
        for _ in range(2)
    )
    settings = {"": step}
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

        settings[" fp16"] = step16
    if args.compile:
        compiled = torch.compile(model)
        settings["+compile"] = lambda a, b, c=compiled: step(a, b, c)
    for suffix, fn in settings.items():  # the compute bound of each model setting
        record(
            model_name,
            "compute" + suffix,
            "end to end",
            lambda fn=fn, synth=synth: timed(itertools.repeat(synth), fn),
        )
    for name, (make, n) in pipelines.items():  # every pipeline with the plain step (bf16 / CPU fp32)
        record(model_name, name, "end to end", lambda make=make, n=n: timed(make(), step, n))
    for suffix, fn in list(settings.items())[1:]:  # lowshot's default pipeline with the faster settings
        record(
            model_name,
            "lowshot batched" + suffix,
            "end to end",
            lambda fn=fn: timed(pipelines["lowshot batched"][0](), fn),
        )

print("\n".join((out / f"{tag}.md").read_text().splitlines()[-len(rows) - 2 :]))
print(f"wrote {out / f'{tag}.md'}")
