"""torch.compile where it pays: each transformer block, the loss and the embedding left eager.

Compiling the whole model would also trace the fused cross-entropy, which then becomes plain chunked ops with
fresh vocabulary-sized buffers and runs slower than its eager, in-place form; the blocks' norms, rotary, SwiGLU and
residual adds are memory-bound elementwise work that inductor fuses into a few passes. So each block is compiled
(one graph serves them all) and the rest stays eager. Compiling the whole body (embedding to final norm) as one
graph measured no faster and was not repeatable on two threads: inductor's embedding backward adds rows in
parallel in no fixed order. Per-block graphs are also the pattern FSDP2 expects. On CPU a compiled graph runs from
a C++ wrapper: with a Python wrapper, launching its kernels cost ~3% of a demo-sized step.

`compile: auto` compiles on CUDA and on a Linux CPU with a C++ compiler (inductor writes C++ kernels there); on
other machines it trains eagerly and says why. Evaluation always runs eagerly: it is no-grad with other batch
shapes, which would only cost recompilations.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmcore.errors import ConfigError

if TYPE_CHECKING:
    import torch


def compile_choice(setting: bool | str, device_type: str, section: str) -> tuple[bool, str]:
    """Whether to compile, and a line for the log ("" when off by request). `setting: true` where it cannot
    work is a ConfigError."""
    if setting is False:
        return False, ""
    problem = _unsupported(device_type)
    if problem is None:
        return True, "torch.compile of each transformer block (the loss stays eager)"
    if setting is True:
        raise ConfigError(f"{section}.compile: true, but {problem}: set {section}.compile to auto or false")
    return False, f"eager: {problem} (compile: auto)"


def _unsupported(device_type: str) -> str | None:
    if device_type == "mps":
        return "torch.compile is not used on MPS here"
    if device_type == "cpu":
        if not sys.platform.startswith("linux"):
            return "torch.compile on CPU is used on Linux only"
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # inductor's own check; it raises its InvalidCxxCompiler (or an OSError)
            return "torch.compile on CPU needs a C++ compiler and none was found (set CXX)"
    return None


def compile_model(
    model: torch.nn.Module, wrapped: torch.nn.Module, device_type: str, threads: int = 0
) -> tuple[torch.nn.Module, Callable[[], None]]:
    """Compile in place; returns the module to call and a function that restores the eager model.

    On CPU, `threads` > 0 fixes the thread count the kernels are written for (inductor writes it into the C++);
    0 takes the count of the thread that first runs the graph.
    """
    import torch

    from lmcore.model import Transformer

    options = None
    if device_type == "cpu":
        options = {"cpp_wrapper": True} | ({"cpp.threads": threads} if threads else {})
    body = next((m for m in model.modules() if isinstance(m, Transformer)), None)
    if body is None:  # not an lmcore transformer: compile it whole
        return torch.compile(wrapped, options=options), lambda: None
    for block in body.blocks:  # in place: the state dict (checkpoints, export) keeps its names
        block.compile(options=options)

    def restore() -> None:
        for block in body.blocks:
            block._compiled_call_impl = None  # what Module.compile set; torch offers no public way back

    return wrapped, restore


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside this block (evaluation)."""
    import torch

    return torch.compiler.set_stance("force_eager")
