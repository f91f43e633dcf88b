"""Helpers shared by the kernel modules: block sizes, output allocation, interpreter tracing."""
from __future__ import annotations

import os

import torch

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


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fast_math() -> bool:
    """Whether the noise uses the GPU's approximate log/sin/cos (see _philox.box_muller): in compiled
    kernels yes; the interpreter has no libdevice."""
    return not interpreting()


def lane_block(q: int, cap: int = 512) -> int:
    """Philox counters per program (each covers 4 pixels): a power of two covering q, at most ``cap``."""
    return max(16, min(cap, 1 << (q - 1).bit_length()))     # plain ints: triton.cdiv & co. cost microseconds


def counter_blocks(pixels: int) -> tuple[int, int, int]:
    """(counters per program, programs per plane, warps) for planes of ``pixels`` pixels: a program
    covers 4 * counters pixels of a plane; each thread takes two counters, i.e. 8 adjacent pixels
    (two 16-byte vectors of float32, one of bfloat16), and at least 2 warps run per program."""
    block = lane_block(-(-pixels // 4))
    return block, -(-pixels // (4 * block)), max(2, min(8, block // 64))


def launcher(kernel, *tensors):
    """How to launch ``kernel`` on these tensors.

    Real tensors outside any tracing mode (eager calls): the bare kernel, without the custom-op or
    higher-order-op dispatch that would cost tens of microseconds to a millisecond per call.
    Fake or functional tensors, or an active dispatch mode (torch.compile, export, make_fx):
    wrap_triton, so the tracer records the kernel. Under TRITON_INTERPRET=1 wrap_triton hands back
    the interpreted kernel, which cannot run on fake tensors: None then tells the caller to only
    allocate outputs (the op's fake implementation)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    fake = any(isinstance(t, FakeTensor) for t in tensors)
    functional = any(isinstance(t, FunctionalTensor) for t in tensors)
    if not (fake or functional or _get_current_dispatch_mode() is not None):
        return kernel
    if not interpreting():
        return torch.library.wrap_triton(kernel)
    if functional:
        raise RuntimeError("pdiff kernels under TRITON_INTERPRET=1 cannot be decomposed by torch.compile "
                           "(the kernel call would be dropped from the graph); compile inside "
                           "torch._functorch.config.patch(decompose_custom_triton_ops=False)")
    if not fake:
        raise RuntimeError("pdiff kernels under TRITON_INTERPRET=1 cannot be traced by a dispatch mode")
    return None
