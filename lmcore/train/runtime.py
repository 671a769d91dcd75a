"""Where and how training runs: device choice, precision, seeding, RNG state, and the GPU's peak FLOP/s.

Everything random in training (dropout, data order, init) flows from the Python, NumPy and torch generators
seeded here; `rng_state`/`set_rng_state` capture and restore all of them so a resumed run draws exactly the
numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets. Matched against the
# device name in order, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    ("GH200", "GH200", 989.0),
    ("H200", "H200 SXM", 989.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),
    ("H800", "H800 SXM", 989.0),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("A800", "A800", 312.0),
    ("L40S", "L40S", 362.0),
    ("L40", "L40", 181.0),
    ("L4", "L4", 121.0),
    ("RTX 4090", "RTX 4090", 165.0),
    ("RTX 3090", "RTX 3090", 71.0),
    ("MI300X", "MI300X", 1307.0),
    ("MI250X", "MI250X", 383.0),
]


def pick_device(name: str = "auto") -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is a ConfigError."""
    import torch

    from lmcore.errors import ConfigError

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available[name]:
        raise ConfigError(f"pretrain.device: {name} is not available on this machine (use auto or cpu)")
    return name


def pick_dtype(name: str, device_type: str) -> torch.dtype:
    """`auto`: bf16 autocast on a GPU that supports it, fp32 elsewhere (CPU bf16 is slow and not bit-stable)."""
    import torch

    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def set_threads(threads: int = 0) -> None:
    """Fix the intra-op thread count; 0 keeps torch's default count.

    Set even when it stays the default: torch.set_num_threads also turns off MKL's dynamic threading, which lets a
    matrix product run on fewer threads now and then, summing in another order. Without it, CPU training at the
    default thread count came out different in about 1 process of 10.
    """
    import torch

    torch.set_num_threads(threads if threads > 0 else torch.get_num_threads())


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_deterministic(device_type: str) -> None:
    """Bit-for-bit repeatable kernels where torch offers them cheaply (CPU already is; cuDNN needs the flags)."""
    import torch

    if device_type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 is deterministic, only less precise than fp32
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, loadable with torch.load(weights_only=True)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: restore the devices both runs have
            for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)


def peak_flops(device_type: str, device_index: int = 0) -> tuple[float, str] | None:
    """(peak FLOP/s, the figure's name) of this GPU for dense bf16, or None when unknown (CPU, unlisted GPUs)."""
    if device_type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device_index)
    for needle, label, tflops in PEAK_BF16_TFLOPS:
        if needle in name:
            return tflops * 1e12, f"{label} dense bf16 {tflops:g} TFLOP/s"
    return None
