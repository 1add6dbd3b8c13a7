"""Run by tests/test_methods.py under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=1.

Each process holds its own half of a fixed batch of embeddings. With gather_distributed=True,
lightly's NT-Xent uses every process's embeddings as negatives, so the mean of the per-process losses
must equal the single-process loss on the whole batch, and differ from the loss on each half alone.
Prints one JSON line from the main process.
"""

import json

import torch
from accelerate import Accelerator
from lightly.loss import NTXentLoss

accelerator = Accelerator()
g = torch.Generator().manual_seed(0)
z0, z1 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
z1 = z0 + 0.3 * z1  # positives are close
half = len(z0) // accelerator.num_processes
mine = slice(accelerator.process_index * half, (accelerator.process_index + 1) * half)
local = NTXentLoss(temperature=0.2, gather_distributed=True)(z0[mine], z1[mine])
gathered_mean = accelerator.reduce(local, reduction="mean")
alone = NTXentLoss(temperature=0.2)(z0[mine], z1[mine])
alone_mean = accelerator.reduce(alone, reduction="mean")
full = NTXentLoss(temperature=0.2)(z0, z1)
if accelerator.is_main_process:
    print(
        json.dumps(
            {
                "world_size": accelerator.num_processes,
                "distributed": str(accelerator.distributed_type),
                "gathered": float(gathered_mean),
                "alone": float(alone_mean),
                "full": float(full),
            }
        )
    )
