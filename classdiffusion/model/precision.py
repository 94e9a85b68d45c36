"""Mixed precision: the dtype a setting computes in, and its autocast context."""

from __future__ import annotations

import contextlib

import torch


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a mixed-precision setting computes in; frozen models are best stored in it, since
    autocast keeps a converted copy of every other-dtype weight for the backward pass."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision_dtype(mixed_precision))
