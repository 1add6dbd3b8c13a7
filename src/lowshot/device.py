"""Device settings of a run: the precision Accelerate trains in and the memory layout of images and
weights (read by ``tracking.make_accelerator``, ``augment`` and the entry scripts)."""

from __future__ import annotations

import os

import torch


def mixed_precision(setting: str) -> str:
    """'auto' → bf16 on CUDA, fp32 ('no') elsewhere: bf16 autocast on CPUs without bf16 instructions
    (AVX2) ran 16-24x slower than fp32 here. An ``accelerate launch --mixed_precision`` wins over auto."""
    if setting != "auto":
        return setting
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if env != "no":
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def memory_format(setting: str, device: torch.device) -> torch.memory_format:
    """``channels_last``: NHWC on a GPU for "auto" (convolutions on tensor cores run in NHWC; NCHW
    weights cost a transpose per layer), the default layout elsewhere."""
    on = setting == "on" or (setting == "auto" and device.type == "cuda")
    return torch.channels_last if on else torch.contiguous_format
