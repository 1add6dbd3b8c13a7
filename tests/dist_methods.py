"""Run by tests/test_methods.py twice: under `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=1) and as one
plain process. Every SSL method trains 3 steps on a fixed global batch of 16 pairs, each process on its
share, through Accelerate (DDP), with a BatchNorm-free MLP backbone so that only the methods' own
cross-image terms can differ (the heads' BatchNorm layers are taken out, see without_batchnorm). Prints one JSON line from the main process: per method the mean loss of
each step, and digests of what must not depend on the process count (online and momentum weights, MoCo's
memory bank, DINO's centre), plus whether those are identical on every process.
"""

import json

import torch
from accelerate import Accelerator
from torch import nn

from lowshot.config import SSLConfig
from lowshot.methods import METHODS

accelerator = Accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)) for _ in range(3)]
mine = slice(rank * 16 // world, (rank + 1) * 16 // world)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that must be equal whatever the process count."""
    out = {"online": torch.cat([p.detach().flatten() for p in model.backbone.parameters()])}
    if hasattr(model, "backbone_m"):
        out["momentum"] = torch.cat([p.detach().flatten() for p in model.backbone_m.parameters()])
    if hasattr(model.criterion, "memory_bank") and model.criterion.memory_bank.size[0]:
        out["bank"] = model.criterion.memory_bank.bank.detach().flatten()
    if hasattr(model.criterion, "center"):
        out["center"] = model.criterion.center.detach().flatten()
    return out


def without_batchnorm(model: nn.Module) -> nn.Module:
    """The heads' BatchNorm layers replaced by identities: per-process BatchNorm statistics (CPU processes
    have no SyncBatchNorm; ssl/pretrain.py syncs them on GPUs) would differ from one process's anyway, and
    this test is about the methods' own cross-image terms."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm1d):
            setattr(model, name, nn.Identity())
        else:
            without_batchnorm(child)
    return model


results = {}
for name, cls in METHODS.items():
    torch.manual_seed(0)  # the same initial weights (and random bank) on every process
    s = SSLConfig(
        method=name, proj_hidden_dim=16, proj_dim=8, memory_bank=64, wide_dim=16, dino_prototypes=32
    )
    model = without_batchnorm(cls(nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12)), 12, s))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    losses = []
    for step, (x0, x1) in enumerate(batches):
        loss = model(x0[mine], x1[mine])
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        accelerator.unwrap_model(model).after_step(step, len(batches))
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
    state = state_of(accelerator.unwrap_model(model))
    same = all(bool((accelerator.gather(t[None]) == t).all()) for t in state.values())
    results[name] = {
        "losses": losses,
        "same_on_every_process": same,
        **{k: t.double().tolist()[:64] for k, t in state.items()},
    }
if accelerator.is_main_process:
    print(json.dumps({"world_size": world, "distributed": str(accelerator.distributed_type), **results}))
