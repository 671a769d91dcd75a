"""Where a model runs to be scored or sampled: a device name and a weight dtype, resolved against this machine.

Inference casts the weights themselves (no autocast): bf16 weights halve the memory traffic that bounds decoding on a
GPU, and the model keeps its norms and losses in fp32 either way. `cpu` + fp32 is the bit-repeatable default of the
evaluate stage; `auto` takes CUDA when this machine has it, and bf16 where that GPU supports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcore.errors import ConfigError
from lmcore.options import DEVICE_PATTERN

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:N"
    dtype_name: str  # "float32" or "bfloat16"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def is_default(self) -> bool:
        """CPU in fp32: what every result of this project was computed with before a device could be chosen."""
        return self.device == "cpu" and self.dtype_name == "float32"

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def resolve(device: str = "auto", dtype: str = "auto", key: str = "device") -> Placement:
    """The device and dtype to use here. A bad or missing device is a ConfigError naming `key` (e.g.
    `evaluate.device`, `--device`), a bad dtype one naming its sibling (`evaluate.dtype`, `--dtype`)."""
    import torch

    dtype_key = key.replace("device", "dtype")
    if not re.match(DEVICE_PATTERN, device):
        raise ConfigError(f"{key}: {device!r} is not a device (auto, cpu, cuda or cuda:N)")
    if dtype not in DTYPES:
        raise ConfigError(f"{dtype_key}: {dtype!r} is not a dtype ({', '.join(DTYPES)})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {device} requested but this machine has no CUDA device (use auto or cpu)")
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {device} requested but this machine has {torch.cuda.device_count()} GPU(s)")
        device = f"cuda:{index}"
    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if cuda_bf16 else "float32"
    return Placement(device, dtype)
