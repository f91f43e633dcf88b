"""Helpers shared by the kernel modules: block sizes, output allocation, interpreter tracing."""
from __future__ import annotations

import os

import torch
import triton

# Tests set this to fill every kernel output with NaN before the launch, so an element the kernel
# fails to write shows up as a mismatch instead of passing with whatever memory held.
POISON_OUTPUTS = False


def empty(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and memory format (a channels_last F gets a channels_last gradient)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def lane_block(q: int, cap: int = 512) -> int:
    """Counters per program: a power of two covering Q up to ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(q)))


def should_launch(*tensors) -> bool:
    """False while tracing under TRITON_INTERPRET=1, where wrap_triton hands back the raw
    interpreted kernel and cannot run it on fake tensors: the op's fake implementation then only
    allocates its outputs. On a GPU wrap_triton handles tracing itself and this is always True."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError("pdiff kernels under TRITON_INTERPRET=1 cannot be decomposed by torch.compile "
                           "(the kernel call would be dropped from the graph); compile inside "
                           "torch._functorch.config.patch(decompose_custom_triton_ops=False)")
    return not any(isinstance(t, FakeTensor) for t in tensors)
