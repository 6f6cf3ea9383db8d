"""Mixed precision for the native engine.

On CUDA, `bfloat16`/`float16` (and `auto`) mean mixed precision: float32 master weights
and optimizer state, forward passes under autocast. Pure bf16 weights would lose AdamW
updates at PSFT's learning rates (1e-6 relative to weights of order 1e-2 is below bf16's
resolution). On CPU the dtype is taken literally (float32 by default; bf16 is slow there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from psft.trainer.model import resolve_dtype


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device: str

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
            yield

    def describe(self) -> str:
        if self.autocast_dtype is None:
            return str(self.param_dtype).removeprefix("torch.")
        return f"{str(self.autocast_dtype).removeprefix('torch.')} autocast, float32 weights"


def resolve_precision(dtype: Any, device: str) -> Precision:
    wanted = resolve_dtype(dtype, device)
    if device.startswith("cuda") and wanted in (torch.bfloat16, torch.float16):
        return Precision(torch.float32, wanted, device)
    return Precision(wanted, None, device)
