"""Counter-based training noise shared by the net-input and loss kernels.

The noise of element (b, c, p) of a (B, C, H, W) batch (p = row * W + col, the pixel's index in its
plane) is a pure function of (seed, images seen, shape): Philox-4x32-10 keyed by the 64-bit seed, with
the counter (j, b * C + c, seen_lo, seen_hi), the low and high words of the images seen before the
step (the training progress, which keys every random draw of a step). One Philox call yields four
uint32, which Box-Muller turns into four normals; they go to the four adjacent pixels p = 4 j + k
(k = 0..3) of the same plane. The definition does not depend on block sizes or memory layout, so the
loss kernel regenerates exactly what the net-input kernel drew and nothing is stored. (Adjacent
pixels also keep the noise in the registers of the thread that loads and stores those pixels: a
thread's four values of one call are its four contiguous elements of a block, so no value crosses
threads through shared memory.)

The torch backend cannot run Philox cheaply; with a seed it draws from a torch.Generator seeded by
(seed, images seen) instead. That stream is NOT the Philox stream (tests compare the two backends with
explicit noise); it is only consistent between build_net_input and edm_patch_loss of one step.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from ._common import counter_blocks, empty, fast_math, launcher
from ._triton import libdevice, tl, triton, triton_op

_MASK64 = (1 << 64) - 1


@triton.jit
def rng_state(seed, images_seen, images_seen_ptr, SEEN_IN_TENSOR: tl.constexpr):
    """(seed, seen_lo, seen_hi): images seen come as a scalar argument or, under torch.compile, from a
    one-element int64 tensor so that the changing value is data, not a guarded constant."""
    if SEEN_IN_TENSOR:
        seen64 = tl.load(images_seen_ptr).to(tl.int64)
    else:
        seen64 = images_seen + tl.zeros((1,), dtype=tl.int64)   # an i32 or i64 scalar, or a Python int when interpreted
    seen_lo = (seen64 & 0xFFFFFFFF).to(tl.uint32)
    seen_hi = ((seen64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return seed, seen_lo, seen_hi


@triton.jit
def box_muller(u1, u2, FAST_MATH: tl.constexpr):
    """Two N(0, 1) from two U[0, 1): r = sqrt(-2 ln u1), angle 2 pi (u2 - 1/2) in [-pi, pi) (u1 is
    clamped at 1e-7, so |n| < 5.68). FAST_MATH (compiled kernels) takes the GPU's approximate log,
    sin and cos (one MUFU instruction each; absolute error below 1e-6 on [-pi, pi]) instead of
    libdevice's exact ones, about 60 instructions per pair with slow paths in local memory: the noise
    would otherwise cost more ALU time than the memory traffic it rides on. The interpreter has no
    libdevice and uses the exact functions (values agree to ~1e-6)."""
    u1 = tl.maximum(1.0e-7, u1)
    theta = 6.283185307179586 * (u2 - 0.5)
    if FAST_MATH:
        r = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def noise4(seed, j, plane, seen_lo, seen_hi, FAST_MATH: tl.constexpr):
    """Four N(0, 1) blocks for counters j (a block) of one plane: the noise of pixels 4 j + k."""
    c0 = j.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + plane.to(tl.uint32)
    c2 = zero + seen_lo
    c3 = zero + seen_hi
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    n0, n1 = box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1), FAST_MATH)
    n2, n3 = box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3), FAST_MATH)
    return n0, n1, n2, n3


@triton.jit
def noise_block(seed, t, plane, seen_lo, seen_hi, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    """N(0, 1) noise of the pixels t * 4 BLOCK + (0 .. 4 BLOCK) of one plane, as one block: counters
    j = t * BLOCK + i give pixels 4 j + k. Joining the four outputs keeps each call's values in one
    thread, in the order the pixels lie in memory."""
    j = t * BLOCK + tl.arange(0, BLOCK)
    n0, n1, n2, n3 = noise4(seed, j, plane, seen_lo, seen_hi, FAST_MATH)
    return tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), (4 * BLOCK,))


@triton.jit(do_not_specialize=["seed", "images_seen"])
def _philox_noise_kernel(out_ptr, seed, images_seen, images_seen_ptr, S, C: tl.constexpr,
                         SEEN_IN_TENSOR: tl.constexpr, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    p = t * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    seed, seen_lo, seen_hi = rng_state(seed, images_seen, images_seen_ptr, SEEN_IN_TENSOR)
    for c in tl.static_range(C):
        plane = b * C + c
        n = noise_block(seed, t, plane, seen_lo, seen_hi, BLOCK, FAST_MATH)
        tl.store(out_ptr + plane.to(tl.int64) * S + p, n, mask=p < S)


def rng_args(seed, images_seen, device):
    """(images_seen tensor or None, seed, images_seen) for the kernels. ``seed`` is a Python int fixed
    for a run; ``images_seen`` an int, or a one-element integer tensor, which keeps torch.compile from
    recompiling as it grows (an int is a guarded constant). Ints go to the kernel as scalar arguments:
    no host-to-device copy, no synchronisation."""
    if isinstance(seed, (torch.Tensor, bool)) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be a Python int (fixed for a run), got {type(seed).__name__}; "
                        "pass the changing images_seen as a tensor instead")
    seed = operator.index(seed)                      # numpy integers too
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if isinstance(images_seen, torch.Tensor):
        if images_seen.numel() != 1 or images_seen.dtype.is_floating_point or images_seen.dtype == torch.bool:
            raise ValueError(f"images_seen tensor must hold one integer, got shape {tuple(images_seen.shape)} "
                             f"{images_seen.dtype}")
        return images_seen.reshape(1).to(device=device, dtype=torch.int64), seed, 0
    if (isinstance(images_seen, bool) or not hasattr(images_seen, "__index__")
            or not 0 <= operator.index(images_seen) < 2**63):
        raise ValueError(f"images_seen must be an int in [0, 2**63) or a one-element tensor, got {images_seen!r}")
    return None, seed, operator.index(images_seen)


@triton_op("pdiff::philox_noise", mutates_args=())
def philox_noise_op(images_seen_t: Optional[torch.Tensor], seed: int, images_seen: int, b: int, c: int, h: int,
                    w: int, device: torch.device) -> torch.Tensor:
    out = empty((b, c, h, w), torch.float32, device)
    s_total = h * w
    block, n_tiles, num_warps = counter_blocks(s_total)
    kernel = launcher(_philox_noise_kernel, out)
    if kernel is not None:
        kernel[(b, n_tiles)](
            out, seed, images_seen, images_seen_t if images_seen_t is not None else out, s_total,
            C=c, SEEN_IN_TENSOR=images_seen_t is not None, BLOCK=block, FAST_MATH=fast_math(), num_warps=num_warps)
    return out


def philox_noise(seed, images_seen, shape, device) -> torch.Tensor:
    """Materialise the in-kernel noise (float32, contiguous (B, C, H, W)) for (seed, images_seen, shape).

    The forward kernels never call this; it exists so tests (and anyone debugging) can see the
    exact noise a seeded step used, and for the rarely needed gradient with respect to sigma."""
    b, c, h, w = (int(v) for v in shape)
    images_seen_t, seed, images_seen = rng_args(seed, images_seen, device)
    return philox_noise_op(images_seen_t, seed, images_seen, b, c, h, w, torch.device(device))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def torch_backend_noise(seed: int, images_seen, shape, device) -> torch.Tensor:
    """Torch-backend noise for (seed, images_seen): a torch.Generator seeded from both (a tensor
    images_seen is read back to the host: the torch backend is the fallback, not the fast path)."""
    images_seen_t, seed, images_seen = rng_args(seed, images_seen, device)
    return _torch_backend_noise(seed, images_seen, images_seen_t, list(shape), torch.device(device))


@torch.library.custom_op("pdiff::torch_backend_noise", mutates_args=())
def _torch_backend_noise(seed: int, images_seen: int, images_seen_t: Optional[torch.Tensor], shape: list[int],
                         device: torch.device) -> torch.Tensor:
    # A custom op is opaque to torch.compile, so the Generator causes no graph break.
    if images_seen_t is not None:
        images_seen = int(images_seen_t.item())
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64(_splitmix64(seed) ^ images_seen) >> 1)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32)


@_torch_backend_noise.register_fake
def _(seed, images_seen, images_seen_t, shape, device):
    return torch.empty(shape, device=device, dtype=torch.float32)
